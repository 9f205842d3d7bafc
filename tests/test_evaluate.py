import json

import h5py
import keras
import numpy as np
import pytest
from keras import ops

from paper_kd import cli, evaluate, physics
from paper_kd.data import format as jetformat

JET_ENERGY = 500.0  # GeV, every jet's energy before any boost
MASS_CUT = 110.0  # GeV, between the top (175) and QCD (60) jet masses below


def two_body_jets(rng, n_jets=400, n_max=16):
    """Jets of known mass: back-to-back massless pairs at rest, boosted to ``JET_ENERGY``.

    Top jets have mass 175 GeV and QCD jets 60 GeV, each smeared by 35 GeV, so a
    cut on the mass separates them well but not perfectly. Multiplicities vary
    (padding at the end), constituents are pT-sorted, and the jets point in
    random directions with |eta| < 1.
    """
    label = np.arange(n_jets) % 2
    jet_mass = np.clip(np.where(label == 1, 175.0, 60.0) + rng.normal(0, 35, n_jets), 10, 400)
    n_pairs = rng.integers(2, n_max // 2 + 1, n_jets)

    p4 = np.zeros((n_jets, n_max, 4))
    for jet in range(n_jets):
        energy = rng.dirichlet(np.ones(n_pairs[jet])) * jet_mass[jet] / 2
        unit = rng.normal(size=(n_pairs[jet], 3))
        unit /= np.linalg.norm(unit, axis=-1, keepdims=True)
        pair = np.concatenate([energy[:, None], energy[:, None] * unit], axis=-1)
        flipped = pair * np.array([1.0, -1.0, -1.0, -1.0])
        p4[jet, : 2 * n_pairs[jet]] = np.concatenate([pair, flipped])

    jet_phi = rng.uniform(-np.pi, np.pi, n_jets)
    jet_eta = rng.uniform(-1, 1, n_jets)
    axis = np.stack([np.cos(jet_phi), np.sin(jet_phi), np.sinh(jet_eta)], axis=-1)
    gamma = JET_ENERGY / jet_mass
    beta = np.sqrt(1 - 1 / gamma**2)
    p4 = physics.boost(p4, beta[:, None], axis[:, None, :])

    real = np.arange(n_max)[None, :] < 2 * n_pairs[:, None]
    p4[~real] = 0.0
    order = np.argsort(np.where(real, -physics.pt(p4), np.inf), axis=1, kind="stable")
    p4 = np.take_along_axis(p4, order[..., None], axis=1).astype(np.float32)
    return {"p4": p4, "mask": real}, label.astype(np.int32)


@keras.saving.register_keras_serializable(package="paper_kd_tests")
class MassCut(keras.Model):
    """Calls a jet top when its invariant mass exceeds ``MASS_CUT``: exactly Lorentz invariant.

    With ``energy_scaled`` it uses ``JET_ENERGY * m / E`` instead, which equals
    the mass before any boost and changes with the jet's energy under a boost.
    """

    def __init__(self, energy_scaled=False, **kwargs):
        super().__init__(**kwargs)
        self.energy_scaled = energy_scaled

    def call(self, inputs, training=False):
        p4 = ops.cast(inputs["p4"], "float64")
        mask = ops.cast(inputs["mask"], "float64")
        jet = ops.sum(p4 * mask[..., None], axis=1)  # [batch, 4]
        mass = ops.sqrt(ops.maximum(jet[:, 0] ** 2 - ops.sum(jet[:, 1:] ** 2, axis=-1), 0.0))
        if self.energy_scaled:
            mass = JET_ENERGY * mass / jet[:, 0]
        logit = (mass - MASS_CUT) / 10.0
        return ops.cast(ops.stack([ops.zeros_like(logit), logit], axis=-1), "float32")

    def get_config(self):
        return {**super().get_config(), "energy_scaled": self.energy_scaled}


# ---------------------------------------------------------------------------
# Metrics on hand-made scores


def test_perfect_classifier_and_lower_bound_rejection():
    labels = np.array([0] * 30 + [1] * 10)
    scores = np.concatenate([np.linspace(0.0, 0.4, 30), np.linspace(0.6, 1.0, 10)])
    metrics = evaluate.tagging_metrics(labels, scores, n_bootstrap=20)
    assert metrics["accuracy"]["value"] == 1.0
    assert metrics["auc"]["value"] == 1.0
    for key in ("rejection_50", "rejection_30"):
        # No QCD jet passes: the rejection is bounded by the 30 QCD jets, not infinite.
        assert metrics[key]["value"] == 30.0 and metrics[key]["lower_bound"]
    json.dumps(metrics, allow_nan=False)


def test_inverted_and_tied_classifiers():
    labels = np.array([1, 1, 0, 0, 1, 0])
    inverted = evaluate.tagging_metrics(labels, 1.0 - labels, n_bootstrap=0)
    assert inverted["auc"]["value"] == 0.0 and inverted["accuracy"]["value"] == 0.0
    assert inverted["auc"]["error"] is None

    tied = evaluate.tagging_metrics(labels, np.full(6, 0.7), n_bootstrap=0)
    assert tied["auc"]["value"] == 0.5  # all pairs tied count half
    assert tied["accuracy"]["value"] == 0.5  # every jet called top
    eff_signal, eff_background = evaluate.roc_curve(labels, np.full(6, 0.7))
    np.testing.assert_array_equal(eff_signal, [0, 1])
    np.testing.assert_array_equal(eff_background, [0, 1])


def test_hand_computed_roc_auc_and_interpolated_rejection():
    # Decreasing scores: S, then a tie {S, B}, then B, S, B, S, B, B, B.
    scores = np.array([0.9, 0.8, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    labels = np.array([1, 1, 0, 0, 1, 0, 1, 0, 0, 0])
    eff_signal, eff_background = evaluate.roc_curve(labels, scores)
    np.testing.assert_allclose(eff_signal, [0, 0.25, 0.5, 0.5, 0.75, 0.75, 1, 1, 1, 1])
    np.testing.assert_allclose(eff_background, [0, 0, 1, 2, 2, 3, 3, 4, 5, 6] * np.array(1 / 6))

    # Signal-background pairs ranked right: 6 + (5 + tie 0.5) + 4 + 3 = 18.5 of 24.
    metrics = evaluate.tagging_metrics(labels, scores, n_bootstrap=0)
    assert metrics["auc"]["value"] == pytest.approx(18.5 / 24, abs=1e-12)
    # Score > 0.5 calls 5 jets top, of which 3 are: 3 right + 4 right QCD of 10.
    assert metrics["accuracy"]["value"] == pytest.approx(0.7)

    # Ten copies of each jet leave the curve unchanged and make 60 QCD jets.
    many = evaluate.tagging_metrics(np.repeat(labels, 10), np.repeat(scores, 10), 0)
    # eps_S = 0.5 is reached exactly at the end of the tie: eps_B = 1/6.
    assert many["rejection_50"]["value"] == pytest.approx(6.0)
    # eps_S = 0.3 is a fifth of the way along the tied segment: eps_B = 1/30.
    assert many["rejection_30"]["value"] == pytest.approx(30.0)
    assert not many["rejection_30"]["lower_bound"]
    # Without the copies, 1/30 of 6 QCD jets is less than one jet: a lower bound.
    assert metrics["rejection_30"] == {"value": 6.0, "error": None, "lower_bound": True}


def test_auc_equals_mann_whitney_statistic_with_ties():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(labels * 0.7, 1.0), 1)  # coarse: many ties
    signal, background = scores[labels == 1], scores[labels == 0]
    greater = (signal[:, None] > background[None, :]).sum()
    ties = (signal[:, None] == background[None, :]).sum()
    assert ties > 100
    mann_whitney = (greater + 0.5 * ties) / (len(signal) * len(background))
    auc = evaluate.tagging_metrics(labels, scores, n_bootstrap=0)["auc"]["value"]
    assert auc == pytest.approx(mann_whitney, abs=1e-12)


def test_random_scores_give_chance_and_bootstrap_error_shrinks():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 20000)
    chance = evaluate.tagging_metrics(labels, rng.uniform(size=20000), n_bootstrap=30)
    assert chance["auc"]["value"] == pytest.approx(0.5, abs=0.015)
    assert chance["accuracy"]["value"] == pytest.approx(0.5, abs=0.015)
    assert chance["rejection_50"]["value"] == pytest.approx(2.0, rel=0.05)

    errors = {}
    for n_jets in (400, 10000):
        labels = rng.integers(0, 2, n_jets)
        scores = 1 / (1 + np.exp(-rng.normal(2 * labels - 1, 1.5)))
        metrics = evaluate.tagging_metrics(labels, scores, n_bootstrap=200, seed=1)
        errors[n_jets] = metrics
        # The bootstrap error of an accuracy is close to the binomial sqrt(p (1 - p) / n).
        p = metrics["accuracy"]["value"]
        assert metrics["accuracy"]["error"] == pytest.approx(np.sqrt(p * (1 - p) / n_jets), rel=0.3)
    for key in ("accuracy", "auc", "rejection_50", "rejection_30"):
        # 25 times the jets: errors about 5 times smaller.
        assert errors[10000][key]["error"] < errors[400][key]["error"] / 3


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 500)
    scores = rng.uniform(size=500) * 0.5 + labels * 0.3
    first = evaluate.tagging_metrics(labels, scores, n_bootstrap=10, seed=7)
    assert first == evaluate.tagging_metrics(labels, scores, n_bootstrap=10, seed=7)
    assert first != evaluate.tagging_metrics(labels, scores, n_bootstrap=10, seed=8)


