"""MLflow bookkeeping against a real SQLite store in a temporary folder."""

import json

import keras
import mlflow
import numpy as np
import pytest

from paper_kd import tracking


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # One store for the module: creating the SQLite schema takes seconds.
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


def test_flatten_params_dotted_keys_and_json_leaves():
    config = {"a": {"b": 1, "c": {"d": [1, 2.5]}}, "e": None, "f": "text", "g": True, "h": {}}
    flat = tracking.flatten_params(config)
    assert flat == {
        "a.b": "1",
        "a.c.d": "[1, 2.5]",
        "e": "null",
        "f": "text",
        "g": "true",
        "h": "{}",
    }


def test_flatten_params_caps_long_values():
    flat = tracking.flatten_params({"long": "x" * 10000})
    assert len(flat["long"]) == tracking.MAX_PARAM_LENGTH
    assert flat["long"].endswith("...")


def test_config_key_ignores_order_and_location_not_content():
    config = {"model": {"name": "deepset", "width": 16}, "output": {"dir": "/a"}, "seed": 0}
    reordered = {"seed": 0, "output": {"dir": "/b"}, "model": {"width": 16, "name": "deepset"}}
    ignore = ("output.dir",)
    key = tracking.config_key(config, "data1", ignore)
    assert key == tracking.config_key(reordered, "data1", ignore)
    assert key != tracking.config_key(config, "data2", ignore)
    assert key != tracking.config_key({**config, "seed": 1}, "data1", ignore)
    assert key != tracking.config_key(config, "data1")  # output.dir counted when not ignored


def test_default_uri_is_repository_sqlite(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.resolve_tracking_uri()
    assert uri == f"sqlite:///{tracking.REPO_ROOT / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert tracking.resolve_tracking_uri() == "sqlite:////elsewhere/x.db"
    assert tracking.artifact_root_for("sqlite:////elsewhere/x.db") == "file:///elsewhere/artifacts"


def test_unreachable_uris_fail_in_one_line(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(tracking.TrackingError, match="cannot create folder") as error:
        tracking.Tracker("x", uri=f"sqlite:///{blocked / 'sub' / 'mlflow.db'}")
    assert "\n" not in str(error.value)
    # Port 9 (discard) on localhost: nothing listens there.
    with pytest.raises(tracking.TrackingError, match="cannot be reached") as error:
        tracking.Tracker("x", uri="http://127.0.0.1:9")
    assert "\n" not in str(error.value)


def test_crashing_runs_end_failed_parent_and_child(store):
    tracker = tracking.Tracker("crash")
    with pytest.raises(RuntimeError, match="boom"):
        with tracker.run("parent", params={"a": {"b": 1}}):
            with tracker.run("child", nested=True, tags={tracking.KEY_TAG: "k"}):
                raise RuntimeError("boom")
    runs = {r.info.run_name: r for r in tracker.client.search_runs([tracker.experiment_id])}
    assert runs["parent"].info.status == "FAILED"
    assert runs["child"].info.status == "FAILED"
    assert runs["child"].data.tags["mlflow.parentRunId"] == runs["parent"].info.run_id
    assert runs["parent"].data.params == {"a.b": "1"}
    assert runs["parent"].data.tags["git_commit"] != ""
    assert "version.keras" in runs["parent"].data.tags
    assert tracker.find_finished("k") is None  # a FAILED run is never reused


def test_keyboard_interrupt_also_ends_failed(store):
    tracker = tracking.Tracker("interrupt")
    with pytest.raises(KeyboardInterrupt):
        with tracker.run("parent"):
            raise KeyboardInterrupt
    (run,) = tracker.client.search_runs([tracker.experiment_id])
    assert run.info.status == "FAILED"


def test_stale_running_run_of_dead_process_is_failed(store):
    tracker = tracking.Tracker("stale")
    run = tracker.client.create_run(
        tracker.experiment_id,
        tags={tracking.HOST_TAG: __import__("socket").gethostname(), tracking.PID_TAG: "999999"},
    )
    assert tracker.client.get_run(run.info.run_id).info.status == "RUNNING"
    tracking.Tracker("stale")
    assert tracker.client.get_run(run.info.run_id).info.status == "FAILED"


def _tiny_model():
    inputs = {"p4": keras.Input((None, 4), name="p4"), "mask": keras.Input((None,), name="mask")}
    pooled = keras.ops.sum(inputs["p4"], axis=1)
    outputs = keras.layers.Dense(2, name="logits")(pooled)
    return keras.Model(inputs, outputs)


def test_model_is_logged_found_by_key_and_loaded_across_experiments(store):
    model = _tiny_model()
    first = tracking.Tracker("table1")
    with first.run("parent"):
        with first.run("deepset-seed0", nested=True, tags={tracking.KEY_TAG: "abc"}) as child:
            first.log_model(model)
            first.log_json(child.info.run_id, {"auc": 0.9}, "evaluation/e.json")
            callback = tracking.EpochMetrics(first.client, child.info.run_id)
            callback.on_epoch_end(0, {"loss": 0.7, "val_accuracy": 0.6})
            callback.on_epoch_end(1, {"loss": 0.5, "val_accuracy": 0.8})

    other = tracking.Tracker("figure_roc")  # another script's experiment, same store
    found = other.find_finished("abc")
    assert found is not None and found.info.run_id == child.info.run_id
    assert other.find_finished("other-key") is None
    history = other.client.get_metric_history(found.info.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(0, 0.6), (1, 0.8)]
    assert other.load_json(found, "evaluation/e.json") == {"auc": 0.9}
    assert other.load_json(found, "evaluation/missing.json") is None

    loaded = other.load_model(found)
    inputs = {"p4": np.random.default_rng(0).normal(size=(3, 5, 4)).astype("float32"),
              "mask": np.ones((3, 5), bool)}  # fmt: skip
    np.testing.assert_allclose(loaded.predict(inputs, verbose=0), model.predict(inputs, verbose=0))


def test_log_params_many_keys_in_batches(store):
    tracker = tracking.Tracker("params")
    config = {f"section{i}": {f"key{j}": j for j in range(30)} for i in range(5)}
    with tracker.run("parent", params=config) as run:
        tracker.log_json(run.info.run_id, config, "config.json")
    stored = tracker.client.get_run(run.info.run_id)
    assert len(stored.data.params) == 150
    assert stored.data.params["section4.key29"] == "29"
    text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.json")
    assert json.loads(text)["section0"]["key3"] == 3


def test_sigterm_ends_the_run_failed(store, tmp_path):
    """A script killed with SIGTERM (a batch system's time limit) leaves no RUNNING run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = (
        "import signal, time\n"
        "from paper_kd import experiment, tracking\n"
        "signal.signal(signal.SIGTERM, experiment._terminate)\n"
        "tracker = tracking.Tracker('sigterm')\n"
        "with tracker.run('parent'):\n"
        "    with tracker.run('child', nested=True):\n"
        "        print('started', flush=True)\n"
        "        time.sleep(600)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "MLFLOW_TRACKING_URI": store})  # fmt: skip
    assert process.stdout.readline().strip() == "started"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    time.sleep(0.1)
    tracker = tracking.Tracker("sigterm")
    statuses = {r.info.run_name: r.info.status for r in tracker.client.search_runs(
        [tracker.experiment_id])}  # fmt: skip
    assert statuses == {"parent": "FAILED", "child": "FAILED"}
