"""Deep Set, PFN, EFN and MLP students: features, symmetries, bad input, serialization."""

import keras
import numpy as np
import pytest

import paper_kd  # noqa: F401  (selects the TensorFlow backend)
from paper_kd import physics
from paper_kd.models.students import (
    MLP,
    ConstituentFeatures,
    DeepSet,
    EnergyFlowNetwork,
    ParticleFlowNetwork,
)

SMALL = {
    "deepset": {"width": 16, "latent": 8, "depth": 3},
    "pfn": {"phi_sizes": (16, 8), "f_sizes": (16,)},
    "efn": {"phi_sizes": (16, 8), "f_sizes": (16,)},
    "mlp": {"n_constituents": 12, "width": 16, "depth": 3},
}
SET_MODELS = ("deepset", "pfn", "efn")
CLASSES = {
    "deepset": DeepSet,
    "pfn": ParticleFlowNetwork,
    "efn": EnergyFlowNetwork,
    "mlp": MLP,
}


def build_model(name, **hparams):
    return CLASSES[name](**hparams)


def make_jets(n_jets=6, n_max=10, seed=0):
    """Massless constituents around a jet axis at pT ~ 600 GeV, pT-sorted, zero-padded."""
    rng = np.random.default_rng(seed)
    p4 = np.zeros((n_jets, n_max, 4), dtype=np.float32)
    mask = np.zeros((n_jets, n_max), dtype=bool)
    for jet in range(n_jets):
        n = rng.integers(1, n_max + 1) if jet else n_max
        pt = np.sort(rng.exponential(60.0, n) + 1.0)[::-1]
        eta = rng.normal(0.5, 0.3, n)
        phi = rng.normal(1.0, 0.3, n)
        px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
        p4[jet, :n] = np.stack([np.sqrt(px**2 + py**2 + pz**2), px, py, pz], -1)
        mask[jet, :n] = True
    return p4, mask


