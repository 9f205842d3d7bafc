"""The ``tf.data`` input pipeline: canonical jet files to padded, masked batches.

``make_dataset`` yields ``({"p4": float32 [B, N, 4], "mask": bool [B, N]}, label int32 [B])``
with ``N`` trimmed to the largest jet of each batch, the model input of every
network in the package. ``load_arrays`` gives the same inputs as numpy arrays
for in-memory evaluation.

How batches are made (all per-batch numpy, no per-jet Python):

- a file whose ``p4`` fits in ``MEMORY_CACHE_BYTES`` is read once and kept in
  memory; a larger file is streamed in blocks of ``READ_BLOCK_JETS`` jets, read
  a window of ``READ_WINDOW_BLOCKS`` blocks at a time in a shuffled block order;
- the shuffle is seeded: the same seed gives the same batches, and each pass
  over the dataset (epoch) reshuffles with the seed ``(seed, epoch)``;
- bucketing by multiplicity sorts jets by their number of constituents inside
  shuffled windows of ``BUCKET_WINDOW_BATCHES`` batches, separately per class,
  and gives every batch the window's share of each class, so its class balance
  follows the dataset's (top jets have more constituents: sorting the two
  classes together would give batches of mostly QCD and batches of mostly top
  jets). A batch's top jets and QCD jets come from ranks drawn at random.

Limitation: bucketing costs a model with BatchNorm accuracy in training, and
only such a model. A first version paired equal ranks of the two classes, so in
every batch the top jets had more constituents than the QCD jets: a cue that
training-mode batch statistics turned into a feature lost at inference (small
Deep Set on synthetic jets: validation accuracy 0.835 unbucketed, 0.795
bucketed). Random ranks remove that cue (the within-batch overlap of the two
multiplicity distributions is the dataset's on average), but the batch
statistics still differ from bucket to bucket. Measured on the ``cpu``
profile's 8,000 generated training jets (48 constituents, 6 epochs, best
validation accuracy, seeds 0 / 1 / 2):

- the paper's Deep Set (BatchNorm): 0.9145 / 0.9195 / 0.9140 unbucketed,
  0.9110 / 0.9095 / 0.9115 bucketed, a gap of 0.5 points (the seed spread is
  0.3); re-estimating the BatchNorm statistics on random batches after training
  does not close it (0.9100 / 0.9095 / 0.9135), so it is learned, not a
  mismatch of the moving statistics;
- the same Deep Set with its BatchNorm layers removed: 0.9070 / 0.9030 / 0.9030
  unbucketed, 0.9045 / 0.9030 / 0.9030 bucketed: the same accuracy;
- the Particle Flow Network (no BatchNorm): 0.8960 / 0.8930 / 0.8920 unbucketed,
  0.8895 / 0.8865 / 0.8960 bucketed (within the spread of the bucketed seeds).

With the paper's 200 constituents, where bucketing saves the most (real over
computed constituents 0.50 unbucketed, 0.79 bucketed), the gap is larger: the
same Deep Set on the same jets (generated again with the QCD cut at 275 GeV, 6
epochs, seeds 0 / 1 / 2) reaches 0.9195 / 0.9185 / 0.9185 unbucketed and
0.9035 / 0.9055 / 0.9030 bucketed; smaller windows (4 batches instead of 32:
padding efficiency 0.65) do not close it (0.9020 / 0.9115 / 0.9105). So
bucketing stays off by default and ``paper-kd train`` warns when it is
turned on for a model with BatchNorm (all of the paper's networks). Inference
is exact either way (every jet is scored on its own), and ``predict_scores``
always batches by multiplicity.
"""

import logging
import os
import time
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from paper_kd.data.format import JetFormatError, read_info, read_jets

__all__ = [
    "BUCKET_WINDOW_BATCHES",
    "MEMORY_CACHE_BYTES",
    "READ_BLOCK_JETS",
    "READ_WINDOW_BLOCKS",
    "assemble_batch",
    "load_arrays",
    "make_dataset",
    "measure_throughput",
    "plan_batches",
]

log = logging.getLogger(__name__)

