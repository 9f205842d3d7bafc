"""How fast the package runs on this machine, against the machine's own limits.

``paper-kd bench`` measures, in one run, and writes ``bench.json`` and
``bench.md``:

- ``matmul``: the float32 matrix-multiply peak (GFLOP/s) through TensorFlow,
  the yardstick every other figure is compared with;
- ``lorentznet``: teacher training and inference jets/s at the paper's size
  (width 72, 6 blocks) and at the ``cpu`` profile's size, on jets of realistic
  multiplicity (about 57 constituents), with FLOPs per jet and the fraction of
  the peak reached, on random and on bucketed batches; at the paper's size a
  profile of the training step by operation, with and without XLA (the share of
  time in matrix products, and their GFLOP/s at the batches' padded widths);
- ``students``: each student's training jets/s and inference latency per jet at
  batch 1 (a pre-traced concrete function on tensors, not ``predict``) and jets/s
  at batch 1024, without and with XLA;
- ``distill``: a distillation step against a plain student step, with the
  teacher live and with cached teacher logits;
- ``generation``: Pythia + FastJet jets/s per process against Pythia's raw event
  rate, with one and two processes;
- ``pipeline``: a training step fed from a file against the same step fed from
  memory.

Each section that cannot run (a module not written yet, a missing dependency)
reports ``{"unavailable": reason}`` and the others still run.

FLOP counts: a multiply-add is 2 FLOPs; per-jet counts are taken from
``paper_kd.models.size.model_size`` at 57 constituents (the useful work of a jet
of mean multiplicity, so padding counts as waste; the exact factorized
formulation each model runs, not the textbook layer sizes), and one training step is
counted as 3 times the forward pass (forward, and two matrix products per layer
backward).

Training steps are taken as ``paper-kd train`` takes them (a ``Distiller``
with the distillation off, compiled without XLA), and again with XLA
(``jit_compile=True``) for the teacher, which recompiles for every new batch
width, so only the steady state is timed.

Timings are wall-clock means over cycled batches (training) or medians over
repeated calls (inference), after warm-up (tracing and compilation excluded).
They are only as good as the machine is quiet.
"""

import argparse
import json
import logging
import math
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from paper_kd.atomic import write_text

__all__ = [
    "SECTIONS",
    "BenchSettings",
    "main",
    "run_bench",
    "synthetic_jets",
    "write_report",
]

log = logging.getLogger(__name__)

SECTIONS = ("matmul", "lorentznet", "students", "distill", "generation", "pipeline")
STUDENTS = ("deepset", "pfn", "efn", "mlp")
PAPER_TEACHER = {"n_hidden": 72, "n_layers": 6}
# Used when configs/profiles/cpu.yaml is not there to read the teacher's size from.
CPU_TEACHER_FALLBACK = {"n_hidden": 32, "n_layers": 4}
MEAN_CONSTITUENTS = 57
# Targets of this project on a 2-core machine (see the performance notes in the README).
TARGETS = {
    "lorentznet_paper_train_jets_per_s": 60.0,
    "lorentznet_paper_train_fraction_of_peak": 0.35,
    "deepset_latency_batch1_ms": 1.0,
    "deepset_jets_per_s_batch1024": 15000.0,
    "distill_cached_over_plain": 1.3,
    "generation_fraction_of_raw": 0.8,
}


@dataclass(frozen=True)
class BenchSettings:
    """Sizes and repetitions of one benchmark run.

    ``full()`` is the reported configuration, ``quick()`` a few-minute check,
    ``tiny()`` only proves that every section runs (tests).
    """

    profile: str = "full"
    matmul_sizes: tuple = (1024, 2048)
    matmul_repeats: int = 10
    n_constituents: int = MEAN_CONSTITUENTS
    n_max: int = 200
    teacher_batch: int = 32
    teacher_sizes: tuple = (("paper", PAPER_TEACHER), ("cpu", None))
    teacher_batches: int = 4
    steps: int = 5
    student_batch: int = 64
    student_batches: int = 4
    inference_batch: int = 1024
    latency_calls: int = 200
    student_overrides: tuple = ()
    distill_teacher: tuple = tuple(PAPER_TEACHER.items())
    generation_events: int = 1280
    generation_rounds: int = 5
    generation_processes: tuple = ("top", "qcd")
    pipeline_jets: int = 8192
    jit: tuple = (False, True)
    op_profile: bool = True

    @classmethod
    def full(cls):
        return cls()

    @classmethod
    def quick(cls):
        return cls(
            profile="quick",
            matmul_sizes=(1024,),
            matmul_repeats=5,
            teacher_batches=2,
            steps=2,
            latency_calls=50,
            # The cpu profile's teacher: a paper-size teacher makes this section many minutes.
            distill_teacher=(("n_hidden", 24), ("n_layers", 3)),
            generation_events=96,
            generation_rounds=1,
            generation_processes=("qcd",),
            pipeline_jets=2048,
            jit=(False,),
        )

    @classmethod
    def tiny(cls):
        small = {"n_hidden": 8, "n_layers": 2}
        return cls(
            profile="tiny",
            matmul_sizes=(64,),
            matmul_repeats=2,
            n_constituents=12,
            n_max=24,
            teacher_batch=4,
            teacher_sizes=(("paper", small),),
            teacher_batches=1,
            steps=1,
            student_batch=8,
            student_batches=1,
            inference_batch=16,
            latency_calls=3,
            student_overrides=(
                ("deepset", (("width", 8), ("latent", 8), ("depth", 2))),
                ("pfn", (("phi_sizes", (8, 8)), ("f_sizes", (8,)))),
                ("efn", (("phi_sizes", (8, 8)), ("f_sizes", (8,)))),
                ("mlp", (("n_constituents", 16), ("width", 8), ("depth", 2))),
            ),
            distill_teacher=tuple(small.items()),
            generation_events=32,
            generation_rounds=1,
            generation_processes=("qcd",),
            pipeline_jets=64,
            jit=(False,),
        )


