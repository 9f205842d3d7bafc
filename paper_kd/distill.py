"""Knowledge distillation (Hinton et al., arXiv:1503.02531) as the paper applies it.

One training step minimises, for a batch of jets with labels ``y``::

    loss = (1 - w) * BCE(y, s1 - s0) + w * T^2 * KL(softmax(t / T) || softmax(s / T))

where ``s`` and ``t`` are the student's and the frozen teacher's two logits,
``T`` the temperature and ``w = lambda * decay(step)``, with ``decay`` falling
linearly from 1 to 0 over ``decay_steps`` steps when that is positive (the
reference's "auxiliary teacher"). The KL divergence is averaged over the batch
(PyTorch's ``batchmean``). ``T <= 0`` trains the student alone on the hard
loss, so a distilled run and its baseline differ only by configuration.

The teacher never trains: it is called with ``training=False`` (BatchNorm in
inference mode) and only the student's variables get gradients.

``Distiller`` is a training wrapper; save and evaluate ``distiller.student``.

Teacher logits can be computed once per training set (``teacher_logits``) and
put in each batch under ``inputs["teacher_logits"]``; the step then skips the
teacher. That is only valid when batches are not augmented and the teacher's
output for a jet does not depend on the rest of its batch (``batch_independent``).
"""

import hashlib
import logging

import keras
import numpy as np
from keras import ops

__all__ = [
    "TEACHER_LOGITS",
    "Distiller",
    "batch_independent",
    "distillation_loss",
    "hard_loss",
    "teacher_fingerprint",
]

log = logging.getLogger(__name__)

# Key of cached teacher logits inside a batch's input dict.
TEACHER_LOGITS = "teacher_logits"


def hard_loss(labels, logits):
    """Binary cross-entropy of the labels against the logit difference ``l1 - l0``.

    Equal to the two-class softmax cross-entropy of the logits.
    """
    labels = ops.cast(labels, logits.dtype)
    difference = logits[:, 1] - logits[:, 0]  # [batch]
    # softplus(z) - y z is log(1 + e^z) - y z, stable for large |z|.
    return ops.mean(ops.softplus(difference) - labels * difference)


def distillation_loss(teacher_logits, student_logits, temperature):
    """``KL(softmax(t/T) || softmax(s/T))`` summed over classes, averaged over the batch."""
    teacher_log_p = ops.log_softmax(teacher_logits / temperature, axis=-1)
    student_log_p = ops.log_softmax(student_logits / temperature, axis=-1)
    kl = ops.sum(ops.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)  # [batch]
    return ops.mean(kl)


def _student_inputs(inputs):
    # Only the model inputs, cached logits removed; a numeric mask becomes boolean.
    return {"p4": inputs["p4"], "mask": ops.cast(inputs["mask"], "bool")}


def _replicas_in_sync():
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


def _multi_worker():
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return False
    return sum(len(tasks) for tasks in resolver.cluster_spec().as_dict().values()) > 1


