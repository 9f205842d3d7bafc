"""The teacher's published per-epoch schedule and the students' warm-up and step decay."""

import math

import keras
import numpy as np
import pytest

from paper_kd.schedules import (
    StudentSchedule,
    TeacherSchedule,
    make_schedule,
    teacher_epoch_factor,
)


def _cosine(position, cycle):
    return 0.5 * (1 + math.cos(math.pi * position / cycle))


@pytest.mark.parametrize(
    ("epoch", "factor"),
    [
        (0, 0.2),
        (1, 0.4),
        (3, 0.8),
        (4, 1.0),  # warm-up done: the first cosine cycle starts at the full rate
        (5, _cosine(1, 4)),
        (6, 0.5),
        (7, _cosine(3, 4)),
        (8, 1.0),  # restart, cycle of 8 epochs
        (12, 0.5),
        (15, _cosine(7, 8)),
        (16, 1.0),  # restart, cycle of 16 epochs
        (24, 0.5),
        (31, _cosine(15, 16)),
        (32, _cosine(15, 16) / 2),  # halved every epoch from here
        (33, _cosine(15, 16) / 4),
        (34, _cosine(15, 16) / 8),
    ],
)
def test_teacher_epoch_factor_matches_published_schedule(epoch, factor):
    assert teacher_epoch_factor(epoch) == pytest.approx(factor, rel=1e-12)


def test_teacher_schedule_is_constant_within_an_epoch():
    schedule = TeacherSchedule(1e-3, steps_per_epoch=10, epochs=35)
    steps = np.array([0, 9, 10, 39, 40, 49, 50, 80, 319, 320, 349, 10_000])
    epochs = np.minimum(steps // 10, 34)
    expected = [1e-3 * teacher_epoch_factor(int(e)) for e in epochs]
    got = [float(schedule(int(step))) for step in steps]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[0] == got[1] and got[2] != got[1]


def test_student_schedule_warm_up_then_step_decay():
    schedule = StudentSchedule(2e-4, steps_per_epoch=200, warmup_steps=1000)
    values = {step: float(schedule(step)) for step in (0, 499, 999, 1000, 1999, 2000, 4000, 6000)}
    assert values[0] == pytest.approx(2e-4 / 1000, rel=1e-6)
    assert values[499] == pytest.approx(1e-4, rel=1e-6)
    assert values[999] == pytest.approx(2e-4, rel=1e-6)
    assert values[1999] == pytest.approx(2e-4, rel=1e-6)  # epoch 9
    assert values[2000] == pytest.approx(1.4e-4, rel=1e-6)  # epoch 10: x0.7
    assert values[4000] == pytest.approx(2e-4 * 0.49, rel=1e-6)
    assert values[6000] == pytest.approx(2e-4 * 0.343, rel=1e-6)


@pytest.mark.parametrize(
    "schedule",
    [TeacherSchedule(1e-3, 7, epochs=12, first_cycle=3), StudentSchedule(2e-4, 9, 20, 3, 0.5)],
)
def test_schedules_serialize(schedule):
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert type(restored) is type(schedule)
    assert restored.get_config() == schedule.get_config()
    for step in (0, 5, 20, 40, 100):
        assert float(restored(step)) == float(schedule(step))


def test_schedule_in_a_saved_optimizer(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    optimizer = keras.optimizers.AdamW(StudentSchedule(2e-4, 5, warmup_steps=10))
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(np.ones((8, 3)), np.zeros((8, 2)), epochs=1, batch_size=4, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer._learning_rate, StudentSchedule)
    assert float(loaded.optimizer.learning_rate) == pytest.approx(2e-4 * 3 / 10, rel=1e-6)


def test_make_schedule():
    teacher = make_schedule({"name": "teacher"}, 1e-3, steps_per_epoch=4, epochs=35)
    assert float(teacher(4 * 32)) == pytest.approx(1e-3 * _cosine(15, 16) / 2, rel=1e-5)
    assert make_schedule({"name": "constant"}, 1e-3, 4, 35) == 1e-3
    with pytest.raises(ValueError, match="schedule name"):
        make_schedule({"name": "cosine"}, 1e-3, 4, 35)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        StudentSchedule(1e-3, 0)