# ---------------------------------------------------------------------------
# Jets


def synthetic_jets(rng, n_jets, mean_constituents=MEAN_CONSTITUENTS, n_max=200):
    """Massless jets of realistic multiplicity, as a stand-in for generated jets.

    Multiplicity is normal around ``mean_constituents`` (width a quarter of it,
    at least 2, at most ``n_max``); pT fractions fall exponentially; constituents
    spread by about 0.2 in eta and phi around an axis with |eta| < 2; the jet pT
    is about 600 GeV. Constituents are pT-sorted and zero-padded. Speed depends
    only on the multiplicities, which is what these jets reproduce.

    Returns:
        ``({"p4": float32 [n, n_max, 4], "mask": bool [n, n_max]}, label int32 [n])``.
    """
    multiplicity = np.clip(
        np.rint(rng.normal(mean_constituents, mean_constituents / 4, n_jets)), 2, n_max
    ).astype(int)
    mask = np.arange(n_max)[None, :] < multiplicity[:, None]  # [jet, node]

    fractions = np.where(mask, rng.exponential(1.0, (n_jets, n_max)), 0.0)
    fractions = -np.sort(-fractions, axis=1)
    pt = 600.0 * fractions / fractions.sum(axis=1, keepdims=True)
    eta = rng.uniform(-2, 2, (n_jets, 1)) + rng.normal(0, 0.2, (n_jets, n_max))
    phi = rng.uniform(-np.pi, np.pi, (n_jets, 1)) + rng.normal(0, 0.2, (n_jets, n_max))
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    p4 = np.stack([np.sqrt(px**2 + py**2 + pz**2), px, py, pz], axis=-1)
    p4[~mask] = 0.0
    label = rng.integers(0, 2, n_jets).astype(np.int32)
    return {"p4": p4.astype(np.float32), "mask": mask}, label


def _cut(inputs, labels, index):
    """The jets ``index`` as one batch, cut to its largest jet (as the pipeline does)."""
    n_nodes = max(int(inputs["mask"][index].sum(axis=1).max()), 1)
    batch = {"p4": inputs["p4"][index, :n_nodes], "mask": inputs["mask"][index, :n_nodes]}
    return batch, labels[index]


def _batches(inputs, labels, batch_size, n_batches, rng):
    """``n_batches`` random batches, each cut to its largest jet."""
    out = []
    for _ in range(n_batches):
        index = rng.choice(len(labels), size=batch_size, replace=len(labels) < batch_size)
        out.append(_cut(inputs, labels, index))
    return out


def _bucketed_batches(inputs, labels, batch_size, n_batches, rng):
    """``n_batches`` batches as ``paper-kd train`` makes them with ``bucket: true``.

    ``plan_batches`` sorts each class by multiplicity within windows and keeps
    every batch's class balance, so the padding saved is what training can
    really save, not the lower bound of a plain sort. The batches are drawn
    evenly across the plan, so they cover the multiplicity range.
    """
    from paper_kd.data.pipeline import plan_batches

    plan, _ = plan_batches(inputs["mask"].sum(axis=1), labels, batch_size, rng=rng, bucket=True)
    picks = np.linspace(0, len(plan) - 1, min(n_batches, len(plan))).round().astype(int)
    return [_cut(inputs, labels, plan[k]) for k in picks]


def _edge_efficiency(batches, extra_nodes=2):
    """Real edges over computed edges: what padding to each batch's largest jet wastes.

    LorentzNet's graph is complete over a jet's constituents plus ``extra_nodes``
    beam particles; a batch computes ``[B, W, W]`` edges for width ``W``.
    """
    real = computed = 0
    for batch, _ in batches:
        nodes = batch["mask"].sum(axis=1) + extra_nodes
        width = batch["mask"].shape[1] + extra_nodes
        real += float(np.sum(nodes * (nodes - 1)))
        computed += len(nodes) * width * (width - 1)
    return real / computed if computed else None


# ---------------------------------------------------------------------------
# Timing


