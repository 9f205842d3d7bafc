"""Profiles, data checks, aggregation over seeds and the Table 1 formats."""

import csv
import io

import numpy as np
import pytest
import yaml

from paper_kd import experiment
from paper_kd.data.format import JetFormatError, write_jets


@pytest.mark.parametrize("name", experiment.PROFILES)
def test_shipped_profiles_load_with_every_row(name):
    profile = experiment.load_profile(name)
    assert list(profile["models"]) == list(experiment.ROWS)
    assert profile["models"]["deepset_kd"]["use_teacher"] is True
    assert profile["models"]["mlp_kd"]["use_teacher"] is True
    assert profile["models"]["deepset"]["use_teacher"] is False
    assert profile["models"]["deepset_aug"]["training"]["augment_beta"] == 0.5
    # Distilled and scratch students differ only in the distillation section.
    for student in ("deepset", "mlp"):
        scratch, distilled = profile["models"][student], profile["models"][f"{student}_kd"]
        assert scratch["model"] == distilled["model"]
        assert scratch.get("training") == distilled.get("training")


def test_cpu_profile_trains_every_student_with_three_seeds():
    assert len(experiment.load_profile("cpu")["seeds"]) >= 3


def test_paper_profile_uses_the_published_hyperparameters():
    models = experiment.load_profile("paper")["models"]
    assert models["teacher"]["model"]["hparams"] == {
        "n_hidden": 72, "n_layers": 6, "n_scalar": 2, "c_weight": 0.005, "dropout": 0.2
    }  # fmt: skip
    assert models["deepset"]["model"]["hparams"]["width"] == 128
    assert models["mlp"]["model"]["hparams"]["width"] == 512
    assert models["mlp_kd"]["distillation"]["weight"] == 0.7
    assert models["deepset_kd"]["distillation"]["weight"] == 1.0


def _write_profile(tmp_path, change):
    profile = yaml.safe_load((experiment.PROFILE_DIR / "smoke.yaml").read_text())
    change(profile)
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p.update(colour="red"), "unknown key 'colour'"),
        (lambda p: p["models"].pop("mlp_kd"), "missing row 'mlp_kd'"),
        (lambda p: p["models"].update(bert={"model": {"name": "x"}}), "models: unknown key"),
        (lambda p: p["data"]["n_jets"].pop("val"), "data.n_jets"),
        (lambda p: p.update(seeds=[]), "seeds"),
        (lambda p: p["models"]["deepset_kd"].update(extends="nothing"), "no model 'nothing'"),
    ],
)
def test_bad_profiles_fail_in_one_line(tmp_path, change, message):
    path = _write_profile(tmp_path, change)
    with pytest.raises(experiment.ProfileError, match=message) as error:
        experiment.load_profile(path)
    assert "\n" not in str(error.value)


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(experiment.ProfileError, match=r"unknown profile 'huge'.*smoke"):
        experiment.load_profile("huge")


def test_extends_merges_deeply():
    profile = experiment.load_profile("smoke")
    augmented = profile["models"]["deepset_aug"]
    assert augmented["model"] == profile["models"]["deepset"]["model"]
    assert augmented["training"]["augment_beta"] == 0.5


def test_check_dataset_names_missing_and_wrong_files(tmp_path):
    with pytest.raises(JetFormatError, match="no such dataset folder"):
        experiment.check_dataset(tmp_path / "absent")
    (tmp_path / "train.h5").write_text("not hdf5")
    with pytest.raises(JetFormatError, match="train.h5: not an HDF5 file"):
        experiment.check_dataset(tmp_path)


def _dataset(folder, seed=0, n=40):
    rng = np.random.default_rng(seed)
    for split in ("train", "val", "test"):
        p4 = np.zeros((n, 6, 4), np.float32)
        p3 = rng.normal(size=(n, 3, 3)).astype(np.float32) * 50
        p4[:, :3, 1:] = p3
        p4[:, :3, 0] = np.linalg.norm(p3, axis=-1)
        write_jets(folder / f"{split}.h5", p4, rng.integers(0, 2, n),
                   provenance={"source": "test"})  # fmt: skip
    return folder


def test_data_fingerprint_follows_content_not_location(tmp_path):
    a = _dataset(tmp_path / "a", seed=0)
    b = _dataset(tmp_path / "b", seed=0)
    c = _dataset(tmp_path / "c", seed=1)
    assert experiment.data_fingerprint(a) == experiment.data_fingerprint(b)
    assert experiment.data_fingerprint(a) != experiment.data_fingerprint(c)


def test_aggregate_several_seeds_mean_and_std():
    stat = experiment.aggregate([0.90, 0.92, 0.94], [0.01, 0.01, 0.01], [False] * 3)
    assert stat["mean"] == pytest.approx(0.92)
    assert stat["error"] == pytest.approx(0.02)
    assert stat["n"] == 3 and not stat["lower_bound"]


