"""Readers of public jet datasets, converting them to the canonical format (``paper-kd convert``).

Three layouts are read, always in chunks so a 4 GB file never sits in memory:

- ``toptagging``: the Top Quark Tagging Reference Dataset (Kasieczka et al.,
  arXiv:1902.09914), pandas HDF5 files ``train.h5``, ``val.h5``, ``test.h5`` with
  key ``table`` and columns ``E_0, PX_0, PY_0, PZ_0, ..., PZ_199``, ``truthE``,
  ``truthPX``, ``truthPY``, ``truthPZ``, ``ttv`` and ``is_signal_new`` (1 = top);
- ``lorentznet``: the same jets as converted for LorentzNet (arXiv:2201.08187),
  h5py files ``train.h5``, ``valid.h5``, ``test.h5`` with ``Pmu`` ``[n, 200, 4]``,
  ``Nobj``, ``is_signal`` (the class) and ``label`` (there a per-constituent
  mask, not the class);
- ``qg``: energyflow's Pythia or Herwig quark/gluon jets (arXiv:1810.05165),
  ``QG_jets*.npz`` files in energyflow's cache with ``X`` ``[n, m, 4]`` rows
  ``(pt, y, phi, pid)`` and ``y`` (1 = quark). Quark jets are written as the
  signal class (label 1), gluon jets as label 0. Four-momenta come from
  ``energyflow.p4s_from_ptyphipids``, so constituents carry their PDG masses.

Treatment of bad input: a missing file, key or column, NaN or infinite
momenta, negative energies and labels other than 0/1 stop the conversion with
a one-line ``JetFormatError`` naming the file and the field. Jets without
constituents are dropped and counted in a warning; jets with more than
``n_max`` constituents keep the ``n_max`` hardest (by pT), counted in a warning.
Constituents are written sorted by decreasing pT.
"""

import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from paper_kd.data.format import JetFormatError, JetWriter

__all__ = [
    "FORMATS",
    "canonical_block",
    "convert",
    "convert_lorentznet",
    "convert_qg",
    "convert_toptagging",
    "qg_cache_files",
]

log = logging.getLogger(__name__)

FORMATS = ("toptagging", "lorentznet", "qg")
DEFAULT_N_MAX = 200
CHUNK_JETS = 20000
COMPONENTS = ("E", "PX", "PY", "PZ")
# Split of the quark/gluon jets recommended by energyflow: 1.6M / 200k / 200k of 2M.
QG_SPLIT = (0.8, 0.1, 0.1)
QG_JETS_PER_FILE = 100000

# File names each reader looks for in a folder, per canonical split.
_SPLIT_FILES = {
    "toptagging": {"train": ("train.h5",), "val": ("val.h5",), "test": ("test.h5",)},
    "lorentznet": {"train": ("train.h5",), "val": ("valid.h5", "val.h5"), "test": ("test.h5",)},
}


class _Counts:
    """Jets read, written, dropped (no constituents) and truncated (over n_max)."""

    def __init__(self):
        self.read = self.written = self.empty = self.truncated = 0

    def report(self, source, n_max):
        if self.empty:
            log.warning("%s: dropped %d jets with no constituents", source, self.empty)
        if self.truncated:
            log.warning(
                "%s: %d jets have more than n_max = %d constituents; kept the %d hardest",
                source,
                self.truncated,
                n_max,
                n_max,
            )
        log.info("%s: wrote %d of %d jets", source, self.written, self.read)


