"""Tagging metrics and the Lorentz-boost scan of arXiv:2311.14160 (Sec. 4, Fig. 3).

A tagger is judged on a test file by its accuracy (threshold 0.5 on P(top)),
ROC AUC and background rejection ``1/eps_B`` at signal efficiencies 0.5 and
0.3, each with a bootstrap uncertainty; then by the boost scan: every jet's
constituents are boosted by ``beta = 0, 0.05, ..., 0.95`` (along x as in the
paper, or along z, or along each jet's own axis) and accuracy and AUC are
recorded at each ``beta``. The invariance score
``(2 mean_beta acc - 1) / (2 max_beta acc - 1)`` sums the scan up: 1 for a
tagger whose accuracy does not move, lower the faster it falls.

The ROC curve and the AUC are computed here with numpy. Tied scores form one
step of the curve (a diagonal segment), so the AUC equals the Mann-Whitney
statistic ``P(s_sig > s_bkg) + 0.5 P(s_sig = s_bkg)``.
"""

import argparse
import json
import logging
import os
import time
import weakref
from pathlib import Path

import numpy as np

from paper_kd import physics
from paper_kd.atomic import write_text

__all__ = [
    "BETAS",
    "DIRECTIONS",
    "boost_scan",
    "evaluate_model",
    "invariance_score",
    "load_model",
    "predict_scores",
    "roc_curve",
    "tagging_metrics",
]

log = logging.getLogger(__name__)

BETAS = tuple(round(0.05 * i, 2) for i in range(20))  # 0, 0.05, ..., 0.95
DIRECTIONS = ("x", "y", "z", "jet")
WORKING_POINTS = {"rejection_50": 0.5, "rejection_30": 0.3}

# Batch size for models without [batch, node, node, hidden] edge tensors.
DEFAULT_BATCH_SIZE = 1024
# Memory allowed for one edge tensor of a graph model during evaluation. Several
# such tensors are alive at once inside a block, so the peak is a few times this.
EDGE_TENSOR_BUDGET_BYTES = 128 * 2**20
# LorentzNet puts two beam particles in front of every jet.
_BEAM_NODES = 2


# ---------------------------------------------------------------------------
# Scores