def _median_seconds(step, calls, warmup=1):
    """Median wall-clock seconds of ``step()`` over ``calls`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(max(int(calls), 1)):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cycle_seconds(step, batches, passes):
    """Mean seconds per batch over ``passes`` passes through ``batches`` after one warm-up pass.

    Several batches of different widths are cycled so the figure averages over
    realistic padding, and the warm-up pass traces (or compiles) every width.
    """
    for batch in batches:
        step(*batch)
    start = time.perf_counter()
    for _ in range(max(int(passes), 1)):
        for batch in batches:
            step(*batch)
    return (time.perf_counter() - start) / (max(int(passes), 1) * len(batches))


def _sync(value):
    """Force a result to be computed (TensorFlow may run asynchronously)."""
    import keras

    return keras.ops.convert_to_numpy(value)


# ---------------------------------------------------------------------------
# Sections


def bench_matmul(settings):
    """Float32 square matrix products through a traced TensorFlow call; best size wins."""
    import tensorflow as tf

    results = {}
    for size in settings.matmul_sizes:
        a = tf.random.normal((size, size), dtype=tf.float32)
        b = tf.random.normal((size, size), dtype=tf.float32)

        @tf.function
        def product(a=a, b=b):
            return tf.reduce_sum(tf.matmul(a, b))

        seconds = _median_seconds(lambda product=product: _sync(product()), settings.matmul_repeats)
        results[str(size)] = 2 * size**3 / seconds / 1e9
    return {
        "gflops_by_size": results,
        "peak_gflops": max(results.values()),
        "threads": {
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        },
    }


def _model_size(model, n_constituents=MEAN_CONSTITUENTS):
    """``{"parameters", "flops_per_jet"}`` (forward, 2 per multiply-add) from ``model_size``.

    Without ``paper_kd.models.size`` the FLOPs are None and the reason is recorded.
    """
    parameters = int(sum(np.prod(weight.shape) for weight in model.weights))
    try:
        from paper_kd.models.size import model_size
    except ImportError as error:
        return {"parameters": parameters, "flops_per_jet": None, "flops_note": str(error)}
    size = model_size(model, n_constituents=n_constituents)
    return {"parameters": int(size["parameters"]), "flops_per_jet": 2 * int(size["macs_per_jet"])}


def _cpu_teacher_size():
    """The teacher's hyperparameters in configs/profiles/cpu.yaml, or a fallback with a note."""
    path = Path(__file__).resolve().parents[1] / "configs" / "profiles" / "cpu.yaml"
    try:
        import yaml

        profile = yaml.safe_load(path.read_text())
        hparams = profile["models"]["teacher"]["model"]["hparams"]
        size = {key: int(hparams[key]) for key in ("n_hidden", "n_layers")}
        return size, f"from {path.name}"
    except (OSError, KeyError, TypeError, ValueError) as error:
        return dict(CPU_TEACHER_FALLBACK), f"assumed ({path.name} not readable: {error})"


def _train_step(model, learning_rate, jit):
    """One optimizer step as ``paper-kd train`` takes it: a ``Distiller`` with T = 0.

    Returns ``step(inputs, labels)``.
    """
    import keras

    from paper_kd.distill import Distiller

    trainer = Distiller(None, model, temperature=0.0, weight=0.0)
    trainer.compile(
        optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=0.01, epsilon=1e-8),
        jit_compile=jit,
    )
    return trainer.train_on_batch


def _traced_call(model, jit):
    import tensorflow as tf

    @tf.function(jit_compile=jit, reduce_retracing=True)
    def call(p4, mask):
        return model({"p4": p4, "mask": mask}, training=False)

    return lambda inputs, labels=None: _sync(call(inputs["p4"], inputs["mask"]))


def _concrete_call(model, jit, example):
    """A pre-traced call on ``example``'s tensors: what a deployed model's latency is.

    The concrete function skips ``tf.function``'s per-call dispatch (argument
    matching, about 0.3 ms on this kind of machine) and the inputs are already
    TensorFlow tensors; numpy conversion and dispatch are measured separately by
    the batch-1024 figure, where they are negligible.
    """
    import tensorflow as tf

    @tf.function(jit_compile=jit)
    def call(p4, mask):
        return model({"p4": p4, "mask": mask}, training=False)

    p4, mask = tf.constant(example["p4"]), tf.constant(example["mask"])
    concrete = call.get_concrete_function(p4, mask)
    return lambda: _sync(concrete(p4, mask))


def _peak_fraction(jets_per_s, flops_per_jet, peak_gflops, factor=1):
    if not flops_per_jet or not peak_gflops:
        return None
    return jets_per_s * flops_per_jet * factor / (peak_gflops * 1e9)


def bench_lorentznet(settings, jets, peak_gflops=None):
    """Teacher training and inference jets/s at the paper's and the cpu profile's size.

    Random batches (each padded to its largest jet) throughout; at the paper's
    size also batches bucketed by multiplicity as training makes them, and a
    profile of the training step by operation type.
    """
    from paper_kd.models import build_model

    inputs, labels = jets
    rng = np.random.default_rng(1)
    batches = _batches(inputs, labels, settings.teacher_batch, settings.teacher_batches, rng)
    bucketed = _bucketed_batches(
        inputs, labels, settings.teacher_batch, settings.teacher_batches, rng
    )
    width = float(np.mean([batch["p4"].shape[1] for batch, _ in batches]))
    out = {
        "batch_size": settings.teacher_batch,
        "mean_padded_constituents": width,
        "mean_padded_constituents_bucketed": float(
            np.mean([batch["p4"].shape[1] for batch, _ in bucketed])
        ),
        "edge_efficiency": _edge_efficiency(batches),
        "edge_efficiency_bucketed": _edge_efficiency(bucketed),
    }

    for label, size in settings.teacher_sizes:
        note = "paper"
        if size is None:
            size, note = _cpu_teacher_size()
        result = {"hparams": dict(size), "source": note}
        for jit in settings.jit:
            model = build_model("lorentznet", **size)
            model(batches[0][0])
            result.update(_model_size(model))
            flops = result["flops_per_jet"]

            step = _train_step(model, 1e-3, jit)
            train = _cycle_seconds(step, batches, settings.steps)
            infer = _cycle_seconds(_traced_call(model, jit), batches, settings.steps)
            key = "xla" if jit else "graph"
            train_rate = settings.teacher_batch / train
            infer_rate = settings.teacher_batch / infer
            result[key] = {
                "train_jets_per_s": train_rate,
                "inference_jets_per_s": infer_rate,
                "train_fraction_of_peak": _peak_fraction(train_rate, flops, peak_gflops, 3),
                "inference_fraction_of_peak": _peak_fraction(infer_rate, flops, peak_gflops),
            }
            if label == "paper":
                bucket_rate = settings.teacher_batch / _cycle_seconds(
                    step, bucketed, settings.steps
                )
                result[key]["train_jets_per_s_bucketed"] = bucket_rate
                result[key]["train_fraction_of_peak_bucketed"] = _peak_fraction(
                    bucket_rate, flops, peak_gflops, 3
                )
                if settings.op_profile:
                    flops_per_step = _padded_train_flops(model, batches)
                    result[key]["op_profile"] = _op_profile(step, batches, train, flops_per_step)
            log.info("LorentzNet %s (%s): %s", label, key, result[key])
        out[label] = result
    return out


