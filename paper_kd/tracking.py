"""MLflow bookkeeping for the reproduce scripts.

One experiment per script, a parent run per invocation and a nested run per
trained model. Parameters are the full resolved configuration (flattened to
dotted keys), metrics are logged per epoch by ``EpochMetrics``, and every
trained model is logged as an MLflow Keras model. A finished model run carries
a reuse key (a hash of its resolved configuration and of the data fingerprint)
as a tag, so a later script finds it instead of training again.

The default store is a SQLite file ``mlflow/mlflow.db`` in the repository with
artifacts under ``mlflow/artifacts``; ``MLFLOW_TRACKING_URI`` overrides it.
A run that raises (including ``KeyboardInterrupt``) ends as FAILED.
"""

import contextlib
import hashlib
import json
import logging
import os
import platform
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

__all__ = [
    "KEY_TAG",
    "REPO_ROOT",
    "EpochMetrics",
    "Tracker",
    "TrackingError",
    "config_key",
    "default_tracking_uri",
    "flatten_params",
    "resolve_tracking_uri",
]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
KEY_TAG = "paper_kd.key"
MODEL_URI_TAG = "paper_kd.model_uri"
KIND_TAG = "paper_kd.kind"
PID_TAG = "paper_kd.pid"
HOST_TAG = "paper_kd.host"
REUSED_TAG = "paper_kd.reused_from"

# MLflow's limits on one parameter value and on one log_batch call.
MAX_PARAM_LENGTH = 6000
BATCH_SIZE = 100


class TrackingError(ValueError):
    """The tracking store cannot be reached or used."""


def default_tracking_uri(root=REPO_ROOT):
    """``sqlite:///<root>/mlflow/mlflow.db``: the store the README's ``mlflow ui`` opens."""
    return f"sqlite:///{Path(root).resolve() / 'mlflow' / 'mlflow.db'}"


def resolve_tracking_uri(uri=None, root=REPO_ROOT):
    """The explicit ``uri``, else ``MLFLOW_TRACKING_URI``, else the repository's SQLite store."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)


def _sqlite_path(uri):
    path = uri[len("sqlite:///") :]
    return Path(path) if path else None


def artifact_root_for(uri):
    """Artifact folder beside a SQLite or file store; ``None`` lets a server decide."""
    if uri.startswith("sqlite:///"):
        return (_sqlite_path(uri).parent / "artifacts").resolve().as_uri()
    if uri.startswith("file:") or "://" not in uri:
        path = Path(urllib.parse.urlparse(uri).path if uri.startswith("file:") else uri)
        return (path / "artifacts").resolve().as_uri()
    return None


def check_tracking_uri(uri, timeout=5.0):
    """Raise ``TrackingError`` (one line) unless the store at ``uri`` answers."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                if response.status != 200:
                    raise TrackingError(f"tracking URI {uri}: /health answered {response.status}")
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise TrackingError(f"tracking URI {uri} cannot be reached ({reason})") from None
        return

    if uri.startswith("sqlite:"):
        path = _sqlite_path(uri)
        if path is None:
            raise TrackingError(f"tracking URI {uri}: expected sqlite:///PATH/TO/FILE.db")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TrackingError(
                f"tracking URI {uri}: cannot create folder {path.parent} ({error.strerror})"
            ) from None
        if not os.access(path.parent, os.W_OK):
            raise TrackingError(f"tracking URI {uri}: folder {path.parent} is not writable")

    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any store failure becomes one line
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise TrackingError(f"tracking URI {uri} cannot be used ({message})") from None