def canonical_block(p4, label, n_max, *, source, field, label_field, first_row=0, counts=None):
    """Validate a block of jets and bring it to the canonical layout.

    Args:
        p4: ``[n, m, 4]`` constituent ``(E, px, py, pz)``; all-zero rows are padding.
        label: ``[n]`` class labels, 1 = signal.
        n_max: constituents kept per jet (the hardest by pT).
        source: file name for error messages.
        field: ``callable(constituent, component) -> str`` naming the input field
            that holds a value, for error messages.
        label_field: name of the input's label field.
        first_row: row of ``p4[0]`` in the file, for error messages.
        counts: a ``_Counts`` to update.

    Returns:
        ``(p4, label)``: float32 ``[n', n_max, 4]`` sorted by decreasing pT and
        int8 ``[n']``, with jets without constituents removed.
    """
    p4 = np.asarray(p4, dtype=np.float32)
    label = np.asarray(label)

    finite = np.isfinite(p4)
    if not finite.all():
        row, constituent, component = np.argwhere(~finite)[0]
        raise JetFormatError(
            f"{source}: field {field(constituent, component)!r} holds NaN or infinite momenta "
            f"(row {first_row + row})"
        )
    negative = p4[..., 0] < 0
    if negative.any():
        row, constituent = np.argwhere(negative)[0]
        raise JetFormatError(
            f"{source}: field {field(constituent, 0)!r} holds a negative energy "
            f"(row {first_row + row}); expected E >= 0"
        )
    valid = (label == 0) | (label == 1)
    if not valid.all():
        row = int(np.argmax(~valid))
        raise JetFormatError(
            f"{source}: field {label_field!r} must be 0 or 1, found {label[row]!r} "
            f"(row {first_row + row})"
        )

    real = np.any(p4 != 0, axis=-1)  # [jet, constituent]
    sort_key = np.where(real, -np.hypot(p4[..., 1], p4[..., 2]), np.inf)
    # The public files are already pT-ordered; sorting them again would cost half the time.
    if not np.all(sort_key[:, 1:] >= sort_key[:, :-1]):
        order = np.argsort(sort_key, axis=1, kind="stable")
        p4 = np.take_along_axis(p4, order[..., None], axis=1)
    n_constituents = real.sum(axis=1)

    kept = n_constituents > 0
    if counts is not None:
        counts.read += len(label)
        counts.empty += int((~kept).sum())
        counts.truncated += int((n_constituents > n_max).sum())
        counts.written += int(kept.sum())
    p4 = p4[kept, :n_max]
    if p4.shape[1] < n_max:
        p4 = np.pad(p4, ((0, 0), (0, n_max - p4.shape[1]), (0, 0)))
    return p4, label[kept].astype(np.int8)


def _resolve_split_files(kind, input_path, output):
    """Pairs ``(input_file, output_file)``: a folder of split files, or one file."""
    input_path, output = Path(input_path), Path(output)
    if not input_path.exists():
        raise JetFormatError(f"{input_path}: no such file or folder")
    if input_path.is_dir():
        if output.suffix == ".h5":
            raise ValueError(f"{output}: the input is a folder, so the output must be a folder")
        pairs = []
        for split, names in _SPLIT_FILES[kind].items():
            found = [input_path / name for name in names if (input_path / name).exists()]
            if found:
                pairs.append((found[0], output / f"{split}.h5"))
        if not pairs:
            expected = sorted({name for names in _SPLIT_FILES[kind].values() for name in names})
            raise JetFormatError(f"{input_path}: holds none of the {kind} files {expected}")
        return pairs

    if output.suffix == ".h5":
        return [(input_path, output)]
    for split, names in _SPLIT_FILES[kind].items():
        if input_path.name in names:
            return [(input_path, output / f"{split}.h5")]
    raise ValueError(
        f"{input_path}: cannot tell its split from the name; give an output file ending in .h5"
    )


def _provenance(kind, input_path, **sizes):
    sizes = {
        key: int(value) if isinstance(value, np.integer) else value for key, value in sizes.items()
    }
    return {
        "source": kind,
        "original_path": str(Path(input_path).resolve()),
        "original_bytes": Path(input_path).stat().st_size,
        "converter": __name__,
        **sizes,
    }