def _is_product(op):
    """Whether an op type (graph mode) or thunk name (XLA, ".N" removed) is a matrix product."""
    # MatMul, _FusedMatMul, BatchMatMulV3; XLA names its products dot or after the TF op.
    return "MatMul" in op or op in ("Einsum", "dot")


def _op_profile(step, batches, step_seconds, flops_per_step=None, top=12):
    """Where a training step's time goes, by operation type, graph mode or XLA.

    Runs the (already traced or compiled) ``step`` over ``batches`` under the
    TensorFlow profiler and sums the duration of every operation event: op
    types on the graph executor's threads (events ``name:Type``), or the
    compiled program's thunks on XLA's threads (``dot.12``, ``ynn_fusion.3``,
    ``add_select_fusion``: the number after the dot is dropped). Operations run
    on two threads at once, so the shares are of the summed operation time,
    which can exceed the wall time. ``flops_per_step`` (the matrix products'
    FLOPs at the batches' padded widths) gives the rate inside the products.

    Returns:
        ``{"wall_ms_per_step", "op_ms_per_step", "product_share",
        "product_gflops_per_s", "ops": [{"op", "ms_per_step", "share"}, ...]}``
        for the ``top`` operation types, or ``{"unavailable": why}``.
    """
    import glob
    import re
    import shutil

    import tensorflow as tf

    try:  # TensorFlow's own copy of the trace format; not a public API
        from tensorflow.tsl.profiler.protobuf import xplane_pb2
    except ImportError as error:
        return {"unavailable": f"trace format not importable: {error}"}

    folder = tempfile.mkdtemp(prefix="paper-kd-profile-")
    try:
        tf.profiler.experimental.start(folder)
        try:
            for batch in batches:
                step(*batch)
        finally:
            tf.profiler.experimental.stop()
        paths = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            return {"unavailable": "the profiler wrote no trace"}
        space = xplane_pb2.XSpace()
        space.ParseFromString(Path(paths[0]).read_bytes())
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    seconds = {}
    for plane in space.planes:
        names = plane.event_metadata
        for line in plane.lines:
            graph_thread = line.name.startswith("tf_Compute")
            xla_thread = line.name.startswith("tf_numa") and "Eigen" in line.name
            if not (graph_thread or xla_thread):
                continue
            for event in line.events:
                name = names[event.metadata_id].name
                # The executors' own events (ExecutorState::Process,
                # ThunkExecutor::Execute) span the ops they run: not ops.
                if "::" in name:
                    continue
                if graph_thread:
                    # Op events are "name:Type"; other bookkeeping has no type.
                    op_type = name.rsplit(":", 1)[-1] if ":" in name else ""
                    if not op_type.lstrip("_")[:1].isupper():
                        continue
                else:  # thunks are "hlo_name.N"
                    op_type = re.sub(r"\.\d+$", "", name)
                seconds[op_type] = seconds.get(op_type, 0.0) + event.duration_ps * 1e-12
    total = sum(seconds.values())
    if not total:
        return {"unavailable": "no op events in the trace"}
    products = sum(value for op, value in seconds.items() if _is_product(op))
    ranked = sorted(seconds.items(), key=lambda item: -item[1])[:top]
    per_step = 1e3 / len(batches)
    rate = None
    if flops_per_step and products:
        rate = flops_per_step * len(batches) / products / 1e9
    return {
        "wall_ms_per_step": 1e3 * step_seconds,
        "op_ms_per_step": total * per_step,
        "product_share": products / total,
        "product_gflops_per_s": rate,
        "ops": [
            {"op": op, "ms_per_step": value * per_step, "share": value / total}
            for op, value in ranked
        ],
    }


def _padded_train_flops(model, batches):
    """FLOPs of one training step (3 forward passes) at each batch's padded width, averaged.

    ``model_size`` counts a jet of ``n`` constituents; a batch computes every jet
    at its width, so a batch of ``B`` jets costs ``B`` times the count at that width.
    """
    counts = {}
    total = 0.0
    for batch, _ in batches:
        width = batch["mask"].shape[1]
        if width not in counts:
            counts[width] = _model_size(model, width)["flops_per_jet"]
        if counts[width] is None:
            return None
        total += 3 * len(batch["mask"]) * counts[width]
    return total / len(batches)


