"""train(): configs to trained students, checkpoints and resuming, seeds, strategies, the CLI."""

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import yaml
from keras import ops

from paper_kd import cli
from paper_kd.data.format import JetFormatError, write_jets
from paper_kd.models import build_model
from paper_kd.physics import mass
from paper_kd.train import _augment, _read_split, cached_teacher_logits, train

REPO = Path(__file__).resolve().parents[1]


def toy_jets(n_jets, seed, n_max=24):
    """Massless constituents near the x axis: three-prong 'top' jets and one-prong 'QCD' jets."""
    rng = np.random.default_rng(seed)
    label = (np.arange(n_jets) % 2).astype(np.int8)
    rng.shuffle(label)
    p4 = np.zeros((n_jets, n_max, 4), np.float32)
    for i, top in enumerate(label):
        n = int(rng.integers(n_max // 2, n_max + 1)) if top else int(rng.integers(4, n_max // 2))
        centers = rng.normal(0, 0.3 if top else 0.02, size=(3 if top else 1, 2))
        angles = centers[rng.integers(0, len(centers), n)] + rng.normal(0, 0.05, (n, 2))
        pt = np.sort(rng.exponential(20.0, n) + 1.0)[::-1]
        momentum = np.stack([pt, pt * angles[:, 0], pt * angles[:, 1]], -1)
        p4[i, :n] = np.concatenate([np.linalg.norm(momentum, axis=-1)[:, None], momentum], -1)
    return p4, label


@pytest.fixture(scope="module")
def jets_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy_jets")
    for k, (split, n_jets) in enumerate((("train", 128), ("val", 64), ("test", 64))):
        p4, label = toy_jets(n_jets, seed=k)
        write_jets(folder / f"{split}.h5", p4, label)
    return folder


def tiny_config(jets_dir, output_dir, **sections):
    config = {
        "name": "tiny",
        "seed": 7,
        "data": {"dir": str(jets_dir)},
        "model": {"name": "deepset", "hparams": {"width": 8, "latent": 8, "depth": 2}},
        "optimizer": {"learning_rate": 5e-3},
        "schedule": {"name": "student", "warmup_steps": 3},
        "training": {"batch_size": 32, "epochs": 2, "verbose": 0},
        "output": {"dir": str(output_dir)},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


class Recorder(keras.callbacks.Callback):
    def __init__(self, crash_in_epoch=None):
        super().__init__()
        self.events, self.logs = [], []
        self.crash_in_epoch = crash_in_epoch
        self.epoch = None

    def on_train_begin(self, logs=None):
        self.events.append("begin")

    def on_train_end(self, logs=None):
        self.events.append("end")

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == self.crash_in_epoch and batch == 1:
            raise RuntimeError("simulated crash")

    def on_epoch_end(self, epoch, logs=None):
        self.events.append(epoch)
        self.logs.append(dict(logs))


def checkpoint_arrays(output_dir):
    with np.load(output_dir / "checkpoint.npz") as archive:
        state = json.loads(archive["state"].tobytes().decode())
        return state, {name: archive[name] for name in archive.files if name != "state"}


@pytest.fixture(scope="module")
def finished_run(jets_dir, tmp_path_factory):
    """One seeded 3-epoch run, shared by the tests that only read it."""
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    recorder = Recorder()
    config = tiny_config(jets_dir, output_dir, training={"epochs": 3})
    return config, train(config, callbacks=[recorder]), recorder


def test_train_logs_checkpoints_and_best_model(finished_run):
    config, result, recorder = finished_run
    output_dir = Path(config["output"]["dir"])

    assert recorder.events == ["begin", 0, 1, 2, "end"]
    expected = {"loss", "hard_loss", "soft_loss", "accuracy", "auc", "learning_rate"}
    expected |= {f"val_{name}" for name in ("loss", "hard_loss", "soft_loss", "accuracy", "auc")}
    assert expected <= set(recorder.logs[0])
    assert set(result.history) == set(recorder.logs[0])
    assert all(len(values) == 3 for values in result.history.values())
    # 4 steps per epoch, warm-up over 3 steps: full rate by the end of epoch 0.
    assert result.history["learning_rate"] == pytest.approx([5e-3] * 3)
    assert result.history["soft_loss"] == [0.0] * 3
    assert result.history["loss"] == result.history["hard_loss"]
    assert result.history["accuracy"][-1] > 0.6  # toy top jets are easy to tell apart

    best = int(np.argmax(result.history["val_accuracy"]))
    assert result.best_epoch == best
    assert result.output_dir == output_dir
    loaded = keras.saving.load_model(output_dir / "best.keras")
    p4 = toy_jets(8, 9)[0]
    inputs = {"p4": p4, "mask": np.any(p4 != 0, axis=-1)}
    np.testing.assert_allclose(
        ops.convert_to_numpy(loaded(inputs)), ops.convert_to_numpy(result.model(inputs)), rtol=1e-6
    )
    state, arrays = checkpoint_arrays(output_dir)
    assert state["epoch"] == 3 and state["best_epoch"] == best
    for k, variable in enumerate(result.model.variables):  # the model holds the best weights
        np.testing.assert_array_equal(arrays[f"best/{k:05d}"], variable.numpy())
    saved = yaml.safe_load((output_dir / "config.yaml").read_text())
    assert saved["seed"] == 7
    assert json.loads((output_dir / "history.json").read_text()) == result.history


def test_seeded_run_repeats_and_crashed_run_resumes_exactly(jets_dir, finished_run, tmp_path):
    config, full, _ = finished_run
    crashed = tiny_config(jets_dir, tmp_path / "crashed", training={"epochs": 3})
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashed, callbacks=[Recorder(crash_in_epoch=2)])
    # The crash hit epoch 2: the last good checkpoint (after epoch 1) is intact.
    state, _ = checkpoint_arrays(tmp_path / "crashed")
    assert state["epoch"] == 2
    assert not list((tmp_path / "crashed").glob(".*tmp*"))

    recorder = Recorder()
    resumed = train(crashed, callbacks=[recorder])
    assert recorder.events == ["begin", 2, "end"]
    # Same seed, same numbers: epochs 0-1 of the first try and the resumed epoch 2
    # repeat the uninterrupted run bit for bit.
    assert resumed.history == full.history
    _, full_arrays = checkpoint_arrays(Path(config["output"]["dir"]))
    _, resumed_arrays = checkpoint_arrays(tmp_path / "crashed")
    assert full_arrays.keys() == resumed_arrays.keys()
    for name in full_arrays:
        np.testing.assert_array_equal(full_arrays[name], resumed_arrays[name], err_msg=name)

    changed = tiny_config(
        jets_dir, tmp_path / "crashed", optimizer={"learning_rate": 1e-3}, training={"epochs": 4}
    )
    with pytest.raises(ValueError, match="different value of key 'optimizer.learning_rate'"):
        train(changed)


def test_distillation_with_cached_teacher(jets_dir, tmp_path):
    keras.utils.set_random_seed(3)
    teacher = build_model("deepset", width=8, latent=8, depth=2)
    teacher.build()
    teacher.save(tmp_path / "teacher.keras")
    weights = [v.numpy().copy() for v in teacher.variables]
    config = tiny_config(
        jets_dir,
        tmp_path / "kd",
        teacher={"path": str(tmp_path / "teacher.keras")},
        distillation={"temperature": 2.0, "weight": 0.7, "cache": True},
        training={"epochs": 1},
    )
    result = train(config)
    assert result.history["soft_loss"][0] > 0
    assert result.history["loss"][0] != result.history["hard_loss"][0]
    cache = sorted((tmp_path / "kd" / "teacher_cache").glob("teacher_logits_*.npy"))
    assert len(cache) == 2  # training and validation sets
    logits = {np.load(path).shape for path in cache}
    assert logits == {(128, 2), (64, 2)}
    # The same teacher as an object, the same jets: the stored logits are found again.
    again = keras.saving.load_model(tmp_path / "teacher.keras")
    train_jets = _read_split(jets_dir / "train.h5", 128, None)
    logits = cached_teacher_logits(again, train_jets, tmp_path / "kd" / "teacher_cache")
    assert len(list((tmp_path / "kd" / "teacher_cache").glob("*.npy"))) == 2
    expected = ops.convert_to_numpy(
        again({"p4": train_jets["p4"][:4], "mask": np.any(train_jets["p4"][:4] != 0, -1)})
    )
    np.testing.assert_allclose(logits[:4], expected, rtol=1e-5, atol=1e-6)
    loaded = keras.saving.load_model(tmp_path / "teacher.keras")
    for before, variable in zip(weights, loaded.variables):
        np.testing.assert_array_equal(before, variable.numpy())


def test_bad_inputs_fail_before_training(jets_dir, tmp_path):
    keras.utils.set_random_seed(3)
    three_class = build_model("deepset", width=8, latent=8, depth=2, n_classes=3)
    three_class.build()
    config = tiny_config(
        jets_dir, tmp_path / "kd", distillation={"temperature": 1.0, "weight": 1.0}
    )
    with pytest.raises(ValueError, match=r"teacher's output shape \(16, 3\) does not match"):
        train(config, teacher=three_class)
    with pytest.raises(ValueError, match="'teacher.path' is needed"):
        train(config)
    augmented = tiny_config(
        jets_dir,
        tmp_path / "kd",
        distillation={"temperature": 1.0, "weight": 1.0, "cache": True},
        training={"augment_beta": 0.3},
    )
    with pytest.raises(ValueError, match="'distillation.cache' is true but training batches"):
        train(augmented, teacher=build_model("deepset", width=8, latent=8, depth=2))

    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    with h5py.File(bad_dir / "train.h5", "w") as handle:
        handle["p4"] = np.zeros((4, 3, 4), np.float32)
    (bad_dir / "val.h5").write_bytes((jets_dir / "val.h5").read_bytes())
    with pytest.raises(JetFormatError, match="train.h5: attribute 'format'"):
        train(tiny_config(bad_dir, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "kd").exists()


def test_boost_augmentation_keeps_jet_masses(jets_dir):
    from paper_kd.data.pipeline import make_dataset

    plain = make_dataset(jets_dir / "train.h5", 32, shuffle=True, seed=4)
    boosted = _augment(
        make_dataset(jets_dir / "train.h5", 32, shuffle=True, seed=4), 0.6, "x", seed=11
    )
    for (inputs, _), (boosted_inputs, _) in zip(plain, boosted):
        p4, new_p4 = inputs["p4"].numpy(), boosted_inputs["p4"].numpy()
        mask = inputs["mask"].numpy()
        np.testing.assert_array_equal(mask, boosted_inputs["mask"].numpy())
        assert np.all(new_p4[~mask] == 0)
        jet, new_jet = p4.sum(axis=1), new_p4.sum(axis=1)
        np.testing.assert_allclose(mass(new_jet), mass(jet), rtol=2e-3, atol=0.05)
        # Along x only: the other components stay.
        np.testing.assert_array_equal(new_p4[..., 2:], p4[..., 2:])

        # Along x the rapidity shifts by atanh(beta): recover each jet's beta.
        def rapidity_x(j):
            return 0.5 * np.log((j[:, 0] + j[:, 1]) / (j[:, 0] - j[:, 1]))

        beta = np.tanh(rapidity_x(new_jet.astype(np.float64)) - rapidity_x(jet.astype(np.float64)))
        assert np.all(beta > -1e-3) and np.all(beta < 0.6 + 1e-3)
        assert beta.std() > 0.05  # one beta per jet


def test_cli_train(finished_run, tmp_path, capsys):
    config, result, _ = finished_run
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    # The run is finished: the command resumes it, trains nothing and reports the best epoch.
    assert cli.main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    best = max(result.history["val_accuracy"])
    assert f"best val_accuracy {best:.4f} at epoch {result.best_epoch}" in out

    broken = dict(config, training={**config["training"], "epoch": 3})
    path.write_text(yaml.safe_dump(broken))
    assert cli.main(["train", str(path)]) == 1
    error = capsys.readouterr().err.strip()
    assert error == f"paper-kd train: error: {path}: unknown key 'training.epoch'"


MIRRORED_SCRIPT = """
import json, sys
import paper_kd
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np
from paper_kd.models import build_model
from paper_kd.train import train

config = json.loads(sys.argv[1])
keras.utils.set_random_seed(1)
teacher = build_model("mlp", n_constituents=16, width=8, depth=2)
teacher.build()
single = train({**config, "output": {"dir": sys.argv[2] + "/single"}}, teacher=teacher)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
mirrored = train({**config, "output": {"dir": sys.argv[2] + "/mirrored"}}, teacher=teacher,
                 strategy=strategy)
difference = max(
    float(np.abs(a.numpy() - b.numpy()).max())
    for a, b in zip(single.model.trainable_variables, mirrored.model.trainable_variables)
)
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "difference": difference,
                  "loss": [single.history["loss"], mirrored.history["loss"]]}))
"""


@pytest.mark.slow
def test_mirrored_strategy_on_two_cpu_devices_matches_one_device(jets_dir, tmp_path):
    # A student without BatchNorm (per-replica statistics would differ by design).
    config = tiny_config(
        jets_dir,
        tmp_path,
        model={"name": "mlp", "hparams": {"n_constituents": 16, "width": 8, "depth": 1}},
        distillation={"temperature": 2.0, "weight": 0.5},
        training={"epochs": 1},
    )
    # Logical devices must be set before TensorFlow starts: a fresh interpreter.
    process = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MIRRORED_SCRIPT), json.dumps(config), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    report = json.loads(process.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2
    assert report["difference"] < 1e-6
    assert report["loss"][0] == pytest.approx(report["loss"][1], rel=1e-5)


WORKER_SCRIPT = """
import json, sys
import paper_kd
from paper_kd.train import default_strategy, train

strategy = default_strategy()
result = train(json.loads(sys.argv[1]), strategy=strategy)
weights = float(sum(abs(v.numpy()).sum() for v in result.model.trainable_variables))
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "loss": result.history["loss"],
                  "weights": weights}))
"""


def _free_ports(count):
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for handle in sockets:
        handle.bind(("localhost", 0))
    ports = [handle.getsockname()[1] for handle in sockets]
    for handle in sockets:
        handle.close()
    return ports


@pytest.mark.slow
def test_multi_worker_strategy_from_tf_config(jets_dir, tmp_path):
    import os

    config = tiny_config(
        jets_dir,
        tmp_path / "run",
        model={"name": "mlp", "hparams": {"n_constituents": 16, "width": 8, "depth": 1}},
        training={"epochs": 1},
    )
    workers = [f"localhost:{port}" for port in _free_ports(2)]
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config)}
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(WORKER_SCRIPT), json.dumps(config)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=REPO,
            )  # fmt: skip
        )
    reports = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert [report["replicas"] for report in reports] == [2, 2]
    assert reports[0]["loss"] == reports[1]["loss"]  # one synchronized model
    assert reports[0]["weights"] == pytest.approx(reports[1]["weights"], rel=1e-6)
    # Only the chief (worker 0) wrote the run's files.
    assert (tmp_path / "run" / "checkpoint.npz").exists()


