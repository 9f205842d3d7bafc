"""Experiment configs: every shipped YAML loads; bad keys fail in one line naming file and key."""

from pathlib import Path

import pytest
import yaml

from paper_kd.config import ConfigError, load_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "configs" / "experiments"

MINIMAL = {
    "name": "tiny",
    "data": {"dir": "data/x"},
    "model": {"name": "deepset"},
    "output": {"dir": "runs/tiny"},
}


def _write(tmp_path, config):
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_every_experiment_config_loads():
    names = sorted(path.stem for path in EXPERIMENTS.glob("*.yaml"))
    assert names == [
        "deepset", "deepset_augmented", "deepset_kd", "mlp", "mlp_kd", "teacher_paper"
    ]  # fmt: skip
    for path in EXPERIMENTS.glob("*.yaml"):
        config = load_config(path)
        assert config["name"] == path.stem
        assert config["source"] == str(path)


def test_paper_settings_in_experiment_configs():
    teacher = load_config(EXPERIMENTS / "teacher_paper.yaml")
    assert teacher["schedule"]["name"] == "teacher"
    assert (teacher["training"]["batch_size"], teacher["training"]["epochs"]) == (128, 35)
    assert teacher["model"]["hparams"]["dropout"] == 0.2
    assert teacher["optimizer"] == {
        "learning_rate": 1e-3, "weight_decay": 0.01, "epsilon": 1e-8, "amsgrad": False,
        "beta_1": 0.9, "beta_2": 0.999,
    }  # fmt: skip

    for name in ("deepset", "deepset_kd", "deepset_augmented", "mlp", "mlp_kd"):
        student = load_config(EXPERIMENTS / f"{name}.yaml")
        assert student["optimizer"]["amsgrad"] is True
        assert student["optimizer"]["learning_rate"] == 2e-4
        assert (student["training"]["batch_size"], student["training"]["epochs"]) == (64, 100)
        assert student["schedule"] == {
            "name": "student", "warmup_steps": 1000, "decay_every_epochs": 10, "decay_factor": 0.7
        }  # fmt: skip

    distillation = {
        name: load_config(EXPERIMENTS / f"{name}.yaml")["distillation"]
        for name in ("deepset", "deepset_kd", "mlp_kd", "deepset_augmented")
    }
    assert (distillation["deepset_kd"]["temperature"], distillation["deepset_kd"]["weight"]) == (
        1.0, 1.0,
    )  # fmt: skip
    assert distillation["mlp_kd"]["weight"] == 0.7
    assert distillation["deepset"]["temperature"] <= 0
    assert load_config(EXPERIMENTS / "deepset_augmented.yaml")["training"]["augment_beta"] == 0.5
    assert load_config(EXPERIMENTS / "deepset.yaml")["training"]["augment_beta"] == 0.0


def test_defaults_filled_and_reload_is_idempotent():
    config = load_config(MINIMAL)
    assert config["seed"] == 0
    assert config["optimizer"]["epsilon"] == 1e-8
    assert config["optimizer"]["weight_decay"] == 0.01
    assert config["schedule"] == {
        "name": "student", "warmup_steps": 1000, "decay_every_epochs": 10, "decay_factor": 0.7
    }  # fmt: skip
    assert config["distillation"]["temperature"] == 0.0
    assert config["model"]["hparams"] == {}
    assert load_config(config) == config


def test_ints_become_floats_where_floats_are_expected():
    config = load_config({**MINIMAL, "optimizer": {"learning_rate": 1}})
    assert isinstance(config["optimizer"]["learning_rate"], float)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["data"].pop("dir"), "missing key 'data.dir'"),
        (lambda c: c.pop("name"), "missing key 'name'"),
        (lambda c: c["training"].update(epoch=3), "unknown key 'training.epoch'"),
        (lambda c: c.update(extra=1), "unknown key 'extra'"),
        (lambda c: c["training"].update(epochs="ten"), "key 'training.epochs' must be int"),
        (lambda c: c["training"].update(batch_size=True), "'training.batch_size' must be int"),
        (lambda c: c["model"].update(name="resnet"), "key 'model.name' must be one of"),
        (lambda c: c["schedule"].update(first_cycle=4), "unknown key 'schedule.first_cycle'"),
        (lambda c: c["schedule"].update(name="cosine"), "'schedule.name' must be one of"),
        (lambda c: c["training"].update(augment_beta=1.0), "'training.augment_beta' must be"),
        (lambda c: c["distillation"].update(weight=1.5), "'distillation.weight' must be"),
        (lambda c: c["training"].update(pad_multiple=0), "'training.pad_multiple' must be >= 1"),
        (
            lambda c: c["training"].update(jit_compile=True),
            "'training.jit_compile' must be false unless training.deterministic is false",
        ),
    ],
)
def test_bad_key_is_one_line_naming_file_and_key(tmp_path, change, message):
    config = {
        **MINIMAL,
        "data": dict(MINIMAL["data"]),
        "model": dict(MINIMAL["model"]),
        "training": {},
        "schedule": {},
        "distillation": {},
    }
    change(config)
    path = _write(tmp_path, config)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    text = str(error.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: ")
    assert message in text


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)
