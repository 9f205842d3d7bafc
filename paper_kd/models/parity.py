"""Parity of the Keras models with the published PyTorch models: ``paper-kd parity``.

A fixture (layout in ``shared/fixtures/README.md``) holds jets, the batch size
the reference ran them with, released weights and the reference logits. The
Keras model loads the weights with the reference arithmetic, runs the jets in
the same batches (LorentzNet: padded to the same node count, which its
reference readout divides by) and is compared logit by logit with

    deviation = |logit - reference| / (1 + |reference|)

per jet and class; a jet's deviation is its largest over the classes.
"""

import logging
from pathlib import Path

import numpy as np

__all__ = ["BOUNDS", "FIXTURE_MODELS", "compare_logits", "fixture_models", "run_parity"]

log = logging.getLogger(__name__)

# Largest allowed deviation statistics and smallest class agreement per model.
# LorentzNet's are looser because the published model reads float32 rounding noise.
BOUNDS = {
    "deepset": {"max": 1e-3},
    "deepsetkd": {"max": 1e-3},
    "lorentznet": {"median": 1e-4, "p99": 2e-3, "max": 1e-2, "agreement": 0.995},
}
# Where each model's weights and logits live in a fixture.
FIXTURE_MODELS = {
    "deepset": "deepset/",
    "deepsetkd": "deepsetkd/",
    "lorentznet": "",
}
# The published LorentzNet's hyperparameters (Gong et al. 2022, top tagging).
LORENTZNET_HPARAMS = {"n_scalar": 2, "n_hidden": 72, "n_layers": 6, "c_weight": 0.005}


def _require(archive, path, key):
    if key not in archive:
        raise KeyError(f"{path}: fixture has no field {key!r}")
    return archive[key]