@keras.saving.register_keras_serializable(package="paper_kd")
class Distiller(keras.Model):
    """A student trained on hard labels and a frozen teacher's softened outputs.

    Args:
        teacher: a model with the input contract, or ``None`` when
            ``temperature <= 0`` (training from scratch).
        student: the model to train.
        temperature: ``T``; ``<= 0`` turns distillation off.
        weight: ``lambda``, the soft loss's share at the start of training.
        decay_steps: if positive, ``w`` falls linearly to 0 over this many steps.

    Example:
        >>> distiller = Distiller(teacher, student, temperature=1.0, weight=0.7)
        >>> distiller.compile(optimizer=keras.optimizers.AdamW(2e-4))
        >>> distiller.fit(dataset)  # batches ({"p4", "mask"}, label)
        >>> distiller.student.save("student.keras")
    """

    def __init__(self, teacher, student, temperature=1.0, weight=1.0, decay_steps=0, **kwargs):
        super().__init__(**kwargs)
        self.temperature = float(temperature)
        self.weight = float(weight)
        self.decay_steps = int(decay_steps)
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"Distiller: weight must be in [0, 1], got {weight}")
        if self.distilling and teacher is None:
            raise ValueError(f"Distiller: temperature {temperature} > 0 needs a teacher")
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.trainable = False

        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.hard_loss_tracker = keras.metrics.Mean(name="hard_loss")
        self.soft_loss_tracker = keras.metrics.Mean(name="soft_loss")
        self.accuracy_metric = keras.metrics.BinaryAccuracy(name="accuracy", threshold=0.0)
        self.auc_metric = keras.metrics.AUC(name="auc", from_logits=True, num_thresholds=500)

    @property
    def distilling(self):
        return self.temperature > 0

    @property
    def metrics(self):
        return [
            self.loss_tracker,
            self.hard_loss_tracker,
            self.soft_loss_tracker,
            self.accuracy_metric,
            self.auc_metric,
        ]

    def call(self, inputs, training=False):
        return self.student(_student_inputs(inputs), training=training)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras builds a model under a tf.distribute strategy from one batch
        # averaged over replicas: that fails on the boolean mask, on multi-worker
        # batches, and takes a batch from the epoch's iterator. Nothing needs
        # it here: ``train`` builds the student and the optimizer beforehand,
        # and the metrics are built on creation.
        return

    def soft_weight(self, step):
        """``w = lambda * decay(step)``; ``step`` counts from 1 at the first update."""
        if not self.distilling:
            return ops.convert_to_tensor(0.0)
        if self.decay_steps <= 0:
            return ops.convert_to_tensor(self.weight)
        progress = ops.cast(step, "float32") / float(self.decay_steps)
        return self.weight * (1.0 - ops.clip(progress, 0.0, 1.0))

    def _teacher_logits(self, inputs):
        if TEACHER_LOGITS in inputs:
            return ops.stop_gradient(ops.cast(inputs[TEACHER_LOGITS], "float32"))
        return ops.stop_gradient(self.teacher(_student_inputs(inputs), training=False))

    def _step_losses(self, inputs, labels, student_logits, step):
        hard = hard_loss(labels, student_logits)
        if not self.distilling:
            return hard, hard, ops.zeros_like(hard)
        soft = distillation_loss(self._teacher_logits(inputs), student_logits, self.temperature)
        weight = self.soft_weight(step)
        total = (1.0 - weight) * hard + weight * self.temperature**2 * soft
        return total, hard, soft

    def _update_metrics(self, labels, student_logits, total, hard, soft):
        batch = ops.shape(labels)[0]
        self.loss_tracker.update_state(total, sample_weight=batch)
        self.hard_loss_tracker.update_state(hard, sample_weight=batch)
        self.soft_loss_tracker.update_state(soft, sample_weight=batch)
        difference = student_logits[:, 1] - student_logits[:, 0]  # [batch]
        self.accuracy_metric.update_state(labels, difference)
        self.auc_metric.update_state(labels, difference)
        results = {metric.name: metric.result() for metric in self.metrics}
        if _multi_worker():
            # Keras averages step results over workers along axis 0, which a scalar lacks.
            results = {name: ops.reshape(value, (1,)) for name, value in results.items()}
        return results

    def train_step(self, data):
        import tensorflow as tf

        inputs, labels = data[0], data[1]
        student_inputs = _student_inputs(inputs)
        step = self.optimizer.iterations + 1

        with tf.GradientTape() as tape:
            student_logits = self.student(student_inputs, training=True)  # [batch, 2]
            total, hard, soft = self._step_losses(inputs, labels, student_logits, step)
            # Replicas' gradients are summed: each contributes its share of the mean.
            scaled = total / float(_replicas_in_sync())

        variables = self.student.trainable_variables
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply_gradients(zip(gradients, variables))
        return self._update_metrics(labels, student_logits, total, hard, soft)

    def test_step(self, data):
        inputs, labels = data[0], data[1]
        student_inputs = _student_inputs(inputs)
        student_logits = self.student(student_inputs, training=False)
        step = self.optimizer.iterations if self.optimizer is not None else 0
        total, hard, soft = self._step_losses(inputs, labels, student_logits, step)
        return self._update_metrics(labels, student_logits, total, hard, soft)

    def get_config(self):
        # A wrapper: its parts are saved as models of their own.
        return {
            "temperature": self.temperature,
            "weight": self.weight,
            "decay_steps": self.decay_steps,
        }

    @classmethod
    def from_config(cls, config):
        raise TypeError(
            "Distiller is a training wrapper and is not restored from a file; "
            "save and load `distiller.student` instead"
        )


def teacher_fingerprint(model):
    """SHA-256 of a model's class, config and weights: a cache key for its outputs."""
    digest = hashlib.sha256()
    digest.update(type(model).__qualname__.encode())
    try:
        digest.update(repr(sorted(model.get_config().items())).encode())
    except NotImplementedError:
        pass
    for weight in model.weights:
        value = np.ascontiguousarray(ops.convert_to_numpy(weight))
        digest.update(weight.path.encode() if hasattr(weight, "path") else b"")
        digest.update(str(value.shape).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def batch_independent(model, inputs, tolerance=1e-5):
    """Whether ``model``'s logits of a jet ignore the rest of its batch.

    A model may declare it with a ``batch_independent`` attribute. Otherwise it
    is measured on a few jets: their logits in one batch, then with extra
    padding nodes appended, must agree. A readout that averages over the
    padded node axis (the reference-compatible one) fails this check.

    Args:
        inputs: ``{"p4": [B, N, 4], "mask": [B, N]}`` numpy arrays of a few jets.
    """
    declared = getattr(model, "batch_independent", None)
    if declared is not None:
        return bool(declared)

    p4 = np.asarray(inputs["p4"], np.float32)[:16]
    mask = np.asarray(inputs["mask"], bool)[:16]
    longest = max(int(mask.sum(axis=1).max()), 1)
    p4, mask = p4[:, :longest], mask[:, :longest]
    extra = 8
    padded_p4 = np.concatenate([p4, np.zeros((len(p4), extra, 4), np.float32)], axis=1)
    padded_mask = np.concatenate([mask, np.zeros((len(mask), extra), bool)], axis=1)

    base = ops.convert_to_numpy(model({"p4": p4, "mask": mask}, training=False))
    padded = ops.convert_to_numpy(model({"p4": padded_p4, "mask": padded_mask}, training=False))
    single = ops.convert_to_numpy(model({"p4": p4[:1], "mask": mask[:1]}, training=False))
    scale = 1.0 + np.abs(base)
    agree = np.all(np.abs(padded - base) <= tolerance * scale) and np.all(
        np.abs(single - base[:1]) <= tolerance * scale[:1]
    )
    return bool(agree)
