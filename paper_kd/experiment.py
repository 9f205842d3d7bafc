"""Orchestration of the paper's experiment (arXiv:2311.14160, Table 1 and Figs. 2-3).

One profile (``configs/profiles/<name>.yaml``) says how big everything is. The
experiment then:

1. gets the data: generated once with Pythia 8 and cached under
   ``data/<key>/`` (key = hash of the generation settings), or a converted
   dataset given by path;
2. trains the LorentzNet teacher (or loads published weights);
3. trains each student for every seed: Deep Set and MLP from scratch and
   distilled from the teacher, plus a Deep Set trained on boosted jets
   (the paper's released from-scratch config augments with beta <= 0.5);
4. evaluates every model on the test split: tagging metrics, ROC curve and
   the boost scan;
5. aggregates over seeds: mean and standard deviation, or the bootstrap
   error where only one seed ran.

Every model is a nested MLflow run under the script's parent run. A model
already trained with the same resolved configuration and data (same reuse
key) is loaded from MLflow instead of trained again, so the figure scripts
reuse Table 1's models and a rerun after an interruption skips what finished.
"""

import copy
import csv
import datetime
import hashlib
import io
import json
import logging
import os
import signal
import sys
from pathlib import Path

import numpy as np
import yaml

from paper_kd import atomic, tracking
from paper_kd.data.format import SPLITS, JetFormatError, read_info, read_jets, split_path

__all__ = [
    "PROFILES",
    "ROWS",
    "Experiment",
    "ProfileError",
    "aggregate",
    "data_fingerprint",
    "format_table",
    "load_profile",
    "run_script",
]

log = logging.getLogger(__name__)

REPO_ROOT = tracking.REPO_ROOT
PROFILE_DIR = REPO_ROOT / "configs" / "profiles"
PROFILES = ("smoke", "cpu", "paper")

# Table rows in order: key in the profile's ``models`` -> label.
ROWS = {
    "teacher": "LorentzNet (teacher)",
    "deepset": "Deep Set",
    "deepset_kd": "Deep Set + KD",
    "mlp": "MLP",
    "mlp_kd": "MLP + KD",
    "deepset_aug": "Deep Set, boost-augmented",
}
REQUIRED_ROWS = ("teacher", "deepset", "deepset_kd", "mlp", "mlp_kd")
METRICS = ("accuracy", "auc", "rejection_50", "rejection_30")

_PROFILE_KEYS = {"description", "data", "seeds", "teacher_seeds", "evaluation", "train", "models"}
_DATA_KEYS = {"n_jets", "n_max", "generate", "require_dir"}
_EVAL_KEYS = {"batch_size", "n_bootstrap", "direction", "max_jets", "betas", "size_constituents"}
_MODEL_KEYS = {"extends", "config", "use_teacher", "model", "distillation", "optimizer",
               "schedule", "training", "data"}  # fmt: skip
# Sections of an experiment config (configs/experiments) that a profile sets itself.
_CONFIG_FILE_DROPPED = ("name", "seed", "data", "teacher", "output")
# Config entries that say where a run reads or writes, not what it computes.
_KEY_IGNORED = (
    "name",
    "source",
    "data.dir",
    "teacher.path",
    "output.dir",
    "training.verbose",
    "training.resume",
    "distillation.cache_dir",
)
# Signal efficiencies at which a ROC curve is stored for the figure.
ROC_GRID = np.round(np.linspace(0.05, 1.0, 96), 4)
# The published teacher on the reference test set (Gong et al., JHEP 07 (2022) 030).
PUBLISHED_TEACHER = {"dataset": "Top Quark Tagging Reference Dataset, test split",
                     "accuracy": 0.9425, "auc": 0.9870, "rejection_50": 534,
                     "rejection_30": 2193}  # fmt: skip


class ProfileError(ValueError):
    """A profile that is unknown, unreadable or has a wrong key."""


# ---------------------------------------------------------------------------
# Profiles