def test_xla_training_on_padded_widths_matches_graph_training(jets_dir, tmp_path):
    """``jit_compile`` with ``pad_multiple`` trains the same model as the plain graph."""
    histories = {}
    for jit in (False, True):
        config = tiny_config(
            jets_dir,
            tmp_path / f"jit{int(jit)}",
            model={"name": "lorentznet", "hparams": {"n_hidden": 4, "n_layers": 1, "dropout": 0.0}},
            training={"epochs": 1, "jit_compile": jit, "pad_multiple": 8, "deterministic": not jit},
        )
        with warnings.catch_warnings():
            # Keras warns when it falls back from XLA to the plain graph: that is a failure.
            warnings.simplefilter("error", UserWarning)
            histories[jit] = train(config).history
    # Same seeds and batches, no dropout (XLA draws other random numbers); XLA changes
    # only the float rounding (fused multiply-adds).
    for key in ("loss", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(histories[True][key], histories[False][key], rtol=1e-3)


@pytest.mark.parametrize("model, warned", [("deepset", True), ("pfn", False)])
def test_bucketing_a_batch_norm_model_warns(jets_dir, tmp_path, caplog, model, warned):
    # Bucketed batches cost a BatchNorm model accuracy (measured, see the pipeline's
    # docstring); a model without BatchNorm trains bucketed silently.
    hparams = {"deepset": {"width": 8, "latent": 8, "depth": 2}, "pfn": {"phi_sizes": [8]}}
    config = tiny_config(
        jets_dir, tmp_path / model, model={"name": model, "hparams": hparams[model]},
        training={"epochs": 1, "bucket": True},
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="paper_kd.train"):
        result = train(config)
    assert len(result.history["val_accuracy"]) == 1
    messages = [record.getMessage() for record in caplog.records]
    assert any("bucket: true with a BatchNorm model" in text for text in messages) is warned
