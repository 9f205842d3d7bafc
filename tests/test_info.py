import json

import numpy as np
import pytest

from paper_kd import cli
from paper_kd.data import info
from paper_kd.data.format import JetWriter, split_path


def massless_pair(mass, pt=600.0):
    """Two massless constituents back to back in the jet frame, with jet mass ``mass``."""
    half = mass / 2.0
    energy = np.hypot(pt / 2.0, half)
    return np.array([[energy, pt / 2.0, half, 0.0], [energy, pt / 2.0, -half, 0.0]], np.float32)


@pytest.fixture
def known_file(tmp_path):
    """Three top jets of mass 175 GeV (two constituents) and one QCD jet of 50 GeV (four)."""
    p4 = np.zeros((4, 6, 4), np.float32)
    for k in range(3):
        p4[k, :2] = massless_pair(175.0)
    p4[3, :2] = massless_pair(30.0, pt=300.0)
    p4[3, 2:4] = massless_pair(30.0, pt=300.0)
    p4[3, 2:4, 2] *= -1.0  # turn the second pair so the jet mass is not simply 2 * 30 GeV
    path = tmp_path / "known.h5"
    with JetWriter(path, 6, {"source": "unit", "generator": "hand-made"}) as writer:
        writer.append(p4, np.array([1, 1, 1, 0], np.int8))
    return path


def test_summary_counts_and_histograms_have_the_right_values(known_file):
    summary = info.summarize(known_file)
    assert summary["n_jets"] == 4 and summary["source"] == "unit"
    assert summary["counts"] == {"top": 3, "qcd": 1} and summary["top_fraction"] == 0.75

    mass = summary["mass"]
    top_bin = int(np.digitize(175.0, mass["edges"])) - 1
    assert mass["top"][top_bin] == 3 and sum(mass["top"]) == 3
    assert mass["mean"]["top"] == pytest.approx(175.0, rel=1e-4)
    assert mass["qcd"][top_bin] == 0 and mass["mean"]["qcd"] < 100.0

    multiplicity = summary["multiplicity"]
    assert multiplicity["mean"] == {"top": 2.0, "qcd": 4.0}
    assert multiplicity["edges"][0] == 0 and multiplicity["edges"][-1] >= 4
    assert summary["pt"]["mean"]["top"] == pytest.approx(600.0, rel=1e-5)
    assert summary["pt"]["mean"]["qcd"] == pytest.approx(600.0, rel=1e-5)
    # Without a generator window the pT bins are round numbers around the jets.
    assert summary["pt"]["edges"][0] == 600.0 and summary["pt"]["edges"][-1] == 610.0
    assert sum(summary["pt"]["top"]) == 3


def test_text_report_shows_balance_and_each_histogram(known_file):
    text = info.format_summary(info.summarize(known_file))
    assert "4 jets (source unit, n_max 6)" in text
    assert "top 3, QCD 1 (top fraction 0.750)" in text
    for title in ("constituent multiplicity", "jet mass", "jet pT in the selection window"):
        assert title in text
    top_row = next(line for line in text.splitlines() if line.strip().startswith("160-180"))
    assert "1.000 " + "#" * info.BAR_WIDTH in top_row


def test_generated_file_shows_unsculpted_window_and_mass_peak(pythia_jets_dir, tmp_path, capsys):
    path = split_path(pythia_jets_dir, "train")
    figure = tmp_path / "figures" / "mass.png"
    assert cli.main(["info", str(path), "--figure", str(figure)]) == 0
    out = capsys.readouterr().out
    assert "classes: top 100, QCD 100 (top fraction 0.500)" in out
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000

    summary = info.summarize(path)
    # The pT histogram spans the generator's window and holds every jet.
    assert summary["pt"]["edges"][0] == 550.0 and summary["pt"]["edges"][-1] == 650.0
    assert sum(summary["pt"]["top"]) == 100 and sum(summary["pt"]["qcd"]) == 100
    edges = np.asarray(summary["mass"]["edges"])
    peak = {name: edges[np.argmax(summary["mass"][name])] for name in ("top", "qcd")}
    assert 140 <= peak["top"] < 200 and peak["qcd"] < 120


def test_json_output_and_missing_file(known_file, tmp_path, capsys):
    assert cli.main(["info", str(known_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == {"top": 3, "qcd": 1}
    assert cli.main(["info", str(tmp_path / "absent.h5")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("paper-kd info: error:") and "absent.h5: no such file" in err
    assert len(err.splitlines()) == 1
