"""End to end: the smoke profile of Table 1 and both figures, with a real MLflow store.

Generates the smoke profile's jets with Pythia, trains every model, writes the
table and figures into a temporary folder, then checks what MLflow holds
through an MLflow server started on 127.0.0.1 (its REST API) and that the
figure scripts reused the trained models instead of training again.
"""

import csv
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
STUDENT_ROWS = ("deepset", "deepset_kd", "mlp", "mlp_kd", "deepset_aug")

SHARED = Path(os.environ.get("PAPER_KD_SHARED", REPO.parent / "shared"))
PUBLISHED = SHARED / "fixtures" / "published" / "lorentznet_top.npz"


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _script(name, tmp, env, *extra):
    command = [PYTHON, str(REPO / "reproduce" / f"{name}.py"), "--profile", "smoke",
               "--output-dir", str(tmp / "figures"), "--cache-dir", str(tmp / "data"),
               "--work-dir", str(tmp / "runs"), *extra]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Run table1, figure_roc and figure_boost once; share their outputs."""
    tmp = tmp_path_factory.mktemp("reproduce")
    uri = f"sqlite:///{tmp / 'mlflow' / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    outputs = {}
    for name in ("table1", "figure_roc", "figure_boost"):
        started = time.perf_counter()
        extra = []
        if name == "table1" and PUBLISHED.exists():
            extra = ["--published-teacher", str(PUBLISHED), "--published-jets", "64"]
        result = _script(name, tmp, env, *extra)
        outputs[name] = result
        assert result.returncode == 0, f"{name} failed:\n{result.stderr[-4000:]}"
        print(f"{name}: {time.perf_counter() - started:.0f} s")
    return {"tmp": tmp, "uri": uri, "env": env, "outputs": outputs}


@pytest.mark.slow
def test_table_has_every_row_with_finite_values(smoke):
    figures = smoke["tmp"] / "figures"
    rows = list(csv.DictReader((figures / "table1.csv").open()))
    assert [row["model"] for row in rows] == [
        "LorentzNet (teacher)", "Deep Set", "Deep Set + KD", "MLP", "MLP + KD",
        "Deep Set, boost-augmented",
    ]  # fmt: skip
    for row in rows:
        for key in ("parameters", "macs_per_jet"):
            assert int(row[key]) > 0, (row["model"], key)
        for key in ("accuracy", "auc", "rejection_50", "rejection_30", "invariance"):
            value = float(row[key])
            assert math.isfinite(value), (row["model"], key, row[key])
        assert 0.0 <= float(row["accuracy"]) <= 1.0
        assert 0.0 <= float(row["auc"]) <= 1.0
        assert float(row["rejection_50"]) >= 1.0

    markdown = (figures / "table1.md").read_text()
    assert "profile 'smoke'" in markdown and "Pythia 8" in markdown
    assert "inf" not in markdown.lower().replace("invariance", "")
    assert markdown.strip() in smoke["outputs"]["table1"].stdout
    assert r"\begin{tabular}" in (figures / "table1.tex").read_text()
    for stem in ("figure_roc", "figure_boost"):
        for suffix in (".pdf", ".png"):
            assert (figures / f"{stem}{suffix}").stat().st_size > 10_000


def _search(base, experiment_ids, filter_string=""):
    body = json.dumps({"experiment_ids": experiment_ids, "filter": filter_string,
                       "max_results": 1000}).encode()  # fmt: skip
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/runs/search", data=body,
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read()).get("runs", [])


@pytest.fixture(scope="module")
def server(smoke):
    """An MLflow server on a free local port over the smoke store; stopped afterwards."""
    port = _free_port()
    mlflow_bin = Path(PYTHON).with_name("mlflow")
    process = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", smoke["uri"], "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=smoke["env"],
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start: {process.stderr.read()[-2000:]}")
            time.sleep(1)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert process.returncode is not None


def _experiments(base):
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/experiments/search",
        data=json.dumps({"max_results": 100}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return {e["name"]: e["experiment_id"] for e in json.loads(response.read())["experiments"]}


def _tags(run):
    return {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}


@pytest.mark.slow
def test_mlflow_server_lists_runs_with_metrics_params_and_artifacts(smoke, server):
    experiments = _experiments(server)
    assert {"table1", "figure_roc", "figure_boost"} <= set(experiments)

    runs = _search(server, [experiments["table1"]])
    by_name = {run["info"]["run_name"]: run for run in runs}
    assert all(run["info"]["status"] == "FINISHED" for run in runs)
    parent = by_name["table1-smoke"]
    assert _tags(parent)["profile"] == "smoke"
    assert len(_tags(parent)["git_commit"]) >= 40
    assert "version.tensorflow-cpu" in _tags(parent) or "version.tensorflow" in _tags(parent)

    children = [
        run for run in runs if _tags(run).get("mlflow.parentRunId") == parent["info"]["run_id"]
        and _tags(run).get("paper_kd.kind") == "model"
    ]  # fmt: skip
    assert sorted(run["info"]["run_name"] for run in children) == sorted(
        ["teacher-seed0"] + [f"{row}-seed0" for row in STUDENT_ROWS]
    )
    for child in children:
        metrics = {m["key"]: m["value"] for m in child["data"]["metrics"]}
        params = {p["key"]: p["value"] for p in child["data"]["params"]}
        assert 0.0 <= metrics["test_auc"] <= 1.0
        assert "val_accuracy" in metrics  # per-epoch training metrics
        assert params["model.name"] in ("lorentznet", "deepset", "mlp")
        assert "paper_kd.model_uri" in _tags(child)

    # Per-epoch history of one student, and its artifacts on disk.
    student = next(run for run in children if run["info"]["run_name"] == "deepset_kd-seed0")
    assert params_of(student)["distillation.temperature"] == "1.0"
    with urllib.request.urlopen(
        f"{server}/api/2.0/mlflow/metrics/get-history?run_id={student['info']['run_id']}"
        "&metric_key=val_accuracy", timeout=30,
    ) as response:  # fmt: skip
        history = json.loads(response.read())["metrics"]
    assert [m["step"] for m in history] == list(range(len(history))) and len(history) >= 2

    import mlflow

    client = mlflow.tracking.MlflowClient(smoke["uri"])
    files = {f.path for f in client.list_artifacts(student["info"]["run_id"])}
    assert {"config.json", "evaluation"} <= files
    parent_files = {f.path for f in client.list_artifacts(parent["info"]["run_id"], "tables")}
    assert "tables/table1.md" in parent_files and "tables/table1.csv" in parent_files
    assert "data_fingerprint.json" in {
        f.path for f in client.list_artifacts(parent["info"]["run_id"])
    }


def params_of(run):
    return {p["key"]: p["value"] for p in run["data"]["params"]}


@pytest.mark.slow
def test_figure_scripts_reused_the_trained_models(smoke, server):
    experiments = _experiments(server)
    trained = [
        run for name in ("table1", "figure_roc", "figure_boost")
        for run in _search(server, [experiments[name]])
        if _tags(run).get("paper_kd.kind") == "model" and "paper_kd.reused_from" not in _tags(run)
    ]  # fmt: skip
    assert len(trained) == 1 + len(STUDENT_ROWS)  # trained once, by table1
    for name in ("figure_roc", "figure_boost"):
        models = [run for run in _search(server, [experiments[name]])
                  if _tags(run).get("paper_kd.kind") == "model"]  # fmt: skip
        assert len(models) == 1 + len(STUDENT_ROWS)
        assert all("paper_kd.reused_from" in _tags(run) for run in models)


@pytest.mark.slow
def test_bad_input_fails_in_one_line_before_work(smoke, tmp_path):
    env = smoke["env"]
    result = _script("table1", tmp_path, env, "--profile", "huge")
    assert result.returncode == 2
    assert "table1.py: error: unknown profile 'huge'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    result = _script("figure_roc", tmp_path, env, "--data-dir", str(tmp_path / "absent"))
    assert result.returncode == 2 and "no such dataset folder" in result.stderr

    bad_env = {**env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    result = _script("figure_boost", tmp_path, bad_env)
    assert result.returncode == 2 and "cannot be reached" in result.stderr
    assert not (tmp_path / "data").exists()  # nothing generated


@pytest.mark.slow
def test_published_teacher_gap_is_measured(smoke):
    if not PUBLISHED.exists():
        pytest.skip(f"published weights not found at {PUBLISHED} (set PAPER_KD_SHARED)")
    results = json.loads((smoke["tmp"] / "figures" / "table1.json").read_text())
    gap = results["published_teacher"]
    assert gap["n_jets"] == 64
    assert 0.5 < gap["metrics"]["auc"]["value"] <= 1.0
    assert gap["reference"]["auc"] == 0.987
    assert "Published LorentzNet teacher (lorentznet_top.npz) on 64" in (
        smoke["outputs"]["table1"].stdout
    )


def test_update_readme_replaces_only_the_results_block(tmp_path):
    sys.path.insert(0, str(REPO / "reproduce"))
    import table1

    readme = tmp_path / "README.md"
    readme.write_text(
        f"# Title\n\nBefore.\n\n{table1.RESULTS_START}\nold\n{table1.RESULTS_END}\n\nAfter.\n"
    )
    table1.update_readme(f"{table1.RESULTS_START}\nnew table\n{table1.RESULTS_END}", readme)
    assert readme.read_text() == (
        f"# Title\n\nBefore.\n\n{table1.RESULTS_START}\nnew table\n{table1.RESULTS_END}\n\nAfter.\n"
    )
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="no '<!-- results:start -->'"):
        table1.update_readme("x", readme)
