import logging

import h5py
import numpy as np
import pandas as pd
import pytest

from paper_kd import cli
from paper_kd.data import readers
from paper_kd.data.format import JetFormatError, read_info, read_jets


def massless(px, py, pz):
    return [np.sqrt(px**2 + py**2 + pz**2), px, py, pz]


# Five jets of up to four constituents, stored in no particular pT order:
# jet 2 has no constituents (dropped), jet 3 has four (over n_max = 3).
RAW_JETS = np.zeros((5, 4, 4), np.float32)
RAW_JETS[0, :2] = [massless(10.0, 0.0, 5.0), massless(0.0, 30.0, -2.0)]
RAW_JETS[1, :3] = [massless(1.0, 1.0, 0.0), massless(-50.0, 0.0, 10.0), massless(0.0, -7.0, 1.0)]
RAW_JETS[3] = [
    massless(2.0, 0.0, 0.0),
    massless(0.0, 90.0, 3.0),
    massless(20.0, 20.0, 0.0),
    massless(-1.0, 0.0, 4.0),
]
RAW_JETS[4, :1] = [massless(100.0, 100.0, 50.0)]
RAW_LABELS = np.array([1, 0, 1, 1, 0])
# Expected canonical jets for n_max = 3: jet 2 dropped, pT-sorted, hardest three kept.
EXPECTED_P4 = np.zeros((4, 3, 4), np.float32)
EXPECTED_P4[0, :2] = RAW_JETS[0, [1, 0]]
EXPECTED_P4[1, :3] = RAW_JETS[1, [1, 2, 0]]
EXPECTED_P4[2, :3] = RAW_JETS[3, [1, 2, 0]]
EXPECTED_P4[3, :1] = RAW_JETS[4, :1]
EXPECTED_LABELS = np.array([1, 0, 1, 0])


def toptagging_frame(p4=RAW_JETS, labels=RAW_LABELS):
    columns = {}
    for i in range(p4.shape[1]):
        for k, component in enumerate(("E", "PX", "PY", "PZ")):
            columns[f"{component}_{i}"] = p4[:, i, k]
    for k, component in enumerate(("truthE", "truthPX", "truthPY", "truthPZ")):
        columns[component] = np.where(labels == 1, 600.0 + k, 0.0).astype(np.float32)
    columns["ttv"] = np.zeros(len(labels), np.int8)
    columns["is_signal_new"] = labels
    return pd.DataFrame(columns)


def check_converted(path, source):
    jets = read_jets(path)
    np.testing.assert_array_equal(jets["p4"], EXPECTED_P4)
    np.testing.assert_array_equal(jets["label"], EXPECTED_LABELS)
    np.testing.assert_array_equal(jets["n_constituents"], [2, 3, 3, 1])
    np.testing.assert_allclose(jets["jet_p4"], EXPECTED_P4.sum(axis=1), rtol=1e-6)
    provenance = read_info(path)["provenance"]
    assert provenance["source"] == source and provenance["n_max"] == 3
    assert provenance["original_jets"] == 5 and provenance["original_n_max"] == 4
    return provenance


@pytest.mark.parametrize("layout", ["table", "fixed"])
def test_toptagging_folder_converts_through_the_cli(tmp_path, layout, caplog):
    source = tmp_path / "toptagging"
    source.mkdir()
    for split in ("train", "val", "test"):
        toptagging_frame().to_hdf(source / f"{split}.h5", key="table", format=layout)
    caplog.set_level(logging.WARNING)
    argv = ["convert", "--format", "toptagging", str(source), str(tmp_path / "out")]
    assert cli.main([*argv, "--n-max", "3", "--chunk-jets", "2"]) == 0

    for split in ("train", "val", "test"):
        provenance = check_converted(tmp_path / "out" / f"{split}.h5", "toptagging")
        assert provenance["original_path"] == str(source / f"{split}.h5")
    assert "dropped 1 jets with no constituents" in caplog.text
    assert "1 jets have more than n_max = 3 constituents" in caplog.text


def test_toptagging_single_file_and_max_jets(tmp_path):
    toptagging_frame().to_hdf(tmp_path / "val.h5", key="table", format="table")
    (written,) = readers.convert_toptagging(tmp_path / "val.h5", tmp_path / "out", n_max=8)
    assert written == tmp_path / "out" / "val.h5"
    assert read_info(written)["n_max"] == 8 and read_info(written)["n_jets"] == 4
    readers.convert_toptagging(tmp_path / "val.h5", tmp_path / "two.h5", n_max=3, max_jets=2)
    np.testing.assert_array_equal(read_jets(tmp_path / "two.h5")["p4"], EXPECTED_P4[:2])


