"""Experiment configuration: one YAML file per experiment, validated on load.

``load_config`` fills defaults and rejects any missing or unknown key with a
one-line error naming the file and the key, before anything is trained.

Sections::

    name: deepset_kd
    seed: 0
    data: {dir, n_max, max_train_jets, max_val_jets}
    model: {name, hparams: {...}}
    teacher: {path}
    distillation: {temperature, weight, decay_steps, cache, cache_dir}
    optimizer: {learning_rate, weight_decay, epsilon, amsgrad, beta_1, beta_2}
    schedule: {name: teacher | student | constant, ...its options}
    training: {batch_size, epochs, augment_beta, augment_direction, bucket, jit_compile,
               pad_multiple, resume, deterministic, verbose}
    output: {dir}

A temperature ``<= 0`` trains the student alone on the hard loss, so a
distilled run and its from-scratch baseline differ only in this section.
"""

import copy
from pathlib import Path

import yaml

__all__ = ["REQUIRED", "SCHEMA", "ConfigError", "load_config"]

REQUIRED = object()
ANY_MAPPING = object()

# Each leaf: (types, default). ``REQUIRED`` marks keys without a default.
SCHEMA = {
    "name": ((str,), REQUIRED),
    "seed": ((int,), 0),
    "data": {
        "dir": ((str,), REQUIRED),
        "n_max": ((int, type(None)), None),
        "max_train_jets": ((int, type(None)), None),
        "max_val_jets": ((int, type(None)), None),
    },
    "model": {
        "name": ((str,), REQUIRED),
        "hparams": ((dict,), ANY_MAPPING),
    },
    "teacher": {
        "path": ((str, type(None)), None),
    },
    "distillation": {
        "temperature": ((float, int), 0.0),
        "weight": ((float, int), 0.0),
        "decay_steps": ((int,), 0),
        "cache": ((bool, str), "auto"),
        "cache_dir": ((str, type(None)), None),
    },
    "optimizer": {
        "learning_rate": ((float, int), 2e-4),
        "weight_decay": ((float, int), 0.01),
        "epsilon": ((float, int), 1e-8),
        "amsgrad": ((bool,), True),
        "beta_1": ((float, int), 0.9),
        "beta_2": ((float, int), 0.999),
    },
    "schedule": {
        "name": ((str,), "student"),
    },
    "training": {
        "batch_size": ((int,), 64),
        "epochs": ((int,), 100),
        "augment_beta": ((float, int), 0.0),
        "augment_direction": ((str,), "x"),
        "bucket": ((bool,), False),
        "jit_compile": ((bool,), False),
        "pad_multiple": ((int,), 1),
        "resume": ((bool,), True),
        "deterministic": ((bool,), True),
        "verbose": ((int,), 2),
    },
    "output": {
        "dir": ((str,), REQUIRED),
    },
}

# Options of each schedule (besides ``name``) and their defaults.
SCHEDULE_OPTIONS = {
    "teacher": {
        "warmup_epochs": ((int,), 5),
        "first_cycle": ((int,), 4),
        "cycle_mult": ((int,), 2),
        "halving_from": ((int,), 32),
        "halving_factor": ((float, int), 0.5),
    },
    "student": {
        "warmup_steps": ((int,), 1000),
        "decay_every_epochs": ((int,), 10),
        "decay_factor": ((float, int), 0.7),
    },
    "constant": {},
}

AUGMENT_DIRECTIONS = ("x", "y", "z", "random")


class ConfigError(ValueError):
    """A configuration that does not match the schema; the message names file and key."""


def _type_names(types):
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _check_value(value, types, source, key):
    # bool is an int in Python; a YAML ``true`` must not pass for a number.
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"{source}: key {key!r} must be {_type_names(types)}, got bool")
    if not isinstance(value, types):
        raise ConfigError(
            f"{source}: key {key!r} must be {_type_names(types)}, got {type(value).__name__}"
        )
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _fill(section, schema, source, prefix):
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: key {prefix.rstrip('.') or '<top>'!r} must be a mapping")
    unknown = sorted(set(section) - set(schema))
    if unknown:
        raise ConfigError(f"{source}: unknown key {prefix + str(unknown[0])!r}")

    out = {}
    for key, spec in schema.items():
        name = prefix + key
        if isinstance(spec, dict):
            out[key] = _fill(section.get(key, {}) or {}, spec, source, name + ".")
            continue
        types, default = spec
        if key not in section:
            if default is REQUIRED:
                raise ConfigError(f"{source}: missing key {name!r}")
            out[key] = {} if default is ANY_MAPPING else copy.deepcopy(default)
            continue
        out[key] = _check_value(section[key], types, source, name)
    return out


