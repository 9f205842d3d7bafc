import json

import h5py
import numpy as np
import pytest

from paper_kd import cli, physics
from paper_kd.data import generate
from paper_kd.data.format import SPLITS, read_info, read_jets, split_path

# Tiny datasets for the bookkeeping tests: 8 shards of 2 to 4 jets each.
SMALL = {"train": 16, "val": 8, "test": 8}
# A pT-hat cut near the window makes them fast; the recipe is otherwise the default one.
SMALL_OPTIONS = {"seed": 3, "n_max": 60, "shard_jets": 4, "progress": False, "pt_hat_min": 450.0}


def read_all(data_dir):
    out = {}
    for split in SPLITS:
        path = split_path(data_dir, split)
        out[split] = read_jets(path)
        out[split]["provenance"] = read_info(path)["provenance"]
    return out


def assert_same_dataset(a, b):
    for split in SPLITS:
        for name in ("p4", "n_constituents", "label", "jet_p4"):
            np.testing.assert_array_equal(a[split][name], b[split][name], err_msg=f"{split}/{name}")
        assert a[split]["provenance"] == b[split]["provenance"]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """The reference run: all shards at once, two processes."""
    out_dir = tmp_path_factory.mktemp("small")
    generate.generate_dataset(out_dir, SMALL, workers=2, **SMALL_OPTIONS)
    return read_all(out_dir)


def test_generated_jets_are_top_and_qcd_jets(pythia_jets_dir):
    jets = read_jets(split_path(pythia_jets_dir, "train"))
    p4, label, jet_p4 = jets["p4"], jets["label"], jets["jet_p4"]
    top, qcd = label == 1, label == 0
    assert top.sum() == qcd.sum() == len(label) // 2

    jet_pt = physics.pt(jet_p4)
    assert np.all((jet_pt > 550) & (jet_pt < 650)), jet_pt[(jet_pt <= 550) | (jet_pt >= 650)]
    assert np.all(np.abs(physics.eta(jet_p4)) < 2.0)

    # The top-jet mass peaks near the top mass, the QCD mass far below it.
    jet_mass = physics.mass(p4.sum(axis=1))
    edges = np.arange(0.0, 301.0, 25.0)
    top_peak = edges[np.argmax(np.histogram(jet_mass[top], edges)[0])] + 12.5
    qcd_peak = edges[np.argmax(np.histogram(jet_mass[qcd], edges)[0])] + 12.5
    assert 150 < top_peak < 200, top_peak
    assert not 150 < qcd_peak < 200 and qcd_peak < 120, qcd_peak
    assert np.mean((jet_mass[top] > 140) & (jet_mass[top] < 210)) > 0.6
    assert np.mean((jet_mass[qcd] > 140) & (jet_mass[qcd] < 210)) < 0.25

    # Constituents: massless, above threshold, pT-sorted, padding only at the end.
    n = jets["n_constituents"]
    real = np.arange(p4.shape[1])[None, :] < n[:, None]
    assert n.min() >= 1 and np.median(n) > 30 and np.all(p4[~real] == 0)
    energy, momentum = p4[real][:, 0], np.linalg.norm(p4[real][:, 1:], axis=-1)
    np.testing.assert_allclose(energy, momentum, rtol=1e-5)
    constituent_pt = physics.pt(p4)
    assert np.all(constituent_pt[real] > 0.5)
    assert np.all(np.diff(np.where(real, constituent_pt, 0.0), axis=1) <= 0)
    # Top jets carry more constituents than QCD jets of the same pT.
    assert n[top].mean() > n[qcd].mean()
    # Nothing was cut by n_max here, so the constituents add up to the clustered jet.
    np.testing.assert_allclose(p4.sum(axis=1), jet_p4, rtol=1e-4, atol=0.05)


def test_generated_files_record_their_provenance(pythia_jets_dir):
    provenance = read_info(split_path(pythia_jets_dir, "val"))["provenance"]
    assert provenance["source"] == "pythia8"
    assert provenance["split"] == "val" and provenance["n_top"] == provenance["n_qcd"] == 50
    assert provenance["generator"]["pt_hat_min"] == {"top": 450.0, "qcd": 450.0}
    assert provenance["generator"]["jet_radius"] == 0.8
    assert "HardQCD:all = on" in provenance["generator"]["processes"]["qcd"]
    assert provenance["pythia8mc"] == "8.317.0" and provenance["fastjet"].startswith("3.")
    seeds = [shard["seed"] for shard in provenance["shards"]]
    assert len(seeds) == len(set(seeds)) >= 2
    assert not (pythia_jets_dir / "shards").exists()


def test_plan_is_balanced_and_seeded_per_shard():
    shards = generate.plan_shards({"train": 11, "val": 4}, seed=1, shard_jets=3)
    train = [s for s in shards if s.split == "train"]
    assert sum(s.n_jets for s in train if s.process == "top") == 5
    assert sum(s.n_jets for s in train if s.process == "qcd") == 6
    assert [s.n_jets for s in train] == [3, 2, 3, 3]
    assert [s.index for s in shards] == list(range(len(shards)))
    assert len({s.seed for s in shards}) == len(shards)
    assert all(1 <= s.seed <= 900_000_000 for s in shards)
    assert generate.plan_shards({"train": 11, "val": 4}, seed=1, shard_jets=3) == shards
    assert generate.plan_shards({"train": 11, "val": 4}, seed=2, shard_jets=3)[0].seed != (
        shards[0].seed
    )
    with pytest.raises(ValueError, match="splits must be among"):
        generate.plan_shards({"training": 10})


