"""The Distiller: the loss equation, a frozen teacher, cached teacher logits, saving the student."""

import keras
import numpy as np
import pytest
from keras import ops

from paper_kd.distill import (
    TEACHER_LOGITS,
    Distiller,
    batch_independent,
    distillation_loss,
    hard_loss,
    teacher_fingerprint,
)
from paper_kd.models import build_model


def toy_batch(n_jets=32, n_max=24, seed=0):
    """Massless constituents near the x axis: three-prong 'top' jets and one-prong 'QCD' jets."""
    rng = np.random.default_rng(seed)
    label = (np.arange(n_jets) % 2).astype(np.int32)
    p4 = np.zeros((n_jets, n_max, 4), np.float32)
    mask = np.zeros((n_jets, n_max), bool)
    for i, top in enumerate(label):
        n = int(rng.integers(n_max // 2, n_max + 1)) if top else int(rng.integers(4, n_max // 2))
        centers = rng.normal(0, 0.3 if top else 0.02, size=(3 if top else 1, 2))
        angles = centers[rng.integers(0, len(centers), n)] + rng.normal(0, 0.05, (n, 2))
        pt = np.sort(rng.exponential(20.0, n) + 1.0)[::-1]
        momentum = np.stack([pt, pt * angles[:, 0], pt * angles[:, 1]], -1)
        p4[i, :n] = np.concatenate([np.linalg.norm(momentum, axis=-1)[:, None], momentum], -1)
        mask[i, :n] = True
    return {"p4": p4, "mask": mask}, label


def small_deepset(seed, dropout=0.0, width=8):
    keras.utils.set_random_seed(seed)
    depth = 2 if width < 64 else 3
    model = build_model("deepset", width=width, latent=width, depth=depth, dropout=dropout)
    model.build()
    return model


def compiled(distiller, learning_rate=1e-2):
    distiller.compile(
        optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=0.01, epsilon=1e-8),
        jit_compile=False,
    )
    return distiller


def numpy_losses(labels, student_logits, teacher_logits, temperature, weight):
    difference = student_logits[:, 1] - student_logits[:, 0]
    hard = np.mean(np.log1p(np.exp(difference)) - labels * difference)

    def log_softmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    teacher_log_p = log_softmax(teacher_logits / temperature)
    student_log_p = log_softmax(student_logits / temperature)
    soft = np.mean(np.sum(np.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1))
    return (1 - weight) * hard + weight * temperature**2 * soft, hard, soft


@pytest.mark.parametrize(("temperature", "weight"), [(1.0, 1.0), (2.5, 0.7), (4.0, 0.0)])
def test_test_step_is_the_loss_equation(temperature, weight):
    inputs, labels = toy_batch()
    student = small_deepset(2)
    # Confident teacher logits, unlike an untrained network's, so the soft term matters.
    teacher_logits = np.random.default_rng(5).normal(0.0, 3.0, (len(labels), 2))
    distiller = compiled(Distiller(small_deepset(1), student, temperature, weight))
    logs = distiller.test_step(({**inputs, TEACHER_LOGITS: teacher_logits}, labels))

    student_logits = ops.convert_to_numpy(student(inputs, training=False)).astype(np.float64)
    total, hard, soft = numpy_losses(labels, student_logits, teacher_logits, temperature, weight)
    assert soft > 0.05
    assert float(logs["hard_loss"]) == pytest.approx(hard, rel=1e-5)
    assert float(logs["soft_loss"]) == pytest.approx(soft, rel=1e-4)
    assert float(logs["loss"]) == pytest.approx(total, rel=1e-5)
    accuracy = np.mean((student_logits[:, 1] > student_logits[:, 0]) == labels)
    assert float(logs["accuracy"]) == pytest.approx(accuracy)


def test_hard_loss_is_two_class_cross_entropy():
    logits = np.array([[0.3, -1.2], [2.0, 5.0], [40.0, -40.0], [-30.0, 30.0]], np.float32)
    labels = np.array([1, 0, 0, 1])
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    expected = float(cross_entropy(labels, logits))
    assert float(hard_loss(labels, logits)) == pytest.approx(expected, rel=1e-5)
    # Identical distributions: KL is zero.
    assert float(distillation_loss(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_weight_decays_linearly_to_zero():
    distiller = Distiller(small_deepset(1), small_deepset(2), weight=0.8, decay_steps=100)
    weights = [float(distiller.soft_weight(step)) for step in (0, 25, 100, 500)]
    np.testing.assert_allclose(weights, [0.8, 0.6, 0.0, 0.0], atol=1e-7)
    constant = Distiller(small_deepset(1), small_deepset(2), weight=0.8)
    assert float(constant.soft_weight(10_000)) == pytest.approx(0.8)


def test_non_positive_temperature_trains_student_alone():
    inputs, labels = toy_batch()
    student = small_deepset(2)
    distiller = compiled(Distiller(None, student, temperature=0.0, weight=0.7))
    logs = distiller.train_step((inputs, labels))
    assert float(logs["soft_loss"]) == 0.0
    assert float(logs["loss"]) == float(logs["hard_loss"]) > 0
    with pytest.raises(ValueError, match="needs a teacher"):
        Distiller(None, student, temperature=1.0)


def test_teacher_frozen_and_student_trained():
    inputs, labels = toy_batch(64)
    # Dropout and BatchNorm in the teacher: either would change it if it ran in training mode.
    teacher, student = small_deepset(1, dropout=0.5), small_deepset(2)
    teacher_before = [v.numpy().copy() for v in teacher.variables]
    student_before = [v.numpy().copy() for v in student.trainable_variables]
    reference_logits = ops.convert_to_numpy(teacher(inputs, training=False))

    distiller = compiled(Distiller(teacher, student, temperature=2.0, weight=0.5))
    distiller.fit(inputs, labels, batch_size=32, epochs=1, verbose=0, shuffle=False)

    for before, variable in zip(teacher_before, teacher.variables):
        assert np.array_equal(before, variable.numpy()), variable.path
    changed = [
        not np.array_equal(before, variable.numpy())
        for before, variable in zip(student_before, student.trainable_variables)
    ]
    assert all(changed)
    trained = {id(v) for v in distiller.trainable_variables}
    assert trained == {id(v) for v in student.trainable_variables}
    np.testing.assert_array_equal(
        ops.convert_to_numpy(teacher(inputs, training=False)), reference_logits
    )


def test_cached_step_equals_live_teacher_step():
    inputs, labels = toy_batch(32)
    teacher = small_deepset(1, dropout=0.5)
    live_student, cached_student = small_deepset(2), small_deepset(2)
    live = compiled(Distiller(teacher, live_student, temperature=2.0, weight=0.6))
    cached = compiled(Distiller(teacher, cached_student, temperature=2.0, weight=0.6))
    logits = ops.convert_to_numpy(teacher(inputs, training=False))

    for _ in range(3):
        live_logs = live.train_step((inputs, labels))
        cached_logs = cached.train_step(({**inputs, TEACHER_LOGITS: logits}, labels))
    for a, b in zip(live_student.variables, cached_student.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-8)
    assert float(live_logs["soft_loss"]) == pytest.approx(float(cached_logs["soft_loss"]))
    assert not np.array_equal(
        live_student.trainable_variables[0].numpy(), small_deepset(2).trainable_variables[0]
    )


def test_student_saved_alone(tmp_path):
    inputs, labels = toy_batch()
    teacher, student = small_deepset(1), small_deepset(2)
    distiller = compiled(Distiller(teacher, student, temperature=1.0))
    distiller.train_step((inputs, labels))
    distiller.student.save(tmp_path / "student.keras")
    loaded = keras.saving.load_model(tmp_path / "student.keras")
    np.testing.assert_allclose(
        ops.convert_to_numpy(loaded(inputs)), ops.convert_to_numpy(student(inputs)), rtol=1e-6
    )
    assert distiller.get_config()["temperature"] == 1.0
    with pytest.raises(TypeError, match="save and load `distiller.student`"):
        Distiller.from_config(distiller.get_config())


def test_batch_independence_of_teacher_readouts():
    inputs, _ = toy_batch(8)
    keras.utils.set_random_seed(3)
    mean = build_model("lorentznet", n_hidden=4, n_layers=1, dropout=0.0)
    reference = build_model("lorentznet", n_hidden=4, n_layers=1, dropout=0.0, readout="reference")
    assert batch_independent(mean, inputs)
    assert not batch_independent(reference, inputs)
    assert batch_independent(small_deepset(1), inputs)
    reference.batch_independent = True  # a model's own declaration wins
    assert batch_independent(reference, inputs)


def test_teacher_fingerprint_follows_weights():
    teacher = small_deepset(1)
    first = teacher_fingerprint(teacher)
    assert teacher_fingerprint(teacher) == first
    teacher.trainable_variables[0].assign(teacher.trainable_variables[0] + 1e-3)
    assert teacher_fingerprint(teacher) != first
