"""The canonical on-disk jet format: one HDF5 file per split.

Every dataset the package reads or writes, generated or converted, ends up in
this layout, and everything downstream (pipeline, training, evaluation) reads
only this layout. A dataset is a folder holding ``train.h5``, ``val.h5`` and
``test.h5``.

Datasets in a file:

- ``p4``: float32 ``[n_jets, n_max, 4]``, constituent ``(E, px, py, pz)`` in GeV,
  sorted by decreasing pT, zero-padded;
- ``n_constituents``: int32 ``[n_jets]``, the number of real constituents;
- ``label``: int8 ``[n_jets]``, 1 = top (signal), 0 = QCD (background);
- ``jet_p4``: float32 ``[n_jets, 4]``, the jet four-momentum (from the
  clustering, or the sum of the stored constituents where none is given).

File attributes: ``format``, ``format_version``, ``n_max``, ``complete`` and a
JSON ``provenance`` (source, generator settings, seed, package version) that a
results table quotes.

Files are written to a temporary name and renamed when complete, and carry
``complete = True`` written last: a half-written file never reads as finished.
"""

import json
import logging
import os
from pathlib import Path

import h5py
import numpy as np

__all__ = [
    "FORMAT_NAME",
    "SPLITS",
    "JetFormatError",
    "JetWriter",
    "check_jets",
    "read_info",
    "read_jets",
    "split_path",
    "write_jets",
]

log = logging.getLogger(__name__)

FORMAT_NAME = "paper-kd-jets"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
FIELDS = ("p4", "n_constituents", "label", "jet_p4")
CHUNK_JETS = 512


class JetFormatError(ValueError):
    """A jet file that is missing, incomplete, or not in the expected layout."""


