"""Learning-rate schedules of the paper's teacher and students, as Keras schedules.

Both are functions of the optimizer step, like every Keras schedule, and need
the number of steps in an epoch to know which epoch a step belongs to.

- ``TeacherSchedule``: the published LorentzNet training, stepped once per
  epoch. Linear warm-up from 0.2x to 1x over epochs 0-4 (the warm-up of the
  reference ends at epoch 4, where the cosine starts at 1x), cosine annealing
  with warm restarts from epoch 4 (first cycle 4 epochs, each next one twice as
  long: epochs 4-7, 8-15, 16-31), then halved every epoch from epoch 32 on.
- ``StudentSchedule``: the students' training code. Linear warm-up over the
  first 1000 steps (``(step + 1) / 1000``), then x0.7 every 10 epochs (a step
  decay per epoch).
"""

import math

import keras
from keras import ops

__all__ = ["StudentSchedule", "TeacherSchedule", "make_schedule", "teacher_epoch_factor"]


def teacher_epoch_factor(
    epoch, warmup_epochs=5, first_cycle=4, cycle_mult=2, halving_from=32, halving_factor=0.5
):
    """Multiplier of the base learning rate during ``epoch`` (0-based) in the published run."""
    if epoch < warmup_epochs - 1:
        return (epoch + 1) / warmup_epochs
    if epoch >= halving_from:
        last = teacher_epoch_factor(
            halving_from - 1, warmup_epochs, first_cycle, cycle_mult, halving_from, halving_factor
        )
        return last * halving_factor ** (epoch - halving_from + 1)

    position, cycle = epoch - (warmup_epochs - 1), first_cycle
    while position >= cycle:
        position -= cycle
        cycle *= cycle_mult
    return 0.5 * (1.0 + math.cos(math.pi * position / cycle))


@keras.saving.register_keras_serializable(package="paper_kd")
class TeacherSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The published LorentzNet schedule: one learning rate per epoch (see the module doc).

    Example:
        >>> schedule = TeacherSchedule(1e-3, steps_per_epoch=100, epochs=35)
        >>> float(schedule(400))  # first step of epoch 4: the cosine's start
        0.001
    """

    def __init__(
        self,
        learning_rate,
        steps_per_epoch,
        epochs=35,
        warmup_epochs=5,
        first_cycle=4,
        cycle_mult=2,
        halving_from=32,
        halving_factor=0.5,
    ):
        self.learning_rate = float(learning_rate)
        self.steps_per_epoch = int(steps_per_epoch)
        self.epochs = int(epochs)
        self.warmup_epochs = int(warmup_epochs)
        self.first_cycle = int(first_cycle)
        self.cycle_mult = int(cycle_mult)
        self.halving_from = int(halving_from)
        self.halving_factor = float(halving_factor)
        if self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        # One value per epoch, computed exactly in Python; steps past the last
        # epoch keep the last value.
        self._table = [
            self.learning_rate
            * teacher_epoch_factor(
                epoch,
                self.warmup_epochs,
                self.first_cycle,
                self.cycle_mult,
                self.halving_from,
                self.halving_factor,
            )
            for epoch in range(max(self.epochs, 1))
        ]

    def __call__(self, step):
        epoch = ops.floor_divide(ops.cast(step, "int64"), self.steps_per_epoch)
        epoch = ops.clip(epoch, 0, len(self._table) - 1)
        return ops.take(ops.convert_to_tensor(self._table, "float32"), epoch)

    def get_config(self):
        return {
            "learning_rate": self.learning_rate,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.epochs,
            "warmup_epochs": self.warmup_epochs,
            "first_cycle": self.first_cycle,
            "cycle_mult": self.cycle_mult,
            "halving_from": self.halving_from,
            "halving_factor": self.halving_factor,
        }


@keras.saving.register_keras_serializable(package="paper_kd")
class StudentSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up over ``warmup_steps`` steps, then x``decay_factor`` every N epochs.

    Example:
        >>> schedule = StudentSchedule(2e-4, steps_per_epoch=5000)
        >>> float(schedule(0))  # (0 + 1) / 1000 of the base rate
        2e-07
    """

    def __init__(
        self,
        learning_rate,
        steps_per_epoch,
        warmup_steps=1000,
        decay_every_epochs=10,
        decay_factor=0.7,
    ):
        self.learning_rate = float(learning_rate)
        self.steps_per_epoch = int(steps_per_epoch)
        self.warmup_steps = int(warmup_steps)
        self.decay_every_epochs = int(decay_every_epochs)
        self.decay_factor = float(decay_factor)
        if self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        if self.decay_every_epochs < 1:
            raise ValueError(f"decay_every_epochs must be >= 1, got {decay_every_epochs}")

    def __call__(self, step):
        step = ops.cast(step, "int64")
        epoch = ops.floor_divide(step, self.steps_per_epoch)
        n_decays = ops.cast(ops.floor_divide(epoch, self.decay_every_epochs), "float32")
        rate = self.learning_rate * ops.power(self.decay_factor, n_decays)
        if self.warmup_steps > 0:
            warmup = ops.minimum(1.0, ops.cast(step + 1, "float32") / float(self.warmup_steps))
            rate = rate * warmup
        return ops.cast(rate, "float32")

    def get_config(self):
        return {
            "learning_rate": self.learning_rate,
            "steps_per_epoch": self.steps_per_epoch,
            "warmup_steps": self.warmup_steps,
            "decay_every_epochs": self.decay_every_epochs,
            "decay_factor": self.decay_factor,
        }


def make_schedule(schedule_config, learning_rate, steps_per_epoch, epochs):
    """The schedule named in a config's ``schedule`` section, or the constant rate."""
    options = {key: value for key, value in schedule_config.items() if key != "name"}
    name = schedule_config["name"]
    if name == "teacher":
        return TeacherSchedule(learning_rate, steps_per_epoch, epochs=epochs, **options)
    if name == "student":
        return StudentSchedule(learning_rate, steps_per_epoch, **options)
    if name == "constant":
        return float(learning_rate)
    raise ValueError(f"schedule name must be teacher, student or constant, got {name!r}")