def randomize(model, seed=1):
    """Random weights and BatchNorm statistics, so that every layer matters."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        shape = tuple(variable.shape)
        if "variance" in variable.path:
            variable.assign(rng.uniform(0.5, 2.0, shape).astype("float32"))
        else:
            variable.assign(rng.normal(0.0, 0.5, shape).astype("float32"))
    return model


def built(name, seed=1, **extra):
    model = build_model(name, **{**SMALL[name], **extra})
    model.build()
    return randomize(model, seed)


def logits(model, p4, mask):
    return np.asarray(model({"p4": p4, "mask": mask}, training=False))


# --- features ----------------------------------------------------------------------------


def test_features_match_numpy_physics():
    p4, mask = make_jets()
    features, pt_fraction = ConstituentFeatures()(p4, mask)
    features = np.asarray(features)
    jet = physics.jet_p4(p4.astype(np.float64))[:, None]
    real = np.broadcast_to(mask[..., None], features.shape)

    expected = np.stack(
        [
            physics.pt(p4) / physics.pt(jet),
            physics.eta(p4) - physics.eta(jet),
            physics.delta_phi(physics.phi(p4), physics.phi(jet)),
            np.zeros(p4.shape[:2]),
        ],
        -1,
    )
    np.testing.assert_allclose(features[real], expected[real], atol=2e-5)
    assert np.all(features[~real] == 0)
    np.testing.assert_allclose(np.asarray(pt_fraction), features[..., 0])


def test_reference_mass_is_rounding_noise_and_stable_mass_is_zero():
    p4, mask = make_jets()
    stable, _ = ConstituentFeatures("stable")(p4, mask)
    reference, _ = ConstituentFeatures("reference")(p4, mask)
    assert np.all(np.asarray(stable)[..., 3] == 0)
    noise = np.asarray(reference)[..., 3][mask]
    assert 0 < noise.max() < 1.0  # float32 rounding of E^2 - p^2, a fraction of a GeV


@pytest.mark.parametrize("name", SET_MODELS + ("mlp",))
def test_stable_models_ignore_float32_rounding_of_energies(name):
    model = built(name)
    p4, mask = make_jets()
    nudged = p4.copy()
    nudged[..., 0] = np.nextafter(nudged[..., 0], np.float32(np.inf))  # one ulp up
    reference = logits(model, p4, mask)
    change = np.abs(logits(model, nudged, mask) - reference) / (1 + np.abs(reference))
    assert change.max() < 1e-4
    if name == "deepset":
        # The reference arithmetic reads the rounding noise as a mass: the same nudge shows.
        model = built(name, arithmetic="reference")
        reference = logits(model, p4, mask)
        change = np.abs(logits(model, nudged, mask) - reference) / (1 + np.abs(reference))
        assert change.max() > 1e-4


def test_massive_constituent_mass():
    p4 = np.array([[[5.0, 3.0, 0.0, 0.0], [10.0, 6.0, 0.0, 0.0]]], dtype=np.float32)
    mask = np.array([[True, True]])
    features, _ = ConstituentFeatures()(p4, mask)
    np.testing.assert_allclose(np.asarray(features)[0, :, 3], [4.0, 8.0], rtol=1e-6)


def test_unknown_arithmetic_is_rejected():
    with pytest.raises(ValueError, match="arithmetic must be one of"):
        DeepSet(arithmetic="float64")


# --- symmetries --------------------------------------------------------------------------


@pytest.mark.parametrize("name", SET_MODELS)
def test_set_models_ignore_order_and_padding(name):
    model = built(name)
    p4, mask = make_jets()
    reference = logits(model, p4, mask)

    rng = np.random.default_rng(3)
    order = rng.permutation(p4.shape[1])
    np.testing.assert_allclose(logits(model, p4[:, order], mask[:, order]), reference, atol=1e-4)

    # Extra padding holding garbage must not matter either.
    garbage = rng.normal(0, 1e3, (p4.shape[0], 7, 4)).astype(np.float32)
    padded_p4 = np.concatenate([p4, garbage], axis=1)
    padded_mask = np.concatenate([mask, np.zeros((p4.shape[0], 7), bool)], axis=1)
    np.testing.assert_allclose(logits(model, padded_p4, padded_mask), reference, atol=1e-4)


def test_mlp_ignores_padding_beyond_the_jet_but_not_order():
    model = built("mlp")
    p4, mask = make_jets()
    reference = logits(model, p4, mask)

    padded_p4 = np.concatenate([p4, np.zeros((p4.shape[0], 30, 4), np.float32)], axis=1)
    padded_mask = np.concatenate([mask, np.zeros((p4.shape[0], 30), bool)], axis=1)
    np.testing.assert_allclose(logits(model, padded_p4, padded_mask), reference, atol=1e-5)

    # Documented limitation: the MLP reads slots in order.
    order = np.arange(p4.shape[1])[::-1]
    assert np.abs(logits(model, p4[:, order], mask[:, order]) - reference).max() > 1e-3


def test_mlp_keeps_only_the_leading_constituents():
    model = built("mlp", n_constituents=4)
    p4, mask = make_jets()
    # Reordering the slots beyond the kept four changes neither the jet nor the kept ones.
    swapped_p4, swapped_mask = p4.copy(), mask.copy()
    swapped_p4[:, 4:] = p4[:, 4:][:, ::-1]
    swapped_mask[:, 4:] = mask[:, 4:][:, ::-1]
    np.testing.assert_allclose(
        logits(model, swapped_p4, swapped_mask), logits(model, p4, mask), atol=1e-4
    )


@pytest.mark.parametrize("name", SET_MODELS + ("mlp",))
@pytest.mark.parametrize("direction", ["x", "y", "z"])
def test_finite_for_strong_boosts(name, direction):
    model = built(name)
    p4, mask = make_jets()
    boosted = physics.boost(p4, 0.99, direction).astype(np.float32)
    assert np.all(np.isfinite(logits(model, boosted, mask)))


@pytest.mark.parametrize("name", SET_MODELS + ("mlp",))
def test_finite_for_single_constituent_and_vanishing_jet_pt(name):
    model = built(name)
    single = np.zeros((2, 3, 4), np.float32)
    single_mask = np.zeros((2, 3), bool)
    single[0, 0] = [100.0, 60.0, 0.0, 80.0]
    single_mask[0, 0] = True
    # Two back-to-back constituents: the jet's pT is zero; and one along the beam.
    single[1, :2] = [[50.0, 30.0, 0.0, 40.0], [50.0, -30.0, 0.0, 40.0]]
    single[1, 2] = [10.0, 0.0, 0.0, 10.0]
    single_mask[1] = True
    assert np.all(np.isfinite(logits(model, single, single_mask)))


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", [DeepSet, MLP, ParticleFlowNetwork, EnergyFlowNetwork])
def test_bad_inputs_give_clear_errors(model_class):
    model = model_class()
    p4, mask = make_jets()
    with pytest.raises(ValueError, match=r"'p4' must be \[batch, node, 4\]"):
        model({"p4": p4[..., :3], "mask": mask})
    with pytest.raises(ValueError, match=r"'p4' must be \[batch, node, 4\]"):
        model({"p4": p4[0], "mask": mask})
    with pytest.raises(ValueError, match="does not match"):
        model({"p4": p4, "mask": mask[:, :-1]})
    with pytest.raises(ValueError, match="keys 'p4' and 'mask'"):
        model(p4)
    bad = p4.copy()
    bad[0, 0, 1] = np.nan
    with pytest.raises(Exception, match="NaN or infinite"):
        model({"p4": bad, "mask": mask})


# --- architecture and training -------------------------------------------------------------


def test_published_deepset_layout_and_size():
    model = DeepSet()
    model.build()
    names = [name for name, _, _ in model._torch_variables()]
    assert names[:6] == [
        "phi.0.weight",
        "phi.0.bias",
        "phi.3.weight",
        "phi.3.bias",
        "phi.3.running_mean",
        "phi.3.running_var",
    ]
    assert "phi.8.weight" in names and "rho.8.running_var" in names
    assert names[-2:] == ["output_layer.0.weight", "output_layer.0.bias"]
    # phi: Linear 4->128, BN, Linear, BN, Linear; rho: BN, (Linear, BN) x 2; Linear 128->2.
    # BatchNorm counts gamma, beta and both running statistics (4 x 128).
    linear, norm = 128 * 128 + 128, 4 * 128
    assert model.count_params() == (4 * 128 + 128) + 4 * linear + 5 * norm + (2 * 128 + 2)
    assert model.count_params() == 69506


def test_deepset_pooling_before_last_phi_layer_is_exact():
    """phi's last Linear runs after the pooling; check against running it per constituent."""
    model = built("deepset")
    p4, mask = make_jets()
    features, pt_fraction = model.constituent_features(p4, mask)
    hidden = np.asarray(features)
    for dense, norm in zip(model.phi_dense, model.phi_norm):
        hidden = np.asarray(dense(hidden))
        hidden = np.where(hidden > 0, hidden, 0.01 * hidden)
        hidden = np.asarray(norm(hidden, training=False))
    phi = hidden @ np.asarray(model.phi_out.kernel) + np.asarray(model.phi_out.bias)
    pooled = np.einsum("bn,bnl->bl", np.asarray(pt_fraction), phi)  # per-constituent phi
    hidden = np.asarray(model.rho_input_norm(pooled, training=False))
    for dense, norm in zip(model.rho_dense, model.rho_norm):
        hidden = np.asarray(dense(hidden))
        hidden = np.asarray(norm(np.where(hidden > 0, hidden, 0.01 * hidden), training=False))
    expected = np.asarray(model.classifier(hidden))
    np.testing.assert_allclose(logits(model, p4, mask), expected, rtol=1e-4, atol=1e-4)