def flatten_params(config, prefix=""):
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists as JSON, ``None`` as ``null``."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        if isinstance(value, str):
            text = value
        else:
            text = json.dumps(_jsonable(value), sort_keys=True)
        if len(text) > MAX_PARAM_LENGTH:
            # Limitation: MLflow caps a parameter at 6000 characters; the full
            # configuration is also logged as an artifact, so nothing is lost.
            text = text[: MAX_PARAM_LENGTH - 3] + "..."
        flat[name] = text
    return flat


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def config_key(config, data_fingerprint, ignore=()):
    """Reuse key: a short hash of the resolved config and the data fingerprint.

    ``ignore`` lists dotted keys (such as ``output.dir``) that say where a run
    writes, not what it computes.
    """
    flat = flatten_params(config)
    for name in ignore:
        flat.pop(name, None)
    payload = json.dumps({"config": flat, "data": data_fingerprint}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def git_commit(root=REPO_ROOT):
    """``<sha>`` or ``<sha>-dirty`` of the working tree; ``unknown`` outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def package_versions():
    """Versions of the packages that decide the numbers, as ``version.<name>`` tags."""
    from importlib import metadata

    versions = {"version.python": platform.python_version()}
    for name in ("paper-kd", "tensorflow-cpu", "tensorflow", "keras", "numpy", "mlflow",
                 "energyflow", "pythia8mc", "fastjet", "h5py"):  # fmt: skip
        try:
            versions[f"version.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EpochMetrics:
    """Keras callback that logs every epoch's ``logs`` to one MLflow run.

    Built lazily as a ``keras.callbacks.Callback`` subclass so that importing
    this module does not import Keras.
    """

    def __new__(cls, client, run_id):
        import keras

        class _EpochMetrics(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                from mlflow.entities import Metric

                stamp = int(time.time() * 1000)
                metrics = [
                    Metric(key, float(value), stamp, epoch)
                    for key, value in (logs or {}).items()
                    if np.ndim(value) == 0 and np.isfinite(float(value))
                ]
                if metrics:
                    client.log_batch(run_id, metrics=metrics)

        return _EpochMetrics()


class Tracker:
    """The MLflow side of one reproduce script: its experiment, runs and lookups.

    Example:
        >>> tracker = Tracker("table1")            # checks the store first
        >>> with tracker.run("table1", tags={"profile": "cpu"}) as parent:
        ...     with tracker.run("deepset-seed0", nested=True) as child: ...
    """

    def __init__(self, experiment, uri=None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = resolve_tracking_uri(uri)
        check_tracking_uri(self.uri)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        self.experiment_name = experiment
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=artifact_root_for(self.uri)
            )
        else:
            self.experiment_id = found.experiment_id
        self._fail_stale_runs()

    def _fail_stale_runs(self):
        """Mark FAILED the runs a killed process on this host left RUNNING."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string="attributes.status = 'RUNNING'"
        )
        for run in runs:
            host, pid = run.data.tags.get(HOST_TAG), run.data.tags.get(PID_TAG)
            if host == socket.gethostname() and pid and not _pid_alive(int(pid)):
                log.warning("run %s was left RUNNING by a killed process; marking it FAILED",
                            run.info.run_id)  # fmt: skip
                self.client.set_terminated(run.info.run_id, status="FAILED")

    def base_tags(self):
        tags = {
            "git_commit": git_commit(),
            HOST_TAG: socket.gethostname(),
            PID_TAG: str(os.getpid()),
        }
        tags.update(package_versions())
        return tags

    @contextlib.contextmanager
    def run(self, name, *, nested=False, tags=None, params=None):
        """Start a run (nested under the active one when ``nested``); FAILED on any exception."""
        import mlflow

        all_tags = self.base_tags()
        all_tags.update({k: str(v) for k, v in (tags or {}).items()})
        active = mlflow.start_run(
            experiment_id=self.experiment_id, run_name=name, nested=nested, tags=all_tags
        )
        run_id = active.info.run_id
        try:
            if params:
                self.log_params(run_id, params)
            yield active
        except BaseException:
            mlflow.end_run("FAILED")
            raise
        else:
            mlflow.end_run("FINISHED")
        finally:
            # A run must never stay RUNNING, whatever ended the block.
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, status="FAILED")

    def log_params(self, run_id, config):
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in sorted(flatten_params(config).items())]
        for start in range(0, len(params), BATCH_SIZE):
            self.client.log_batch(run_id, params=params[start : start + BATCH_SIZE])

    def log_metrics(self, run_id, metrics, step=0):
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), stamp, step)
            for k, v in metrics.items()
            if v is not None and np.isfinite(float(v))
        ]
        for start in range(0, len(batch), BATCH_SIZE):
            self.client.log_batch(run_id, metrics=batch[start : start + BATCH_SIZE])

    def log_json(self, run_id, payload, artifact_file):
        self.client.log_text(run_id, json.dumps(_jsonable(payload), indent=2), artifact_file)

    def log_artifact(self, run_id, path, artifact_path=None):
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_model(self, model, name="model"):
        """Log a Keras model to the active run as an MLflow model; return its URI."""
        import mlflow
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        signature = ModelSignature(
            inputs=Schema([
                TensorSpec(np.dtype(np.float32), (-1, -1, 4), "p4"),
                TensorSpec(np.dtype(bool), (-1, -1), "mask"),
            ]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 2), "logits")]),
        )  # fmt: skip
        # Explicit requirements: MLflow would otherwise reload the model in a
        # subprocess to infer them, which costs more than training a student.
        versions = package_versions()
        requirements = [
            f"{name}=={versions[f'version.{name}']}"
            for name in ("keras", "tensorflow-cpu", "numpy", "paper-kd")
            if f"version.{name}" in versions
        ]
        info = mlflow.keras.log_model(
            model, name=name, signature=signature, pip_requirements=requirements
        )
        mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
        return info.model_uri

    def find_finished(self, key, require_model=True):
        """The newest FINISHED run, in any experiment of this store, with reuse key ``key``.

        Runs that only reused another are skipped; ``require_model`` also skips
        runs that logged no model.
        """
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        runs = self.client.search_runs(
            experiments,
            filter_string=f"tags.`{KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=20,
        )
        for run in runs:
            has_model = MODEL_URI_TAG in run.data.tags or not require_model
            if has_model and REUSED_TAG not in run.data.tags:
                return run
        return None

    def load_model(self, run):
        """Load the Keras model logged in ``run``."""
        import mlflow

        import paper_kd.models  # noqa: F401 - registers the custom layers

        with contextlib.suppress(ImportError):
            import paper_kd.models.lorentznet  # noqa: F401
            import paper_kd.models.students  # noqa: F401
        return mlflow.keras.load_model(run.data.tags[MODEL_URI_TAG])

    def load_json(self, run, artifact_file):
        """A JSON artifact of ``run``, or ``None`` when it was not logged."""
        import mlflow

        try:
            text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{artifact_file}")
        except Exception:  # noqa: BLE001 - a missing artifact is an answer, not an error
            return None
        return json.loads(text)
