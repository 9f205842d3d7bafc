"""Training from a YAML config: the published teacher recipe and the students' recipe.

``train(config)`` builds the student (or the teacher, trained from scratch with
``temperature <= 0``), wraps it in a ``Distiller``, and fits it epoch by epoch:

- data from ``paper_kd.data.pipeline``; each epoch reshuffles with the seed
  ``(seed, epoch)``, so a run and its resumed continuation see the same batches;
- optional boost augmentation of training batches: each jet gets a random
  ``beta`` in ``[0, augment_beta]`` along x (the paper's choice), y, z or a
  random direction, drawn from a seed of ``(seed, epoch, batch)``;
- teacher logits computed once per training (and validation) set and reused
  when that is valid (no augmentation, a batch-independent teacher readout);
- AdamW with PyTorch's defaults (weight decay 0.01, epsilon 1e-8), AMSGrad for
  the students, and the schedules of ``paper_kd.schedules``;
- after each epoch an atomic checkpoint (``checkpoint.npz``: weights, optimizer
  state, epoch, best score, history); the student with the best validation
  accuracy is saved as ``best.keras``; a run started again on the same output
  folder resumes after the last finished epoch;
- a ``tf.distribute`` strategy (``MirroredStrategy`` on several devices,
  ``MultiWorkerMirroredStrategy`` when ``TF_CONFIG`` is set); the batch size in
  the config is the global one.

Per-epoch logs reaching callbacks: ``loss, hard_loss, soft_loss, accuracy, auc``,
the same with ``val_`` and ``learning_rate``.
"""

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
from pathlib import Path

import numpy as np

from paper_kd.atomic import atomic_path
from paper_kd.config import ConfigError, load_config

__all__ = ["TrainResult", "add_arguments", "default_strategy", "main", "make_optimizer", "train"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.npz"
BEST_MODEL_NAME = "best.keras"
# Keys that may change between a run and its resumed continuation.
_RESUMABLE_CHANGES = {("training", "epochs"), ("training", "verbose"), ("training", "resume")}


@dataclasses.dataclass
class TrainResult:
    """What ``train`` returns: the best-validation-accuracy student and the run's record."""

    model: object
    history: dict
    best_epoch: int
    output_dir: Path


def default_strategy():
    """``MultiWorkerMirroredStrategy`` with ``TF_CONFIG``, ``Mirrored`` on 2+ GPUs, else default."""
    import tensorflow as tf

    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _is_chief(strategy):
    """Whether this process writes the run's files (one writer per multi-worker cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def make_optimizer(config, steps_per_epoch):
    """AdamW with the config's settings (PyTorch defaults) and learning-rate schedule."""
    import keras

    from paper_kd.schedules import make_schedule

    settings = config["optimizer"]
    schedule = make_schedule(
        config["schedule"], settings["learning_rate"], steps_per_epoch, config["training"]["epochs"]
    )
    return keras.optimizers.AdamW(
        learning_rate=schedule,
        weight_decay=settings["weight_decay"],
        epsilon=settings["epsilon"],
        beta_1=settings["beta_1"],
        beta_2=settings["beta_2"],
        amsgrad=settings["amsgrad"],
    )


# ----------------------------------------------------------------------------- data


def _split_files(config):
    from paper_kd.data.format import read_info, split_path

    files = {}
    for split, limit in (("train", "max_train_jets"), ("val", "max_val_jets")):
        path = split_path(config["data"]["dir"], split)
        info = read_info(path)  # a wrong or incomplete file fails here, before training
        n_jets = (
            info["n_jets"]
            if config["data"][limit] is None
            else min(info["n_jets"], config["data"][limit])
        )
        if n_jets < 1:
            raise ValueError(f"{path}: holds no jets")
        files[split] = (path, n_jets)
    return files


def _read_split(path, n_jets, n_max):
    from paper_kd.data.format import read_jets

    jets = read_jets(path, 0, n_jets, ("p4", "n_constituents", "label"), n_max)
    jets["p4"] = np.ascontiguousarray(jets["p4"], np.float32)
    return jets


def _epoch_seed(seed, epoch):
    # One integer per (seed, epoch); distinct for every pair in practice.
    return int(seed) * 1_000_003 + int(epoch)


def _array_dataset(jets, teacher_logits, batch_size, *, shuffle, seed, bucket, pad_multiple=1):
    """Batches like ``make_dataset``'s, from jets in memory, with their cached teacher logits."""
    import tensorflow as tf

    from paper_kd.data.pipeline import assemble_batch, plan_batches

    rng = np.random.default_rng([seed, 0]) if shuffle else None
    batches, leftover = plan_batches(
        jets["n_constituents"], jets["label"], batch_size, rng=rng, bucket=bucket
    )
    if len(leftover):
        batches.append(leftover)

    def generate():
        for index in batches:
            p4, mask, label = assemble_batch(jets, index, pad_multiple)
            yield p4, mask, teacher_logits[index], label

    signature = (
        tf.TensorSpec((None, None, 4), tf.float32),
        tf.TensorSpec((None, None), tf.bool),
        tf.TensorSpec((None, teacher_logits.shape[1]), tf.float32),
        tf.TensorSpec((None,), tf.int32),
    )
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(len(batches)))
    dataset = dataset.map(
        lambda p4, mask, logits, label: ({"p4": p4, "mask": mask, "teacher_logits": logits}, label)
    )
    return dataset.prefetch(tf.data.AUTOTUNE)


