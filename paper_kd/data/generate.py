"""Simulate boosted top and QCD jets with Pythia 8 and FastJet.

Follows the recipe of the Top Quark Tagging Reference Dataset (Kasieczka et
al., arXiv:1902.09914), with the detector simulation left out:

- pp collisions at 14 TeV; signal ``ttbar`` (``Top:gg2ttbar``,
  ``Top:qqbar2ttbar``) with both W bosons forced to quarks, background QCD
  2->2 (``HardQCD:all``); hadronization on; multiparton interactions off
  and no pile-up, as in the reference dataset;
- visible final-state particles (no neutrinos) with pT above
  ``constituent_pt_min`` (0.5 GeV) are made massless (E = |p|), as the
  reference dataset stores them, and clustered with anti-kT, R = 0.8; so the
  stored constituents sum to the clustered jet unless ``n_max`` truncates;
- every jet with 550 < pT < 650 GeV and |eta| < 2 is kept (an event can give
  two); a top jet also needs a hadronically decaying top quark, and the top's
  three decay quarks, within Delta R < 0.8 of the jet axis (Delta R in
  rapidity and azimuth, the clustering metric);
- constituents are pT-sorted and cut to the hardest ``n_max``.

The pT-hat cut. Without one, almost no event reaches the window. With a cut
too close to it, the jet-pT spectrum inside the window is sculpted, because a
jet can carry more pT than its hard process (initial-state radiation recoils
against the hard system) and the steeply falling spectrum favours such upward
fluctuations. ``pt_hat_study`` measures, in a sample made with a looser cut,
the fraction of window jets whose event's pT-hat lies below a candidate cut:
what the candidate would remove, per pT bin. Measured with the settings here
(multiparton interactions off) at ``pTHatMin = 200`` GeV, 180,000 events per
class (seeds 4711 / 4712: 1,931 top and 1,644 QCD window jets), the loss in
the 25-GeV bins 550-575 / ... / 625-650, in %:

- top, cut 300: 7.4 / 5.3 / 6.4 / 8.2 (+- 1-1.5); cut 350: 11.1 / 9.2 / 9.2 /
  10.4 (+- 1.2-1.7); cut 400: 15.5 / 13.7 / 13.3 / 13.3;
- QCD, cut 275: 0.3 / 0.2 / 0.0 / 0.0 (+- 0.2-0.4); cut 300: 1.9 / 0.4 / 0.0 /
  0.0 (+- 0.3-0.6); cut 350: 7.6 / 2.8 / 2.1 / 0.7.

The top loss is flat across the window (at 350 GeV: chi2 1.7 for 3 degrees of
freedom against a constant): a ttbar event's pT-hat is its top pT, and the
share of window jets recoiling up from below the cut barely depends on the
jet pT; the cut costs events, not shape. The QCD loss falls steeply across the
window: at 300 GeV it removes 1.9 +- 0.6 % of the lowest bin and nothing of
the others, at 275 GeV 0.3 %. So ``PT_HAT_MIN`` is 350 GeV for top and 275 GeV
for QCD. Limitation: losses below 200 GeV are not measured (top has window
jets down to pT-hat 202 GeV: at most a few % more, flat like the rest).

Generation runs in shards: a shard is one split and one class with its own
seed, made by one fresh Pythia in one process and written atomically through
``JetWriter``. A finished shard is never generated again (an interrupted run
resumes), shards can run as independent batch jobs (``--shard i/N``), and a
merge step interleaves the shards of each split into ``train.h5``,
``val.h5`` and ``test.h5`` in a seeded random order.

Particles are read from Pythia in batches through ``Pythia.nextBatch``
(an awkward array of the event record) and clustered with FastJet's
multi-event interface, so no Python loop runs over particles or events.
"""

import argparse
import contextlib
import json
import logging
import math
import multiprocessing
import os
import queue
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from paper_kd import physics
from paper_kd.data.format import (
    SPLITS,
    JetFormatError,
    JetWriter,
    read_info,
    read_jets,
    split_path,
)

__all__ = [
    "JET_ETA_MAX",
    "JET_PT_WINDOW",
    "JET_RADIUS",
    "PROCESSES",
    "PT_HAT_MIN",
    "JetGenerator",
    "Shard",
    "add_arguments",
    "generate_dataset",
    "generate_shard",
    "main",
    "make_pythia",
    "merge_dataset",
    "pipeline_rate",
    "plan_shards",
    "pt_hat_study",
    "raw_event_rate",
    "select_jets",
]

log = logging.getLogger(__name__)