def edge_batch_size(n_nodes, hidden, budget_bytes=EDGE_TENSOR_BUDGET_BYTES):
    """Largest batch whose float32 ``[batch, node, node, hidden]`` tensor fits ``budget_bytes``."""
    per_jet = (n_nodes + _BEAM_NODES) ** 2 * hidden * 4
    return int(max(1, min(DEFAULT_BATCH_SIZE, budget_bytes // per_jet)))


def default_batch_size(model, n_nodes):
    """A memory-bounded evaluation batch size for ``model`` on jets of ``n_nodes`` constituents.

    A graph model (one whose config has a hidden width and which builds edge
    tensors, i.e. LorentzNet) gets a batch sized to its edge tensors; any other
    model gets ``DEFAULT_BATCH_SIZE``.
    """
    if "lorentz" not in type(model).__name__.lower():
        return DEFAULT_BATCH_SIZE
    config = model.get_config() if hasattr(model, "get_config") else {}
    hidden = next((config[k] for k in ("n_hidden", "hidden", "width") if k in config), 72)
    return edge_batch_size(n_nodes, int(hidden))


# One traced function per live model, dropped with the model.
_COMPILED = weakref.WeakKeyDictionary()


def _compiled_logits(model):
    """``model(inputs, training=False)`` as a traced graph (no ``predict`` overhead)."""
    import tensorflow as tf

    try:
        return _COMPILED[model]
    except (KeyError, TypeError):
        pass

    @tf.function(reduce_retracing=True)
    def logits_fn(p4, mask):
        return model({"p4": p4, "mask": mask}, training=False)

    try:
        _COMPILED[model] = logits_fn
    except TypeError:  # not weak-referenceable: trace again next time
        pass
    return logits_fn


def _probability_top(logits):
    """softmax(logits)[:, 1] in float64: float32 saturates at 1 and would tie the best jets."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] != 2:
        raise ValueError(f"model output must be logits [batch, 2], got shape {logits.shape}")
    # 1 / (1 + e^d) written without overflow for any logit difference d.
    return np.exp(-np.logaddexp(0.0, logits[:, 0] - logits[:, 1]))


def _check_inputs(inputs):
    if not isinstance(inputs, dict) or "p4" not in inputs or "mask" not in inputs:
        raise ValueError("inputs must be a dict with keys 'p4' [n, N, 4] and 'mask' [n, N]")
    p4, mask = np.asarray(inputs["p4"]), np.asarray(inputs["mask"], dtype=bool)
    if p4.ndim != 3 or p4.shape[-1] != 4 or mask.shape != p4.shape[:2]:
        raise ValueError(
            f"inputs: 'p4' must be [n, N, 4] and 'mask' [n, N], got {p4.shape} and {mask.shape}"
        )
    return p4, mask


def predict_scores(model, inputs, batch_size=None, transform=None):
    """P(top) = softmax(logits)[:, 1] for every jet, float64 ``[n]``.

    Jets are run through a traced ``model(..., training=False)`` in batches of
    ``batch_size`` (default: ``default_batch_size``, which bounds a graph model's
    ``[batch, node, node, hidden]`` tensors). Each batch is cut to its largest
    jet, as the training pipeline and the published reference do; the last batch
    is filled up with copies of its first jet so that every call has the same
    batch size. Jets are batched in order of multiplicity, which wastes little on
    padding; a model whose output depends on the padding (LorentzNet with the
    published ``readout="reference"``) gets them in file order, as published.

    ``transform(p4) -> p4`` is applied to each batch before the model sees it
    (the boost scan uses it so that no boosted copy of the whole set is made).
    """
    p4, mask = _check_inputs(inputs)
    n_jets = len(p4)
    if n_jets == 0:
        return np.zeros(0)
    if batch_size is None:
        batch_size = default_batch_size(model, p4.shape[1])
    batch_size = int(min(batch_size, n_jets))
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")

    logits_fn = _compiled_logits(model)
    n_real = mask.sum(axis=1)
    if _padding_independent(model):
        order = np.argsort(n_real, kind="stable")
    else:
        order = np.arange(n_jets)
    scores = np.empty(n_jets)
    for start in range(0, n_jets, batch_size):
        stop = min(start + batch_size, n_jets)
        index = order[start:stop]
        n_nodes = max(int(n_real[index].max()), 1)
        batch_p4 = p4[index, :n_nodes].astype(np.float32, copy=False)
        batch_mask = mask[index, :n_nodes]
        if transform is not None:
            batch_p4 = np.asarray(transform(batch_p4), dtype=np.float32)
        if stop - start < batch_size:
            fill = batch_size - (stop - start)
            batch_p4 = np.concatenate([batch_p4, np.repeat(batch_p4[:1], fill, axis=0)])
            batch_mask = np.concatenate([batch_mask, np.repeat(batch_mask[:1], fill, axis=0)])
        logits = logits_fn(batch_p4, batch_mask).numpy()
        scores[index] = _probability_top(logits)[: stop - start]
    return scores


def _padding_independent(model):
    """Whether each jet's output ignores how much padding its batch has."""
    config = model.get_config() if hasattr(model, "get_config") else {}
    return config.get("readout", "mean") != "reference"


# ---------------------------------------------------------------------------
# Metrics


def _check_labels_scores(labels, scores):
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in length")
    if not np.all(np.isin(labels, (0, 1))):
        raise ValueError("labels must be 0 (QCD) or 1 (top)")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores hold NaN or infinite values")
    return labels.astype(bool), scores


class _SortedScores:
    """Scores sorted once, decreasing, with the ends of groups of tied scores.

    Any weighting of the jets (a bootstrap resample is one) then gives its ROC
    curve by cumulative sums, without sorting again.
    """

    def __init__(self, labels, scores):
        order = np.argsort(-scores, kind="stable")
        self.signal = labels[order]
        sorted_scores = scores[order]
        # Index of the last jet of each group of equal scores.
        self.group_ends = np.flatnonzero(np.append(np.diff(sorted_scores) != 0, True))
        self.order = order

    def curve(self, weights=None):
        """Cumulative (signal, background) weights above each threshold, from (0, 0)."""
        if weights is None:
            signal_w = self.signal.astype(np.float64)
            background_w = 1.0 - signal_w
        else:
            weights = weights[self.order]
            signal_w = np.where(self.signal, weights, 0.0)
            background_w = weights - signal_w
        signal_sum = np.concatenate([[0.0], np.cumsum(signal_w)[self.group_ends]])
        background_sum = np.concatenate([[0.0], np.cumsum(background_w)[self.group_ends]])
        return signal_sum, background_sum


def roc_curve(labels, scores):
    """ROC curve ``(eff_signal, eff_background)``, from (0, 0) to (1, 1).

    One point per distinct score, thresholds decreasing: a jet passes when its
    score is at least the threshold, so tied jets enter together.
    """
    labels, scores = _check_labels_scores(labels, scores)
    n_signal, n_background = labels.sum(), (~labels).sum()
    if n_signal == 0 or n_background == 0:
        raise ValueError("a ROC curve needs both top (1) and QCD (0) jets")
    signal_sum, background_sum = _SortedScores(labels, scores).curve()
    return signal_sum / n_signal, background_sum / n_background


def _auc(signal_sum, background_sum):
    """Area under the curve of cumulative counts, normalized at the end (exact for counts).

    Trapezoids: a tied group is a straight segment, which counts its pairs as half.
    """
    area = np.sum(np.diff(background_sum) * (signal_sum[1:] + signal_sum[:-1]))
    return float(area / (2 * signal_sum[-1] * background_sum[-1]))


def _background_efficiency_at(eff_signal, eff_background, target):
    """eps_B at eps_S = ``target``, linear between ROC points; the best point on a vertical step."""
    index = int(np.searchsorted(eff_signal, target, side="left"))
    if eff_signal[index] == target or index == 0:
        return float(eff_background[index])
    s0, s1 = eff_signal[index - 1], eff_signal[index]
    b0, b1 = eff_background[index - 1], eff_background[index]
    return float(b0 + (b1 - b0) * (target - s0) / (s1 - s0))


def _rejection(eff_background, n_background):
    """``(1/eps_B, lower_bound)``; fewer than one passing QCD jet gives the bound ``n_background``.

    Interpolation can put eps_B below ``1 / n_background``; no finite sample
    measures a rejection above its number of background jets.
    """
    if eff_background * n_background < 1.0:
        return float(n_background), True
    return 1.0 / eff_background, False


def _point_metrics(labels, scores, sorted_scores, weights=None):
    """Accuracy, AUC and rejections for one weighting of the jets (None = each once)."""
    signal_sum, background_sum = sorted_scores.curve(weights)
    n_signal, n_background = signal_sum[-1], background_sum[-1]
    if n_signal == 0 or n_background == 0:
        return None
    eff_signal, eff_background = signal_sum / n_signal, background_sum / n_background

    correct = (scores > 0.5) == labels
    if weights is None:
        accuracy = float(correct.mean())
    else:
        accuracy = float(np.sum(weights * correct) / np.sum(weights))
    out = {"accuracy": (accuracy, False), "auc": (_auc(signal_sum, background_sum), False)}
    for key, target in WORKING_POINTS.items():
        eff = _background_efficiency_at(eff_signal, eff_background, target)
        out[key] = _rejection(eff, n_background)
    return out


def tagging_metrics(labels, scores, n_bootstrap=100, seed=0):
    """Accuracy, ROC AUC and background rejection at eps_S = 0.5 and 0.3, with bootstrap errors.

    Args:
        labels: ``[n]`` 1 = top, 0 = QCD.
        scores: ``[n]`` P(top); a jet is called top when its score exceeds 0.5.
        n_bootstrap: resamples of the jets (with replacement) for the errors;
            0 gives ``"error": None``.
        seed: seed of the resampling.

    Returns:
        ``{"accuracy", "auc", "rejection_50", "rejection_30"}``, each
        ``{"value", "error", "lower_bound"}``. ``error`` is the standard
        deviation over the resamples. ``lower_bound`` is True when fewer than
        one background jet passes at the working point: ``value`` is then the
        number of background jets, a lower bound on the rejection, never infinity.
    """
    labels, scores = _check_labels_scores(labels, scores)
    if labels.all() or not labels.any():
        raise ValueError("tagging metrics need both top (1) and QCD (0) jets")
    sorted_scores = _SortedScores(labels, scores)
    central = _point_metrics(labels, scores, sorted_scores)

    samples = {key: [] for key in central}
    rng = np.random.default_rng(seed)
    for _ in range(int(n_bootstrap)):
        weights = np.bincount(rng.integers(0, len(scores), len(scores)), minlength=len(scores))
        resampled = _point_metrics(labels, scores, sorted_scores, weights.astype(np.float64))
        if resampled is None:  # a resample without one of the classes: tiny sets only
            continue
        for key, (value, _) in resampled.items():
            samples[key].append(value)

    out = {}
    for key, (value, lower_bound) in central.items():
        values = samples[key]
        error = float(np.std(values, ddof=1)) if len(values) > 1 else None
        out[key] = {"value": float(value), "error": error, "lower_bound": bool(lower_bound)}
    return out


# ---------------------------------------------------------------------------
# Boost scan


def _check_betas(betas):
    betas = [float(beta) for beta in np.atleast_1d(np.asarray(betas, dtype=np.float64))]
    if not betas:
        raise ValueError("betas: need at least one boost velocity")
    bad = [beta for beta in betas if not (0.0 <= beta < 1.0)]
    if bad:
        raise ValueError(f"betas must satisfy 0 <= beta < 1, got {bad}")
    return betas


def _check_direction(direction):
    if direction not in DIRECTIONS:
        raise ValueError(f"boost direction must be one of {DIRECTIONS}, got {direction!r}")
    return direction


def _boost_batch(beta, direction):
    """A ``transform`` for ``predict_scores``: boost every constituent of a batch."""
    if beta == 0.0:
        return None

    def transform(p4):
        if direction == "jet":
            # Each jet along its own momentum: [batch, 1, 3]; padding adds nothing to the sum.
            axis = physics.jet_p4(p4.astype(np.float64))[:, None, 1:]
            return physics.boost(p4, beta, axis)
        return physics.boost(p4, beta, direction)

    return transform


def boost_scan(model, inputs, labels, betas=BETAS, direction="x", batch_size=None):
    """Accuracy and AUC of ``model`` with every jet boosted by each ``beta``.

    Constituents are boosted along ``direction``: ``"x"`` (the paper's choice),
    ``"y"``, ``"z"`` (the beam) or ``"jet"`` (each jet's own momentum). The
    beams a model adds (LorentzNet) are the model's own and stay unboosted.
    Constituents keep their order and their mask (no re-sorting, no
    re-selection, as in the paper's code); padding stays zero.

    Returns:
        ``{"beta": [...], "accuracy": [...], "auc": [...]}``.
    """
    betas = _check_betas(betas)
    direction = _check_direction(direction)
    _check_inputs(inputs)
    labels = np.asarray(labels)

    scan = {"beta": [], "accuracy": [], "auc": []}
    for beta in betas:
        scores = predict_scores(model, inputs, batch_size, transform=_boost_batch(beta, direction))
        metrics = tagging_metrics(labels, scores, n_bootstrap=0)
        scan["beta"].append(beta)
        scan["accuracy"].append(metrics["accuracy"]["value"])
        scan["auc"].append(metrics["auc"]["value"])
        log.info(
            "beta %.2f along %s: accuracy %.4f, AUC %.4f",
            beta, direction, scan["accuracy"][-1], scan["auc"][-1],
        )  # fmt: skip
    return scan


def invariance_score(accuracies):
    """``(2 mean(acc) - 1) / (2 max(acc) - 1)`` over the boost scan; NaN if max(acc) <= 0.5.

    1 for a tagger whose accuracy does not move under boosts; it falls as the
    accuracy falls toward chance (0.5).
    """
    accuracies = np.asarray(accuracies, dtype=np.float64)
    if accuracies.size == 0:
        raise ValueError("invariance score needs at least one accuracy")
    best = accuracies.max()
    if best <= 0.5:
        return float("nan")
    return float((2 * accuracies.mean() - 1) / (2 * best - 1))


# ---------------------------------------------------------------------------
# A model on a file


def load_model(path):
    """Load a ``.keras`` model saved by this package (its classes are registered on import)."""
    import keras

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model file")
    if path.suffix != ".keras":
        raise ValueError(f"{path}: model file must be a Keras v3 '.keras' archive")
    for module in ("paper_kd.models.lorentznet", "paper_kd.models.students", "paper_kd.distill"):
        try:  # registers the package's serializable classes
            __import__(module)
        except ImportError as error:
            log.debug("could not import %s: %s", module, error)
    try:
        return keras.saving.load_model(path, compile=False)
    except (OSError, ValueError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise ValueError(f"{path}: cannot load the model ({first_line})") from None


def _read_test_arrays(path, n_max=None, max_jets=None):
    """``({"p4", "mask"}, labels)`` in memory, through the data pipeline when it exists."""
    try:
        from paper_kd.data.pipeline import load_arrays
    except ImportError:
        load_arrays = None
    if load_arrays is not None:
        return load_arrays(path, n_max=n_max, max_jets=max_jets)

    from paper_kd.data.format import read_jets

    jets = read_jets(path, 0, max_jets, fields=("p4", "n_constituents", "label"), n_max=n_max)
    positions = np.arange(jets["p4"].shape[1])
    mask = positions[None, :] < jets["n_constituents"][:, None]
    return {"p4": jets["p4"], "mask": mask}, jets["label"].astype(np.int32)


def _resolve_data_path(path):
    from paper_kd.data.format import split_path

    path = Path(path)
    if path.is_dir():
        return split_path(path, "test")
    return path


def evaluate_model(
    model,
    path,
    *,
    batch_size=None,
    n_bootstrap=100,
    betas=BETAS,
    direction="x",
    max_jets=None,
    seed=0,
    n_max=None,
):
    """Metrics, boost scan and invariance score of ``model`` on the jets in ``path``.

    Args:
        model: a ``keras.Model`` or the path of a ``.keras`` file.
        path: a canonical jet file, or a dataset folder (its ``test.h5`` is used).
        batch_size: evaluation batch size (default: sized to the model, see
            ``default_batch_size``).
        n_bootstrap, seed: bootstrap resamples for the metric errors.
        betas, direction: the boost scan (empty ``betas`` skips it).
        max_jets: evaluate only the first ``max_jets`` jets.
        n_max: keep only the ``n_max`` hardest constituents of each jet.

    Returns:
        A JSON-able dict: ``model``, ``data`` (file, provenance, jets used),
        ``settings``, ``metrics`` (see ``tagging_metrics``), ``boost_scan``,
        ``invariance_score`` (None when undefined) and ``seconds``.
    """
    from paper_kd import __version__
    from paper_kd.data.format import read_info

    started = time.perf_counter()
    betas = _check_betas(betas) if len(betas) else []
    direction = _check_direction(direction)
    model_path = None
    if isinstance(model, (str, os.PathLike)):
        model_path = str(model)
        model = load_model(model)

    path = _resolve_data_path(path)
    info = read_info(path)
    inputs, labels = _read_test_arrays(path, n_max=n_max, max_jets=max_jets)
    log.info("evaluating %s on %d jets of %s", type(model).__name__, len(labels), path)

    if batch_size is None:
        batch_size = default_batch_size(model, inputs["p4"].shape[1])
    scores = predict_scores(model, inputs, batch_size)
    metrics = tagging_metrics(labels, scores, n_bootstrap=n_bootstrap, seed=seed)
    result = {
        "paper_kd_version": __version__,
        "model": {"class": type(model).__name__, "name": model.name, "path": model_path},
        "data": {
            "path": str(path),
            "n_jets_file": info["n_jets"],
            "n_jets": int(len(labels)),
            "n_top": int(np.sum(labels == 1)),
            "n_max": int(inputs["p4"].shape[1]),
            "provenance": info["provenance"],
        },
        "settings": {
            "batch_size": batch_size,
            "n_bootstrap": int(n_bootstrap),
            "seed": int(seed),
            "max_jets": max_jets,
            "n_max": n_max,
        },
        "metrics": metrics,
    }
    if betas:
        scan = boost_scan(model, inputs, labels, betas, direction, batch_size)
        score = invariance_score(scan["accuracy"])
        result["boost_scan"] = {"direction": direction, **scan}
        result["invariance_score"] = None if np.isnan(score) else score
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def write_json(result, path):
    """Write ``result`` as JSON to a temporary file, then rename it into place."""
    return write_text(path, json.dumps(result, indent=2, allow_nan=False) + "\n")


# ---------------------------------------------------------------------------
# Command line


def _beta_list(text):
    try:
        return [float(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"betas must be numbers, got {text!r}") from None


def add_arguments(parser):
    parser.add_argument("model", help="trained model, a .keras file")
    parser.add_argument("data", help="canonical jet file, or a dataset folder (uses test.h5)")
    parser.add_argument("-o", "--output", required=True, help="JSON file to write")
    parser.add_argument(
        "--betas", type=_beta_list, default=list(BETAS),
        help="boost velocities, comma-separated (default 0,0.05,...,0.95; '' skips the scan)",
    )  # fmt: skip
    parser.add_argument("--direction", choices=DIRECTIONS, default="x", help="boost axis")
    parser.add_argument("--batch-size", type=int, default=None, help="default: sized to model")
    parser.add_argument("--n-bootstrap", type=int, default=100)
    parser.add_argument("--max-jets", type=int, default=None)
    parser.add_argument("--n-max", type=int, default=None, help="hardest constituents kept")
    parser.add_argument("--seed", type=int, default=0)


def main(args):
    result = evaluate_model(
        args.model,
        args.data,
        batch_size=args.batch_size,
        n_bootstrap=args.n_bootstrap,
        betas=args.betas,
        direction=args.direction,
        max_jets=args.max_jets,
        seed=args.seed,
        n_max=args.n_max,
    )
    write_json(result, args.output)
    for key, metric in result["metrics"].items():
        bound = " (lower bound)" if metric["lower_bound"] else ""
        error = "" if metric["error"] is None else f" +- {metric['error']:.4g}"
        print(f"{key:>13}: {metric['value']:.4f}{error}{bound}")
    if "invariance_score" in result:
        print(
            f"invariance score ({result['boost_scan']['direction']}): {result['invariance_score']}"
        )
    print(f"wrote {args.output}")
    return 0
