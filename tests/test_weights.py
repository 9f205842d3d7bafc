"""PyTorch state dicts into Keras models, and ``paper-kd convert-weights``."""

import importlib.util
import os
from pathlib import Path

import keras
import numpy as np
import pytest

from paper_kd import cli
from paper_kd.models.students import MLP, DeepSet
from paper_kd.models.weights import assign_torch_state, load_state_dict, torch_state_dict

SHARED = Path(os.environ.get("PAPER_KD_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DEEPSET_FIXTURE = SHARED / "fixtures" / "published" / "deepset_kd4jets.npz"
SMALL = {"width": 8, "latent": 4, "depth": 3}


def random_state(model_class=DeepSet, seed=0, **hparams):
    """A PyTorch-layout state dict of a randomly initialised model (with BN counters)."""
    model = model_class(**hparams)
    rng = np.random.default_rng(seed)
    model.build()
    for variable in model.weights:
        variable.assign(rng.uniform(0.5, 1.5, tuple(variable.shape)).astype("float32"))
    state = torch_state_dict(model)
    for name in list(state):
        if name.endswith(".running_var"):
            state[name.replace("running_var", "num_batches_tracked")] = np.array(7)
    return model, state


def jets(seed=0):
    rng = np.random.default_rng(seed)
    momentum = rng.normal(0, 30, (4, 6, 3)).astype(np.float32)
    momentum[..., 0] += 200.0
    p4 = np.concatenate([np.linalg.norm(momentum, axis=-1, keepdims=True), momentum], -1)
    mask = np.ones((4, 6), bool)
    mask[1, 3:] = False
    return {"p4": p4, "mask": mask}


def test_round_trip_through_torch_layout():
    original, state = random_state(**SMALL)
    assert state["phi.0.weight"].shape == (8, 4)  # PyTorch Linear layout [out, in]
    loaded = DeepSet.from_torch_state_dict(state, arithmetic="stable", **SMALL)
    for a, b in zip(original.weights, loaded.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(
        np.asarray(loaded(jets(), training=False)), np.asarray(original(jets(), training=False))
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("rho.4.running_mean"), "no tensor 'rho.4.running_mean'"),
        (lambda s: s.update({"phi.9.weight": np.zeros(3)}), "unexpected tensor 'phi.9.weight'"),
        (
            lambda s: s.update({"output_layer.0.weight": np.zeros((3, 8))}),
            r"'output_layer.0.weight' has shape \(3, 8\)",
        ),
    ],
)
def test_mismatch_is_named_and_nothing_is_loaded(change, message):
    _, state = random_state(**SMALL)
    change(state)
    target = DeepSet(**SMALL)
    target.build()
    before = [np.asarray(variable).copy() for variable in target.weights]
    with pytest.raises(ValueError, match=message):
        assign_torch_state(target._torch_variables(), state, "DeepSet")
    for variable, value in zip(target.weights, before):
        np.testing.assert_array_equal(np.asarray(variable), value)
    with pytest.raises(ValueError, match=message):
        DeepSet.from_torch_state_dict(state, **SMALL)


def test_wrong_depth_names_the_first_mismatch():
    _, state = random_state(**SMALL)
    # Depth 4 has a hidden Linear where depth 3 has its last one: the shapes disagree first.
    match = r"DeepSet: tensor 'phi.8.weight' has shape \(4, 8\), the model expects \(8, 8\)"
    with pytest.raises(ValueError, match=match):
        DeepSet.from_torch_state_dict(state, width=8, latent=4, depth=4)


def test_load_state_dict_npz_prefix_and_wrapper(tmp_path):
    _, state = random_state(**SMALL)
    path = tmp_path / "state.npz"
    np.savez(path, **{f"run/w/module.{k}": v for k, v in state.items()}, other=np.zeros(1))
    loaded = load_state_dict(path, prefix="run/w/")
    assert sorted(loaded) == sorted(state)
    np.testing.assert_array_equal(loaded["phi.4.weight"], state["phi.4.weight"])
    with pytest.raises(ValueError, match="no tensor under prefix 'nothing/'"):
        load_state_dict(path, prefix="nothing/")


def test_load_state_dict_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        load_state_dict(tmp_path / "missing.npz")
    text = tmp_path / "weights.txt"
    text.write_text("not weights")
    with pytest.raises(ValueError, match=r"\.pt/\.pth/\.ckpt checkpoint or an \.npz"):
        load_state_dict(text)


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="PyTorch installed")
def test_pt_checkpoint_without_torch_is_a_clear_error(tmp_path, capsys):
    checkpoint = tmp_path / "best-val-model.pt"
    checkpoint.write_bytes(b"\x80\x02}q\x00.")
    code = cli.main(["convert-weights", str(checkpoint), str(tmp_path / "out.weights.h5")])
    assert code == 1
    assert "needs PyTorch" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
def test_convert_weights_command_from_npz(tmp_path, suffix, capsys):
    original, state = random_state(**SMALL)
    source = tmp_path / "deepset.npz"
    np.savez(source, **state)
    output = tmp_path / f"deepset{suffix}"
    hparams = ["--hparam", "width=8", "--hparam", "latent=4", "--hparam", "arithmetic=stable"]
    assert cli.main(["convert-weights", str(source), str(output), *hparams]) == 0
    assert "parameters" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["deepset.npz", output.name])

    if suffix == ".keras":
        converted = keras.saving.load_model(output)
    else:
        converted = DeepSet(**SMALL)
        converted.build()
        converted.load_weights(output)
    np.testing.assert_array_equal(
        np.asarray(converted(jets(), training=False)), np.asarray(original(jets(), training=False))
    )


def test_convert_weights_mlp_and_bad_output(tmp_path, capsys):
    original, state = random_state(MLP, n_constituents=6, width=8, depth=2)
    source = tmp_path / "mlp.npz"
    np.savez(source, **state)
    output = tmp_path / "mlp.keras"
    args = ["--model", "mlp", "--hparam", "n_constituents=6", "--hparam", "width=8"]
    assert (
        cli.main(["convert-weights", str(source), str(output), *args, "--hparam", "depth=2"]) == 0
    )
    converted = keras.saving.load_model(output)
    assert converted.get_config()["arithmetic"] == "reference"
    np.testing.assert_allclose(
        np.asarray(converted(jets(), training=False)),
        np.asarray(MLP.from_torch_state_dict(state, n_constituents=6, width=8, depth=2)(jets())),
        rtol=1e-6,
    )
    assert cli.main(["convert-weights", str(source), str(tmp_path / "mlp.h5"), *args]) == 1
    assert "must end in .weights.h5 or .keras" in capsys.readouterr().err


def test_convert_published_deepset_reproduces_its_logits(tmp_path):
    if not DEEPSET_FIXTURE.exists():
        pytest.skip(f"published-model fixture {DEEPSET_FIXTURE} absent")
    output = tmp_path / "deepsetkd.keras"
    args = ["convert-weights", str(DEEPSET_FIXTURE), str(output), "--prefix", "deepsetkd/w/"]
    assert cli.main(args) == 0
    model = keras.saving.load_model(output)
    with np.load(DEEPSET_FIXTURE) as archive:
        p4, reference = archive["p4"][:64], archive["deepsetkd/logits"][:64]
    logits = np.asarray(model({"p4": p4, "mask": p4[..., 0] > 0}, training=False))
    assert np.max(np.abs(logits - reference) / (1 + np.abs(reference))) < 1e-3