# Files whose p4 (after the n_max cut) is smaller than this are read into memory once.
MEMORY_CACHE_BYTES = 1 << 30
# Jets per read; a multiple of the format's HDF5 chunk (512 jets) so no chunk is decoded twice.
READ_BLOCK_JETS = 8192
# Blocks read together and shuffled together when a file is streamed.
READ_WINDOW_BLOCKS = 4
# Batches sorted together when bucketing by multiplicity.
BUCKET_WINDOW_BATCHES = 32

_FIELDS = ("p4", "n_constituents", "label")


def _check_path(path):
    path = Path(path)
    if path.is_dir():
        raise JetFormatError(
            f"{path}: is a folder; pass one split's file, e.g. {path / 'train.h5'}"
        )
    return path


def _decode_threads():
    return max(1, min(8, os.cpu_count() or 1))


_DECODE_POOL = None


def _decode_pool():
    global _DECODE_POOL
    if _DECODE_POOL is None:
        _DECODE_POOL = ThreadPoolExecutor(_decode_threads(), thread_name_prefix="jet-decode")
    return _DECODE_POOL


def _decode_chunk(raw, chunk_shape, n_max):
    """Inflate one gzip + byte-shuffle HDF5 chunk of float32 ``p4``; keep ``n_max`` constituents."""
    planes = np.frombuffer(zlib.decompress(raw), np.uint8).reshape(4, -1)  # [byte, value]
    values = np.empty((planes.shape[1], 4), np.uint8)
    for byte in range(4):
        values[:, byte] = planes[byte]
    return values.view("<f4").reshape(chunk_shape)[:, :n_max]


