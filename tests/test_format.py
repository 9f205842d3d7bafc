import h5py
import numpy as np
import pytest

from paper_kd.data import format as jetformat


def small_jets(rng, n_jets=20, n_max=10):
    momentum = rng.normal(0, 20, size=(n_jets, n_max, 3)).astype(np.float32)
    p4 = np.concatenate([np.linalg.norm(momentum, axis=-1, keepdims=True), momentum], axis=-1)
    n = rng.integers(1, n_max + 1, size=n_jets)
    p4[np.arange(n_max)[None, :] >= n[:, None]] = 0.0
    return p4, rng.integers(0, 2, size=n_jets).astype(np.int8), n


def test_round_trip_with_provenance_and_slices(tmp_path):
    p4, label, n = small_jets(np.random.default_rng(0))
    path = jetformat.write_jets(tmp_path / "train.h5", p4, label, provenance={"source": "unit"})
    info = jetformat.read_info(path)
    assert info["n_jets"] == 20 and info["n_max"] == 10
    assert info["provenance"]["source"] == "unit" and "paper_kd_version" in info["provenance"]
    jets = jetformat.read_jets(path, 5, 12, n_max=4)
    np.testing.assert_array_equal(jets["p4"], p4[5:12, :4])
    np.testing.assert_array_equal(jets["n_constituents"], np.minimum(n[5:12], 4))
    np.testing.assert_allclose(jets["jet_p4"], p4[5:12].sum(axis=1), rtol=1e-5)


def test_writer_buffers_small_blocks_across_chunk_boundaries(tmp_path):
    # Blocks of 7 jets: the writer holds them until a chunk is full, so the
    # file must still hold every jet, in order, after the last partial chunk.
    rng = np.random.default_rng(5)
    blocks = [small_jets(rng, n_jets=7) for _ in range(jetformat.CHUNK_JETS // 7 + 3)]
    with jetformat.JetWriter(tmp_path / "train.h5", n_max=10) as writer:
        for p4, label, _ in blocks:
            writer.append(p4, label)
    expected = np.concatenate([p4 for p4, _, _ in blocks])
    assert writer.n_jets == len(expected) > jetformat.CHUNK_JETS
    jets = jetformat.read_jets(tmp_path / "train.h5")
    np.testing.assert_array_equal(jets["p4"], expected)
    np.testing.assert_array_equal(jets["label"], np.concatenate([lab for _, lab, _ in blocks]))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda p4, label: p4.__setitem__((0, 0, 1), np.nan), "NaN"),
        (lambda p4, label: p4.__setitem__((1, 0, 0), -1.0), "negative energies"),
        (lambda p4, label: label.__setitem__(2, 3), "'label' must be 0 or 1"),
    ],
)
def test_bad_jets_are_rejected_and_existing_file_kept(tmp_path, corrupt, message):
    p4, label, _ = small_jets(np.random.default_rng(1))
    path = jetformat.write_jets(tmp_path / "train.h5", p4, label)
    before = path.read_bytes()
    corrupt(p4, label)
    with pytest.raises(jetformat.JetFormatError, match=message) as error:
        jetformat.write_jets(path, p4, label)
    assert str(path) in str(error.value)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_interrupted_write_never_reads_as_complete(tmp_path):
    path = tmp_path / "val.h5"
    writer = jetformat.JetWriter(path, n_max=10)
    writer.append(*small_jets(np.random.default_rng(2))[:2])
    # Simulate a crash: the temporary file exists, the final one does not.
    writer._file.flush()
    with pytest.raises(jetformat.JetFormatError, match="no such file"):
        jetformat.read_info(path)
    writer._file.close()
    writer._tmp.rename(path)
    with pytest.raises(jetformat.JetFormatError, match="'complete' is not set"):
        jetformat.read_jets(path)


def test_foreign_hdf5_file_is_named(tmp_path):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as handle:
        handle["table"] = np.zeros(3)
    with pytest.raises(jetformat.JetFormatError, match="foreign.h5: attribute 'format'"):
        jetformat.read_jets(path)