# Per process, in GeV; the module docstring shows how they were chosen. Lower
# cuts cost generation time: window jets per event fall about x2 per 50 GeV lower.
PT_HAT_MIN = {"top": 350.0, "qcd": 275.0}
JET_RADIUS = 0.8
JET_PT_WINDOW = (550.0, 650.0)
JET_ETA_MAX = 2.0
MATCH_RADIUS = 0.8
LABELS = {"top": 1, "qcd": 0}

COMMON_SETTINGS = (
    "Beams:idA = 2212",
    "Beams:idB = 2212",
    "Beams:eCM = 14000.",
    # The reference dataset has no multiparton interactions and no pile-up; MPI
    # would also cost 4-5x the generation time (measured: 80 vs 370 events/s).
    "PartonLevel:MPI = off",
)
PROCESSES = {
    "top": (
        "Top:gg2ttbar = on",
        "Top:qqbar2ttbar = on",
        "24:onMode = off",
        "24:onIfAny = 1 2 3 4 5",
    ),
    "qcd": ("HardQCD:all = on",),
}
# Settings that only silence output; they do not change the events.
QUIET_SETTINGS = (
    "Print:quiet = on",
    "Init:showProcesses = off",
    "Init:showMultipartonInteractions = off",
    "Init:showChangedSettings = off",
    "Init:showChangedParticleData = off",
    "Next:numberCount = 0",
    "Next:numberShowInfo = 0",
    "Next:numberShowProcess = 0",
    "Next:numberShowEvent = 0",
)
NEUTRINOS = (12, 14, 16)
# Events per nextBatch call: large enough to amortize the Python work, small
# enough for a smooth progress bar. A shard keeps its first jets in event
# order, so the jets do not depend on it.
BATCH_EVENTS = 128
SHARD_JETS = 5000
# Pythia accepts seeds in [1, 900 000 000].
_SEED_RANGE = 900_000_000


def _settings(process, seed, pt_hat_min):
    if process not in PROCESSES:
        raise ValueError(f"process must be one of {sorted(PROCESSES)}, got {process!r}")
    return [
        *COMMON_SETTINGS,
        *PROCESSES[process],
        f"PhaseSpace:pTHatMin = {pt_hat_min:g}",
        "Random:setSeed = on",
        f"Random:seed = {int(seed)}",
    ]


def _pt_hat_min(process, pt_hat_min=None):
    """The pT-hat cut for ``process``: the default, one number for both, or a per-process dict."""
    if pt_hat_min is None:
        pt_hat_min = PT_HAT_MIN
    if isinstance(pt_hat_min, dict):
        pt_hat_min = pt_hat_min[process]
    return float(pt_hat_min)


def make_pythia(process, seed, pt_hat_min=None):
    """An initialized, silent Pythia for ``process`` ("top" or "qcd").

    ``pt_hat_min`` (GeV): ``None`` for ``PT_HAT_MIN``, a number, or a per-process dict.
    """
    import pythia8mc

    pt_hat_min = _pt_hat_min(process, pt_hat_min)
    pythia = pythia8mc.Pythia("", False)
    for line in (*QUIET_SETTINGS, *_settings(process, seed, pt_hat_min)):
        if not pythia.readString(line):
            raise ValueError(f"Pythia rejected the setting {line!r}")
    if not pythia.init():
        raise RuntimeError(f"Pythia failed to initialize for process {process!r}")
    return pythia


def _jet_definition():
    import fastjet

    # FastJet prints its banner to stdout on the first clustering otherwise.
    fastjet._swig.ClusterSequence.set_fastjet_banner_stream(None)
    return fastjet.JetDefinition(fastjet.antikt_algorithm, JET_RADIUS)


def _flat(array):
    """Flat numpy values of a (nested) awkward list, read from its layout.

    Walking the layout costs microseconds; ``ak.flatten`` + ``ak.to_numpy``
    cost ~0.1 ms a call through awkward's dispatch, which on 32-event batches
    was a third of the generator's own time.
    """
    import awkward as ak

    layout = ak.to_layout(array)
    while True:
        if isinstance(layout, ak.contents.NumpyArray):
            return np.asarray(layout.data)
        if isinstance(layout, ak.contents.ListArray):
            layout = layout.to_ListOffsetArray64(True)
        if not isinstance(layout, ak.contents.ListOffsetArray):
            return ak.to_numpy(ak.flatten(ak.Array(layout), axis=None))
        offsets = np.asarray(layout.offsets)
        layout = layout.content[offsets[0] : offsets[-1]]