class _P4Reader:
    """Reads ``p4[start:stop, :n_max]`` of a canonical file.

    The canonical files store ``p4`` gzip-compressed with the byte-shuffle
    filter, and inflating is what limits the read rate. When the layout allows,
    the raw chunks are read here and inflated in a thread pool (``zlib``
    releases the GIL), which scales with the cores; otherwise h5py reads.
    """

    def __init__(self, path, n_max):
        self._file = h5py.File(path, "r")
        self._p4 = self._file["p4"]
        self.n_max = n_max
        p4 = self._p4
        self.parallel = (
            p4.compression == "gzip"
            and p4.shuffle
            and not p4.fletcher32
            and p4.scaleoffset is None
            and p4.chunks is not None
            and p4.chunks[1:] == p4.shape[1:]
            and p4.dtype == np.dtype("<f4")
        )

    def read(self, start, stop):
        if not self.parallel or stop <= start:
            return self._p4[start:stop, : self.n_max]
        size = self._p4.chunks[0]
        first = start // size
        chunks = range(first, (stop - 1) // size + 1)
        raws = [self._p4.id.read_direct_chunk((c * size, 0, 0)) for c in chunks]
        jobs = [
            _decode_pool().submit(_decode_chunk, raw, self._p4.chunks, self.n_max)
            if filter_mask == 0
            # A chunk stored without some filter (rare) goes through h5py.
            else None
            for filter_mask, raw in raws
        ]
        parts = [
            job.result() if job is not None else self._p4[c * size : (c + 1) * size, : self.n_max]
            for c, job in zip(chunks, jobs)
        ]
        offset = first * size
        return np.concatenate(parts)[start - offset : stop - offset]


class _JetSource:
    """Jets ``[0, n_jets)`` of one canonical file, whole in memory or as streamed windows.

    Multiplicities and labels (5 bytes a jet) are always held in memory; only
    ``p4`` is streamed.
    """

    def __init__(self, path, n_max=None, max_jets=None, in_memory=None):
        self.path = _check_path(path)
        info = read_info(self.path)
        self.n_jets = info["n_jets"] if max_jets is None else min(int(max_jets), info["n_jets"])
        self.n_max = info["n_max"] if n_max is None else min(int(n_max), info["n_max"])
        small = read_jets(self.path, 0, self.n_jets, ("n_constituents", "label"), self.n_max)
        self.n_constituents, self.label = small["n_constituents"], small["label"]
        self._reader = _P4Reader(self.path, self.n_max)
        if in_memory is None:
            in_memory = self.n_jets * self.n_max * 4 * 4 <= MEMORY_CACHE_BYTES
        blocks = range(0, self.n_jets, READ_BLOCK_JETS)
        self.cached = self._read_blocks(blocks) if in_memory else None
        if self.cached is None:
            self._warn_if_ordered_by_class()
        log.debug(
            "%s: %d jets, n_max %d, %s",
            self.path,
            self.n_jets,
            self.n_max,
            "in memory" if in_memory else "streamed",
        )

    def _read_blocks(self, starts):
        """Jets of the blocks beginning at ``starts``, concatenated in that order."""
        rows = [np.arange(s, min(s + READ_BLOCK_JETS, self.n_jets)) for s in starts]
        rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        p4 = [self._reader.read(s, min(s + READ_BLOCK_JETS, self.n_jets)) for s in starts]
        return {
            "p4": np.concatenate(p4) if p4 else np.zeros((0, self.n_max, 4), np.float32),
            "n_constituents": self.n_constituents[rows],
            "label": self.label[rows],
        }

    def _warn_if_ordered_by_class(self):
        # Limitation: a streamed file is shuffled block by block (READ_BLOCK_JETS jets), so
        # it must already be in random order, as generated, converted and public files are.
        # A file sorted by class would give class-skewed windows and batches.
        fractions = [
            self.label[start : start + READ_BLOCK_JETS].mean()
            for start in range(0, self.n_jets, READ_BLOCK_JETS)
        ]
        if len(fractions) > 1 and np.ptp(fractions) > 0.2:
            log.warning(
                "%s: the top fraction varies from %.2f to %.2f between blocks of %d jets; "
                "streamed batches will not be class-balanced (rewrite the file shuffled)",
                self.path,
                min(fractions),
                max(fractions),
                READ_BLOCK_JETS,
            )

    def windows(self, rng=None):
        """Yield dicts of numpy arrays covering every jet once; block order shuffled by ``rng``.

        While one window is being batched, the next is read in the background.
        """
        if self.cached is not None:
            yield self.cached
            return
        starts = np.arange(0, self.n_jets, READ_BLOCK_JETS)
        if rng is not None:
            starts = rng.permutation(starts)
        groups = [
            starts[i : i + READ_WINDOW_BLOCKS] for i in range(0, len(starts), READ_WINDOW_BLOCKS)
        ]
        with ThreadPoolExecutor(1, thread_name_prefix="jet-read") as ahead:
            pending = ahead.submit(self._read_blocks, groups[0]) if groups else None
            for k in range(len(groups)):
                jets = pending.result()
                if k + 1 < len(groups):
                    pending = ahead.submit(self._read_blocks, groups[k + 1])
                yield jets


# Files held in memory, most recent last: a trainer that builds a dataset every
# epoch (train and validation) reads each file once, not once an epoch.
_MEMORY_SOURCES = OrderedDict()
_MEMORY_SOURCES_KEPT = 2


def _open_source(path, n_max=None, max_jets=None, in_memory=None):
    """A ``_JetSource``; one held in memory is reused while its file is unchanged."""
    path = _check_path(path)
    if in_memory is False or not path.is_file():
        return _JetSource(path, n_max, max_jets, in_memory)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_mtime_ns, stat.st_size, n_max, max_jets)
    if key in _MEMORY_SOURCES:
        _MEMORY_SOURCES.move_to_end(key)
        return _MEMORY_SOURCES[key]
    source = _JetSource(path, n_max, max_jets, in_memory)
    if source.cached is not None:
        _MEMORY_SOURCES[key] = source
        while len(_MEMORY_SOURCES) > _MEMORY_SOURCES_KEPT:
            _MEMORY_SOURCES.popitem(last=False)
    return source