def _augment(dataset, augment_beta, direction, seed):
    """Boost every jet of every batch by a random ``beta`` in ``[0, augment_beta]``."""
    import tensorflow as tf

    from paper_kd.physics import boost_tensor

    def boost_batch(index, batch):
        inputs, label = batch
        p4 = inputs["p4"]
        batch_size = tf.shape(p4)[0]
        batch_seed = tf.stack([tf.constant(seed, tf.int64), index])
        beta = tf.random.stateless_uniform(
            (batch_size, 1), seed=batch_seed, maxval=augment_beta
        )  # [batch, 1]
        if direction == "random":
            axis = tf.random.stateless_normal((batch_size, 1, 3), seed=batch_seed + 1)
            axis = tf.math.l2_normalize(axis, axis=-1)  # [batch, 1, 3]
        else:
            axis = direction
        boosted = boost_tensor(p4, beta, axis)
        # Padding is boosted to zero already; the mask keeps it out of every model.
        return {**inputs, "p4": boosted}, label

    return dataset.enumerate().map(boost_batch, num_parallel_calls=tf.data.AUTOTUNE)


def _data_fingerprint(jets):
    digest = hashlib.sha256()
    for name in ("p4", "n_constituents", "label"):
        values = np.ascontiguousarray(jets[name])
        digest.update(f"{name}{values.shape}{values.dtype}".encode())
        digest.update(memoryview(values).cast("B"))
    return digest.hexdigest()


def _compute_teacher_logits(teacher, jets, batch_size):
    import tensorflow as tf

    from paper_kd.data.pipeline import assemble_batch

    @tf.function(reduce_retracing=True)
    def predict(p4, mask):
        return teacher({"p4": p4, "mask": mask}, training=False)

    n_jets = len(jets["label"])
    logits = []
    for start in range(0, n_jets, batch_size):
        p4, mask, _ = assemble_batch(jets, np.arange(start, min(start + batch_size, n_jets)))
        logits.append(predict(tf.constant(p4), tf.constant(mask)).numpy())
    return np.concatenate(logits).astype(np.float32)