def _student_hparams(settings, name):
    return dict(dict(settings.student_overrides).get(name, ()))


def bench_students(settings, jets, peak_gflops=None):
    """Each student's training jets/s and its inference latency at batch 1 and batch 1024."""
    from paper_kd.models import build_model

    inputs, labels = jets
    rng = np.random.default_rng(2)
    train_batches = _batches(inputs, labels, settings.student_batch, settings.student_batches, rng)
    big = _batches(inputs, labels, settings.inference_batch, 1, rng)[0][0]
    single = {key: value[:1, : max(int(big["mask"][0].sum()), 1)] for key, value in big.items()}

    out = {"train_batch_size": settings.student_batch, "inference_batch": settings.inference_batch}
    for name in STUDENTS:
        model = build_model(name, **_student_hparams(settings, name))
        model(train_batches[0][0])
        size = _model_size(model)
        flops = size["flops_per_jet"]
        train = _cycle_seconds(_train_step(model, 2e-4, False), train_batches, settings.steps)
        modes = {}
        for jit in settings.jit:
            call = _traced_call(model, jit)
            latency = _median_seconds(_concrete_call(model, jit, single), settings.latency_calls, 5)
            batch_seconds = _median_seconds(lambda call=call: call(big), settings.steps, 2)
            rate = settings.inference_batch / batch_seconds
            modes["xla" if jit else "graph"] = {
                "latency_batch1_ms": 1e3 * latency,
                "inference_jets_per_s": rate,
                "inference_fraction_of_peak": _peak_fraction(rate, flops, peak_gflops),
            }
        # The headline figures are the better mode's (a trigger would deploy that one).
        fastest = min(modes, key=lambda mode: modes[mode]["latency_batch1_ms"])
        best = max(modes.values(), key=lambda mode: mode["inference_jets_per_s"])
        out[name] = {
            **size,
            "train_jets_per_s": settings.student_batch / train,
            "latency_batch1_ms": modes[fastest]["latency_batch1_ms"],
            "latency_mode": fastest,
            "inference_jets_per_s": best["inference_jets_per_s"],
            "inference_fraction_of_peak": best["inference_fraction_of_peak"],
            "modes": modes,
        }
        log.info("%s: %s", name, out[name])
    return out


def bench_distill(settings, jets):
    """A Distiller step (live teacher, cached teacher logits) against a plain student step."""
    import keras

    from paper_kd.distill import TEACHER_LOGITS, Distiller
    from paper_kd.models import build_model

    inputs, labels = jets
    rng = np.random.default_rng(3)
    batches = _batches(inputs, labels, settings.student_batch, settings.student_batches, rng)
    teacher = build_model("lorentznet", **dict(settings.distill_teacher))
    teacher(batches[0][0])
    cached = []
    for batch, label in batches:
        logits = _sync(teacher(batch, training=False))
        cached.append(({**batch, TEACHER_LOGITS: logits}, label))

    def seconds(teacher_model, temperature, feed):
        student = build_model("deepset", **_student_hparams(settings, "deepset"))
        distiller = Distiller(teacher_model, student, temperature=temperature, weight=1.0)
        distiller.compile(optimizer=keras.optimizers.AdamW(2e-4, epsilon=1e-8, amsgrad=True))
        return _cycle_seconds(lambda x, y: distiller.train_on_batch(x, y), feed, settings.steps)

    plain = seconds(None, 0.0, batches)
    live = seconds(teacher, 1.0, batches)
    from_cache = seconds(teacher, 1.0, cached)
    return {
        "student": "deepset",
        "teacher_hparams": dict(settings.distill_teacher),
        "batch_size": settings.student_batch,
        "plain_step_ms": 1e3 * plain,
        "distill_live_step_ms": 1e3 * live,
        "distill_cached_step_ms": 1e3 * from_cache,
        "live_over_plain": live / plain,
        "cached_over_plain": from_cache / plain,
    }


_START = None  # a barrier shared by the processes of one measurement


def _init_rate_worker(barrier):
    global _START
    _START = barrier


def _pipeline_rate_worker(args):
    from paper_kd.data.generate import pipeline_rate

    process, n_events, seed = args
    return pipeline_rate(process, n_events, seed, ready=_START.wait if _START else None)