def test_aggregate_one_seed_keeps_bootstrap_error_and_lower_bound():
    stat = experiment.aggregate([400.0], [None], [True])
    assert stat == {"mean": 400.0, "error": None, "lower_bound": True, "n": 1}
    stat = experiment.aggregate([0.9], [0.004], [False])
    assert stat["error"] == 0.004


def test_format_value_precision_and_bounds():
    assert experiment.format_value({"mean": 0.91234, "error": 0.0031, "lower_bound": False}) == (
        "0.912 ± 0.003"
    )
    assert (
        experiment.format_value({"mean": 812.0, "error": None, "lower_bound": True}, "rejection")
        == "> 812"
    )
    assert (
        experiment.format_value({"mean": 45.26, "error": 3.2, "lower_bound": False}, "rejection")
        == "45 ± 3"
    )
    assert "inf" not in experiment.format_value(
        {"mean": 812.0, "error": 5.0, "lower_bound": True}, "rejection", latex=True
    )


def _results():
    def stat(mean, error=0.01, lower_bound=False):
        return {"mean": mean, "error": error, "lower_bound": lower_bound, "n": 3}

    rows = []
    for i, (row, label) in enumerate(experiment.ROWS.items()):
        rows.append({
            "row": row, "label": label, "parameters": 1000 * (i + 1), "macs_per_jet": 12345,
            "accuracy": stat(0.9 + i / 100), "auc": stat(0.95 + i / 200),
            "rejection_50": stat(50.0 + i, 2.0), "rejection_30": stat(800.0, None, True),
            "invariance": stat(0.7 + i / 50),
        })  # fmt: skip
    return {
        "profile": "smoke", "seeds": [0, 1, 2], "betas": [0.0, 0.95], "direction": "x",
        "size_constituents": 57, "teacher_source": "trained here", "date": "today",
        "git_commit": "abcdef1234567890",
        "data": {"description": "2,000 generated jets", "n_jets": {"test": 600}}, "rows": rows,
    }  # fmt: skip


def test_format_table_markdown_csv_latex_agree():
    markdown, table_csv, latex = experiment.format_table(_results())
    lines = markdown.strip().splitlines()
    assert lines[0].startswith("| Model | Parameters | MACs/jet | Accuracy | AUC")
    assert len([line for line in lines if line.startswith("| ")]) == 1 + len(experiment.ROWS)
    assert "| Deep Set + KD | 3,000 | 12,345 | 0.920 ± 0.010 |" in markdown
    assert "> 800" in markdown and "inf" not in markdown
    assert "profile 'smoke'" in markdown and "2,000 generated jets" in markdown

    rows = list(csv.DictReader(io.StringIO(table_csv)))
    assert [row["model"] for row in rows] == list(experiment.ROWS.values())
    assert float(rows[2]["accuracy"]) == pytest.approx(0.92)
    assert rows[0]["rejection_30_lower_bound"] == "1"

    assert latex.count(r"\\") == 1 + len(experiment.ROWS)
    assert r"$> 800$" in latex and r"\caption{" in latex


def test_claims_state_measured_differences():
    text = experiment.claims(_results())
    # Deep Set + KD (row 2) vs Deep Set (row 1): AUC 0.96 vs 0.955, errors 0.01 each.
    assert "Deep Set + KD vs Deep Set: AUC higher by 0.0050 ± 0.0141 (0.4 σ)" in text
    assert "MLP + KD vs MLP: invariance score higher by 0.0200" in text


def test_output_dir_defaults_keep_the_committed_cpu_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    seen = {}

    def body(exp, args):
        seen[exp.profile["name"]] = args.output_dir
        return 0

    for profile in ("smoke", "cpu"):
        argv = ["--profile", profile, "--cache-dir", str(tmp_path / "data")]
        assert experiment.run_script("table1", "test", body, argv=argv) == 0
    assert seen["cpu"] == experiment.REPO_ROOT / "figures"
    assert seen["smoke"] == experiment.REPO_ROOT / "figures" / "smoke"
    explicit = tmp_path / "out"
    argv = ["--profile", "smoke", "--output-dir", str(explicit)]
    assert experiment.run_script("table1", "test", body, argv=argv) == 0
    assert seen["smoke"] == explicit


def test_generated_data_cache_key_holds_the_default_pt_hat_cut(monkeypatch):
    from paper_kd.data import generate

    profile = {"data": {"n_jets": {"train": 8, "val": 4, "test": 4}, "generate": {"seed": 1}}}
    settings = experiment.generation_settings(profile)
    assert settings["generate"]["pt_hat_min"] == {"top": 350.0, "qcd": 275.0}
    assert profile["data"]["generate"] == {"seed": 1}  # the profile itself is not changed
    # A new default gives new settings, hence a new cache folder: no stale jets.
    monkeypatch.setattr(generate, "PT_HAT_MIN", {"top": 350.0, "qcd": 300.0})
    assert experiment.generation_settings(profile) != settings
    explicit = {"data": {**profile["data"], "generate": {"seed": 1, "pt_hat_min": 400.0}}}
    assert experiment.generation_settings(explicit)["generate"]["pt_hat_min"] == 400.0
