"""LorentzNet: masking, symmetries, numerical stability, weights, saving, published parity."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from paper_kd.models.lorentznet import (
    PARITY_BOUNDS,
    LorentzNet,
    MaskedBatchNormalization,
    lorentznet_parity,
    masked_moments,
    split_edge_moments,
    torch_hparams,
)
from paper_kd.physics import boost

SMALL = {"n_hidden": 8, "n_layers": 2, "dropout": 0.0}


def make_jets(n_jets=3, n_max=9, seed=0, dtype=np.float32, massless=True, n_constituents=None):
    """Jet-like massless constituents (E = |p|, GeV) around a random axis, zero-padded."""
    rng = np.random.default_rng(seed)
    pt = rng.exponential(20.0, size=(n_jets, n_max)) + 1.0
    eta = rng.normal(0.0, 0.3, size=(n_jets, n_max)) + rng.uniform(-1, 1, size=(n_jets, 1))
    phi = rng.normal(0.0, 0.3, size=(n_jets, n_max)) + rng.uniform(-3, 3, size=(n_jets, 1))
    momentum = np.stack([pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)], axis=-1)
    mass = 0.0 if massless else rng.uniform(1.0, 5.0, size=(n_jets, n_max, 1))
    energy = np.sqrt(np.sum(momentum**2, axis=-1, keepdims=True) + mass**2)
    p4 = np.concatenate([energy, momentum], axis=-1).astype(dtype)
    if n_constituents is None:
        n_constituents = rng.integers(1, n_max + 1, size=n_jets)
        n_constituents[0] = n_max
    mask = np.arange(n_max)[None, :] < np.asarray(n_constituents)[:, None]
    p4[~mask] = 0.0
    return {"p4": p4, "mask": mask}


def logits(model, inputs, training=False):
    return keras.ops.convert_to_numpy(model(inputs, training=training))


def relative(a, b):
    return np.max(np.abs(a - b) / (1.0 + np.abs(b)))


def rotation(axis, angle):
    c, s = np.cos(angle), np.sin(angle)
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return c * np.eye(3) + s * cross + (1 - c) * np.outer(k, k)


def rotate(p4, matrix):
    return np.concatenate([p4[..., :1], p4[..., 1:] @ matrix.T], axis=-1)


@pytest.fixture
def float64_policy():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_dtype_policy(previous)


# --- output, masking, padding ---------------------------------------------------------------


def test_paper_size_builds_and_gives_finite_logits():
    model = LorentzNet()
    inputs = make_jets(n_jets=2, n_max=12)
    out = logits(model, inputs)
    assert out.shape == (2, 2) and out.dtype == np.float32
    assert np.all(np.isfinite(out))
    # Published count: 224,072 trainable parameters at width 72, 6 blocks, 2 scalars.
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    assert trainable == 224_072


@pytest.mark.parametrize("training", [False, True])
def test_padding_content_and_extra_padding_do_not_change_logits(training):
    model = LorentzNet(**SMALL)
    inputs = make_jets(n_jets=4, n_max=7, seed=1)
    reference = logits(model, inputs, training=training)

    garbage = dict(inputs, p4=inputs["p4"].copy())
    garbage["p4"][~inputs["mask"]] = 123.0
    # A wider batch changes how the per-edge sums are blocked: float32 rounding of
    # ~1e-7 on logits of order 1, where a leak of padding changes them by ~0.1.
    close = {"rtol": 1e-5, "atol": 1e-6}
    np.testing.assert_allclose(logits(model, garbage, training=training), reference, **close)

    # Five more padding slots: means, sums and BatchNorm statistics must ignore them.
    padded = {
        "p4": np.concatenate([inputs["p4"], np.zeros((4, 5, 4), np.float32)], axis=1),
        "mask": np.concatenate([inputs["mask"], np.zeros((4, 5), bool)], axis=1),
    }
    np.testing.assert_allclose(logits(model, padded, training=training), reference, **close)


def test_reference_readout_divides_by_the_padded_node_count():
    model = LorentzNet(**SMALL, readout="reference")
    inputs = make_jets(n_jets=2, n_max=6, seed=2)
    padded = {
        "p4": np.concatenate([inputs["p4"], np.zeros((2, 3, 4), np.float32)], axis=1),
        "mask": np.concatenate([inputs["mask"], np.zeros((2, 3), bool)], axis=1),
    }
    # Three more padding slots: the published readout divides by 11 nodes instead of 8.
    assert relative(logits(model, padded), logits(model, inputs)) > 1e-3
    mean_model = LorentzNet(**SMALL)
    mean_model.set_weights(model.get_weights())
    np.testing.assert_allclose(logits(mean_model, padded), logits(mean_model, inputs), rtol=1e-5)


def test_permutation_of_constituents():
    model = LorentzNet(**SMALL)
    inputs = make_jets(n_jets=3, n_max=8, seed=3, n_constituents=[8, 5, 8])
    order = np.random.default_rng(0).permutation(8)
    permuted = {"p4": inputs["p4"][:, order], "mask": inputs["mask"][:, order]}
    for training in (False, True):
        np.testing.assert_allclose(
            logits(model, permuted, training=training),
            logits(model, inputs, training=training),
            rtol=1e-5,
            atol=1e-6,
        )


def test_masked_batch_normalization_uses_only_masked_entries():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(2, 5, 3)).astype(np.float32)
    mask = rng.random((2, 5)) < 0.6
    x_padded = np.where(mask[..., None], x, 1e3).astype(np.float32)
    norm = MaskedBatchNormalization()
    out = keras.ops.convert_to_numpy(norm(x_padded, mask, training=True))

    real = x[mask]  # [n_real, 3]
    expected = (real - real.mean(0)) / np.sqrt(real.var(0) + 1e-5)
    np.testing.assert_allclose(out[mask], expected, rtol=1e-4, atol=1e-5)
    # PyTorch's update: momentum 0.1 on the mean and on the unbiased variance.
    np.testing.assert_allclose(norm.moving_mean.numpy(), 0.1 * real.mean(0), rtol=1e-5)
    np.testing.assert_allclose(
        norm.moving_variance.numpy(), 0.9 + 0.1 * real.var(0, ddof=1), rtol=1e-5
    )

    inference = keras.ops.convert_to_numpy(norm(x, mask, training=False))
    mean, var = norm.moving_mean.numpy(), norm.moving_variance.numpy()
    np.testing.assert_allclose(inference, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-5)


def test_split_edge_moments_equal_moments_of_the_built_edges():
    # Pieces with a large common offset: a naive E[e^2] - E[e]^2 in float32 loses
    # the variance (offset^2 / variance ~ 1e6); the centred sums must not.
    rng = np.random.default_rng(3)
    batch, nodes, channels = 3, 7, 5
    node_i = rng.normal(40.0, 0.05, size=(batch, nodes, channels))
    node_j = rng.normal(-3.0, 2.0, size=(batch, nodes, channels))
    invariants = rng.normal(1.0, 1.0, size=(batch, nodes, nodes, 2))
    kernel = rng.normal(size=(2, channels))
    mask = rng.random((batch, nodes)) < 0.7
    edge_mask = mask[:, :, None] & mask[:, None, :] & ~np.eye(nodes, dtype=bool)
    edges = node_i[:, :, None] + node_j[:, None, :] + invariants @ kernel  # float64

    real = edges[edge_mask]  # [n_edges, channels]
    cast = [x.astype(np.float32) for x in (node_i, node_j, invariants, kernel)]
    mean, variance, count = (
        keras.ops.convert_to_numpy(v) for v in split_edge_moments(*cast, edge_mask)
    )
    assert count == edge_mask.sum()
    np.testing.assert_allclose(mean, real.mean(0), rtol=1e-5)
    np.testing.assert_allclose(variance, real.var(0), rtol=1e-4)
    # The same moments as masked_moments on the built float32 tensor.
    built = [
        keras.ops.convert_to_numpy(v) for v in masked_moments(edges.astype(np.float32), edge_mask)
    ]
    np.testing.assert_allclose(variance, built[1], rtol=1e-4)


# --- symmetries ------------------------------------------------------------------------------


def random_boost_and_rotation(rng, p4, beta_max=0.9):
    axis = rng.normal(size=3)
    beta = rng.uniform(0.1, beta_max)
    turned = rotate(p4, rotation(rng.normal(size=3), rng.uniform(0, 2 * np.pi)))
    return boost(turned, beta, axis / np.linalg.norm(axis))


def test_lorentz_invariance_without_beams_float64(float64_policy):
    model = LorentzNet(**SMALL, beams=False, n_scalar=1, c_weight=0.1)
    rng = np.random.default_rng(4)
    for massless in (True, False):
        inputs = make_jets(n_jets=3, n_max=8, seed=5, dtype=np.float64, massless=massless)
        reference = logits(model, inputs)
        assert reference.dtype == np.float64
        for _ in range(3):
            moved = dict(inputs, p4=random_boost_and_rotation(rng, inputs["p4"]))
            moved["p4"][~inputs["mask"]] = 0.0
            out = logits(model, moved)
            assert relative(out, reference) < 1e-6, (massless, relative(out, reference))


def test_lorentz_invariance_without_beams_float32():
    # float32: dots of nearly collinear constituents lose digits under a boost; the
    # tolerance is the float32 one, not the float64 1e-6.
    model = LorentzNet(**SMALL, beams=False, n_scalar=1)
    inputs = make_jets(n_jets=3, n_max=8, seed=6)
    reference = logits(model, inputs)
    rng = np.random.default_rng(7)
    for _ in range(3):
        moved = dict(inputs, p4=random_boost_and_rotation(rng, inputs["p4"]).astype(np.float32))
        assert relative(logits(model, moved), reference) < 2e-3


def test_with_beams_only_rotations_about_the_beam_axis_are_symmetries(float64_policy):
    model = LorentzNet(**SMALL)
    inputs = make_jets(n_jets=3, n_max=8, seed=8, dtype=np.float64)
    reference = logits(model, inputs)

    about_z = dict(inputs, p4=rotate(inputs["p4"], rotation([0, 0, 1], 1.234)))
    assert relative(logits(model, about_z), reference) < 1e-6

    about_x = dict(inputs, p4=rotate(inputs["p4"], rotation([1, 0, 0], 0.7)))
    boosted_z = dict(inputs, p4=boost(inputs["p4"], 0.5, "z"))
    assert relative(logits(model, about_x), reference) > 1e-4
    assert relative(logits(model, boosted_z), reference) > 1e-4


# --- numerical stability and bad input -------------------------------------------------------


def test_one_ulp_energy_nudge_barely_moves_the_default_model():
    inputs = make_jets(n_jets=4, n_max=20, seed=9)
    nudged = dict(inputs, p4=inputs["p4"].copy())
    energy = nudged["p4"][..., 0]
    nudged["p4"][..., 0] = np.where(inputs["mask"], np.nextafter(energy, np.float32(np.inf)), 0)

    model = LorentzNet(n_hidden=16, n_layers=3, dropout=0.0)
    assert relative(logits(model, nudged), logits(model, inputs)) < 1e-4

    # The published arithmetic reads the rounding noise: the same weights move far more.
    reference = LorentzNet(n_hidden=16, n_layers=3, dropout=0.0, arithmetic="reference")
    reference.set_weights(model.get_weights())
    assert relative(logits(reference, nudged), logits(reference, inputs)) > 1e-3


@pytest.mark.parametrize("axis", ["x", "y", "z", (1.0, -2.0, 0.5)])
def test_extreme_boosts_and_single_constituents_stay_finite(axis):
    model = LorentzNet(**SMALL)
    inputs = make_jets(n_jets=3, n_max=6, seed=10, n_constituents=[1, 6, 2])
    for beta in (0.9, 0.99, -0.99):
        boosted = dict(inputs, p4=boost(inputs["p4"], beta, axis).astype(np.float32))
        for training in (False, True):
            assert np.all(np.isfinite(logits(model, boosted, training=training)))
    for beams in (True, False):
        alone = make_jets(n_jets=1, n_max=1, seed=11, n_constituents=[1])
        assert np.all(np.isfinite(logits(LorentzNet(**SMALL, beams=beams), alone)))


def test_bad_input_is_rejected_at_the_model_boundary():
    model = LorentzNet(**SMALL)
    inputs = make_jets(n_jets=2, n_max=4)
    with pytest.raises(ValueError, match=r"LorentzNet: 'p4' must be \[batch, node, 4\]"):
        model({"p4": inputs["p4"][..., :3], "mask": inputs["mask"]})
    with pytest.raises(ValueError, match="LorentzNet: 'p4' must be"):
        model({"p4": inputs["p4"][0], "mask": inputs["mask"]})
    with pytest.raises(ValueError, match="does not match"):
        model({"p4": inputs["p4"], "mask": inputs["mask"][:, :3]})
    with pytest.raises(ValueError, match="dict with keys"):
        model(inputs["p4"])
    bad = dict(inputs, p4=inputs["p4"].copy())
    bad["p4"][0, 0, 1] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or infinite"):
        model(bad)
    with pytest.raises(ValueError, match="readout must be one of"):
        LorentzNet(readout="sum")
    with pytest.raises(ValueError, match="arithmetic must be one of"):
        LorentzNet(arithmetic="float64")


# --- XLA, saving, weights --------------------------------------------------------------------


def test_xla_and_graph_training_steps_agree():
    inputs = make_jets(n_jets=4, n_max=6, seed=12)
    labels = np.array([0, 1, 1, 0], np.int32)
    results = []
    for jit_compile in (False, True):
        keras.utils.set_random_seed(0)
        model = LorentzNet(**SMALL)
        model.compile(
            optimizer=keras.optimizers.SGD(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit_compile,
        )
        history = model.fit(inputs, labels, batch_size=4, epochs=3, verbose=0, shuffle=False)
        results.append((history.history["loss"], logits(model, inputs)))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-4)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-4, atol=1e-5)
    assert results[0][0][-1] < results[0][0][0]


@pytest.mark.parametrize("jit_compile", [False, True])
def test_jet_loop_gives_the_same_logits_gradients_and_statistics(jit_compile):
    inputs = make_jets(n_jets=4, n_max=7, seed=21)
    results = []
    for jet_loop in (False, True):
        keras.utils.set_random_seed(0)
        model = LorentzNet(**SMALL, jet_loop=jet_loop)

        @tf.function(jit_compile=jit_compile)
        def step(p4, mask, model=model):
            with tf.GradientTape() as tape:
                out = model({"p4": p4, "mask": mask}, training=True)
                loss = tf.reduce_sum(out[:, 1] - out[:, 0])
            return out, tape.gradient(loss, model.trainable_variables)

        out, gradients = step(inputs["p4"], inputs["mask"])
        moving = [v.numpy() for v in model.non_trainable_variables]
        results.append((out.numpy(), [g.numpy() for g in gradients], moving, logits(model, inputs)))

    (out, gradients, moving, inference), (loop_out, loop_gradients, loop_moving, loop_inference) = (
        results
    )
    np.testing.assert_allclose(loop_out, out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loop_inference, inference, rtol=1e-5, atol=1e-6)
    for expected, found in zip(moving, loop_moving):
        np.testing.assert_allclose(found, expected, rtol=1e-5, atol=1e-7)
    assert len(loop_gradients) == len(gradients)
    # Some gradients vanish in exact arithmetic (a bias ahead of a BatchNorm): those
    # are rounding noise, compared on the scale of the largest gradient.
    floor = 1e-5 * max(np.abs(g).max() for g in gradients)
    for expected, found in zip(gradients, loop_gradients):
        np.testing.assert_allclose(found, expected, rtol=1e-4, atol=floor)
    # The per-edge weights (passed into the loop as arguments) do get gradients.
    names = [v.path.split("/", 1)[1] for v in model.trainable_variables]
    kernel = names.index("lgeb_0/coordinate_hidden/kernel")
    assert np.abs(loop_gradients[kernel]).max() > 0


def test_save_and_load_round_trip(tmp_path):
    model = LorentzNet(**SMALL, c_weight=0.01, readout="reference", arithmetic="reference")
    inputs = make_jets(n_jets=2, n_max=5, seed=13)
    model(inputs, training=True)  # moves the BatchNorm statistics away from their start
    path = tmp_path / "lorentznet.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, LorentzNet)
    assert loaded.get_config() == model.get_config()
    np.testing.assert_array_equal(logits(loaded, inputs), logits(model, inputs))


def torch_state_of(model):
    """The inverse of ``from_torch_state_dict``: a PyTorch-layout state dict of a model."""
    state = {}
    for name, (variable, transpose) in model._torch_targets().items():
        value = keras.ops.convert_to_numpy(variable)
        state[name] = value.T if transpose else value
    return state


def test_torch_state_dict_round_trip_and_mismatches():
    source = LorentzNet(**SMALL)
    inputs = make_jets(n_jets=2, n_max=5, seed=14)
    source(inputs, training=True)
    state = torch_state_of(source)
    assert "LGEBs.1.phi_x.0.weight" not in state  # no coordinate update in the last block
    assert state["LGEBs.0.phi_e.0.weight"].shape == (8, 18)

    loaded = LorentzNet.from_torch_state_dict({f"module.{k}": v for k, v in state.items()}, **SMALL)
    np.testing.assert_array_equal(logits(loaded, inputs), logits(source, inputs))
    assert torch_hparams(state) == {"n_hidden": 8, "n_scalar": 2, "n_layers": 2, "n_classes": 2}

    missing = {k: v for k, v in state.items() if k != "LGEBs.1.phi_m.0.bias"}
    with pytest.raises(ValueError, match="'LGEBs.1.phi_m.0.bias' missing"):
        LorentzNet.from_torch_state_dict(missing, **SMALL)
    extra = dict(state, **{"LGEBs.0.phi_q.weight": np.zeros(3)})
    with pytest.raises(ValueError, match="unexpected tensor 'LGEBs.0.phi_q.weight'"):
        LorentzNet.from_torch_state_dict(extra, **SMALL)
    wrong = dict(state, **{"graph_dec.3.weight": np.zeros((3, 8), np.float32)})
    with pytest.raises(ValueError, match=r"'graph_dec.3.weight' has shape \(3, 8\), expected"):
        LorentzNet.from_torch_state_dict(wrong, **SMALL)
    with pytest.raises(
        ValueError, match=r"'embedding.weight' has shape \(8, 2\), expected \(9, 2\)"
    ):
        LorentzNet.from_torch_state_dict(state, n_hidden=9, n_layers=2)


# --- the published teacher -------------------------------------------------------------------


def published_fixture(shared_fixtures):
    path = shared_fixtures / "published" / "lorentznet_top.npz"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return path


def test_published_weights_first_batch_parity(shared_fixtures):
    path = published_fixture(shared_fixtures)
    result = lorentznet_parity(path, max_batches=1)
    assert result["n_jets"] == 64
    for key in ("median", "p99", "max"):
        assert result[key] <= PARITY_BOUNDS[key], result
    assert result["agreement"] >= PARITY_BOUNDS["agreement"], result


@pytest.mark.slow
@pytest.mark.parametrize("jit_compile", [False, True])
def test_published_weights_parity(shared_fixtures, jit_compile):
    path = published_fixture(shared_fixtures)
    result = lorentznet_parity(path, jit_compile=jit_compile)
    assert result["n_jets"] == 512
    for key in ("median", "p99", "max"):
        assert result[key] <= PARITY_BOUNDS[key], result
    assert result["agreement"] >= PARITY_BOUNDS["agreement"], result