def test_shards_as_batch_jobs_then_merge_equal_one_run(small_dataset, tmp_path):
    args = ["generate", str(tmp_path), "--train", "16", "--val", "8", "--test", "8"]
    args += ["--seed", "3", "--n-max", "60", "--shard-jets", "4", "--pt-hat-min", "450"]
    args += ["--no-progress"]
    for index in range(3):
        assert cli.main([*args, "--shard", f"{index}/3", "--workers", "1"]) == 0
    assert not split_path(tmp_path, "train").exists()
    assert len(list((tmp_path / "shards").glob("*.h5"))) == 8
    assert cli.main([*args, "--merge"]) == 0

    assert_same_dataset(read_all(tmp_path), small_dataset)
    assert not (tmp_path / "shards").exists()


def test_interrupted_run_resumes_from_finished_shards(small_dataset, tmp_path):
    shards = generate.plan_shards(SMALL, SMALL_OPTIONS["seed"], SMALL_OPTIONS["shard_jets"])
    recipe = generate._recipe(SMALL_OPTIONS["n_max"], 0.5, SMALL_OPTIONS["pt_hat_min"])
    shard_dir = tmp_path / "shards"
    finished = generate.generate_shard(shards[0], shard_dir, recipe)
    finished_time = finished.stat().st_mtime_ns

    def interrupt(n_jets):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate.generate_shard(shards[1], shard_dir, recipe, report=interrupt)
    assert not (shard_dir / shards[1].name).exists()
    # A shard that a crash left half-written under its final name is made again.
    with h5py.File(shard_dir / shards[2].name, "w") as handle:
        handle.attrs["format"] = "paper-kd-jets"
        handle.attrs["complete"] = False

    generate.generate_dataset(tmp_path, SMALL, workers=1, keep_shards=True, **SMALL_OPTIONS)
    assert finished.stat().st_mtime_ns == finished_time
    assert read_info(shard_dir / shards[2].name)["n_jets"] == shards[2].n_jets
    assert_same_dataset(read_all(tmp_path), small_dataset)

    # A split recorded with the events per block (a speed setting, files made
    # before it left the recipe) is still finished: nothing is made again.
    path = split_path(tmp_path, "val")
    with h5py.File(path, "a") as handle:
        provenance = json.loads(handle.attrs["provenance"])
        provenance["generator"]["batch_events"] = 32
        handle.attrs["provenance"] = json.dumps(provenance)
    written = path.stat().st_mtime_ns
    generate.generate_dataset(tmp_path, SMALL, workers=1, keep_shards=True, **SMALL_OPTIONS)
    assert path.stat().st_mtime_ns == written

    # Asking for another seed in the same folder is refused, not mixed in.
    with pytest.raises(ValueError, match="provenance differs"):
        generate.generate_dataset(tmp_path, SMALL, **{**SMALL_OPTIONS, "seed": 4})


def test_small_dataset_is_balanced_and_truncated_to_n_max(small_dataset):
    for split, size in SMALL.items():
        jets = small_dataset[split]
        assert len(jets["label"]) == size and jets["label"].sum() == size // 2
        assert jets["p4"].shape[1:] == (60, 4) and jets["n_constituents"].max() <= 60
    # Merging shuffles: labels are not sorted by class.
    assert len(np.unique(small_dataset["train"]["label"][:8])) == 2


def test_bad_shard_argument_is_one_line_error(tmp_path, capsys):
    assert cli.main(["generate", str(tmp_path), "--train", "4", "--shard", "3/3"]) == 1
    assert "shard must be i/N with 0 <= i < N, got 3/3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["generate", str(tmp_path), "--shard", "x"])
    assert "expected i/N" in capsys.readouterr().err


def test_merge_without_shards_names_the_missing_shard(tmp_path, capsys):
    assert cli.main(["generate", str(tmp_path), "--train", "4", "--merge"]) == 1
    assert "shard(s) of split 'train' not finished, e.g. train-top-0000.h5" in (
        capsys.readouterr().err
    )


def test_rates_are_measured_on_real_events():
    n_events = generate.BATCH_EVENTS  # one block
    rates = generate.pipeline_rate("qcd", n_events, seed=5)
    assert rates["n_events"] == n_events and rates["events_per_s"] > 0
    assert rates["jets_per_s"] == pytest.approx(rates["n_jets"] / n_events * rates["events_per_s"])
    # CPU time never exceeds wall time in one single-threaded process.
    assert rates["events_per_cpu_s"] >= 0.9 * rates["events_per_s"]
    assert generate.raw_event_rate("qcd", 8, seed=5, cpu_time=True) > 0
    json.dumps(rates)


def test_jets_do_not_depend_on_events_per_block():
    # A shard takes its first jets in event order, so the block size (a speed
    # setting) must not change the data.
    jets = []
    for batch_events in (7, 64):
        source = generate.JetGenerator("qcd", seed=11, pt_hat_min=450.0, batch_events=batch_events)
        blocks = list(source.jets(12))
        jets.append({name: np.concatenate([b[name] for b in blocks]) for name in ("p4", "jet_p4")})
    assert len(jets[0]["p4"]) == 12
    for name in ("p4", "jet_p4"):
        np.testing.assert_array_equal(jets[0][name], jets[1][name])