def _counts(array, axis=1):
    """Lengths of the lists at ``axis`` of an awkward list array, flat, from its offsets."""
    import awkward as ak

    layout = ak.to_layout(array)
    for level in range(1, axis + 1):
        if isinstance(layout, ak.contents.ListArray):
            layout = layout.to_ListOffsetArray64(True)
        if not isinstance(layout, ak.contents.ListOffsetArray):
            return ak.to_numpy(ak.flatten(ak.num(array, axis=axis), axis=None))
        offsets = np.asarray(layout.offsets)
        if level == axis:
            return np.diff(offsets)
        layout = layout.content[offsets[0] : offsets[-1]]


def _field(array, *path):
    """The awkward array of a (nested) record field, without awkward's dispatch."""
    import awkward as ak

    layout = ak.to_layout(array)
    lists = []
    while isinstance(layout, ak.contents.ListOffsetArray):
        lists.append(layout.offsets)
        layout = layout.content
    if not isinstance(layout, ak.contents.RecordArray):
        return array[path]
    for name in path:
        layout = layout.content(name)
    for offsets in reversed(lists):
        layout = ak.contents.ListOffsetArray(offsets, layout)
    return ak.Array(layout)


def _delta_r(p4_a, p4_b):
    d_y = physics.rapidity(p4_a) - physics.rapidity(p4_b)
    d_phi = physics.delta_phi(physics.phi(p4_a), physics.phi(p4_b))
    return np.hypot(d_y, d_phi)


def _hadronic_tops(record, offsets):
    """Four-momenta ``[n_tops, 4, 4]`` (top, b, q, q') and event index of each hadronic top.

    ``record`` holds flat arrays of the event record; daughter indices are
    local to an event and become global by adding the event's offset.
    """
    n_per_event = np.diff(offsets)
    event = np.repeat(np.arange(len(n_per_event)), n_per_event)
    base = offsets[:-1][event]
    abs_id = np.abs(record["id"])
    first = np.where(record["daughter1"] > 0, record["daughter1"] + base, 0)
    last = np.where(record["daughter2"] > 0, record["daughter2"] + base, 0)

    # The top that decays is the last copy: its first daughter is no longer a top.
    tops = np.flatnonzero((abs_id == 6) & (record["daughter1"] > 0))
    tops = tops[abs_id[first[tops]] != 6]
    tops = tops[last[tops] == first[tops] + 1]
    w_first = abs_id[first[tops]] == 24
    w = np.where(w_first, first[tops], last[tops])
    b = np.where(w_first, last[tops], first[tops])
    keep = abs_id[w] == 24
    tops, w, b = tops[keep], w[keep], b[keep]

    # Follow the W through its recoil copies to the one that decays.
    for _ in range(100):
        copy = (record["daughter1"][w] > 0) & (first[w] == last[w]) & (abs_id[first[w]] == 24)
        if not copy.any():
            break
        w = np.where(copy, first[w], w)
    quark_1, quark_2 = first[w], last[w]
    hadronic = (
        (record["daughter1"][w] > 0)
        & (quark_2 == quark_1 + 1)
        & (abs_id[quark_1] <= 5)
        & (abs_id[quark_2] <= 5)
    )
    tops, b, quark_1, quark_2 = tops[hadronic], b[hadronic], quark_1[hadronic], quark_2[hadronic]
    partons = np.stack([tops, b, quark_1, quark_2], axis=1)
    return record["p4"][partons], event[tops]  # [n_tops, 4 partons, 4]


def _matched_to_top(jet_p4, jet_event, top_p4, top_event):
    """Boolean per jet: some hadronic top and its three quarks lie within ``MATCH_RADIUS``."""
    matched = np.zeros(len(jet_p4), bool)
    for k in range(len(top_p4)):
        same_event = jet_event == top_event[k]
        if not same_event.any():
            continue
        distance = _delta_r(jet_p4[same_event][:, None, :], top_p4[k][None, :, :])
        matched[same_event] |= np.all(distance < MATCH_RADIUS, axis=1)
    return matched