def _toptagging_columns(source, columns):
    """Number of constituents and the ordered four-momentum column names of a frame."""
    present = set(columns)
    n_constituents = 0
    while f"E_{n_constituents}" in present:
        n_constituents += 1
    if n_constituents == 0:
        raise JetFormatError(f"{source}: columns 'E_0', 'PX_0', ... are missing")
    names = [f"{c}_{i}" for i in range(n_constituents) for c in COMPONENTS]
    missing = [name for name in names + ["is_signal_new"] if name not in present]
    if missing:
        raise JetFormatError(f"{source}: column {missing[0]!r} is missing")
    return n_constituents, names


def _convert_toptagging_file(input_file, output_file, n_max, chunk_jets, max_jets):
    import pandas as pd

    try:
        store = pd.HDFStore(input_file, mode="r")
    except (OSError, ValueError) as error:
        raise JetFormatError(f"{input_file}: not a pandas HDF5 file ({error})") from None
    with store:
        if "/table" not in store.keys():
            raise JetFormatError(
                f"{input_file}: key 'table' is missing (found {sorted(store.keys())})"
            )
        storer = store.get_storer("table")
        n_rows = int(storer.nrows if storer.is_table else storer.shape[0])
        n_rows = n_rows if max_jets is None else min(n_rows, int(max_jets))
        columns = store.select("table", start=0, stop=1).columns
        n_original, names = _toptagging_columns(input_file, columns)
        counts = _Counts()

        def field(constituent, component):
            return f"{COMPONENTS[component]}_{constituent}"

        provenance = _provenance(
            "toptagging", input_file, original_jets=n_rows, original_n_max=n_original, n_max=n_max
        )
        with (
            JetWriter(output_file, n_max, provenance) as writer,
            tqdm(total=n_rows, unit="jet", desc=Path(input_file).name, disable=None) as progress,
        ):
            for start in range(0, n_rows, chunk_jets):
                stop = min(start + chunk_jets, n_rows)
                frame = store.select("table", start=start, stop=stop)
                p4 = frame[names].to_numpy(np.float32).reshape(len(frame), n_original, 4)
                p4, label = canonical_block(
                    p4,
                    frame["is_signal_new"].to_numpy(),
                    n_max,
                    source=input_file,
                    field=field,
                    label_field="is_signal_new",
                    first_row=start,
                    counts=counts,
                )
                writer.append(p4, label)
                progress.update(stop - start)
    counts.report(input_file, n_max)
    return Path(output_file)


def convert_toptagging(
    input_path, output, *, n_max=DEFAULT_N_MAX, chunk_jets=CHUNK_JETS, max_jets=None
):
    """Convert Top Quark Tagging Reference Dataset files; returns the written paths.

    ``input_path`` is a folder with ``train.h5``/``val.h5``/``test.h5`` (written to
    the folder ``output``) or one file (written to ``output`` if it ends in ``.h5``,
    else to ``output/<split>.h5``). The truth top four-momentum is not carried over:
    the canonical ``jet_p4`` is the sum of the constituents.
    """
    return [
        _convert_toptagging_file(source, target, n_max, chunk_jets, max_jets)
        for source, target in _resolve_split_files("toptagging", input_path, output)
    ]