def _balanced_buckets(index, n_constituents, label, batch_size, rng):
    """Split ``index`` (a multiple of ``batch_size`` long) into multiplicity buckets.

    Each class is sorted by multiplicity on its own and cut into one slice per
    batch, sized so that every batch's class fraction matches the window's. Batch
    ``j`` takes the ``j``-th signal slice and a background slice of random rank:
    pairing equal ranks would put the top jets of every batch above its QCD jets
    in multiplicity (top jets have more constituents), a within-batch cue that
    BatchNorm's batch statistics turn into a training-only feature.
    """
    n_batches = len(index) // batch_size
    signal = index[label[index] == 1]
    background = index[label[index] != 1]
    # Stable sorts keep the shuffled order among jets of equal multiplicity.
    signal = signal[np.argsort(n_constituents[signal], kind="stable")]
    background = background[np.argsort(n_constituents[background], kind="stable")]

    edges = np.arange(n_batches + 1) * batch_size
    signal_edges = np.round(len(signal) * edges / max(len(index), 1)).astype(np.int64)
    background_sizes = batch_size - np.diff(signal_edges)
    rank = rng.permutation(n_batches)  # batch rank[r] takes the r-th background slice
    bounds = np.concatenate([[0], np.cumsum(background_sizes[rank])])
    background_slices = [None] * n_batches
    for r, j in enumerate(rank):
        background_slices[j] = background[bounds[r] : bounds[r + 1]]
    return [
        np.concatenate([signal[signal_edges[j] : signal_edges[j + 1]], background_slices[j]])
        for j in range(n_batches)
    ]


def plan_batches(
    n_constituents,
    label,
    batch_size,
    *,
    rng=None,
    bucket=False,
    window_batches=BUCKET_WINDOW_BATCHES,
):
    """Group jet indices into batches of exactly ``batch_size``.

    Args:
        n_constituents: int ``[n_jets]`` multiplicities.
        label: ``[n_jets]`` class labels (1 = top).
        batch_size: jets per batch.
        rng: a ``numpy.random.Generator`` to shuffle with, or ``None`` for file order.
        bucket: sort by multiplicity within windows of ``window_batches`` batches,
            class by class (see ``_balanced_buckets``).

    Returns:
        ``(batches, leftover)``: a list of int index arrays ``[batch_size]`` and
        the fewer than ``batch_size`` indices left over.
    """
    n_jets = len(label)
    order = np.arange(n_jets) if rng is None else rng.permutation(n_jets)
    n_full = n_jets // batch_size * batch_size
    order, leftover = order[:n_full], order[n_full:]
    if not bucket:
        return list(order.reshape(-1, batch_size)), leftover

    batches = []
    window = window_batches * batch_size
    pairing = rng if rng is not None else np.random.default_rng(0)
    for start in range(0, n_full, window):
        batches += _balanced_buckets(
            order[start : start + window], n_constituents, label, batch_size, pairing
        )
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches, leftover


