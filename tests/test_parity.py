"""``paper-kd parity`` on the published-model fixtures, and its bound checks."""

import os
from pathlib import Path

import numpy as np
import pytest

from paper_kd import cli
from paper_kd.models.parity import compare_logits, fixture_models, run_parity

SHARED = Path(os.environ.get("PAPER_KD_SHARED", Path(__file__).resolve().parents[2] / "shared"))
PUBLISHED = SHARED / "fixtures" / "published"
DEEPSET = PUBLISHED / "deepset_kd4jets.npz"
LORENTZNET = PUBLISHED / "lorentznet_top.npz"


def require(path):
    if not path.exists():
        pytest.skip(f"published-model fixture {path} absent (needs the shared fixtures folder)")
    return path


def test_compare_logits_statistics():
    reference = np.array([[1.0, -1.0], [0.0, 2.0], [3.0, 0.0], [-1.0, 1.0]])
    logits = reference + np.array([[0.2, 0.0], [0.0, 0.0], [0.0, 4.0], [0.0, 0.0]])
    result = compare_logits(logits, reference)
    assert result["max"] == pytest.approx(4.0)
    assert result["median"] == pytest.approx(0.05)
    assert result["agreement"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="shape"):
        compare_logits(logits[:2], reference)


@pytest.mark.parametrize("model", ["deepset", "deepsetkd"])
def test_deepset_matches_published_logits(model):
    result = run_parity(require(DEEPSET), model)
    assert result["n_jets"] == 512
    assert result["max"] <= 1e-3
    assert result["agreement"] == 1.0
    assert result["passed"]


def test_parity_command_on_deepset_fixture(capsys):
    path = require(DEEPSET)
    assert fixture_models(path) == ["deepset", "deepsetkd"]
    assert cli.main(["parity", str(path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["deepset", "deepsetkd"]
    assert all("max <= 0.001: ok" in line for line in lines)


def test_parity_command_fails_when_a_bound_is_broken(tmp_path, capsys):
    with np.load(require(DEEPSET)) as archive:
        fields = {key: archive[key] for key in archive.files}
    fields["deepset/logits"] = fields["deepset/logits"].copy()
    fields["deepset/logits"][7, 1] += 0.5
    broken = tmp_path / "broken.npz"
    np.savez(broken, **fields)

    assert cli.main(["parity", str(broken), "--model", "deepset"]) == 1
    out = capsys.readouterr().out
    assert "max <= 0.001: BROKEN" in out and "parity bound broken" in out


def test_max_jets_checks_the_leading_jets():
    result = run_parity(require(DEEPSET), "deepsetkd", max_jets=100)
    assert result["n_jets"] == 100 and result["passed"]
    with pytest.raises(ValueError, match="max-jets must be >= 1"):
        run_parity(DEEPSET, "deepset", max_jets=0)


def test_parity_command_names_a_missing_field(tmp_path, capsys):
    with np.load(require(DEEPSET)) as archive:
        fields = {key: archive[key] for key in archive.files if key != "batch_size"}
    broken = tmp_path / "no_batch_size.npz"
    np.savez(broken, **fields)
    assert cli.main(["parity", str(broken), "--model", "deepset"]) == 1
    assert "no field 'batch_size'" in capsys.readouterr().err


@pytest.mark.slow
def test_lorentznet_matches_published_logits(capsys):
    path = require(LORENTZNET)
    pytest.importorskip("paper_kd.models.lorentznet", reason="LorentzNet model not built yet")
    assert fixture_models(path) == ["lorentznet"]
    # The leading 16 jets, padded as in their reference batch: all 512 take many minutes
    # on two CPU cores (`paper-kd parity` checks them all).
    result = run_parity(path, "lorentznet", max_jets=16)
    assert result["n_jets"] == 16
    assert result["median"] <= 1e-4
    assert result["p99"] <= 2e-3
    assert result["max"] <= 1e-2
    assert result["agreement"] >= 0.995