def _convert_lorentznet_file(input_file, output_file, n_max, chunk_jets, max_jets):
    import h5py

    try:
        handle = h5py.File(input_file, "r")
    except OSError as error:
        raise JetFormatError(f"{input_file}: not an HDF5 file ({error})") from None
    with handle:
        for key in ("Pmu", "is_signal"):
            if key not in handle:
                raise JetFormatError(
                    f"{input_file}: key {key!r} is missing (found {sorted(handle.keys())})"
                )
        pmu = handle["Pmu"]
        if pmu.ndim != 3 or pmu.shape[-1] != 4:
            raise JetFormatError(f"{input_file}: field 'Pmu' must be [n, m, 4], got {pmu.shape}")
        if handle["is_signal"].shape != pmu.shape[:1]:
            raise JetFormatError(
                f"{input_file}: field 'is_signal' must be [{pmu.shape[0]}], "
                f"got {handle['is_signal'].shape}"
            )
        mask = handle["label"] if "label" in handle else None
        if mask is not None and mask.shape != pmu.shape[:2]:
            raise JetFormatError(
                f"{input_file}: field 'label' (constituent mask) must be {pmu.shape[:2]}, "
                f"got {mask.shape}"
            )
        n_rows = pmu.shape[0] if max_jets is None else min(pmu.shape[0], int(max_jets))
        counts = _Counts()
        provenance = _provenance(
            "lorentznet",
            input_file,
            original_jets=n_rows,
            original_n_max=pmu.shape[1],
            n_max=n_max,
        )
        with (
            JetWriter(output_file, n_max, provenance) as writer,
            tqdm(total=n_rows, unit="jet", desc=Path(input_file).name, disable=None) as progress,
        ):
            for start in range(0, n_rows, chunk_jets):
                stop = min(start + chunk_jets, n_rows)
                p4 = pmu[start:stop]
                if mask is not None:
                    # The mask, not a zero four-vector, marks padding in this layout.
                    p4 = np.where(mask[start:stop][..., None] > 0, p4, 0)
                p4, label = canonical_block(
                    p4,
                    handle["is_signal"][start:stop],
                    n_max,
                    source=input_file,
                    field=lambda constituent, component: "Pmu",
                    label_field="is_signal",
                    first_row=start,
                    counts=counts,
                )
                writer.append(p4, label)
                progress.update(stop - start)
    counts.report(input_file, n_max)
    return Path(output_file)


def convert_lorentznet(
    input_path, output, *, n_max=DEFAULT_N_MAX, chunk_jets=CHUNK_JETS, max_jets=None
):
    """Convert LorentzNet-layout files (``train.h5``, ``valid.h5``, ``test.h5``).

    Input and output are resolved as in ``convert_toptagging``; ``valid.h5``
    becomes ``val.h5``. The class is ``is_signal``; ``label`` is used as the
    constituent mask when present.
    """
    return [
        _convert_lorentznet_file(source, target, n_max, chunk_jets, max_jets)
        for source, target in _resolve_split_files("lorentznet", input_path, output)
    ]


def _qg_urls(generator, with_bc):
    from energyflow.datasets import qg_jets

    if generator not in qg_jets.URLS:
        raise ValueError(f"generator must be one of {sorted(qg_jets.URLS)}, got {generator!r}")
    return qg_jets.URLS[generator]["bc" if with_bc else "nobc"]


def _qg_file_names(generator, with_bc):
    # The dropbox list names every file once and in order (the zenodo list repeats one).
    urls = _qg_urls(generator, with_bc)["dropbox"]
    return [url.split("/")[-1].split("?")[0] for url in urls]


def qg_cache_files(input_path, *, generator="pythia", with_bc=False, n_files=None, download=False):
    """The ``QG_jets*.npz`` files to read, in energyflow's order.

    ``input_path`` is one ``.npz`` file, a folder holding the files, or an
    energyflow ``cache_dir`` (files under ``datasets/``, as
    ``energyflow.qg_jets.load(cache_dir=...)`` stores them). With ``download``,
    missing files are fetched and hash-checked by energyflow.

    Limitation: ``energyflow.qg_jets.load`` itself is not called: it checks a
    sha256 of every cached file (so a cut-down file would be re-downloaded) and
    returns all jets in memory as float64; the files are read here one at a time.
    """
    input_path = Path(input_path).expanduser()
    if input_path.is_file():
        return [input_path]
    if not input_path.exists() and not download:
        raise JetFormatError(f"{input_path}: no such file or folder")
    folder = input_path / "datasets" if (input_path / "datasets").is_dir() else input_path
    names = _qg_file_names(generator, with_bc)[:n_files]

    if download:
        _download_qg(input_path, names, generator, with_bc)
        folder = input_path / "datasets"
    files = [folder / name for name in names if (folder / name).exists()]
    if not files:
        raise JetFormatError(
            f"{folder}: holds no {names[0]}; fetch the files with "
            f"`paper-kd convert --format qg --download {input_path} OUT` or "
            f"energyflow.qg_jets.load(cache_dir={str(input_path)!r})"
        )
    if n_files is not None and len(files) < len(names):
        missing = [name for name in names if not (folder / name).exists()]
        log.warning(
            "%s: %d of %d files missing (%s, ...)", folder, len(missing), len(names), missing[0]
        )
    return files