@pytest.mark.parametrize(
    "labels, scores, message",
    [
        ([0, 0, 0], [0.1, 0.2, 0.3], "both top"),
        ([0, 1, 2], [0.1, 0.2, 0.3], "0 \\(QCD\\) or 1"),
        ([0, 1], [0.1, np.nan], "NaN"),
        ([0, 1], [0.1], "differ in length"),
    ],
)
def test_bad_metric_inputs(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        evaluate.tagging_metrics(labels, scores)


def test_invariance_score_values():
    assert evaluate.invariance_score([0.9] * 20) == pytest.approx(1.0, abs=1e-12)
    # Mean 0.8, max 0.9: (1.6 - 1) / (1.8 - 1).
    assert evaluate.invariance_score([0.9, 0.7, 0.8]) == pytest.approx(0.75)
    assert evaluate.invariance_score([0.9, 0.5]) == pytest.approx(0.5)
    assert np.isnan(evaluate.invariance_score([0.5, 0.4]))


def test_betas_are_the_papers():
    assert len(evaluate.BETAS) == 20
    np.testing.assert_allclose(evaluate.BETAS, np.arange(20) * 0.05, atol=1e-12)


# ---------------------------------------------------------------------------
# Scores and the boost scan on models with known behaviour


def test_predict_scores_do_not_depend_on_batching():
    inputs, labels = two_body_jets(np.random.default_rng(6), n_jets=50)
    model = MassCut()
    whole = evaluate.predict_scores(model, inputs, batch_size=64)
    batched = evaluate.predict_scores(model, inputs, batch_size=7)
    np.testing.assert_allclose(whole, batched, rtol=1e-6)

    jet = inputs["p4"].astype(np.float64).sum(axis=1)
    mass = physics.mass(jet)
    np.testing.assert_allclose(whole, 1 / (1 + np.exp(-(mass - MASS_CUT) / 10)), rtol=1e-4)


@pytest.mark.parametrize("direction", ["x", "z", "jet"])
def test_boost_scan_is_flat_for_an_invariant_model_only(direction):
    inputs, labels = two_body_jets(np.random.default_rng(7))
    betas = (0.0, 0.3, 0.6, 0.9)
    invariant = evaluate.boost_scan(MassCut(), inputs, labels, betas, direction, batch_size=128)
    assert invariant["beta"] == list(betas)
    assert invariant["accuracy"][0] > 0.85
    # float32 rounding of the boosted momenta may move a jet sitting on the cut, no more.
    assert np.ptp(invariant["accuracy"]) <= 1 / len(labels)
    assert np.ptp(invariant["auc"]) < 1e-4
    assert evaluate.invariance_score(invariant["accuracy"]) > 0.995

    variant = evaluate.boost_scan(
        MassCut(energy_scaled=True), inputs, labels, betas, direction, batch_size=128
    )
    assert variant["accuracy"][0] == pytest.approx(invariant["accuracy"][0], abs=1 / len(labels))
    assert variant["accuracy"][-1] < variant["accuracy"][0] - 0.1
    assert evaluate.invariance_score(variant["accuracy"]) < 0.9


def test_boost_scan_keeps_padding_and_order():
    inputs, _ = two_body_jets(np.random.default_rng(8), n_jets=20)
    seen = []
    transform = evaluate._boost_batch(0.5, "x")

    def recording(p4):
        boosted = transform(p4)
        seen.append((p4, boosted))
        return boosted

    evaluate.predict_scores(MassCut(), inputs, batch_size=8, transform=recording)
    for original, boosted in seen:
        padding = ~np.any(original != 0, axis=-1)
        assert np.all(boosted[padding] == 0)
        np.testing.assert_allclose(boosted, physics.boost(original, 0.5, "x"), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"betas": (0.0, 1.0)}, "0 <= beta < 1"),
        ({"betas": (-0.1,)}, "0 <= beta < 1"),
        ({"direction": "w"}, "direction must be one of"),
    ],
)
def test_bad_scan_settings(kwargs, message):
    inputs, labels = two_body_jets(np.random.default_rng(9), n_jets=10)
    with pytest.raises(ValueError, match=message):
        evaluate.boost_scan(MassCut(), inputs, labels, **kwargs)