def corrupted_frame(column, row, value):
    frame = toptagging_frame()
    frame.loc[row, column] = value
    return frame


@pytest.mark.parametrize(
    "frame, message",
    [
        (corrupted_frame("PX_1", 3, np.nan), r"field 'PX_1' holds NaN .*\(row 3\)"),
        (corrupted_frame("PZ_0", 4, np.inf), r"field 'PZ_0' holds NaN or infinite"),
        (corrupted_frame("E_2", 1, -3.0), r"field 'E_2' holds a negative energy \(row 1\)"),
        (corrupted_frame("is_signal_new", 0, 2), r"field 'is_signal_new' must be 0 or 1, found 2"),
        (toptagging_frame().drop(columns="is_signal_new"), r"column 'is_signal_new' is missing"),
        (toptagging_frame().drop(columns="PY_2"), r"column 'PY_2' is missing"),
    ],
)
def test_toptagging_bad_input_names_file_and_field(tmp_path, frame, message):
    source = tmp_path / "train.h5"
    frame.to_hdf(source, key="table", format="table")
    with pytest.raises(JetFormatError, match=message) as error:
        readers.convert_toptagging(source, tmp_path / "out.h5", n_max=3, chunk_jets=2)
    assert str(source) in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out.h5").exists()


def test_missing_file_and_wrong_key_are_one_line_cli_errors(tmp_path, capsys):
    argv = ["convert", "--format", "toptagging", str(tmp_path / "nope.h5"), str(tmp_path / "o.h5")]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err.strip() == (
        f"paper-kd convert: error: {tmp_path / 'nope.h5'}: no such file or folder"
    )
    toptagging_frame().to_hdf(tmp_path / "train.h5", key="jets", format="table")
    with pytest.raises(
        JetFormatError, match=r"train.h5: key 'table' is missing \(found \['/jets'\]"
    ):
        readers.convert_toptagging(tmp_path / "train.h5", tmp_path / "o.h5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(JetFormatError, match="empty: holds none of the toptagging files"):
        readers.convert_toptagging(tmp_path / "empty", tmp_path / "out")


def write_lorentznet(path, p4=RAW_JETS, labels=RAW_LABELS, keys=None):
    mask = np.any(p4 != 0, axis=-1)
    contents = {
        "Nobj": mask.sum(axis=1),
        "Pmu": p4.astype(np.float64),
        "is_signal": labels,
        "label": mask,
        "truth_Pmu": np.zeros((len(labels), 4)),
        "jet_pt": np.zeros(len(labels)),
    }
    with h5py.File(path, "w") as handle:
        for key in keys or contents:
            handle[key] = contents[key]


def test_lorentznet_folder_maps_valid_to_val_and_uses_the_mask(tmp_path):
    source = tmp_path / "lorentznet"
    source.mkdir()
    for name in ("train.h5", "valid.h5", "test.h5"):
        write_lorentznet(source / name)
    # A momentum behind a zero in the constituent mask is padding, not a particle.
    with h5py.File(source / "test.h5", "r+") as handle:
        pmu = handle["Pmu"][...]
        pmu[0, 3] = massless(500.0, 0.0, 0.0)
        handle["Pmu"][...] = pmu
    written = readers.convert("lorentznet", source, tmp_path / "out", n_max=3)
    assert [p.name for p in written] == ["train.h5", "val.h5", "test.h5"]
    for path in written:
        check_converted(path, "lorentznet")


def test_lorentznet_bad_input(tmp_path):
    write_lorentznet(tmp_path / "train.h5", keys=["Nobj", "Pmu", "label"])
    with pytest.raises(JetFormatError, match=r"train.h5: key 'is_signal' is missing"):
        readers.convert_lorentznet(tmp_path / "train.h5", tmp_path / "o.h5")
    labels = RAW_LABELS.copy()
    labels[4] = -1
    write_lorentznet(tmp_path / "test.h5", labels=labels)
    with pytest.raises(JetFormatError, match=r"field 'is_signal' must be 0 or 1, found -1 \(row 4"):
        readers.convert_lorentznet(tmp_path / "test.h5", tmp_path / "o.h5", chunk_jets=3)
    p4 = RAW_JETS.copy()
    p4[1, 0, 2] = np.nan
    write_lorentznet(tmp_path / "valid.h5", p4=p4)
    with pytest.raises(JetFormatError, match=r"valid.h5: field 'Pmu' holds NaN"):
        readers.convert_lorentznet(tmp_path / "valid.h5", tmp_path / "o.h5")


def qg_rows(rng, n_jets, n_particles=6, empty=3):
    """(pt, y, phi, pid) rows padded with zeros, as energyflow stores them."""
    rows = np.zeros((n_jets, n_particles, 4))
    multiplicity = rng.integers(1, n_particles + 1, n_jets)
    if empty is not None:
        multiplicity[empty] = 0
    pids = np.array([211, -211, 22, 130, 2212, -11, 321])
    for jet, n in enumerate(multiplicity):
        rows[jet, :n, 0] = np.sort(rng.exponential(20.0, n))[::-1]
        rows[jet, :n, 1] = rng.normal(0.0, 0.3, n)
        rows[jet, :n, 2] = rng.normal(1.0, 0.3, n)
        rows[jet, :n, 3] = rng.choice(pids, n)
    return rows, (rng.random(n_jets) < 0.5).astype(float)


def test_qg_cache_layout_converts_with_split(tmp_path, caplog):
    import energyflow

    rng = np.random.default_rng(0)
    first, second = qg_rows(rng, 30), qg_rows(rng, 20, n_particles=4, empty=None)
    cache = tmp_path / "ef"
    (cache / "datasets").mkdir(parents=True)
    np.savez_compressed(cache / "datasets" / "QG_jets.npz", X=first[0], y=first[1])
    np.savez_compressed(cache / "datasets" / "QG_jets_1.npz", X=second[0], y=second[1])

    caplog.set_level(logging.WARNING)
    written = readers.convert_qg(cache, tmp_path / "qg", n_max=5, chunk_jets=7)
    assert [p.name for p in written] == ["train.h5", "val.h5", "test.h5"]
    assert "dropped 1 jets with no constituents" in caplog.text

    rows = np.concatenate([first[0], np.pad(second[0], ((0, 0), (0, 2), (0, 0)))])
    labels = np.concatenate([first[1], second[1]])
    expected = energyflow.p4s_from_ptyphipids(rows, error_on_unknown=True)
    expected[rows[..., 0] == 0] = 0
    kept = np.ones(50, bool)
    kept[3] = False
    sizes = [len(read_jets(p, fields=("label",))["label"]) for p in written]
    assert sizes == [39, 5, 5]  # rows [0, 40) minus the empty jet, [40, 45), [45, 50)
    p4 = np.concatenate([read_jets(p)["p4"] for p in written])
    np.testing.assert_allclose(p4, expected[kept, :5].astype(np.float32), rtol=1e-6)
    label = np.concatenate([read_jets(p)["label"] for p in written])
    np.testing.assert_array_equal(label, labels[kept])
    provenance = read_info(written[1])["provenance"]
    assert provenance["source"] == "qg" and provenance["signal"] == "quark"
    assert provenance["files"] == ["QG_jets.npz", "QG_jets_1.npz"]
    assert provenance["split_rows"] == [40, 45]

    readers.convert_qg(cache / "datasets" / "QG_jets_1.npz", tmp_path / "one", max_jets=10)
    assert read_info(tmp_path / "one" / "train.h5")["n_jets"] == 8


def test_qg_missing_cache_says_how_to_fetch(tmp_path, capsys):
    (tmp_path / "datasets").mkdir()
    assert cli.main(["convert", "--format", "qg", str(tmp_path), str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "holds no QG_jets.npz; fetch the files with" in error
    argv = ["convert", "--format", "toptagging", "--download", str(tmp_path), "out"]
    assert cli.main(argv) == 1
    assert "--download only applies to --format qg" in capsys.readouterr().err
    np.savez(tmp_path / "datasets" / "QG_jets.npz", X=np.zeros((2, 3, 4)))
    with pytest.raises(JetFormatError, match=r"QG_jets.npz: key 'y' is missing"):
        readers.convert_qg(tmp_path, tmp_path / "out")
    rows, labels = qg_rows(np.random.default_rng(1), 10)
    rows[5, 0, 0] = np.inf
    np.savez(tmp_path / "datasets" / "QG_jets.npz", X=rows, y=labels)
    with pytest.raises(JetFormatError, match=r"field 'X' holds NaN or infinite momenta \(row 5\)"):
        readers.convert_qg(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out" / "train.h5").exists()