def test_masked_batch_norm_ignores_padding_in_training():
    model = built("deepset")
    p4, mask = make_jets()
    garbage_p4 = p4.copy()
    garbage_p4[~mask] = 1e4  # padding with huge values
    before = [np.asarray(v) for v in model.non_trainable_weights]

    model({"p4": p4, "mask": mask}, training=True)
    clean = [np.asarray(v) for v in model.non_trainable_weights]
    for variable, value in zip(model.non_trainable_weights, before):
        variable.assign(value)
    model({"p4": garbage_p4, "mask": mask}, training=True)
    dirty = [np.asarray(v) for v in model.non_trainable_weights]

    assert any(np.abs(a - b).max() > 1e-3 for a, b in zip(clean, before))
    for a, b in zip(clean, dirty):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", SET_MODELS + ("mlp",))
def test_fit_one_step_changes_weights(name):
    model = build_model(name, **SMALL[name])
    p4, mask = make_jets(n_jets=8)
    labels = np.arange(8) % 2
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(True))
    model.build()
    before = [np.asarray(v).copy() for v in model.trainable_weights]
    history = model.fit({"p4": p4, "mask": mask}, labels, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert all(np.abs(np.asarray(v) - b).max() > 0 for v, b in zip(model.trainable_weights, before))


@pytest.mark.parametrize("name", SET_MODELS + ("mlp",))
def test_save_and_load_round_trip(name, tmp_path):
    model = built(name, arithmetic="reference")
    p4, mask = make_jets()
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(model)
    assert loaded.get_config() == model.get_config()
    np.testing.assert_allclose(logits(loaded, p4, mask), logits(model, p4, mask), rtol=1e-6)


def test_configs_carry_hyperparameters():
    config = DeepSet(width=32, latent=16, depth=2, dropout=0.1, arithmetic="reference").get_config()
    assert {k: config[k] for k in ("width", "latent", "depth", "dropout", "arithmetic")} == {
        "width": 32,
        "latent": 16,
        "depth": 2,
        "dropout": 0.1,
        "arithmetic": "reference",
    }
    assert EnergyFlowNetwork().get_config()["phi_sizes"] == [100, 100, 128]
    assert ParticleFlowNetwork().get_config()["f_sizes"] == [100, 100, 100]
    assert MLP().get_config()["n_constituents"] == 128


def test_mlp_from_torch_state_dict_layout():
    rng = np.random.default_rng(0)
    state = {
        "mlp.0.weight": rng.normal(size=(16, 48)),
        "mlp.0.bias": rng.normal(size=16),
        "mlp.3.weight": rng.normal(size=16),
        "mlp.3.bias": rng.normal(size=16),
        "mlp.3.running_mean": rng.normal(size=16),
        "mlp.3.running_var": rng.uniform(1, 2, 16),
        "mlp.3.num_batches_tracked": np.array(5),
        "output_layer.0.weight": rng.normal(size=(2, 16)),
        "output_layer.0.bias": rng.normal(size=2),
    }
    model = MLP.from_torch_state_dict(state, n_constituents=12, width=16, depth=2)
    np.testing.assert_array_equal(
        np.asarray(model.hidden_dense[0].kernel), state["mlp.0.weight"].T.astype("float32")
    )
    p4, mask = make_jets(n_max=12)
    features, _ = model.constituent_features(p4, mask)
    flat = np.asarray(features).reshape(len(p4), -1)
    hidden = flat @ state["mlp.0.weight"].T + state["mlp.0.bias"]
    hidden = np.where(hidden > 0, hidden, 0.01 * hidden)
    hidden = (hidden - state["mlp.3.running_mean"]) / np.sqrt(state["mlp.3.running_var"] + 1e-5)
    hidden = hidden * state["mlp.3.weight"] + state["mlp.3.bias"]
    expected = hidden @ state["output_layer.0.weight"].T + state["output_layer.0.bias"]
    np.testing.assert_allclose(logits(model, p4, mask), expected, rtol=1e-4, atol=1e-4)