def _merge(base, override):
    """Deep merge of two config dicts; ``override`` wins.

    A section whose ``name`` changes (another schedule, another model) is
    replaced, not merged: the old one's options would not apply.
    """
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        renamed = (
            isinstance(value, dict) and isinstance(out.get(key), dict)
            and "name" in value and value["name"] != out[key].get("name")
        )  # fmt: skip
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not renamed:
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _check_keys(section, allowed, where):
    if not isinstance(section, dict):
        raise ProfileError(f"{where}: expected a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ProfileError(f"{where}: unknown key {unknown[0]!r} (allowed: {sorted(allowed)})")


def load_profile(name_or_path):
    """Read and validate a profile: a name in ``configs/profiles`` or a YAML path.

    Returns the profile dict with ``name`` and ``path`` added and each model's
    ``extends`` chain resolved.
    """
    text = str(name_or_path)
    path = Path(text) if text.endswith((".yaml", ".yml")) else PROFILE_DIR / f"{text}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise ProfileError(f"unknown profile {text!r}: no file {path} (known: {known})")
    try:
        profile = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ProfileError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None

    where = str(path)
    _check_keys(profile, _PROFILE_KEYS, where)
    for key in ("data", "seeds", "evaluation", "models"):
        if key not in profile:
            raise ProfileError(f"{where}: missing key {key!r}")
    _check_keys(profile["data"], _DATA_KEYS, f"{where}: data")
    n_jets = profile["data"].get("n_jets", {})
    if set(n_jets) != set(SPLITS) or not all(isinstance(n_jets[s], int) for s in SPLITS):
        raise ProfileError(f"{where}: data.n_jets must give an integer for each of {SPLITS}")
    _check_keys(profile["evaluation"], _EVAL_KEYS, f"{where}: evaluation")
    seeds = profile["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ProfileError(f"{where}: seeds must be a non-empty list of integers")
    profile.setdefault("teacher_seeds", seeds[:1])
    profile.setdefault("train", {})

    models = profile["models"]
    _check_keys(models, ROWS, f"{where}: models")
    for row in REQUIRED_ROWS:
        if row not in models:
            raise ProfileError(f"{where}: models: missing row {row!r}")
    resolved = {}
    for row, entry in models.items():
        _check_keys(entry, _MODEL_KEYS, f"{where}: models.{row}")
        chain, current = [entry], entry
        while "extends" in current:
            parent = current["extends"]
            if parent not in models or len(chain) > len(models):
                raise ProfileError(f"{where}: models.{row}.extends: no model {parent!r}")
            current = models[parent]
            chain.append(current)
        merged = {}
        for item in reversed(chain):
            merged = _merge(merged, {k: v for k, v in item.items() if k != "extends"})
        if "config" in merged:
            config_path = REPO_ROOT / merged["config"]
            if not config_path.is_file():
                raise ProfileError(f"{where}: models.{row}.config: no such file {config_path}")
            from_file = yaml.safe_load(config_path.read_text()) or {}
            merged.setdefault(
                "use_teacher", (from_file.get("teacher") or {}).get("path") is not None
            )
            base = {k: v for k, v in from_file.items() if k not in _CONFIG_FILE_DROPPED}
            merged = _merge(base, {k: v for k, v in merged.items() if k != "config"})
            merged["config_file"] = str(merged.get("config_file", config_path))
        merged.setdefault("use_teacher", False)
        if "model" not in merged or "name" not in merged["model"]:
            raise ProfileError(f"{where}: models.{row}: missing key 'model.name'")
        resolved[row] = merged
    profile["models"] = resolved
    profile["name"] = path.stem
    profile["path"] = str(path)
    return profile


# ---------------------------------------------------------------------------
# Data


def check_dataset(data_dir):
    """Raise a one-line ``JetFormatError`` unless ``data_dir`` holds three complete splits."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise JetFormatError(f"{data_dir}: no such dataset folder (expected train.h5, val.h5, "
                             "test.h5 in the canonical format)")  # fmt: skip
    return {split: read_info(split_path(data_dir, split)) for split in SPLITS}


def data_fingerprint(data_dir):
    """A short hash that changes when the jets change: sizes, provenance, labels, jet momenta.

    Reads ``label``, ``n_constituents`` and ``jet_p4`` of every split (a few
    bytes per jet), not the constituents, so it stays quick on the full dataset.
    """
    digest = hashlib.sha256()
    for split in SPLITS:
        path = split_path(data_dir, split)
        info = read_info(path)
        digest.update(json.dumps({k: info[k] for k in ("n_jets", "n_max", "provenance")},
                                 sort_keys=True, default=str).encode())  # fmt: skip
        jets = read_jets(path, fields=("label", "n_constituents", "jet_p4"))
        for name in ("label", "n_constituents", "jet_p4"):
            digest.update(np.ascontiguousarray(jets[name]).tobytes())
    return digest.hexdigest()[:20]


def generation_settings(profile):
    """Everything that decides the generated jets; its hash names the cache folder."""
    from paper_kd import __version__
    from paper_kd.data.generate import PT_HAT_MIN

    data = profile["data"]
    generate = dict(data.get("generate", {}))
    # The package's default cut is part of the recipe: a new default must not
    # reuse jets cached under the old one.
    generate.setdefault("pt_hat_min", dict(PT_HAT_MIN))
    return {"n_jets": data["n_jets"], "generate": generate, "paper_kd_version": __version__}


def describe_data(infos, source_dir, generated):
    """One sentence for a caption: where the jets come from and how many."""
    provenance = infos["test"]["provenance"]
    source = provenance.get("source") or provenance.get("generator") or "unknown source"
    sizes = ", ".join(f"{infos[s]['n_jets']:,} {s}" for s in SPLITS)
    if generated:
        what = ("jets generated by this package with Pythia 8 and FastJet (particle level, no "
                f"detector simulation; seed {provenance.get('seed', '?')})")  # fmt: skip
    else:
        what = f"dataset {source_dir} ({source})"
    return f"{what}; {sizes} jets"


# ---------------------------------------------------------------------------
# Aggregation and tables


def aggregate(values, errors=None, lower_bounds=None):
    """``{"mean", "error", "lower_bound", "n"}`` over seeds.

    Several seeds: mean and sample standard deviation. One seed: its value
    and its bootstrap error. When any seed's value is only a lower bound, so
    is the mean.
    """
    values = [float(v) for v in values]
    lower_bound = bool(lower_bounds and any(lower_bounds))
    if len(values) > 1:
        return {"mean": float(np.mean(values)), "error": float(np.std(values, ddof=1)),
                "lower_bound": lower_bound, "n": len(values)}  # fmt: skip
    error = errors[0] if errors else None
    return {"mean": values[0], "error": None if error is None else float(error),
            "lower_bound": lower_bound, "n": 1}  # fmt: skip


def _digits(error, default=3):
    """Decimals that show one significant digit of ``error`` (two when it starts with 1)."""
    if error is None or not np.isfinite(error) or error <= 0:
        return default
    exponent = int(np.floor(np.log10(error)))
    leading = int(error / 10.0**exponent)
    return int(max(0, min(6, -exponent + (1 if leading == 1 else 0))))


def format_value(stat, kind="fraction", latex=False):
    """``0.912 ± 0.003`` (or ``> 1000`` for a lower bound), to the error's precision."""
    mean, error = stat["mean"], stat["error"]
    if mean is None or not np.isfinite(mean):
        return "n/a"  # undefined, e.g. an invariance score when accuracy never exceeds 0.5
    pm = r" \pm " if latex else " ± "
    if kind == "rejection":
        if stat["lower_bound"]:
            return (r"$> %d$" if latex else "> %d") % int(mean)
        digits = min(_digits(error, 0), 1)
    else:
        digits = _digits(error, 3)
    text = f"{mean:.{digits}f}"
    if error is not None and np.isfinite(error):
        text += f"{pm}{error:.{digits}f}"
    return f"${text}$" if latex else text


COLUMNS = (
    ("parameters", "Parameters", None),
    ("macs_per_jet", "MACs/jet", None),
    ("accuracy", "Accuracy", "fraction"),
    ("auc", "AUC", "fraction"),
    ("rejection_50", "1/εB at εS=0.5", "rejection"),
    ("rejection_30", "1/εB at εS=0.3", "rejection"),
    ("invariance", "Invariance score", "fraction"),
)
_TEX_HEADERS = {"rejection_50": r"$1/\varepsilon_B$ ($\varepsilon_S=0.5$)",
                "rejection_30": r"$1/\varepsilon_B$ ($\varepsilon_S=0.3$)",
                "macs_per_jet": "MACs/jet"}  # fmt: skip


def caption(results):
    seeds = results["seeds"]
    return (
        f"Table 1 reproduced with profile '{results['profile']}' on "
        f"{results['data']['description']}. Students: mean ± standard deviation over "
        f"{len(seeds)} seed(s) {seeds}; a single run shows its bootstrap error. Teacher "
        f"{results['teacher_source']}. MACs per jet at {results['size_constituents']} "
        f"constituents. Invariance score over β = {results['betas'][0]}-{results['betas'][-1]} "
        f"({len(results['betas'])} values) along {results['direction']}. "
        f"Generated {results['date']}, commit {results['git_commit'][:12]}."
    )


def format_table(results):
    """``(markdown, csv, latex)`` text of Table 1."""
    rows = results["rows"]
    header = ["Model"] + [title for _, title, _ in COLUMNS]

    def cells(row, latex=False):
        out = []
        for key, _, kind in COLUMNS:
            if kind is None:
                out.append("–" if row[key] is None else f"{row[key]:,}")
            else:
                out.append(format_value(row[key], kind, latex=latex))
        return out

    md = io.StringIO()
    md.write("| " + " | ".join(header) + " |\n")
    md.write("|" + "|".join(["---"] + ["---:"] * len(COLUMNS)) + "|\n")
    for row in rows:
        md.write("| " + " | ".join([row["label"]] + cells(row)) + " |\n")
    md.write(f"\n*{caption(results)}*\n")

    plain = io.StringIO()
    writer = csv.writer(plain)
    writer.writerow(["model"] + [f"{key}{suffix}" for key, _, kind in COLUMNS
                                 for suffix in (("",) if kind is None
                                                else ("", "_error", "_lower_bound"))])  # fmt: skip
    for row in rows:
        line = [row["label"]]
        for key, _, kind in COLUMNS:
            if kind is None:
                line.append(row[key])
            else:
                stat = row[key]
                line += [stat["mean"], "" if stat["error"] is None else stat["error"],
                         int(stat["lower_bound"])]  # fmt: skip
        writer.writerow(line)

    tex = io.StringIO()
    tex.write("\\begin{table}\n\\centering\n\\begin{tabular}{l" + "r" * len(COLUMNS) + "}\n")
    tex.write("\\hline\n")
    tex.write(" & ".join(["Model"] + [_TEX_HEADERS.get(k, t) for k, t, _ in COLUMNS]) + r" \\")
    tex.write("\n\\hline\n")
    for row in rows:
        label = row["label"].replace("β", r"$\beta$")
        tex.write(
            " & ".join(
                [label]
                + [
                    c.replace(",", "{,}") if k is None else c
                    for (k, _, _), c in zip(COLUMNS, cells(row, True))
                ]
            )
        )
        tex.write(" \\\\\n")  # fmt: skip
    text = caption(results).replace("±", r"$\pm$").replace("β", r"$\beta$")
    tex.write("\\hline\n\\end{tabular}\n\\caption{" + text + "}\n\\end{table}\n")
    return md.getvalue(), plain.getvalue(), tex.getvalue()


def claims(results):
    """Measured sentences on the paper's two claims: KD raises AUC, and robustness."""
    rows = {row["row"]: row for row in results["rows"]}
    lines = []
    for student in ("deepset", "mlp"):
        scratch, distilled = rows.get(student), rows.get(f"{student}_kd")
        if not scratch or not distilled:
            continue
        for key, what in (("auc", "AUC"), ("invariance", "invariance score")):
            a, b = scratch[key], distilled[key]
            diff = b["mean"] - a["mean"]
            verdict = "higher" if diff > 0 else "lower"
            if a["error"] is None or b["error"] is None:
                uncertainty = " (no uncertainty: a single run without bootstrap)"
            else:
                error = float(np.hypot(a["error"], b["error"]))
                sigma = f" ({abs(diff) / error:.1f} σ)" if error > 0 else ""
                uncertainty = f" ± {error:.4f}{sigma}"
            lines.append(
                f"- {distilled['label']} vs {scratch['label']}: {what} {verdict} by "
                f"{abs(diff):.4f}{uncertainty}."
            )
    gap = results.get("published_teacher")
    if gap:
        auc = gap["metrics"]["auc"]
        error = "" if auc["error"] is None else f" ± {auc['error']:.4f}"
        lines.append(
            f"- Published LorentzNet teacher ({gap['weights']}) on {gap['n_jets']:,} of these "
            f"test jets: AUC {auc['value']:.4f}{error}, against {gap['reference']['auc']:.4f} "
            "on the reference test set."
        )
    return "\n".join(lines)


write_atomic = atomic.write_text


# ---------------------------------------------------------------------------
# The experiment


class Experiment:
    """One reproduce script's run: profile, data, models, MLflow.

    Everything that can be checked without work is checked in the constructor
    (profile, data folder, teacher weights, tracking store), so bad input
    fails in one line before generation or training starts.

    Example:
        >>> exp = Experiment("table1", profile="smoke")
        >>> with exp.parent_run():
        ...     results = exp.collect()
    """

    def __init__(self, script, profile="cpu", *, data_dir=None, teacher_weights=None,
                 cache_dir=None, work_dir=None, tracking_uri=None, workers=None,
                 published_teacher=None):  # fmt: skip
        self.script = script
        self.profile = load_profile(profile)
        self.data_dir = None if data_dir is None else Path(data_dir).resolve()
        if self.data_dir is not None:
            self.data_infos = check_dataset(self.data_dir)
        elif self.profile["data"].get("require_dir"):
            raise ProfileError(
                f"profile {self.profile['name']!r} needs --data-dir: convert the reference "
                "dataset first with `paper-kd convert`"
            )
        self.teacher_weights = None if teacher_weights is None else Path(teacher_weights)
        if self.teacher_weights is not None and not self.teacher_weights.is_file():
            raise FileNotFoundError(f"{self.teacher_weights}: no such teacher weights file")
        self.published_teacher = None if published_teacher is None else Path(published_teacher)
        if self.published_teacher is not None and not self.published_teacher.is_file():
            raise FileNotFoundError(f"{self.published_teacher}: no such published weights file")
        self.cache_dir = Path(cache_dir or REPO_ROOT / "data")
        self.work_dir = Path(work_dir or REPO_ROOT / "runs")
        for row in self.profile["models"]:
            if row == "teacher" and self.teacher_weights is not None:
                continue
            # Every training config is validated now, before any work.
            try:
                self.train_config(row, self.profile["seeds"][0], "<data>", "<teacher>")
            except ValueError as error:
                message = str(error).removeprefix("<config>: ")
                raise ProfileError(f"{self.profile['path']}: models.{row}: {message}") from None
        self.workers = workers
        self.tracker = tracking.Tracker(script, uri=tracking_uri)
        self._arrays = None

    # -- runs ---------------------------------------------------------------

    def parent_run(self):
        """The script's parent run (a context manager); models are nested inside it."""
        tags = {"profile": self.profile["name"], tracking.KIND_TAG: "script",
                "script": self.script}  # fmt: skip
        params = {"profile": self.profile, "data_dir": str(self.data_dir),
                  "teacher_weights": str(self.teacher_weights)}  # fmt: skip
        return self.tracker.run(f"{self.script}-{self.profile['name']}", tags=tags, params=params)

    def log_artifacts(self, paths, artifact_path=None):
        import mlflow

        run_id = mlflow.active_run().info.run_id
        for path in paths:
            self.tracker.log_artifact(run_id, path, artifact_path)

    # -- data -----------------------------------------------------------------

    def prepare_data(self):
        """The dataset folder: the given one, or the cached generated one (generated if missing)."""
        if self.data_dir is not None:
            return self.data_dir, self.data_infos, False

        settings = generation_settings(self.profile)
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        out_dir = self.cache_dir / key
        try:
            return out_dir, check_dataset(out_dir), True
        except JetFormatError:
            pass

        from paper_kd.data.generate import generate_dataset

        generate = dict(settings["generate"])
        if self.workers is not None:
            generate["workers"] = self.workers
        log.info("generating %s jets into %s", settings["n_jets"], out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / "settings.json", json.dumps(settings, indent=2, sort_keys=True))
        generate_dataset(out_dir, n_jets=dict(settings["n_jets"]), **generate)
        return out_dir, check_dataset(out_dir), True

    def test_arrays(self, data_dir):
        if self._arrays is None:
            from paper_kd.data.pipeline import load_arrays

            evaluation = self.profile["evaluation"]
            # Enough constituents for the model that reads the most.
            n_maxes = [self.profile["data"].get("n_max")] + [
                (entry.get("data") or {}).get("n_max") for entry in self.profile["models"].values()
            ]
            n_max = None if n_maxes[0] is None else max(n for n in n_maxes if n is not None)
            self._arrays = load_arrays(
                split_path(data_dir, "test"),
                n_max=n_max,
                max_jets=evaluation.get("max_jets"),
            )
        return self._arrays

    # -- configs --------------------------------------------------------------

    def train_config(self, row, seed, data_dir, teacher_path=None):
        """The resolved training config of one row and seed."""
        from paper_kd.config import load_config

        entry = self.profile["models"][row]
        sections = {k: v for k, v in entry.items() if k not in ("use_teacher", "config_file")}
        config = _merge(self.profile["train"], sections)
        n_max = (sections.get("data") or {}).get("n_max", self.profile["data"].get("n_max"))
        config = _merge(config, {
            "name": f"{row}-seed{seed}",
            "seed": int(seed),
            "data": {"dir": str(data_dir), "n_max": n_max},
            "teacher": {"path": str(teacher_path) if entry["use_teacher"] else None},
        })  # fmt: skip
        config.setdefault("output", {})["dir"] = str(self.work_dir / "pending")
        if entry["use_teacher"] and not config.get("distillation", {}).get("cache_dir"):
            # Teacher logits computed once per teacher and training set, shared by all seeds.
            config["distillation"]["cache_dir"] = str(self.work_dir / "teacher_logits")
        return load_config(config)

    def eval_settings(self):
        from paper_kd.evaluate import BETAS

        evaluation = self.profile["evaluation"]
        betas = evaluation.get("betas", "paper")
        return {
            "batch_size": evaluation.get("batch_size"),
            "n_bootstrap": int(evaluation.get("n_bootstrap", 100)),
            "direction": evaluation.get("direction", "x"),
            "max_jets": evaluation.get("max_jets"),
            "betas": list(BETAS) if betas == "paper" else [float(b) for b in betas],
            "n_max": self.profile["data"].get("n_max"),
        }

    # -- models ---------------------------------------------------------------

    def _published_teacher(self):
        """Load ``--teacher-weights``: a ``.keras`` model, Keras weights or a state dict."""
        from paper_kd.models import build_model

        path = self.teacher_weights
        hparams = self.profile["models"]["teacher"]["model"].get("hparams", {})
        if path.suffix == ".keras":
            from paper_kd.evaluate import load_model

            return load_model(path)
        if path.name.endswith(".weights.h5"):
            model = build_model("lorentznet", **hparams)
            model({"p4": np.zeros((1, 4, 4), np.float32), "mask": np.ones((1, 4), bool)})
            model.load_weights(path)
            return model
        if path.suffix in (".npz", ".pt", ".pth"):
            return load_published_lorentznet(path, hparams)
        raise ValueError(f"{path}: teacher weights must be .keras, .weights.h5, .npz or .pt")

    def model_run(self, row, seed, data_dir, fingerprint, teacher=None):
        """Train (or reuse) and evaluate one model in a nested run; return its record."""
        eval_settings = self.eval_settings()
        eval_key = tracking.config_key(eval_settings, fingerprint)
        eval_file = f"evaluation/{eval_key}.json"

        published = row == "teacher" and self.teacher_weights is not None
        if published:
            weights_hash = hashlib.sha256(self.teacher_weights.read_bytes()).hexdigest()[:20]
            config = {"published_weights": str(self.teacher_weights), "sha256": weights_hash,
                      "model": self.profile["models"]["teacher"]["model"]}  # fmt: skip
            key = tracking.config_key(config, fingerprint)
        else:
            teacher_key = teacher["key"] if teacher else None
            config = self.train_config(row, seed, data_dir, teacher and teacher["path"])
            key = tracking.config_key(
                config, {"data": fingerprint, "teacher": teacher_key}, ignore=_KEY_IGNORED
            )

        found = self.tracker.find_finished(key)
        tags = {tracking.KEY_TAG: key, "row": row, "seed": seed, "profile": self.profile["name"],
                tracking.KIND_TAG: "model", "data_fingerprint": fingerprint}  # fmt: skip
        if found is not None:
            tags[tracking.REUSED_TAG] = found.info.run_id
        with self.tracker.run(f"{row}-seed{seed}", nested=True, tags=tags, params=config) as run:
            run_id = run.info.run_id
            self.tracker.log_json(run_id, config, "config.json")
            if found is not None:
                log.info("%s seed %d: reusing run %s (key %s)", row, seed, found.info.run_id, key)
                model = self.tracker.load_model(found)
                evaluation = self.tracker.load_json(found, eval_file)
            else:
                if published:
                    model = self._published_teacher()
                else:
                    model = self._train(config, teacher, run_id, key)
                self.tracker.log_model(model)
                evaluation = None
            if evaluation is None:
                n_max = self.profile["data"].get("n_max") if published else config["data"]["n_max"]
                evaluation = self.evaluate(model, data_dir, eval_settings, seed, n_max)
                if found is not None:
                    self.tracker.log_json(found.info.run_id, evaluation, eval_file)
            evaluation["size"] = _model_size(
                model, self.profile["evaluation"].get("size_constituents", 57)
            )
            self.tracker.log_json(run_id, evaluation, eval_file)
            self.tracker.log_metrics(run_id, _flat_metrics(evaluation))

        return {"row": row, "seed": seed, "key": key, "run_id": run_id, "model": model,
                "evaluation": evaluation,
                "reused_from": None if found is None else found.info.run_id}  # fmt: skip

    def _train(self, config, teacher, run_id, key):
        from paper_kd.train import train

        config = copy.deepcopy(config)
        # One folder per configuration: an interrupted run resumes from its checkpoint.
        config["output"]["dir"] = str(self.work_dir / self.profile["name"] / config["name"] / key)
        callbacks = [tracking.EpochMetrics(self.tracker.client, run_id)]
        result = train(config, teacher=teacher and teacher["model"], callbacks=callbacks)
        model = getattr(result.model, "student", result.model)
        self.tracker.log_metrics(run_id, {"best_epoch": result.best_epoch})
        return model

    def evaluate(self, model, data_dir, settings, seed, n_max=None):
        """Tagging metrics, ROC curve on a fixed εS grid and the boost scan of one model.

        ``n_max`` keeps the hardest constituents the model was trained on.
        """
        from paper_kd.evaluate import (
            boost_scan,
            invariance_score,
            predict_scores,
            roc_curve,
            tagging_metrics,
        )

        inputs, labels = self.test_arrays(data_dir)
        if n_max is not None and n_max < inputs["p4"].shape[1]:
            inputs = {"p4": inputs["p4"][:, :n_max], "mask": inputs["mask"][:, :n_max]}
        scores = predict_scores(model, inputs, settings["batch_size"])
        metrics = tagging_metrics(labels, scores, n_bootstrap=settings["n_bootstrap"], seed=seed)
        eff_signal, eff_background = roc_curve(labels, scores)
        # The last point of each tie group: np.interp needs increasing x.
        keep = np.r_[np.diff(eff_signal) > 0, True]
        roc_background = np.interp(ROC_GRID, eff_signal[keep], eff_background[keep])
        scan = boost_scan(model, inputs, labels, settings["betas"], settings["direction"],
                          settings["batch_size"])  # fmt: skip
        score = invariance_score(scan["accuracy"])
        return {
            "settings": settings,
            "n_jets": int(len(labels)),
            "n_background": int(np.sum(labels == 0)),
            "metrics": metrics,
            "roc": {"eff_signal": ROC_GRID.tolist(), "eff_background": roc_background.tolist()},
            "boost_scan": scan,
            "invariance_score": None if np.isnan(score) else float(score),
        }

    def published_gap(self, path, data_dir, fingerprint, max_jets):
        """The published teacher's metrics on these test jets (all stored constituents).

        Measures how far generated jets are from the reference dataset, on which
        the same weights reach the AUC in ``PUBLISHED_TEACHER``.
        """
        from paper_kd.data.pipeline import load_arrays
        from paper_kd.evaluate import predict_scores, tagging_metrics

        path = Path(path)
        hparams = load_profile("paper")["models"]["teacher"]["model"]["hparams"]
        weights_hash = hashlib.sha256(path.read_bytes()).hexdigest()[:20]
        n_bootstrap = int(self.profile["evaluation"].get("n_bootstrap", 100))
        config = {"published_weights": str(path), "sha256": weights_hash, "hparams": hparams,
                  "max_jets": max_jets, "n_bootstrap": n_bootstrap}  # fmt: skip
        key = tracking.config_key(config, fingerprint, ignore=("published_weights",))
        tags = {tracking.KEY_TAG: key, tracking.KIND_TAG: "published_gap",
                "profile": self.profile["name"], "data_fingerprint": fingerprint}  # fmt: skip
        with self.tracker.run("published-teacher", nested=True, tags=tags, params=config) as run:
            found = self.tracker.find_finished(key, require_model=False)
            result = None if found is None else self.tracker.load_json(found, "gap.json")
            if result is None:
                model = load_published_lorentznet(path, hparams)
                inputs, labels = load_arrays(
                    split_path(data_dir, "test"), n_max=None, max_jets=max_jets
                )
                scores = predict_scores(model, inputs)
                result = {
                    "weights": path.name,
                    "n_jets": int(len(labels)),
                    "metrics": tagging_metrics(labels, scores, n_bootstrap=n_bootstrap),
                    "reference": PUBLISHED_TEACHER,
                }
            self.tracker.log_json(run.info.run_id, result, "gap.json")
            self.tracker.log_metrics(
                run.info.run_id, {f"test_{k}": v["value"] for k, v in result["metrics"].items()}
            )
        return result

    # -- everything -------------------------------------------------------------

    def collect(self, published_jets=1000):
        """Run (or reuse) every model of the profile; return the aggregated results.

        With ``published_teacher`` weights, they are also evaluated on
        ``published_jets`` test jets, measuring the gap to the reference dataset.
        """
        import mlflow

        data_dir, infos, generated = self.prepare_data()
        fingerprint = data_fingerprint(data_dir)
        parent_id = mlflow.active_run().info.run_id
        mlflow.set_tags({"data_fingerprint": fingerprint, "data_dir": str(data_dir)})
        self.tracker.log_json(parent_id, {"fingerprint": fingerprint, "dir": str(data_dir),
                                          "splits": infos}, "data_fingerprint.json")  # fmt: skip

        records = []
        teacher = None
        for seed in self.profile["teacher_seeds"]:
            record = self.model_run("teacher", seed, data_dir, fingerprint)
            records.append(record)
            if teacher is None:
                teacher_path = self.work_dir / "teachers" / f"{record['key']}.keras"
                if not teacher_path.exists():
                    teacher_path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = teacher_path.with_name(f".{teacher_path.stem}.{os.getpid()}.keras")
                    record["model"].save(tmp)
                    os.replace(tmp, teacher_path)
                teacher = {"model": record["model"], "key": record["key"], "path": teacher_path}

        for row in self.profile["models"]:
            if row == "teacher":
                continue
            for seed in self.profile["seeds"]:
                use = self.profile["models"][row]["use_teacher"]
                records.append(self.model_run(row, seed, data_dir, fingerprint,
                                              teacher if use else None))  # fmt: skip

        gap = None
        if self.published_teacher is not None:
            gap = self.published_gap(self.published_teacher, data_dir, fingerprint, published_jets)

        settings = self.eval_settings()
        return {
            "published_teacher": gap,
            "profile": self.profile["name"],
            "script": self.script,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "git_commit": tracking.git_commit(),
            "seeds": self.profile["seeds"],
            "betas": settings["betas"],
            "direction": settings["direction"],
            "size_constituents": self.profile["evaluation"].get("size_constituents", 57),
            "teacher_source": (
                "loaded from published weights " + self.teacher_weights.name
                if self.teacher_weights
                else "trained here, seed(s) " + str(self.profile["teacher_seeds"])
            ),  # fmt: skip
            "data": {
                "dir": str(data_dir),
                "fingerprint": fingerprint,
                "generated": generated,
                "n_jets": {s: infos[s]["n_jets"] for s in SPLITS},
                "description": describe_data(infos, data_dir, generated),
            },  # fmt: skip
            "rows": summarize(records),
            "records": [{k: v for k, v in r.items() if k != "model"} for r in records],
        }


def load_published_lorentznet(path, hparams):
    """A LorentzNet from a published PyTorch state dict (``.pt``, or ``.npz`` as in the fixtures).

    Published weights are run with the reference readout and float32 arithmetic,
    which is what reproduces their logits.
    """
    from paper_kd.models.lorentznet import LorentzNet
    from paper_kd.models.weights import load_state_dict

    path = Path(path)
    prefix = ""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            prefix = "w/" if any(key.startswith("w/") for key in archive.files) else ""
    hparams = {"readout": "reference", "arithmetic": "reference", **hparams}
    return LorentzNet.from_torch_state_dict(load_state_dict(path, prefix), **hparams)


def _model_size(model, n_constituents):
    try:
        from paper_kd.models.size import model_size
    except ImportError:
        # Limitation: without the size report, MACs per jet are left blank (never guessed).
        log.warning("paper_kd.models.size is missing: MACs per jet left blank")
        return {"parameters": int(model.count_params()), "macs_per_jet": None}
    return model_size(model, n_constituents=n_constituents)


def _flat_metrics(evaluation):
    out = {f"test_{key}": value["value"] for key, value in evaluation["metrics"].items()}
    if evaluation.get("invariance_score") is not None:
        out["test_invariance_score"] = evaluation["invariance_score"]
    return out


def summarize(records):
    """One aggregated table row per model kind, in ``ROWS`` order."""
    rows = []
    for row, label in ROWS.items():
        mine = [r for r in records if r["row"] == row]
        if not mine:
            continue
        evaluations = [r["evaluation"] for r in mine]
        out = {"row": row, "label": label, "seeds": [r["seed"] for r in mine],
               "run_ids": [r["run_id"] for r in mine]}  # fmt: skip
        out.update(evaluations[0]["size"])
        for key in METRICS:
            out[key] = aggregate(
                [e["metrics"][key]["value"] for e in evaluations],
                [e["metrics"][key]["error"] for e in evaluations],
                [e["metrics"][key]["lower_bound"] for e in evaluations],
            )
        scores = [e["invariance_score"] for e in evaluations]
        scores = [np.nan if s is None else s for s in scores]
        out["invariance"] = aggregate(scores)
        accuracy = np.array([e["boost_scan"]["accuracy"] for e in evaluations])
        out["boost"] = {
            "beta": evaluations[0]["boost_scan"]["beta"],
            "accuracy_mean": accuracy.mean(axis=0).tolist(),
            "accuracy_std": (
                accuracy.std(axis=0, ddof=1) if len(accuracy) > 1 else np.zeros(accuracy.shape[1])
            ).tolist(),  # fmt: skip
        }
        out["roc"] = [e["roc"] for e in evaluations]
        rows.append(out)
    return rows


# ---------------------------------------------------------------------------
# Command line


def add_arguments(parser):
    parser.add_argument("--profile", default="cpu",
                        help=f"one of {PROFILES} or a YAML path (default: cpu)")  # fmt: skip
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="a converted dataset folder (train/val/test.h5) instead of "
                        "generated jets")  # fmt: skip
    parser.add_argument("--teacher-weights", type=Path, default=None,
                        help="published LorentzNet weights (.keras, .weights.h5, .npz, .pt) "
                        "instead of training the teacher")  # fmt: skip
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where tables and figures go (default: figures/ for the cpu "
                        "profile, figures/<profile>/ for any other)")  # fmt: skip
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / "data",
                        help="cache of generated datasets (default: data/)")  # fmt: skip
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "runs",
                        help="training checkpoints (default: runs/)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=None,
                        help="generator processes (default: the profile's)")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def experiment_from_args(script, args):
    return Experiment(
        script, args.profile, data_dir=args.data_dir, teacher_weights=args.teacher_weights,
        cache_dir=args.cache_dir, work_dir=args.work_dir, workers=args.workers,
        published_teacher=getattr(args, "published_teacher", None),
    )  # fmt: skip


def _terminate(signum, frame):
    # SIGTERM becomes an exception, so open MLflow runs end as FAILED.
    raise SystemExit(128 + signum)


def run_script(script, description, body, argv=None, extra_arguments=None):
    """Shared ``main`` of the reproduce scripts: parse, check, run ``body(exp, args)``.

    Bad input (unknown profile, missing data, unreachable tracking store) is
    one line on stderr and exit status 2, before any work.
    """
    import argparse

    parser = argparse.ArgumentParser(prog=f"{script}.py", description=description)
    add_arguments(parser)
    if extra_arguments is not None:
        extra_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("mlflow", "alembic", "urllib3", "matplotlib", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _terminate)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        exp = experiment_from_args(script, args)
    except (ValueError, FileNotFoundError, KeyError) as error:
        print(f"{script}.py: error: {error}", file=sys.stderr)
        return 2
    if args.output_dir is None:
        # The committed figures/ are the cpu profile's; a smoke run must not overwrite them.
        name = exp.profile["name"]
        args.output_dir = REPO_ROOT / "figures" / ("" if name == "cpu" else name)
    with exp.parent_run():
        return int(body(exp, args) or 0)