# ---------------------------------------------------------------------------
# A saved model on a jet file, through the command line


@pytest.fixture
def saved_model_and_data(tmp_path):
    inputs, labels = two_body_jets(np.random.default_rng(10), n_jets=200)
    data = jetformat.write_jets(
        tmp_path / "test.h5", inputs["p4"], labels, provenance={"source": "two-body test jets"}
    )
    model = MassCut(energy_scaled=True)
    model({"p4": inputs["p4"][:2], "mask": inputs["mask"][:2]})
    model_path = tmp_path / "mass_cut.keras"
    model.save(model_path)
    return model_path, data, labels


def test_evaluate_command_writes_json(saved_model_and_data, tmp_path, capsys):
    model_path, data, labels = saved_model_and_data
    out = tmp_path / "results" / "eval.json"
    argv = ["evaluate", str(model_path), str(tmp_path), "-o", str(out)]
    assert (
        cli.main(argv + ["--betas", "0,0.5,0.9", "--n-bootstrap", "20", "--batch-size", "64"]) == 0
    )

    result = json.loads(out.read_text())
    assert result["data"]["n_jets"] == 200 and result["data"]["path"] == str(data)
    assert result["data"]["provenance"]["source"] == "two-body test jets"
    assert result["model"]["class"] == "MassCut"
    metrics = result["metrics"]
    assert set(metrics) == {"accuracy", "auc", "rejection_50", "rejection_30"}
    scores = evaluate.predict_scores(
        evaluate.load_model(model_path), evaluate._read_test_arrays(data)[0], batch_size=64
    )
    assert metrics["auc"]["value"] == evaluate.tagging_metrics(labels, scores, 0)["auc"]["value"]
    assert metrics["accuracy"]["error"] > 0
    assert result["boost_scan"]["beta"] == [0.0, 0.5, 0.9]
    assert result["boost_scan"]["direction"] == "x"
    expected = evaluate.invariance_score(result["boost_scan"]["accuracy"])
    assert result["invariance_score"] == pytest.approx(expected)
    assert result["invariance_score"] < 0.95
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]
    assert "auc" in capsys.readouterr().out