def select_jets(events, process, jet_definition, *, n_max=200, constituent_pt_min=0.5):
    """Cluster, select and pack the jets of a batch of Pythia events.

    ``events`` is the awkward array from ``Pythia.nextBatch``. Returns a dict
    with ``p4`` float32 ``[n_jets, n_max, 4]`` (massless, pT-sorted, padded),
    ``jet_p4`` float32 ``[n_jets, 4]``, ``label`` int8, and per jet the
    ``event`` index in the batch and the event's ``pt_hat``.
    """
    import awkward as ak
    import fastjet

    particles = _field(events, "prt")
    counts = _counts(particles)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    record = {
        "id": _flat(_field(particles, "id")),
        "status": _flat(_field(particles, "status")),
        "p4": np.stack(
            [_flat(_field(particles, "p", name)) for name in ("e", "px", "py", "pz")], axis=-1
        ),  # [n_particles, 4]
    }
    event_of = np.repeat(np.arange(len(counts)), counts)

    # Visible final state above threshold, made massless before clustering.
    p4 = record["p4"]
    visible = (record["status"] > 0) & ~np.isin(np.abs(record["id"]), NEUTRINOS)
    visible &= physics.pt(p4) > constituent_pt_min
    visible_p4 = p4[visible]
    visible_p4[:, 0] = np.linalg.norm(visible_p4[:, 1:], axis=-1)
    visible_counts = np.bincount(event_of[visible], minlength=len(counts))
    visible_offsets = np.concatenate([[0], np.cumsum(visible_counts)])
    columns = [ak.contents.NumpyArray(np.ascontiguousarray(visible_p4[:, i])) for i in range(4)]
    inputs = ak.Array(
        ak.contents.ListOffsetArray(
            ak.index.Index64(visible_offsets),
            ak.contents.RecordArray(columns, ["E", "px", "py", "pz"]),
        )
    )
    sequence = fastjet.ClusterSequence(inputs, jet_definition)
    jets = sequence.inclusive_jets(min_pt=JET_PT_WINDOW[0])
    constituent_index = sequence.constituent_index(min_pt=JET_PT_WINDOW[0])

    jet_counts = _counts(jets)
    jet_event = np.repeat(np.arange(len(counts)), jet_counts)
    jet_p4 = np.stack([_flat(_field(jets, name)) for name in ("E", "px", "py", "pz")], axis=-1)
    jet_pt = physics.pt(jet_p4)
    selected = (jet_pt > JET_PT_WINDOW[0]) & (jet_pt < JET_PT_WINDOW[1])
    selected &= np.abs(physics.eta(jet_p4)) < JET_ETA_MAX
    if process == "top":
        for name in ("mother1", "daughter1", "daughter2"):
            record[name] = _flat(_field(particles, name))
        top_p4, top_event = _hadronic_tops(record, offsets)
        selected[selected] = _matched_to_top(
            jet_p4[selected], jet_event[selected], top_p4, top_event
        )

    # Constituents of the selected jets, as rows into the visible arrays.
    n_per_jet = _counts(constituent_index, axis=2)
    rows = _flat(constituent_index) + np.repeat(visible_offsets[jet_event], n_per_jet)
    jet_of_row = np.repeat(np.arange(len(jet_p4)), n_per_jet)
    keep_rows = selected[jet_of_row]
    rows, jet_of_row = rows[keep_rows], jet_of_row[keep_rows]
    new_index = np.cumsum(selected) - 1
    jet_of_row = new_index[jet_of_row]

    constituents = visible_p4[rows]
    order = np.lexsort((-physics.pt(constituents), jet_of_row))
    constituents, jet_of_row = constituents[order], jet_of_row[order]
    n_selected = int(selected.sum())
    starts = np.searchsorted(jet_of_row, np.arange(n_selected))
    rank = np.arange(len(jet_of_row)) - starts[jet_of_row]
    in_range = rank < n_max
    packed = np.zeros((n_selected, n_max, 4), np.float32)
    packed[jet_of_row[in_range], rank[in_range]] = constituents[in_range]

    pt_hat = np.sqrt(_flat(_field(events, "info", "pT2Hat")))
    return {
        "p4": packed,
        "jet_p4": jet_p4[selected].astype(np.float32),
        "label": np.full(n_selected, LABELS[process], np.int8),
        "event": jet_event[selected],
        "pt_hat": pt_hat[jet_event[selected]],
    }


class JetGenerator:
    """One Pythia and one jet definition, producing selected jets block by block.

    Example:
        >>> source = JetGenerator("top", seed=7)
        >>> block = source.next_block()  # dict of arrays, see ``select_jets``
    """

    def __init__(
        self,
        process,
        seed,
        *,
        n_max=200,
        constituent_pt_min=0.5,
        pt_hat_min=None,
        batch_events=BATCH_EVENTS,
    ):
        self.process = process
        self.n_max = int(n_max)
        self.constituent_pt_min = float(constituent_pt_min)
        self.batch_events = int(batch_events)
        self.pythia = make_pythia(process, seed, pt_hat_min)
        self.jet_definition = _jet_definition()
        self.n_events = 0

    def next_block(self):
        """Generate ``batch_events`` events and return their selected jets."""
        events = self.pythia.nextBatch(self.batch_events)
        self.n_events += len(events)
        return select_jets(
            events,
            self.process,
            self.jet_definition,
            n_max=self.n_max,
            constituent_pt_min=self.constituent_pt_min,
        )

    def jets(self, n_jets):
        """Yield blocks until exactly ``n_jets`` jets have been produced."""
        produced, empty_blocks = 0, 0
        while produced < n_jets:
            block = self.next_block()
            taken = min(len(block["label"]), n_jets - produced)
            empty_blocks = 0 if taken else empty_blocks + 1
            if empty_blocks > 1000:
                raise RuntimeError(
                    f"no {self.process} jet selected in {1000 * self.batch_events} events"
                )
            if taken:
                produced += taken
                yield {name: values[:taken] for name, values in block.items()}