def bench_generation(settings):
    """Jets/s of the generation pipeline per process against ``Pythia.next()`` alone.

    Both run the same seed, so they generate the same events; the pipeline's
    extra cost is then extraction, clustering, selection and writing, nothing
    else. Rates are per CPU second of the process (much less disturbed by other
    jobs than wall time), the best of ``generation_rounds`` alternating runs of
    each, since this VM's speed drifts by 10 % from one second to the next. The
    fraction is the median over rounds of pipeline / raw within a round: the two
    runs of a round are seconds apart and see the same machine speed, where the
    best of each can come from a fast and a slow stretch.
    """
    from paper_kd.data.generate import pipeline_rate, raw_event_rate

    out = {"n_events": settings.generation_events, "rounds": settings.generation_rounds}
    context = multiprocessing.get_context("spawn")  # no fork of a process running TensorFlow
    for process in settings.generation_processes:
        raw, pipeline = [], []
        for _ in range(settings.generation_rounds):
            raw.append(raw_event_rate(process, settings.generation_events, seed=12, cpu_time=True))
            pipeline.append(pipeline_rate(process, settings.generation_events, seed=12))
        one = max(pipeline, key=lambda result: result["events_per_cpu_s"])
        ratios = [p["events_per_cpu_s"] / r for p, r in zip(pipeline, raw)]
        # Both start the clock together, after both have initialized.
        with context.Pool(2, _init_rate_worker, (context.Barrier(2),)) as pool:
            two = pool.map(
                _pipeline_rate_worker,
                # The same seed in both: identical work, so only contention can differ.
                [(process, settings.generation_events, 12)] * 2,
            )
        # Per wall second: what a user waits for. The scaling compares events/s:
        # 640 events give only ~50 jets, whose count alone fluctuates by ~14 %.
        two_jets = sum(result["jets_per_s"] for result in two)
        two_events = sum(result["events_per_s"] for result in two)
        result = {
            "raw_events_per_cpu_s": max(raw),
            "pipeline_events_per_cpu_s": one["events_per_cpu_s"],
            "fraction_of_raw": statistics.median(ratios),
            "fraction_of_raw_by_round": [round(ratio, 3) for ratio in ratios],
            "jets_per_event": one["n_jets"] / max(one["n_events"], 1),
            "jets_per_s_1_process": one["jets_per_s"],
            "jets_per_s_2_processes": two_jets,
            "events_per_s_1_process": one["events_per_s"],
            "events_per_s_2_processes": two_events,
            "scaling_2_processes": two_events / one["events_per_s"],
        }
        out[process] = result
        log.info("generation %s: %s", process, result)
    return out