def _download_qg(cache_dir, names, generator, with_bc):
    from energyflow.datasets import qg_jets
    from energyflow.utils.data_utils import _get_filepath

    urls = _qg_urls(generator, with_bc)
    hashes = qg_jets.HASHES[generator]["bc" if with_bc else "nobc"]["sha256"]
    for index, name in enumerate(names):
        for source in qg_jets.SOURCES:
            url = next((u for u in urls[source] if u.split("/")[-1].split("?")[0] == name), None)
            if url is None:
                continue
            try:
                _get_filepath(name, url, str(cache_dir), file_hash=hashes[index])
                break
            except Exception as error:  # energyflow raises bare Exceptions on network failure
                log.warning("%s: download from %s failed (%s)", name, source, error)
        else:
            raise JetFormatError(f"{cache_dir}: could not download {name} from any source")


def _qg_jets(files, max_jets):
    """Yield ``(file, X, y)`` one file at a time, at most ``max_jets`` jets in all."""
    remaining = np.inf if max_jets is None else int(max_jets)
    for path in files:
        if remaining <= 0:
            return
        try:
            archive = np.load(path)
        except (OSError, ValueError) as error:
            raise JetFormatError(f"{path}: not an .npz file ({error})") from None
        with archive:
            for key in ("X", "y"):
                if key not in archive:
                    raise JetFormatError(
                        f"{path}: key {key!r} is missing (found {sorted(archive.files)})"
                    )
            jets, label = archive["X"], archive["y"]
        if jets.ndim != 3 or jets.shape[-1] < 4 or label.shape != jets.shape[:1]:
            raise JetFormatError(
                f"{path}: field 'X' must be [n, m, 4] rows (pt, y, phi, pid) with 'y' [n], "
                f"got {jets.shape} and {label.shape}"
            )
        take = int(min(remaining, len(label)))
        remaining -= take
        yield path, jets[:take, :, :4], label[:take]


def _qg_p4(rows):
    """``(pt, y, phi, pid)`` rows to ``(E, px, py, pz)``; zero-pT rows are padding."""
    from energyflow import p4s_from_ptyphipids

    finite = np.isfinite(rows[..., :3])
    rows = np.where(finite.all(axis=-1, keepdims=True), rows, 0.0)
    p4 = p4s_from_ptyphipids(rows, error_on_unknown=False)
    p4[rows[..., 0] <= 0] = 0.0
    # Non-finite inputs stay visible to the checks that name the field.
    p4[~finite.all(axis=-1)] = np.nan
    return p4