def fixture_models(path):
    """Names of the models whose weights a fixture holds."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such fixture")
    with np.load(path, allow_pickle=False) as archive:
        keys = archive.files
    return [
        name
        for name, prefix in FIXTURE_MODELS.items()
        if any(key.startswith(f"{prefix}w/") for key in keys)
        and (name != "lorentznet" or "padded_nodes" in keys)
    ]


def compare_logits(logits, reference):
    """Deviation statistics of ``logits`` from ``reference`` (both ``[n_jets, n_classes]``)."""
    logits = np.asarray(logits, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if logits.shape != reference.shape:
        raise ValueError(f"logits shape {logits.shape} != reference shape {reference.shape}")
    deviation = np.max(np.abs(logits - reference) / (1.0 + np.abs(reference)), axis=-1)
    return {
        "n_jets": int(len(deviation)),
        "median": float(np.median(deviation)),
        "p99": float(np.percentile(deviation, 99)),
        "max": float(np.max(deviation)),
        "agreement": float(np.mean(logits.argmax(-1) == reference.argmax(-1))),
    }


def _load_model(name, state):
    if name == "lorentznet":
        from paper_kd.models.lorentznet import LorentzNet

        return LorentzNet.from_torch_state_dict(
            state, **LORENTZNET_HPARAMS, readout="reference", arithmetic="reference"
        )
    from paper_kd.models.students import DeepSet

    return DeepSet.from_torch_state_dict(state, arithmetic="reference")


def _batches(n_jets, batch_size):
    return [(start, min(start + batch_size, n_jets)) for start in range(0, n_jets, batch_size)]


def run_parity(path, model="deepset", max_jets=None):
    """Run one model of a fixture in its batch layout; return statistics and bound checks.

    ``max_jets`` keeps only the leading jets (a quicker, partial check); each batch
    keeps the reference's padding, so those jets see exactly the reference layout.
    Returns a dict with ``n_jets, median, p99, max, agreement``, the ``bounds`` and
    ``passed`` (every bound holds).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such fixture")
    if model not in FIXTURE_MODELS:
        raise ValueError(f"--model must be one of {sorted(FIXTURE_MODELS)}, got {model!r}")
    prefix = FIXTURE_MODELS[model]

    with np.load(path, allow_pickle=False) as archive:
        p4 = np.asarray(_require(archive, path, "p4"), dtype=np.float32)
        batch_size = int(_require(archive, path, "batch_size"))
        reference = _require(archive, path, f"{prefix}logits")
        state = {
            key[len(prefix) + 2 :]: archive[key]
            for key in archive.files
            if key.startswith(f"{prefix}w/")
        }
        padded_nodes = archive["padded_nodes"] if model == "lorentznet" else None
    if not state:
        raise KeyError(f"{path}: fixture has no weights under {prefix + 'w/'!r}")
    if p4.ndim != 3 or p4.shape[-1] != 4:
        raise ValueError(f"{path}: field 'p4' must be [n_jets, n_max, 4], got {p4.shape}")

    keras_model = _load_model(model, state)
    mask = np.any(p4 != 0, axis=-1)
    n_constituents = mask.sum(axis=1)
    batches = _batches(len(p4), batch_size)
    if padded_nodes is not None and len(padded_nodes) != len(batches):
        raise ValueError(
            f"{path}: field 'padded_nodes' has {len(padded_nodes)} entries, "
            f"expected {len(batches)} batches of {batch_size}"
        )

    if max_jets is not None:
        if max_jets < 1:
            raise ValueError(f"--max-jets must be >= 1, got {max_jets}")
        batches = [(start, min(stop, max_jets)) for start, stop in batches if start < max_jets]
        reference = reference[:max_jets]

    logits = []
    for index, (start, stop) in enumerate(batches):
        # The reference pads each batch to its largest jet (plus two beams for LorentzNet).
        width = int(n_constituents[start : start + batch_size].max())
        if padded_nodes is not None:
            if padded_nodes[index] - 2 < width:
                raise ValueError(
                    f"{path}: padded_nodes[{index}] = {padded_nodes[index]} is smaller than "
                    f"the batch's largest jet ({width}) plus two beams"
                )
            width = int(padded_nodes[index]) - 2
        batch = {"p4": p4[start:stop, :width], "mask": mask[start:stop, :width]}
        logits.append(np.asarray(keras_model(batch, training=False)))

    result = compare_logits(np.concatenate(logits), reference)
    bounds = BOUNDS[model]
    checks = {
        key: (result[key] >= bound if key == "agreement" else result[key] <= bound)
        for key, bound in bounds.items()
    }
    result.update(model=model, bounds=bounds, checks=checks, passed=all(checks.values()))
    return result


def format_result(result):
    """One line: deviation statistics, agreement, bound checks."""
    checks = ", ".join(
        f"{key} {'>=' if key == 'agreement' else '<='} {result['bounds'][key]:g}: "
        f"{'ok' if passed else 'BROKEN'}"
        for key, passed in result["checks"].items()
    )
    return (
        f"{result['model']}: {result['n_jets']} jets, |dlogit|/(1+|logit|) "
        f"median {result['median']:.2e}, p99 {result['p99']:.2e}, max {result['max']:.2e}; "
        f"class agreement {100 * result['agreement']:.2f}%; {checks}"
    )


def add_arguments(parser):
    parser.add_argument("fixture", help="fixture .npz (layout: shared/fixtures/README.md)")
    parser.add_argument(
        "--model",
        choices=sorted(FIXTURE_MODELS),
        help="model to check (default: every model the fixture holds)",
    )
    parser.add_argument(
        "--max-jets",
        type=int,
        default=None,
        help="check only the leading jets, in their reference batches (default: all)",
    )


def main(args):
    models = [args.model] if args.model else fixture_models(args.fixture)
    if not models:
        raise ValueError(f"{args.fixture}: fixture holds no known model weights")
    passed = True
    for model in models:
        result = run_parity(args.fixture, model, args.max_jets)
        print(format_result(result))
        passed &= result["passed"]
    if not passed:
        print(f"{args.fixture}: parity bound broken")
    return 0 if passed else 1