def test_evaluate_bad_input_is_one_line(saved_model_and_data, tmp_path, capsys):
    model_path, data, _ = saved_model_and_data
    out = str(tmp_path / "eval.json")

    assert cli.main(["evaluate", str(tmp_path / "none.keras"), str(data), "-o", out]) == 1
    assert "none.keras: no such model file" in capsys.readouterr().err

    wrong = tmp_path / "wrong.h5"
    with h5py.File(wrong, "w") as handle:
        handle["p4"] = np.zeros((2, 3, 4))
    assert cli.main(["evaluate", str(model_path), str(wrong), "-o", out]) == 1
    err = capsys.readouterr().err
    assert "wrong.h5" in err and "'format'" in err and len(err.strip().splitlines()) == 1

    assert cli.main(["evaluate", str(model_path), str(data), "-o", out, "--betas", "0.5,1"]) == 1
    assert "0 <= beta < 1" in capsys.readouterr().err
    assert not (tmp_path / "eval.json").exists()


@pytest.mark.slow
def test_scores_reproduce_the_published_teacher_with_its_batching(shared_fixtures):
    """Cutting each batch to its largest jet is how the reference padded its batches.

    The published readout divides by the padded node count, so its logits depend on
    the batching; evaluated here in the reference's batches, the published teacher
    must give the reference's probabilities and metrics.
    """
    from paper_kd.models.lorentznet import LorentzNet

    fixture = np.load(shared_fixtures / "published" / "lorentznet_top.npz")
    state = {key[2:]: fixture[key] for key in fixture.files if key.startswith("w/")}
    model = LorentzNet.from_torch_state_dict(
        state, n_hidden=72, n_layers=6, readout="reference", arithmetic="reference"
    )
    # The first two reference batches (widths differ), to keep the test short.
    batch_size = int(fixture["batch_size"])
    n_batches = 2
    p4, label = fixture["p4"][: n_batches * batch_size], fixture["label"][: n_batches * batch_size]
    inputs = {"p4": p4, "mask": np.any(p4 != 0, axis=-1)}
    widths = [
        inputs["mask"][k * batch_size : (k + 1) * batch_size].sum(1).max() for k in range(n_batches)
    ]
    np.testing.assert_array_equal(np.array(widths) + 2, fixture["padded_nodes"][:n_batches])

    scores = evaluate.predict_scores(model, inputs, batch_size=batch_size)
    logits = fixture["logits"][: len(p4)].astype(np.float64)
    reference = 1 / (1 + np.exp(logits[:, 0] - logits[:, 1]))
    np.testing.assert_allclose(scores, reference, atol=2e-3)
    ours = evaluate.tagging_metrics(label, scores, n_bootstrap=0)
    theirs = evaluate.tagging_metrics(label, reference, n_bootstrap=0)
    assert ours["auc"]["value"] == pytest.approx(theirs["auc"]["value"], abs=2e-3)
    assert ours["accuracy"]["value"] == pytest.approx(theirs["accuracy"]["value"], abs=2 / len(p4))
    assert theirs["auc"]["value"] > 0.85