def cached_teacher_logits(teacher, jets, cache_dir, batch_size=512):
    """Teacher logits ``[n_jets, n_classes]`` of ``jets``, computed once and stored.

    The file name is a hash of the teacher (class, config, weights) and of the
    jets themselves, so a changed teacher or data set never reads a stale cache.
    """
    from paper_kd.distill import teacher_fingerprint

    key = hashlib.sha256(
        (teacher_fingerprint(teacher) + _data_fingerprint(jets)).encode()
    ).hexdigest()[:24]
    path = Path(cache_dir) / f"teacher_logits_{key}.npy"
    if path.exists():
        logits = np.load(path)
        if logits.shape[0] == len(jets["label"]):
            log.info("teacher logits read from %s", path)
            return logits
    log.info("computing teacher logits of %d jets", len(jets["label"]))
    logits = _compute_teacher_logits(teacher, jets, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda handle: np.save(handle, logits))
    return logits


# ----------------------------------------------------------------------------- checkpoints


def _atomic_write(path, write):
    """Write ``path`` through a temporary file in the same folder, then rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def _values(variables):
    from keras import ops

    return [np.asarray(ops.convert_to_numpy(v)) for v in variables]


def _assign(variables, values, what, source):
    if len(variables) != len(values):
        raise ValueError(
            f"{source}: checkpoint holds {len(values)} {what} variables, the model has "
            f"{len(variables)}; it was written for another model"
        )
    for variable, value in zip(variables, values):
        if tuple(variable.shape) != value.shape:
            raise ValueError(
                f"{source}: {what} variable {variable.path} has shape {tuple(variable.shape)}, "
                f"the checkpoint {value.shape}"
            )
        variable.assign(value)


def _save_checkpoint(path, student, optimizer, state, best_values):
    arrays = {"state": np.frombuffer(json.dumps(state).encode(), np.uint8)}
    for i, value in enumerate(_values(student.variables)):
        arrays[f"student/{i:05d}"] = value
    for i, value in enumerate(_values(optimizer.variables)):
        arrays[f"optimizer/{i:05d}"] = value
    for i, value in enumerate(best_values or []):
        arrays[f"best/{i:05d}"] = value

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    _atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def _load_checkpoint(path):
    with np.load(path) as archive:
        state = json.loads(archive["state"].tobytes().decode())
        groups = {"student": [], "optimizer": [], "best": []}
        for name in sorted(archive.files):
            group = name.split("/")[0]
            if group in groups:
                groups[group].append(archive[name])
    return state, groups


def _resume_view(config):
    view = json.loads(json.dumps(config, default=str))
    view.pop("source", None)
    view.pop("output", None)
    for section, key in _RESUMABLE_CHANGES:
        view[section].pop(key, None)
    return view


def _first_difference(old, new, prefix=""):
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}"
    return None


def _save_student(model, path):
    """``model.save`` through a temporary ``.keras`` name, then rename."""
    with atomic_path(path) as tmp:
        model.save(tmp)


# ----------------------------------------------------------------------------- callbacks


def _relay_class():
    import keras

    class Relay(keras.callbacks.Callback):
        """Passes one epoch's events from an inner ``fit`` to the run's callbacks.

        ``on_train_begin``/``on_train_end`` are sent once per run by ``train``.
        """

        def __init__(self, outer, learning_rate):
            super().__init__()
            self.outer = outer
            self.learning_rate = learning_rate

        def on_epoch_begin(self, epoch, logs=None):
            self.outer.on_epoch_begin(epoch, logs)

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            logs["learning_rate"] = self.learning_rate()
            self.outer.on_epoch_end(epoch, logs)

        def on_train_batch_begin(self, batch, logs=None):
            self.outer.on_train_batch_begin(batch, logs)

        def on_train_batch_end(self, batch, logs=None):
            self.outer.on_train_batch_end(batch, logs)

        def on_test_begin(self, logs=None):
            self.outer.on_test_begin(logs)

        def on_test_end(self, logs=None):
            self.outer.on_test_end(logs)

    return Relay


# ----------------------------------------------------------------------------- training


def _seed_everything(seed, deterministic):
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    else:
        # The setting is process-wide: a run asking for speed must not inherit an
        # earlier run's determinism (under which Keras also refuses XLA).
        from tensorflow.python.framework import config as tf_config

        tf_config.disable_op_determinism()


def _batch_norm_layers(model):
    """Names of the BatchNorm layers (Keras's or the masked one) anywhere in ``model``."""
    # Keras has no public recursive layer walk for subclassed models.
    layers = model._flatten_layers(include_self=False, recursive=True)
    return [layer.name for layer in layers if "BatchNormalization" in type(layer).__name__]


def _load_teacher(config):
    import keras

    path = config["teacher"]["path"]
    if path is None:
        raise ConfigError(
            f"{config['source']}: key 'teacher.path' is needed when distillation.temperature > 0"
        )
    if not Path(path).exists():
        raise FileNotFoundError(f"{config['source']}: teacher.path {path}: no such file")
    return keras.saving.load_model(path, compile=False)


def _check_outputs(teacher, student, sample, source):
    from keras import ops

    student_shape = tuple(ops.shape(student(sample, training=False)))
    if teacher is None:
        return
    teacher_shape = tuple(ops.shape(teacher(sample, training=False)))
    if teacher_shape != student_shape:
        raise ValueError(
            f"{source}: the teacher's output shape {teacher_shape} does not match the "
            f"student's {student_shape}"
        )


def train(config, *, teacher=None, callbacks=(), strategy=None):
    """Train the model a config describes; resume if its output folder holds a checkpoint.

    Args:
        config: a path to a YAML file or a config dict (see ``paper_kd.config``).
        teacher: a teacher model to use instead of loading ``teacher.path``.
        callbacks: Keras callbacks; they get every epoch's logs (``loss, hard_loss,
            soft_loss, accuracy, auc, val_*, learning_rate``). Their ``model`` is
            the ``Distiller``; its ``student`` is the network being trained.
        strategy: a ``tf.distribute.Strategy``; default ``default_strategy()``.

    Returns:
        ``TrainResult(model, history, best_epoch, output_dir)``; ``model`` is the
        student with the weights of its best validation accuracy.

    Side effects: seeds Python, NumPy and TensorFlow with the config's seed and,
    with ``training.deterministic`` (default), turns on TensorFlow's op
    determinism for the rest of the process.
    """
    import keras

    from paper_kd.distill import Distiller, batch_independent
    from paper_kd.models import build_model
    from paper_kd.schedules import make_schedule

    config = load_config(config)
    source = config["source"]
    training, distillation = config["training"], config["distillation"]
    seed, epochs, batch_size = config["seed"], training["epochs"], training["batch_size"]
    output_dir = Path(config["output"]["dir"])
    distilling = distillation["temperature"] > 0

    # Everything that can be wrong with the inputs fails here, before any training.
    files = _split_files(config)
    checkpoint_path = output_dir / CHECKPOINT_NAME
    view = _resume_view(config)
    saved = None
    if checkpoint_path.exists() and training["resume"]:
        saved = _load_checkpoint(checkpoint_path)
        difference = _first_difference(saved[0]["config"], view)
        if difference:
            raise ConfigError(
                f"{source}: {checkpoint_path} was written with a different value of key "
                f"{difference!r}; use another output.dir or remove the checkpoint"
            )
    train_path, n_train = files["train"]
    val_path, n_val = files["val"]
    _seed_everything(seed, training["deterministic"])
    strategy = strategy or default_strategy()

    from paper_kd.data.pipeline import assemble_batch

    # A few validation jets: to check the models' outputs and build them.
    first_jets = _read_split(val_path, min(16, n_val), config["data"]["n_max"])
    sample_p4, sample_mask, _ = assemble_batch(first_jets, np.arange(len(first_jets["label"])))
    sample = {"p4": sample_p4, "mask": sample_mask}
    with strategy.scope():
        student = build_model(config["model"]["name"], **config["model"]["hparams"])
        if distilling and teacher is None:
            teacher = _load_teacher(config)
        if not distilling:
            teacher = None
        # Also creates the student's variables, which must be made inside the scope.
        _check_outputs(teacher, student, sample, source)

    if training["bucket"] and _batch_norm_layers(student):
        log.warning(
            "%s: bucket: true with a BatchNorm model costs validation accuracy (Deep Set on "
            "generated jets: 0.904 vs 0.919 at 200 constituents, see paper_kd.data.pipeline)",
            config["name"],
        )  # fmt: skip

    use_cache = distilling and distillation["cache"] is not False
    if use_cache and training["augment_beta"] > 0:
        use_cache = False
        reason = "training batches are boosted"
    elif use_cache and not batch_independent(teacher, sample):
        use_cache = False
        reason = "the teacher's readout depends on the batch"
    if distilling and distillation["cache"] is True and not use_cache:
        raise ConfigError(f"{source}: key 'distillation.cache' is true but {reason}")

    train_jets = val_jets = train_logits = val_logits = None
    if use_cache:
        cache_dir = distillation["cache_dir"] or output_dir / "teacher_cache"
        train_jets = _read_split(train_path, n_train, config["data"]["n_max"])
        val_jets = _read_split(val_path, n_val, config["data"]["n_max"])
        train_logits = cached_teacher_logits(teacher, train_jets, cache_dir)
        val_logits = cached_teacher_logits(teacher, val_jets, cache_dir)

    # Limitation: under a strategy each replica normalises with its own batch
    # statistics unless the model's BatchNorm layers are synchronized; the
    # published teacher synchronized them over its 4 GPUs (32 jets each).
    n_replicas = strategy.num_replicas_in_sync
    steps_per_epoch = math.ceil(n_train / batch_size)
    log.info(
        "%s: %s on %d training jets, %d steps per epoch, %d replica(s), teacher %s",
        config["name"], config["model"]["name"], n_train, steps_per_epoch, n_replicas,
        "cached" if use_cache else ("live" if distilling else "none"),
    )  # fmt: skip

    with strategy.scope():
        optimizer = make_optimizer(config, steps_per_epoch)
        distiller = Distiller(
            teacher,
            student,
            temperature=distillation["temperature"],
            weight=distillation["weight"],
            decay_steps=distillation["decay_steps"],
        )
        distiller.compile(optimizer=optimizer, jit_compile=training["jit_compile"])
        distiller(sample)
        optimizer.build(student.trainable_variables)

    from paper_kd.data.pipeline import make_dataset

    # XLA compiles one program per batch shape: rounded widths keep the count small.
    pad_multiple = training["pad_multiple"]

    def train_dataset(epoch):
        epoch_seed = _epoch_seed(seed, epoch)
        if use_cache:
            return _array_dataset(
                train_jets, train_logits, batch_size, shuffle=True, seed=epoch_seed,
                bucket=training["bucket"], pad_multiple=pad_multiple,
            )  # fmt: skip
        # Limitation: make_dataset reads through a Python generator, which tf.data
        # cannot shard by file: with several workers each one reads the whole file
        # and keeps its share of the batches.
        dataset = make_dataset(
            train_path, batch_size, shuffle=True, seed=epoch_seed, bucket=training["bucket"],
            n_max=config["data"]["n_max"], max_jets=n_train, pad_multiple=pad_multiple,
        )  # fmt: skip
        if training["augment_beta"] > 0:
            dataset = _augment(
                dataset, training["augment_beta"], training["augment_direction"], epoch_seed
            )
        return dataset

    if use_cache:
        val_dataset = _array_dataset(
            val_jets, val_logits, batch_size, shuffle=False, seed=0, bucket=False,
            pad_multiple=pad_multiple,
        )  # fmt: skip
    else:
        val_dataset = make_dataset(
            val_path, batch_size, n_max=config["data"]["n_max"], max_jets=n_val,
            pad_multiple=pad_multiple,
        )  # fmt: skip

    # Resume after the last finished epoch.
    output_dir.mkdir(parents=True, exist_ok=True)
    state = {"epoch": 0, "best_val_accuracy": -1.0, "best_epoch": -1, "history": {}}
    best_values = None
    if saved is not None:
        saved_state, groups = saved
        _assign(student.variables, groups["student"], "student", checkpoint_path)
        _assign(optimizer.variables, groups["optimizer"], "optimizer", checkpoint_path)
        best_values = groups["best"] or None
        state.update(saved_state)
        log.info("resuming %s after epoch %d", config["name"], state["epoch"])
    state["config"] = view
    # Limitation: with several workers, output.dir must be a folder all of them
    # see (they resume from the chief's checkpoint); only the chief writes there.
    chief = _is_chief(strategy)
    if chief:
        _write_config(output_dir, config)

    schedule = make_schedule(
        config["schedule"], config["optimizer"]["learning_rate"], steps_per_epoch, epochs
    )

    def learning_rate():
        """The rate of the epoch's last step (the optimizer's own is the next step's)."""
        if not callable(schedule):
            return float(schedule)
        step = max(int(optimizer.iterations.numpy()) - 1, 0)
        return float(keras.ops.convert_to_numpy(schedule(step)))

    outer = keras.callbacks.CallbackList(
        list(callbacks), model=distiller, epochs=epochs, steps=steps_per_epoch,
        verbose=training["verbose"],
    )  # fmt: skip
    relay = _relay_class()(outer, learning_rate)
    history = state["history"]

    outer.on_train_begin()
    for epoch in range(state["epoch"], epochs):
        record = distiller.fit(
            train_dataset(epoch),
            validation_data=val_dataset,
            epochs=epoch + 1,
            initial_epoch=epoch,
            callbacks=[relay],
            shuffle=False,
            verbose=training["verbose"],
        )
        logs = {key: float(values[-1]) for key, values in record.history.items()}
        logs["learning_rate"] = learning_rate()
        for key, value in logs.items():
            history.setdefault(key, []).append(value)

        if logs.get("val_accuracy", -1.0) > state["best_val_accuracy"]:
            state["best_val_accuracy"] = logs["val_accuracy"]
            state["best_epoch"] = epoch
            best_values = _values(student.variables)
            if chief:
                _save_student(student, output_dir / BEST_MODEL_NAME)
        state["epoch"] = epoch + 1
        if chief:
            _save_checkpoint(checkpoint_path, student, optimizer, state, best_values)
        log.info(
            "epoch %d/%d: val_accuracy %.4f (best %.4f at epoch %d)", epoch + 1, epochs,
            logs.get("val_accuracy", float("nan")), state["best_val_accuracy"],
            state["best_epoch"],
        )  # fmt: skip
        if distiller.stop_training:
            break
    outer.on_train_end({key: values[-1] for key, values in history.items()})

    if best_values is not None:
        _assign(student.variables, best_values, "student", checkpoint_path)
    if chief:
        _atomic_write(
            output_dir / "history.json",
            lambda handle: handle.write(json.dumps(history, indent=1).encode()),
        )
    return TrainResult(student, history, state["best_epoch"], output_dir)


def _write_config(output_dir, config):
    import yaml

    text = yaml.safe_dump({k: v for k, v in config.items() if k != "source"}, sort_keys=False)
    _atomic_write(output_dir / "config.yaml", lambda handle: handle.write(text.encode()))


# ----------------------------------------------------------------------------- command line


def add_arguments(parser):
    parser.add_argument("config", help="experiment YAML (see configs/experiments/)")
    parser.add_argument("--output-dir", help="override output.dir")
    parser.add_argument("--epochs", type=int, help="override training.epochs")
    parser.add_argument(
        "--restart", action="store_true", help="ignore a checkpoint in the output folder"
    )


def main(args):
    config = load_config(args.config)
    if args.output_dir:
        config["output"]["dir"] = args.output_dir
    if args.epochs is not None:
        config["training"]["epochs"] = args.epochs
    if args.restart:
        config["training"]["resume"] = False
    config = load_config(config)
    result = train(config)
    best = result.history.get("val_accuracy", [float("nan")])
    print(
        f"{config['name']}: best val_accuracy {max(best):.4f} at epoch {result.best_epoch}, "
        f"student saved in {result.output_dir / BEST_MODEL_NAME}"
    )
    return 0