@dataclass(frozen=True)
class Shard:
    """One unit of work: ``n_jets`` jets of one class for one split, from one seed."""

    index: int
    split: str
    process: str
    part: int
    n_jets: int
    seed: int

    @property
    def name(self):
        return f"{self.split}-{self.process}-{self.part:04d}.h5"


def _shard_seed(seed, split, process, part):
    words = [int(seed), SPLITS.index(split), sorted(PROCESSES).index(process), int(part)]
    return int(np.random.SeedSequence(words).generate_state(1)[0] % _SEED_RANGE) + 1


def plan_shards(n_jets, seed=0, shard_jets=SHARD_JETS):
    """All shards of a dataset, in a fixed order; each split is half top, half QCD.

    ``n_jets`` maps split -> number of jets; an odd count gives QCD one jet more.
    """
    unknown = set(n_jets) - set(SPLITS)
    if unknown:
        raise ValueError(f"n_jets: splits must be among {SPLITS}, got {sorted(unknown)}")
    if int(shard_jets) < 1:
        raise ValueError(f"shard_jets must be positive, got {shard_jets}")
    shards = []
    for split in SPLITS:
        total = int(n_jets.get(split, 0))
        if total < 0:
            raise ValueError(f"n_jets[{split!r}] must be >= 0, got {total}")
        for process, count in (("top", total // 2), ("qcd", total - total // 2)):
            n_parts = math.ceil(count / shard_jets)
            for part in range(n_parts):
                size = count // n_parts + (part < count % n_parts)
                shards.append(
                    Shard(
                        len(shards), split, process, part, size,
                        _shard_seed(seed, split, process, part),
                    )
                )  # fmt: skip
    return shards


def _recipe(n_max, constituent_pt_min, pt_hat_min):
    return {
        "common": list(COMMON_SETTINGS),
        "processes": {name: list(lines) for name, lines in PROCESSES.items()},
        "pt_hat_min": {process: _pt_hat_min(process, pt_hat_min) for process in PROCESSES},
        "jet_algorithm": "anti-kt",
        "jet_radius": JET_RADIUS,
        "jet_pt_window": list(JET_PT_WINDOW),
        "jet_eta_max": JET_ETA_MAX,
        "top_match_radius": MATCH_RADIUS,
        "constituents": "visible final state, massless (E=|p|), pT-sorted",
        "constituent_pt_min": constituent_pt_min,
        "n_max": n_max,
    }


def _versions():
    from importlib.metadata import version

    return {name: version(name) for name in ("pythia8mc", "fastjet", "numpy", "awkward")}


def _shard_provenance(shard, recipe):
    return {"source": "pythia8", "generator": recipe, "shard": asdict(shard), **_versions()}


def _provenance_matches(path, expected):
    """Whether a complete file's provenance holds ``expected``; None if it is not complete."""
    try:
        found = read_info(path)["provenance"]
    except JetFormatError as error:
        log.warning("%s is not a finished file, made again (%s)", path, error)
        return None
    expected = json.loads(json.dumps(expected))
    # Files made before 2026-12-04 recorded the events per block, a speed setting
    # that does not change the jets (tested): they still count as finished.
    if isinstance(found.get("generator"), dict):
        found["generator"].pop("batch_events", None)
    return {key: found.get(key) for key in expected} == expected


def _shard_is_done(path, shard, recipe):
    """True for a complete shard made from this recipe; an error for a foreign one."""
    if not path.exists():
        return False
    matches = _provenance_matches(path, _shard_provenance(shard, recipe))
    if matches is False:
        raise ValueError(
            f"{path}: shard was made with other settings or seed (provenance differs); "
            "remove it or generate into another folder"
        )
    return bool(matches)


def _split_is_done(path, provenance):
    """True for a complete merged split made from these shards; an error for a foreign one."""
    if not path.exists():
        return False
    matches = _provenance_matches(path, provenance)
    if matches is False:
        raise ValueError(
            f"{path}: exists with other settings, sizes or seed (provenance differs); "
            "remove it or generate into another folder"
        )
    return bool(matches)


def _split_provenance(split, shards, recipe, seed):
    split_shards = [s for s in shards if s.split == split]
    return {
        "source": "pythia8",
        "split": split,
        "seed": int(seed),
        "generator": recipe,
        "shards": [asdict(s) for s in split_shards],
        "n_top": sum(s.n_jets for s in split_shards if s.process == "top"),
        "n_qcd": sum(s.n_jets for s in split_shards if s.process == "qcd"),
        **_versions(),
    }


def generate_shard(shard, shard_dir, recipe, report=None):
    """Generate one shard into ``shard_dir`` (atomic); ``report(n)`` is told of new jets."""
    path = Path(shard_dir) / shard.name
    source = JetGenerator(
        shard.process,
        shard.seed,
        n_max=recipe["n_max"],
        constituent_pt_min=recipe["constituent_pt_min"],
        pt_hat_min=recipe["pt_hat_min"][shard.process],
    )
    with JetWriter(path, recipe["n_max"], _shard_provenance(shard, recipe)) as writer:
        for block in source.jets(shard.n_jets):
            writer.append(block["p4"], block["label"], block["jet_p4"])
            if report is not None:
                report(len(block["label"]))
    return path


_progress_queue = None


def _init_worker(progress_queue):
    global _progress_queue
    _progress_queue = progress_queue


def _worker(shard, shard_dir, recipe):
    return generate_shard(shard, shard_dir, recipe, report=_progress_queue.put)


def _run_shards(shards, shard_dir, recipe, workers, progress):
    from tqdm.auto import tqdm

    total = sum(shard.n_jets for shard in shards)
    bar = tqdm(total=total, unit="jet", disable=not progress, desc="generate", smoothing=0.1)
    with bar:
        if workers == 1:
            for shard in shards:
                generate_shard(shard, shard_dir, recipe, report=bar.update)
            return

        # Spawned (not forked) workers: the caller may hold threads (TensorFlow, tqdm).
        context = multiprocessing.get_context("spawn")
        progress_queue = context.Queue()
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init_worker, initargs=(progress_queue,)
        ) as pool:
            # Submitted in plan order, so the first shards finish first.
            pending = set([pool.submit(_worker, shard, shard_dir, recipe) for shard in shards])
            try:
                while pending:
                    with contextlib.suppress(queue.Empty):
                        bar.update(progress_queue.get(timeout=0.2))
                    done = {future for future in pending if future.done()}
                    pending -= done
                    for future in done:
                        future.result()  # re-raises a worker's error (or its death) here
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
            while not progress_queue.empty():
                bar.update(progress_queue.get())


class _ShardStream:
    """Sequential reader of one shard, buffered by whole chunks."""

    def __init__(self, path, buffer_jets=512):
        self.path, self.buffer_jets = path, buffer_jets
        self.n_jets = read_info(path)["n_jets"]
        self.position, self.buffer = 0, None

    def take(self, count):
        parts = []
        while count:
            if self.buffer is None or not len(self.buffer["label"]):
                stop = min(self.position + self.buffer_jets, self.n_jets)
                self.buffer = read_jets(self.path, self.position, stop)
                self.position = stop
            taken = min(count, len(self.buffer["label"]))
            parts.append({k: v[:taken] for k, v in self.buffer.items()})
            self.buffer = {k: v[taken:] for k, v in self.buffer.items()}
            count -= taken
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _merge_split(path, shards, shard_dir, provenance, seed, block_jets=8192):
    """Interleave shards into one file in a seeded random order, streaming."""
    streams = [_ShardStream(Path(shard_dir) / shard.name) for shard in shards]
    # A random interleaving of the shards; within a shard, events are already i.i.d.
    source = np.repeat(np.arange(len(streams)), [s.n_jets for s in streams])
    np.random.default_rng([int(seed), SPLITS.index(provenance["split"])]).shuffle(source)
    with JetWriter(path, provenance["generator"]["n_max"], provenance) as writer:
        for start in range(0, len(source), block_jets):
            block_source = source[start : start + block_jets]
            block = {}
            for k, stream in enumerate(streams):
                rows = np.flatnonzero(block_source == k)
                if not len(rows):
                    continue
                taken = stream.take(len(rows))
                for name, values in taken.items():
                    if name not in block:
                        block[name] = np.zeros((len(block_source), *values.shape[1:]), values.dtype)
                    block[name][rows] = values
            writer.append(block["p4"], block["label"], block["jet_p4"])
    return path


def merge_dataset(out_dir, shards, recipe, seed, *, keep_shards=False):
    """Merge finished shards into ``train.h5``, ``val.h5``, ``test.h5`` under ``out_dir``.

    ``shards`` and ``recipe`` must be those the shards were made with (see
    ``plan_shards``); a split already merged from the same shards is kept.
    """
    out_dir = Path(out_dir)
    shard_dir = out_dir / "shards"
    for split in SPLITS:
        split_shards = [s for s in shards if s.split == split]
        if not split_shards:
            continue
        provenance = _split_provenance(split, shards, recipe, seed)
        path = split_path(out_dir, split)
        if _split_is_done(path, provenance):
            log.info("%s is complete, kept", path)
        else:
            missing = [
                s.name for s in split_shards if not _shard_is_done(shard_dir / s.name, s, recipe)
            ]
            if missing:
                raise FileNotFoundError(
                    f"{shard_dir}: {len(missing)} shard(s) of split {split!r} not finished, "
                    f"e.g. {missing[0]}; generate them first"
                )
            _merge_split(path, split_shards, shard_dir, provenance, seed)
            log.info("wrote %s (%d jets)", path, provenance["n_top"] + provenance["n_qcd"])
        if not keep_shards:
            for shard in split_shards:
                (shard_dir / shard.name).unlink(missing_ok=True)
    if not keep_shards and shard_dir.exists() and not any(shard_dir.iterdir()):
        shard_dir.rmdir()
    return out_dir


def generate_dataset(
    out_dir,
    n_jets=None,
    *,
    seed=0,
    workers=None,
    n_max=200,
    constituent_pt_min=0.5,
    shard_jets=SHARD_JETS,
    shard=None,
    progress=True,
    keep_shards=False,
    pt_hat_min=None,
):
    """Generate a balanced top/QCD dataset into ``out_dir`` and return its path.

    Args:
        out_dir: dataset folder; shards go to ``out_dir/shards`` until merged.
        n_jets: split -> number of jets, e.g. ``{"train": 1000, "val": 200, "test": 200}``.
        seed: base seed; every shard's Pythia seed derives from it.
        workers: processes (default: all cores, at most one per shard).
        n_max, constituent_pt_min: constituents kept per jet and their pT threshold (GeV).
        shard_jets: jets per shard, the unit of resuming and of parallel work.
        shard: ``(i, n)`` runs only shards ``k`` with ``k % n == i`` and does not
            merge (for batch jobs); ``None`` runs all and merges.
        progress: show a progress bar with jets/s.
        keep_shards: keep the shard files after merging.
        pt_hat_min: the Pythia pT-hat cut in GeV: ``None`` for ``PT_HAT_MIN`` (see the
            module docstring), one number for both classes, or a per-process dict.

    With ``workers > 1`` the shards run in spawned processes, which import the
    caller's main module: call this from under ``if __name__ == "__main__":``
    in a script.
    """
    out_dir = Path(out_dir)
    n_jets = dict(n_jets or {"train": 10_000, "val": 2_000, "test": 2_000})
    shards = plan_shards(n_jets, seed, shard_jets)
    recipe = _recipe(int(n_max), float(constituent_pt_min), pt_hat_min)
    shard_dir = out_dir / "shards"

    selected = shards
    if shard is not None:
        index, count = (int(v) for v in shard)
        if not 0 <= index < count:
            raise ValueError(f"shard must be i/N with 0 <= i < N, got {index}/{count}")
        selected = [s for s in shards if s.index % count == index]
    merged = {
        split
        for split in SPLITS
        if _split_is_done(
            split_path(out_dir, split), _split_provenance(split, shards, recipe, seed)
        )
    }
    todo = [
        s
        for s in selected
        if s.split not in merged and not _shard_is_done(shard_dir / s.name, s, recipe)
    ]
    log.info(
        "%d of %d shards to generate (%d jets) in %s",
        len(todo), len(selected), sum(s.n_jets for s in todo), shard_dir,
    )  # fmt: skip
    if todo:
        workers = min(int(workers or os.cpu_count() or 1), len(todo))
        _run_shards(todo, shard_dir, recipe, workers, progress)
    if shard is None:
        merge_dataset(out_dir, shards, recipe, seed, keep_shards=keep_shards)
    return out_dir


def raw_event_rate(process, n_events, seed=0, pt_hat_min=None, *, cpu_time=False):
    """Events per second of ``Pythia.next()`` alone, initialization excluded.

    ``cpu_time=True`` divides by this process's CPU time instead of wall time,
    which a machine shared with other jobs disturbs much less.
    """
    clock = time.process_time if cpu_time else time.perf_counter
    pythia = make_pythia(process, seed, pt_hat_min)
    start = clock()
    for _ in range(int(n_events)):
        pythia.next()
    return n_events / (clock() - start)


def pipeline_rate(
    process, n_events, seed=0, *, n_max=200, constituent_pt_min=0.5, ready=None
):  # fmt: skip
    """Throughput of the whole pipeline (generation, clustering, selection, writing).

    Returns ``{"events_per_s", "jets_per_s", "events_per_cpu_s", "jets_per_cpu_s",
    "n_events", "n_jets"}``, per wall and per CPU second of this process;
    initialization excluded. The jets are written to a temporary file.
    ``ready``, if given, is called after initialization and before the clock
    starts (a barrier, so that processes measured together run together).
    """
    source = JetGenerator(process, seed, n_max=n_max, constituent_pt_min=constituent_pt_min)
    source.next_block()  # imports and first-call set-up of awkward and FastJet
    source.n_events = 0
    if ready is not None:
        ready()
    n_jets = 0
    with tempfile.TemporaryDirectory() as tmp:
        start, start_cpu = time.perf_counter(), time.process_time()
        with JetWriter(Path(tmp) / "rate.h5", n_max, {"source": "pythia8"}) as writer:
            while source.n_events < n_events:
                block = source.next_block()
                writer.append(block["p4"], block["label"], block["jet_p4"])
                n_jets += len(block["label"])
        elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return {
        "events_per_s": source.n_events / elapsed,
        "jets_per_s": n_jets / elapsed,
        "events_per_cpu_s": source.n_events / elapsed_cpu,
        "jets_per_cpu_s": n_jets / elapsed_cpu,
        "n_events": source.n_events,
        "n_jets": n_jets,
    }


def pt_hat_study(process, n_events, seed=0, pt_hat_min=250.0, cuts=(350, 400, 450, 500)):
    """Fraction of window jets whose event's pT-hat lies below each cut, generated loose.

    A cut C sculpts the window's jet-pT spectrum by at most this fraction.
    Returns ``{"n_jets", "below": {C: fraction}, "jet_pt", "pt_hat"}``.
    """
    source = JetGenerator(process, seed, pt_hat_min=pt_hat_min)
    jet_pt, pt_hat = [], []
    while source.n_events < n_events:
        block = source.next_block()
        jet_pt.append(physics.pt(block["jet_p4"]))
        pt_hat.append(block["pt_hat"])
    jet_pt, pt_hat = np.concatenate(jet_pt), np.concatenate(pt_hat)
    return {
        "n_jets": len(jet_pt),
        "n_events": source.n_events,
        "below": {float(cut): float(np.mean(pt_hat < cut)) for cut in cuts},
        "jet_pt": jet_pt,
        "pt_hat": pt_hat,
    }


def _parse_shard(text):
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/N, e.g. 0/4, got {text!r}") from None
    return index, count


def add_arguments(parser):
    parser.add_argument("out_dir", type=Path, help="dataset folder (train.h5, val.h5, test.h5)")
    parser.add_argument("--train", type=int, default=10_000, help="training jets (half top)")
    parser.add_argument("--val", type=int, default=2_000, help="validation jets")
    parser.add_argument("--test", type=int, default=2_000, help="test jets")
    parser.add_argument("--seed", type=int, default=0, help="base seed of all shards")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: cores)")
    parser.add_argument("--n-max", type=int, default=200, help="constituents kept per jet")
    parser.add_argument(
        "--constituent-pt-min", type=float, default=0.5, help="constituent pT threshold (GeV)"
    )
    parser.add_argument("--shard-jets", type=int, default=SHARD_JETS, help="jets per shard")
    parser.add_argument(
        "--pt-hat-min",
        type=float,
        default=None,
        help="Pythia pT-hat cut for both classes (GeV; default: top "
        f"{PT_HAT_MIN['top']:g}, QCD {PT_HAT_MIN['qcd']:g})",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--shard",
        type=_parse_shard,
        metavar="i/N",
        help="run only shards k with k %% N == i (0 <= i < N), do not merge",
    )
    action.add_argument(
        "--merge", action="store_true", help="only merge finished shards (same options)"
    )
    parser.add_argument("--keep-shards", action="store_true", help="keep shards after merging")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args):
    n_jets = {"train": args.train, "val": args.val, "test": args.test}
    if args.merge:
        recipe = _recipe(args.n_max, args.constituent_pt_min, args.pt_hat_min)
        shards = plan_shards(n_jets, args.seed, args.shard_jets)
        merge_dataset(args.out_dir, shards, recipe, args.seed, keep_shards=args.keep_shards)
    else:
        generate_dataset(
            args.out_dir,
            n_jets,
            seed=args.seed,
            workers=args.workers,
            n_max=args.n_max,
            constituent_pt_min=args.constituent_pt_min,
            shard_jets=args.shard_jets,
            shard=args.shard,
            progress=not args.no_progress,
            keep_shards=args.keep_shards,
            pt_hat_min=args.pt_hat_min,
        )
    if args.shard is None:
        for split in SPLITS:
            path = split_path(args.out_dir, split)
            if path.exists():
                print(f"{path}: {read_info(path)['n_jets']} jets")
    return 0