def assemble_batch(jets, index, pad_multiple=1):
    """Model inputs and labels of jets ``index``, padding trimmed to the largest jet.

    With ``pad_multiple > 1`` the width is rounded up to a multiple of it (at most
    the stored width), so a compiled (XLA) step sees a few shapes, not one per batch.
    """
    n_constituents = jets["n_constituents"][index]
    width = max(int(n_constituents.max(initial=0)), 1)
    if pad_multiple > 1:
        width = min(-(-width // pad_multiple) * pad_multiple, jets["p4"].shape[1])
    p4 = jets["p4"][index, :width]  # [batch, width, 4]
    mask = np.arange(width)[None, :] < n_constituents[:, None]  # [batch, width]
    return p4.astype(np.float32, copy=False), mask, jets["label"][index].astype(np.int32)


def _take(jets, index):
    return {name: values[index] for name, values in jets.items()}


def _epoch_batches(
    source, batch_size, *, shuffle, seed, epoch, bucket, drop_remainder, pad_multiple=1
):
    """Yield ``(p4, mask, label)`` numpy batches for one pass over ``source``."""
    rng = np.random.default_rng([seed, epoch]) if shuffle else None
    carry = None
    for jets in source.windows(rng):
        if carry is not None:
            jets = {name: np.concatenate([carry[name], jets[name]]) for name in _FIELDS}
        batches, leftover = plan_batches(
            jets["n_constituents"], jets["label"], batch_size, rng=rng, bucket=bucket
        )
        for index in batches:
            yield assemble_batch(jets, index, pad_multiple)
        carry = _take(jets, leftover)
    if carry is not None and len(carry["label"]) and not drop_remainder:
        yield assemble_batch(carry, np.arange(len(carry["label"])), pad_multiple)


def make_dataset(
    path,
    batch_size,
    *,
    shuffle=False,
    seed=0,
    bucket=False,
    n_max=None,
    repeat=False,
    drop_remainder=False,
    max_jets=None,
    in_memory=None,
    pad_multiple=1,
):
    """A ``tf.data.Dataset`` of model inputs and labels from one canonical file.

    Args:
        path: a canonical jet file (one split, e.g. ``data/train.h5``).
        batch_size: jets per batch.
        shuffle: shuffle with ``seed``; each pass reshuffles with ``(seed, epoch)``.
        bucket: group jets of similar multiplicity (class-balanced, see module doc).
        n_max: keep at most the ``n_max`` hardest constituents per jet.
        repeat: cycle forever, epoch after epoch.
        drop_remainder: drop the last partial batch of each epoch.
        max_jets: use only the first ``max_jets`` jets of the file.
        in_memory: keep the whole file in memory; ``None`` decides from
            ``MEMORY_CACHE_BYTES``.
        pad_multiple: round each batch's width up to a multiple of this (for XLA).

    Returns:
        A dataset of ``({"p4": float32 [B, N, 4], "mask": bool [B, N]}, int32 [B])``.

    Example:
        >>> train = make_dataset("data/train.h5", 256, shuffle=True, bucket=True)
        >>> model.fit(train, epochs=10)
    """
    import tensorflow as tf

    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch_size = int(batch_size)
    source = _open_source(path, n_max=n_max, max_jets=max_jets, in_memory=in_memory)
    passes = {"count": 0}

    def generate():
        # Every iteration of the dataset (a Keras epoch) is a new pass with its own shuffle.
        while True:
            epoch = passes["count"]
            passes["count"] += 1
            yield from _epoch_batches(
                source,
                batch_size,
                shuffle=shuffle,
                seed=seed,
                epoch=epoch,
                bucket=bucket,
                drop_remainder=drop_remainder,
                pad_multiple=pad_multiple,
            )
            if not repeat:
                return

    batch_dim = batch_size if drop_remainder else None
    signature = (
        tf.TensorSpec((batch_dim, None, 4), tf.float32),
        tf.TensorSpec((batch_dim, None), tf.bool),
        tf.TensorSpec((batch_dim,), tf.int32),
    )
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    # A known length lets Keras size its epochs without running out of data first.
    if repeat:
        n_batches = tf.data.INFINITE_CARDINALITY
    elif drop_remainder:
        n_batches = source.n_jets // batch_size
    else:
        n_batches = -(-source.n_jets // batch_size)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(n_batches))
    dataset = dataset.map(lambda p4, mask, label: ({"p4": p4, "mask": mask}, label))
    return dataset.prefetch(tf.data.AUTOTUNE)


def load_arrays(path, n_max=None, max_jets=None):
    """All (or the first ``max_jets``) jets of a file as numpy model inputs.

    Returns:
        ``({"p4": float32 [n, N, 4], "mask": bool [n, N]}, label int32 [n])`` with
        ``N`` the largest multiplicity in the selection (at most ``n_max``).
    """
    source = _open_source(path, n_max=n_max, max_jets=max_jets, in_memory=True)
    p4, mask, label = assemble_batch(source.cached, np.arange(source.n_jets))
    return {"p4": p4, "mask": mask}, label


def measure_throughput(path, batch_size=256, *, n_batches=None, **options):
    """Jets per second ``make_dataset`` delivers with no model attached.

    ``options`` go to ``make_dataset``; ``n_batches`` stops early (default: one pass).
    The first batch is excluded from the timing (it pays for graph set-up and, for
    files in memory, the initial read).

    Returns:
        ``{"jets": int, "batches": int, "seconds": float, "jets_per_s": float,
        "mean_width": float}`` where ``mean_width`` is the mean padded ``N``.
    """
    dataset = make_dataset(path, batch_size, **options)
    iterator = iter(dataset)
    next(iterator)
    jets = batches = width = 0
    start = time.perf_counter()
    for inputs, label in iterator:
        jets += int(label.shape[0])
        width += int(inputs["p4"].shape[1])
        batches += 1
        if n_batches is not None and batches >= n_batches:
            break
    seconds = time.perf_counter() - start
    return {
        "jets": jets,
        "batches": batches,
        "seconds": seconds,
        "jets_per_s": jets / seconds if seconds > 0 else float("nan"),
        "mean_width": width / max(batches, 1),
    }