def bench_pipeline(settings, jets, data_path=None):
    """A Deep Set training step fed from a file (streamed, cached) against pre-built batches."""
    from paper_kd.data.format import write_jets
    from paper_kd.data.pipeline import make_dataset, measure_throughput
    from paper_kd.models import build_model

    inputs, labels = jets
    n_jets = min(settings.pipeline_jets, len(labels))
    batch_size = settings.student_batch
    n_batches = max(n_jets // batch_size, 1)
    out = {"batch_size": batch_size, "batches": n_batches}

    with tempfile.TemporaryDirectory() as tmp:
        path = data_path
        if path is None:
            path = write_jets(Path(tmp) / "bench.h5", inputs["p4"][:n_jets], labels[:n_jets])
        feeds = {}
        for mode, in_memory in (("file_streamed", False), ("file_cached", True)):
            feeds[mode] = make_dataset(
                path, batch_size, in_memory=in_memory, max_jets=n_jets, drop_remainder=True
            )
        memory = [(dict(x), y) for x, y in feeds["file_cached"].take(n_batches)]
        out["pipeline_alone_jets_per_s"] = measure_throughput(
            path, batch_size, in_memory=False, max_jets=n_jets, n_batches=n_batches
        )["jets_per_s"]

        model = build_model("deepset", **_student_hparams(settings, "deepset"))
        model(memory[0][0])
        step = _train_step(model, 2e-4, False)
        for x, y in memory:  # trace every width before any timing
            step(x, y)

        def run(feed):
            start = time.perf_counter()
            steps = 0
            for x, y in feed:
                step(x, y)
                steps += 1
            return steps * batch_size / (time.perf_counter() - start)

        out["memory_jets_per_s"] = run(memory)
        for mode, dataset in feeds.items():
            out[f"{mode}_jets_per_s"] = run(dataset)
        out["streamed_over_memory"] = out["file_streamed_jets_per_s"] / out["memory_jets_per_s"]
    return out


# ---------------------------------------------------------------------------
# Running and reporting


def _machine():
    import keras
    import tensorflow as tf

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _load_jets(settings, data_path):
    """Jets to run the models on: the first jets of ``data_path``, or synthetic ones."""
    n_jets = max(settings.pipeline_jets, settings.inference_batch, 4 * settings.student_batch)
    if data_path is not None:
        from paper_kd.data.pipeline import load_arrays

        inputs, labels = load_arrays(data_path, n_max=settings.n_max, max_jets=n_jets)
        source = f"{data_path} (first {len(labels)} jets)"
    else:
        rng = np.random.default_rng(0)
        inputs, labels = synthetic_jets(rng, n_jets, settings.n_constituents, settings.n_max)
        source = "synthetic massless jets"
    multiplicity = inputs["mask"].sum(axis=1)
    return (inputs, labels), {
        "source": source,
        "n_jets": int(len(labels)),
        "mean_constituents": float(multiplicity.mean()),
    }


def run_bench(settings=None, sections=SECTIONS, data_path=None):
    """Run the chosen sections; each failing one is reported, never fatal.

    Returns:
        ``{"machine", "settings", "jets", "sections": {name: dict}, "targets"}``;
        a section that could not run is ``{"unavailable": reason}``.
    """
    settings = settings or BenchSettings.full()
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown bench sections {unknown}; choose from {SECTIONS}")

    report = {"machine": _machine(), "settings": _jsonable(asdict(settings)), "sections": {}}
    jets, report["jets"] = _load_jets(settings, data_path)
    peak = None
    runners = {
        "matmul": lambda: bench_matmul(settings),
        "lorentznet": lambda: bench_lorentznet(settings, jets, peak),
        "students": lambda: bench_students(settings, jets, peak),
        "distill": lambda: bench_distill(settings, jets),
        "generation": lambda: bench_generation(settings),
        "pipeline": lambda: bench_pipeline(settings, jets, data_path),
    }
    for name in SECTIONS:
        if name not in sections:
            continue
        log.info("bench section %s", name)
        start = time.perf_counter()
        try:
            result = runners[name]()
        except ImportError as error:
            result = {"unavailable": f"missing module: {error}"}
        except Exception as error:  # a broken section must not hide the others
            log.debug("section %s failed", name, exc_info=True)
            result = {"unavailable": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
        result["seconds"] = round(time.perf_counter() - start, 2)
        report["sections"][name] = result
        if name == "matmul" and "peak_gflops" in result:
            peak = result["peak_gflops"]
    # Toy sizes say nothing about the targets.
    report["targets"] = check_targets(report["sections"] if settings.profile != "tiny" else {})
    return _jsonable(report)


def _get(sections, *keys):
    value = sections
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def check_targets(sections):
    """Each target with the measured value and whether it is met (None: not measured)."""
    # The best way the teacher can be trained: either mode, random or bucketed batches.
    lorentz = _get(sections, "lorentznet", "paper") or {}
    candidates = []
    for key in ("graph", "xla"):
        result = lorentz.get(key) or {}
        for suffix in ("", "_bucketed"):
            if result.get(f"train_jets_per_s{suffix}") is not None:
                candidates.append({
                    "train_jets_per_s": result[f"train_jets_per_s{suffix}"],
                    "train_fraction_of_peak": result.get(f"train_fraction_of_peak{suffix}"),
                })  # fmt: skip
    best = max(candidates, key=lambda result: result["train_jets_per_s"], default={})
    generation = [
        value["fraction_of_raw"]
        for value in (sections.get("generation") or {}).values()
        if isinstance(value, dict) and "fraction_of_raw" in value
    ]
    measured = {
        "lorentznet_paper_train_jets_per_s": best.get("train_jets_per_s"),
        "lorentznet_paper_train_fraction_of_peak": best.get("train_fraction_of_peak"),
        "deepset_latency_batch1_ms": _get(sections, "students", "deepset", "latency_batch1_ms"),
        "deepset_jets_per_s_batch1024": _get(
            sections, "students", "deepset", "inference_jets_per_s"
        ),
        "distill_cached_over_plain": _get(sections, "distill", "cached_over_plain"),
        "generation_fraction_of_raw": min(generation) if generation else None,
    }
    at_most = {"deepset_latency_batch1_ms", "distill_cached_over_plain"}
    out = {}
    for key, target in TARGETS.items():
        value = measured[key]
        met = None
        if value is not None:
            met = value <= target if key in at_most else value >= target
        out[key] = {
            "target": target,
            "value": value,
            "met": met,
            "kind": "max" if key in at_most else "min",
        }
    return out


def _jsonable(value):
    """Tuples to lists, numpy scalars to Python, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def _fmt(value):
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.4g}" if abs(value) < 100 else f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)


def _table(rows, header):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows]
    return lines


def _settings_line(settings, sections):
    """Which settings made the report: ``--quick`` leaves out XLA and shrinks sections."""
    profile = settings.get("profile", "?")
    modes = " and ".join("XLA" if jit else "graph" for jit in settings.get("jit", ()))
    command = "paper-kd bench" + ("" if profile == "full" else f" --{profile}")
    if set(sections) != set(SECTIONS):
        command += f" --only {','.join(sections)}"
    line = f"Settings: {profile} (`{command}`); "
    line += f"inference and teacher training timed in {modes or '?'} mode"
    if profile != "full":
        line += (
            f"; distillation against a teacher {dict(settings.get('distill_teacher', ()))}, "
            f"generation of {', '.join(settings.get('generation_processes', ()))} only"
        )
    return line + "; student training always without XLA, as `paper-kd train` runs it."


def markdown_report(report):
    """The report as Markdown: machine, targets, then one table per section."""
    machine, sections = report["machine"], report["sections"]
    lines = [
        "# paper-kd benchmark",
        "",
        f"{machine['date']}; {machine['cpu_count']} CPUs ({machine['processor']}), "
        f"TensorFlow {machine['tensorflow']}, Keras {machine['keras']}; "
        f"load average at start {machine['load_average']}.",
        f"Jets: {report['jets']['source']}, {report['jets']['mean_constituents']:.1f} "
        "constituents on average.",
        _settings_line(report.get("settings", {}), list(report["sections"])),
        "",
        "FLOPs: 2 per multiply-add, forward pass of a jet of 57 constituents "
        "(`model_size`: layers counted where the model runs them, LorentzNet's first "
        "edge layer split into per-node and per-edge parts); a training step counts "
        "3 forward passes.",
        "",
        "## Targets",
        "",
    ]
    rows = [
        [key, ("≤ " if t["kind"] == "max" else "≥ ") + _fmt(t["target"]), t["value"], t["met"]]
        for key, t in report["targets"].items()
    ]
    lines += _table(rows, ["target", "aim", "measured", "met"])

    for name, result in sections.items():
        lines += ["", f"## {name}", ""]
        if "unavailable" in result:
            lines.append(f"unavailable: {result['unavailable']}")
            continue
        lines += _section_markdown(name, result)
        lines.append(f"\n({result.get('seconds', 0):.0f} s)")
    return "\n".join(lines) + "\n"


def _section_markdown(name, result):
    if name == "matmul":
        rows = [[f"{size}²", gflops] for size, gflops in result["gflops_by_size"].items()]
        return _table(rows, ["matrix", "GFLOP/s"]) + ["", f"Peak: {_fmt(result['peak_gflops'])}"]
    if name == "lorentznet":
        rows = []
        for label, value in result.items():
            if not isinstance(value, dict) or "hparams" not in value:
                continue
            for mode in ("graph", "xla"):
                if mode in value:
                    m = value[mode]
                    rows.append([
                        label, str(value["hparams"]), mode, value["flops_per_jet"],
                        m["train_jets_per_s"], m["train_fraction_of_peak"],
                        m.get("train_jets_per_s_bucketed"),
                        m.get("train_fraction_of_peak_bucketed"),
                        m["inference_jets_per_s"], m["inference_fraction_of_peak"],
                    ])  # fmt: skip
        header = ["size", "hparams", "mode", "FLOPs/jet", "train jets/s", "train/peak",
                  "bucketed train jets/s", "bucketed/peak", "infer jets/s",
                  "infer/peak"]  # fmt: skip
        lines = _table(rows, header)
        lines += [
            "",
            f"Batch {result['batch_size']}. Random batches: mean padded width "
            f"{result['mean_padded_constituents']:.1f}, real edges / computed edges "
            f"{_fmt(result.get('edge_efficiency'))}; bucketed as `paper-kd train` does "
            f"(`bucket: true`): width {_fmt(result.get('mean_padded_constituents_bucketed'))}, "
            f"edges {_fmt(result.get('edge_efficiency_bucketed'))}.",
        ]
        for mode in ("graph", "xla"):
            profile = _get(result, "paper", mode, "op_profile") if "paper" in result else None
            if profile and "ops" in profile:
                lines += [
                    "",
                    f"Paper-size training step ({mode}, random batches) by operation: "
                    f"{profile['op_ms_per_step']:.0f} ms of operation time per step in "
                    f"{profile['wall_ms_per_step']:.0f} ms of wall time (two threads); "
                    f"matrix products {_fmt(profile['product_share'])} of it, at "
                    f"{_fmt(profile['product_gflops_per_s'])} GFLOP/s.",
                    "",
                ]
                lines += _table(
                    [[op["op"], op["ms_per_step"], op["share"]] for op in profile["ops"]],
                    ["operation", "ms/step", "share of operation time"],
                )
            elif profile:
                lines += ["", f"{mode} profile unavailable: {profile['unavailable']}"]
        return lines
    if name == "students":
        rows = []
        for student, v in result.items():
            if not isinstance(v, dict):
                continue
            for mode, m in v.get("modes", {"graph": v}).items():
                # Training is timed once, as `paper-kd train` runs it (graph mode).
                train = v["train_jets_per_s"] if mode == "graph" else None
                rows.append([
                    student, mode, v["parameters"], v["flops_per_jet"], train,
                    m["latency_batch1_ms"], m["inference_jets_per_s"],
                    m["inference_fraction_of_peak"],
                ])  # fmt: skip
        header = ["student", "inference", "parameters", "FLOPs/jet", "train jets/s",
                  "batch-1 ms/jet", f"jets/s at {result['inference_batch']}",
                  "infer/peak"]  # fmt: skip
        return _table(rows, header)
    rows = [[key, value] for key, value in result.items() if key != "seconds"]
    if name == "generation":
        rows = []
        for process, value in result.items():
            if isinstance(value, dict):
                rows += [[f"{process}: {key}", item] for key, item in value.items()]
    return _table(rows, ["quantity", "value"])


def write_report(report, out_dir):
    """Write ``bench.json`` and ``bench.md`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "bench.json", out_dir / "bench.md"
    write_text(json_path, json.dumps(report, indent=2, allow_nan=False) + "\n")
    write_text(md_path, markdown_report(report))
    return json_path, md_path


def _sections(text):
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown sections {unknown}; choose from {SECTIONS}")
    return names


def add_arguments(parser):
    parser.add_argument("-o", "--output-dir", default="runs/bench", help="report folder")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer repetitions, a few minutes")
    mode.add_argument("--tiny", action="store_true", help="toy sizes: proves every section runs")
    parser.add_argument(
        "--only", type=_sections, default=list(SECTIONS),
        help=f"comma-separated sections among {','.join(SECTIONS)}",
    )  # fmt: skip
    parser.add_argument("--data", default=None, help="canonical jet file to run the models on")
    parser.add_argument("--no-xla", action="store_true", help="skip the XLA-compiled variants")


def main(args):
    if args.tiny:
        settings = BenchSettings.tiny()
    elif args.quick:
        settings = BenchSettings.quick()
    else:
        settings = BenchSettings.full()
    if args.no_xla:
        settings = replace(settings, jit=(False,))
    if args.data is not None and not Path(args.data).exists():
        raise FileNotFoundError(f"{args.data}: no such jet file")

    report = run_bench(settings, args.only, args.data)
    json_path, md_path = write_report(report, args.output_dir)
    print(markdown_report(report))
    print(f"wrote {json_path} and {md_path}")
    return 0