def convert_qg(
    input_path,
    output_dir,
    *,
    n_max=DEFAULT_N_MAX,
    max_jets=None,
    generator="pythia",
    with_bc=False,
    split=QG_SPLIT,
    chunk_jets=CHUNK_JETS,
    download=False,
):
    """Convert energyflow quark/gluon jets to ``output_dir/{train,val,test}.h5``.

    The jets are split in file order by the fractions ``split`` (energyflow's
    recommended 1.6M/200k/200k of the full 2M). Quark jets (``y = 1``) become
    label 1, gluon jets label 0.
    """
    split = np.asarray(split, dtype=float)
    if split.shape != (3,) or np.any(split < 0) or not np.isclose(split.sum(), 1.0):
        raise ValueError(f"split must be three fractions summing to 1, got {split.tolist()}")
    n_files = None
    if max_jets is not None:
        n_files = int(np.ceil(int(max_jets) / QG_JETS_PER_FILE))
    files = qg_cache_files(
        input_path, generator=generator, with_bc=with_bc, n_files=n_files, download=download
    )
    n_total = 0
    for path in files:
        with np.load(path) as archive:
            n_total += len(archive["y"]) if "y" in archive else 0
    n_total = n_total if max_jets is None else min(n_total, int(max_jets))
    bounds = np.round(np.cumsum(np.concatenate([[0.0], split])) * n_total).astype(int)

    output_dir = Path(output_dir)
    provenance = _provenance(
        "qg",
        files[0],
        generator=generator,
        with_bc=with_bc,
        original_jets=n_total,
        files=[p.name for p in files],
        n_max=n_max,
        signal="quark",
        split=split.tolist(),
    )
    writers = []
    for i, name in enumerate(("train", "val", "test")):
        rows = {"split_rows": bounds[i : i + 2].tolist()}
        writers.append(JetWriter(output_dir / f"{name}.h5", n_max, {**provenance, **rows}))
    counts = _Counts()
    try:
        offset = 0
        with tqdm(total=n_total, unit="jet", desc="qg", disable=None) as progress:
            for path, rows, label in _qg_jets(files, max_jets):
                for start in range(0, len(label), chunk_jets):
                    stop = min(start + chunk_jets, len(label))
                    # A jet's row in the whole sample decides its split, before any drop.
                    which = np.searchsorted(bounds, offset + np.arange(start, stop), "right") - 1
                    for i, writer in enumerate(writers):
                        selected = np.flatnonzero(which == i) + start
                        if len(selected) == 0:
                            continue
                        p4, block_label = canonical_block(
                            _qg_p4(rows[selected]),
                            label[selected],
                            n_max,
                            source=path,
                            field=lambda constituent, component: "X",
                            label_field="y",
                            first_row=selected[0],
                            counts=counts,
                        )
                        writer.append(p4, block_label)
                    progress.update(stop - start)
                offset += len(label)
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    for writer in writers:
        writer.close()
    counts.report(files[0].parent, n_max)
    return [writer.path for writer in writers]


def convert(kind, input_path, output, **options):
    """Dispatch to ``convert_<kind>``; returns the written paths."""
    converters = {
        "toptagging": convert_toptagging,
        "lorentznet": convert_lorentznet,
        "qg": convert_qg,
    }
    if kind not in converters:
        raise ValueError(f"format must be one of {FORMATS}, got {kind!r}")
    return converters[kind](input_path, output, **options)


def add_arguments(parser):
    parser.add_argument(
        "--format", required=True, choices=FORMATS, dest="kind", help="layout of the input"
    )
    parser.add_argument("input", help="a file, or a folder holding the split files / npz cache")
    parser.add_argument("output", help="output folder (or a .h5 file for a single input file)")
    parser.add_argument(
        "--n-max",
        type=int,
        default=DEFAULT_N_MAX,
        help="constituents kept per jet, the hardest by pT",
    )
    parser.add_argument("--max-jets", type=int, default=None, help="convert only the first jets")
    parser.add_argument("--chunk-jets", type=int, default=CHUNK_JETS, help="jets read at once")
    qg = parser.add_argument_group("qg")
    qg.add_argument("--generator", default="pythia", choices=("pythia", "herwig"))
    qg.add_argument("--with-bc", action="store_true", help="the sample with c and b quark jets")
    qg.add_argument(
        "--download",
        action="store_true",
        help="fetch missing QG_jets files into INPUT (an energyflow cache_dir)",
    )


def main(args):
    options = {"n_max": args.n_max, "max_jets": args.max_jets, "chunk_jets": args.chunk_jets}
    if args.kind == "qg":
        options.update(generator=args.generator, with_bc=args.with_bc, download=args.download)
    elif args.download:
        raise ValueError("--download only applies to --format qg")
    for path in convert(args.kind, args.input, args.output, **options):
        print(path)
    return 0