def split_path(data_dir, split):
    """Path of one split's file inside a dataset folder."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return Path(data_dir) / f"{split}.h5"


def check_jets(p4, label, source):
    """Validate one block of jets; raise ``JetFormatError`` naming ``source`` and the field.

    Returns the number of real constituents per jet. Checks: shapes, finite
    momenta, non-negative energies, labels in {0, 1}, padding after the last
    real constituent only.
    """
    p4 = np.asarray(p4)
    label = np.asarray(label)
    if p4.ndim != 3 or p4.shape[-1] != 4:
        raise JetFormatError(f"{source}: field 'p4' must be [n_jets, n_max, 4], got {p4.shape}")
    if label.shape != p4.shape[:1]:
        raise JetFormatError(
            f"{source}: field 'label' must be [n_jets] = [{p4.shape[0]}], got {label.shape}"
        )
    if not np.all(np.isfinite(p4)):
        raise JetFormatError(f"{source}: field 'p4' holds NaN or infinite momenta")
    if np.any(p4[..., 0] < 0):
        raise JetFormatError(f"{source}: field 'p4' holds negative energies")
    if not np.all(np.isin(label, (0, 1))):
        bad = np.unique(label[~np.isin(label, (0, 1))])[:5]
        raise JetFormatError(f"{source}: field 'label' must be 0 or 1, found {bad.tolist()}")

    real = np.any(p4 != 0, axis=-1)
    n_constituents = real.sum(axis=-1).astype(np.int32)
    positions = np.arange(p4.shape[1])
    if np.any(real & (positions >= n_constituents[:, None])):
        raise JetFormatError(f"{source}: field 'p4' has padding before real constituents")
    return n_constituents


def _provenance_attr(provenance):
    from paper_kd import __version__

    merged = {"paper_kd_version": __version__}
    merged.update(provenance or {})
    return json.dumps(merged, sort_keys=True, default=str)


class JetWriter:
    """Append blocks of jets to a canonical file; rename into place on ``close``.

    Use as a context manager: an exception inside the block removes the
    temporary file and leaves any existing file at ``path`` untouched.

    Example:
        >>> with JetWriter("train.h5", n_max=200, provenance={"source": "pythia"}) as w:
        ...     w.append(p4, label)
    """

    def __init__(self, path, n_max, provenance=None, compression="gzip"):
        self.path = Path(path)
        self.n_max = int(n_max)
        self.n_jets = 0
        self._pending, self._pending_jets = [], 0
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = h5py.File(self._tmp, "w")
        chunk = (CHUNK_JETS,)
        options = {"compression": compression, "shuffle": True} if compression else {}
        self._file.create_dataset(
            "p4", (0, self.n_max, 4), np.float32, maxshape=(None, self.n_max, 4),
            chunks=(CHUNK_JETS, self.n_max, 4), **options,
        )  # fmt: skip
        self._file.create_dataset(
            "n_constituents", (0,), np.int32, maxshape=(None,), chunks=chunk, **options
        )
        self._file.create_dataset("label", (0,), np.int8, maxshape=(None,), chunks=chunk, **options)
        self._file.create_dataset(
            "jet_p4", (0, 4), np.float32, maxshape=(None, 4), chunks=(CHUNK_JETS, 4), **options
        )
        self._file.attrs["format"] = FORMAT_NAME
        self._file.attrs["format_version"] = FORMAT_VERSION
        self._file.attrs["n_max"] = self.n_max
        self._file.attrs["complete"] = False
        self._file.attrs["provenance"] = _provenance_attr(provenance)

    def append(self, p4, label, jet_p4=None):
        """Validate and append jets; ``p4`` is ``[n, <= n_max, 4]``, padded to ``n_max`` here."""
        p4 = np.asarray(p4, dtype=np.float32)
        label = np.asarray(label)
        n_constituents = check_jets(p4, label, self.path)
        if p4.shape[1] > self.n_max:
            raise JetFormatError(
                f"{self.path}: field 'p4' has {p4.shape[1]} constituents, more than n_max "
                f"= {self.n_max}"
            )
        if p4.shape[1] < self.n_max:
            p4 = np.pad(p4, ((0, 0), (0, self.n_max - p4.shape[1]), (0, 0)))
        jet_p4 = p4.sum(axis=1) if jet_p4 is None else np.asarray(jet_p4, np.float32)

        self._pending.append(
            {"p4": p4, "n_constituents": n_constituents, "label": label, "jet_p4": jet_p4}
        )
        self._pending_jets += len(p4)
        self.n_jets += len(p4)
        if self._pending_jets >= CHUNK_JETS:
            self.flush()

    def flush(self):
        """Write the buffered jets to the (still temporary) file.

        Blocks are buffered up to a whole chunk: appending a few jets at a time
        would recompress the same partial chunk on every call (measured: the
        writer then cost as much as FastJet in the generator).
        """
        if not self._pending:
            return
        start = self._file["label"].shape[0]
        stop = start + self._pending_jets
        for name in ("p4", "n_constituents", "label", "jet_p4"):
            dataset = self._file[name]
            dataset.resize(stop, axis=0)
            dataset[start:stop] = np.concatenate([block[name] for block in self._pending])
        self._pending, self._pending_jets = [], 0
        self._file.flush()

    def close(self):
        """Mark the file complete and move it to its final name."""
        self.flush()
        self._file.attrs["complete"] = True
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self):
        """Discard what was written; the final path is never touched."""
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def write_jets(path, p4, label, jet_p4=None, provenance=None, n_max=None):
    """Write a whole split at once (atomic); see ``JetWriter``."""
    p4 = np.asarray(p4, dtype=np.float32)
    with JetWriter(path, n_max or p4.shape[1], provenance) as writer:
        for start in range(0, max(len(p4), 1), CHUNK_JETS * 8):
            stop = start + CHUNK_JETS * 8
            jets = None if jet_p4 is None else jet_p4[start:stop]
            writer.append(p4[start:stop], np.asarray(label)[start:stop], jets)
    return Path(path)


def _open_checked(path):
    path = Path(path)
    if not path.exists():
        raise JetFormatError(f"{path}: no such file")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise JetFormatError(f"{path}: not an HDF5 file ({error})") from None
    if handle.attrs.get("format") != FORMAT_NAME:
        handle.close()
        raise JetFormatError(
            f"{path}: attribute 'format' must be {FORMAT_NAME!r}; convert the file first "
            "with `paper-kd convert`"
        )
    if not bool(handle.attrs.get("complete", False)):
        handle.close()
        raise JetFormatError(f"{path}: attribute 'complete' is not set: the write was interrupted")
    for name in FIELDS:
        if name not in handle:
            handle.close()
            raise JetFormatError(f"{path}: field {name!r} is missing")
    return handle


def read_info(path):
    """Size, ``n_max`` and provenance of a canonical file, without reading the jets."""
    with _open_checked(path) as handle:
        return {
            "path": str(path),
            "n_jets": int(handle["label"].shape[0]),
            "n_max": int(handle.attrs["n_max"]),
            "provenance": json.loads(handle.attrs["provenance"]),
        }


def read_jets(path, start=0, stop=None, fields=FIELDS, n_max=None):
    """Read jets ``[start, stop)`` of a canonical file as a dict of numpy arrays.

    ``n_max`` keeps only the leading (hardest) constituents.
    """
    with _open_checked(path) as handle:
        out = {}
        for name in fields:
            if name == "p4":
                out[name] = handle["p4"][start:stop, :n_max]
            else:
                out[name] = handle[name][start:stop]
        if "n_constituents" in out and n_max is not None:
            out["n_constituents"] = np.minimum(out["n_constituents"], n_max)
        return out