def _check_ranges(config, source):
    from paper_kd.models import MODEL_NAMES

    def fail(key, expected, value):
        raise ConfigError(f"{source}: key {key!r} must be {expected}, got {value!r}")

    if config["model"]["name"] not in MODEL_NAMES:
        fail("model.name", f"one of {MODEL_NAMES}", config["model"]["name"])
    training = config["training"]
    if training["batch_size"] < 1:
        fail("training.batch_size", ">= 1", training["batch_size"])
    if training["jit_compile"] and training["deterministic"]:
        # Keras silently falls back to the plain graph under TensorFlow's op determinism.
        fail("training.jit_compile", "false unless training.deterministic is false", True)
    if training["pad_multiple"] < 1:
        fail("training.pad_multiple", ">= 1", training["pad_multiple"])
    if training["epochs"] < 1:
        fail("training.epochs", ">= 1", training["epochs"])
    if not 0.0 <= training["augment_beta"] < 1.0:
        fail("training.augment_beta", "in [0, 1)", training["augment_beta"])
    if training["augment_direction"] not in AUGMENT_DIRECTIONS:
        fail(
            "training.augment_direction",
            f"one of {AUGMENT_DIRECTIONS}",
            training["augment_direction"],
        )
    distillation = config["distillation"]
    if distillation["cache"] not in ("auto", True, False):
        fail("distillation.cache", "auto, true or false", distillation["cache"])
    if not 0.0 <= distillation["weight"] <= 1.0:
        fail("distillation.weight", "in [0, 1]", distillation["weight"])
    if distillation["decay_steps"] < 0:
        fail("distillation.decay_steps", ">= 0", distillation["decay_steps"])
    for key in ("n_max", "max_train_jets", "max_val_jets"):
        value = config["data"][key]
        if value is not None and value < 1:
            fail(f"data.{key}", ">= 1 or null", value)
    if config["optimizer"]["learning_rate"] <= 0:
        fail("optimizer.learning_rate", "> 0", config["optimizer"]["learning_rate"])


def load_config(path_or_dict):
    """Read, validate and complete a configuration.

    Args:
        path_or_dict: a YAML file path, or a dict with the same layout (its
            source in error messages is ``<config>``).

    Returns:
        A new dict with every key of the schema, defaults filled in.

    Raises:
        ConfigError: one line naming the file and the key that is missing,
            unknown, of the wrong type or out of range.
        FileNotFoundError: no such file.
    """
    if isinstance(path_or_dict, dict):
        raw = copy.deepcopy(path_or_dict)
        # A config already loaded keeps naming its file.
        source = str(raw.pop("source", "<config>"))
    else:
        source = str(path_or_dict)
        path = Path(path_or_dict)
        if not path.is_file():
            raise FileNotFoundError(f"{source}: no such config file")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            first = str(error).splitlines()[0]
            raise ConfigError(f"{source}: not valid YAML ({first})") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")

    schedule = raw.get("schedule") or {}
    schedule_name = schedule.get("name", SCHEMA["schedule"]["name"][1])
    if schedule_name not in SCHEDULE_OPTIONS:
        raise ConfigError(
            f"{source}: key 'schedule.name' must be one of {tuple(SCHEDULE_OPTIONS)}, "
            f"got {schedule_name!r}"
        )
    schema = dict(SCHEMA)
    schema["schedule"] = {**SCHEMA["schedule"], **SCHEDULE_OPTIONS[schedule_name]}

    config = _fill(raw, schema, source, "")
    _check_ranges(config, source)
    config["source"] = source
    return config
