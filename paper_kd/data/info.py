"""``paper-kd info``: what a canonical jet file holds.

Prints the number of jets, the class balance, and text histograms of the
constituent multiplicity, the jet mass and the jet pT for top and QCD jets
side by side. The jet-pT histogram shows whether the generator's pT-hat cut
sculpted either class inside the selection window; the jet-mass histogram
shows the top peak near 173 GeV that QCD jets lack. ``--figure`` draws the jet
mass of both classes with the mplhep style.

The file is read in slices, without its constituents, so large files are fine.
"""

import json
import logging
from pathlib import Path

import numpy as np

from paper_kd import physics
from paper_kd.data.format import read_info, read_jets

__all__ = ["add_arguments", "format_summary", "main", "plot_mass", "summarize"]

log = logging.getLogger(__name__)

CLASSES = (("top", 1), ("qcd", 0))
MASS_BINS = np.linspace(0.0, 300.0, 16)
READ_JETS = 65_536
BAR_WIDTH = 24


def _pt_bins(provenance, jet_pt, n_bins=10):
    generator = provenance.get("generator")
    window = generator.get("jet_pt_window") if isinstance(generator, dict) else None
    if window is None and len(jet_pt):
        low, high = 10 * np.floor(jet_pt.min() / 10), 10 * np.ceil(jet_pt.max() / 10)
        window = (low, max(high, low + 10))
    return np.linspace(*(window or (0.0, 1.0)), n_bins + 1)


def summarize(path, *, mass_bins=MASS_BINS, multiplicity_bins=None, max_jets=None):
    """Counts and per-class histograms of a canonical file, as a dict of plain values.

    Keys: ``path``, ``n_jets``, ``n_max``, ``source``, ``counts`` (class -> jets),
    ``top_fraction``, and ``multiplicity``, ``mass``, ``pt``, each
    ``{"edges": [...], "top": [...], "qcd": [...], "mean": {class: value}}``
    with raw counts per bin (out-of-range values are not counted in a bin).
    """
    info = read_info(path)
    n_jets = info["n_jets"] if max_jets is None else min(info["n_jets"], int(max_jets))
    columns = {"label": [], "n_constituents": [], "jet_p4": []}
    for start in range(0, n_jets, READ_JETS):
        block = read_jets(path, start, min(start + READ_JETS, n_jets), fields=tuple(columns))
        for name in columns:
            columns[name].append(block[name])
    empty = {"label": np.int8, "n_constituents": np.int32}
    label, multiplicity = (
        np.concatenate(columns[name]) if columns[name] else np.zeros(0, empty[name])
        for name in ("label", "n_constituents")
    )
    jet_p4 = np.concatenate(columns["jet_p4"]) if columns["jet_p4"] else np.zeros((0, 4))
    jet_mass, jet_pt = physics.mass(jet_p4), physics.pt(jet_p4)

    if multiplicity_bins is None:
        # About ten bins of a round width (a multiple of 10) covering every jet.
        largest = max(int(multiplicity.max(initial=0)), 1)
        width = 10 * max(1, int(np.ceil(largest / 100)))
        multiplicity_bins = np.arange(0, width * (largest // width + 1) + 1, width)
    histograms = {
        "multiplicity": (multiplicity, np.asarray(multiplicity_bins, float)),
        "mass": (jet_mass, np.asarray(mass_bins, float)),
        "pt": (jet_pt, _pt_bins(info["provenance"], jet_pt)),
    }
    summary = {
        "path": str(path),
        "n_jets": int(n_jets),
        "n_max": info["n_max"],
        "source": info["provenance"].get("source", "unknown"),
        "counts": {name: int(np.sum(label == value)) for name, value in CLASSES},
        "top_fraction": float(np.mean(label == 1)) if n_jets else float("nan"),
    }
    for key, (values, edges) in histograms.items():
        entry = {"edges": edges.tolist(), "mean": {}}
        for name, value in CLASSES:
            chosen = values[label == value]
            entry[name] = np.histogram(chosen, edges)[0].tolist()
            entry["mean"][name] = float(chosen.mean()) if len(chosen) else float("nan")
        summary[key] = entry
    return summary


def _text_histogram(title, entry, unit):
    totals = {name: max(sum(entry[name]), 1) for name, _ in CLASSES}
    peak = max(
        max(entry[name][i] / totals[name] for name, _ in CLASSES) for i in range(len(entry["top"]))
    )
    suffix = f" {unit}" if unit else ""
    header = f"bin [{unit}]" if unit else "bin"
    lines = [
        f"{title} (fraction per bin; mean top {entry['mean']['top']:.1f}, "
        f"QCD {entry['mean']['qcd']:.1f}{suffix})",
        f"  {header:>15}  {'top':>6} {'':<{BAR_WIDTH}}  {'QCD':>6}",
    ]
    edges = entry["edges"]
    for i in range(len(entry["top"])):
        cells = []
        for name, _ in CLASSES:
            fraction = entry[name][i] / totals[name]
            bar = "#" * round(BAR_WIDTH * fraction / peak) if peak else ""
            cells.append(f"{fraction:6.3f} {bar:<{BAR_WIDTH}}")
        lines.append(f"  {edges[i]:7.0f}-{edges[i + 1]:<7.0f}  {cells[0]}  {cells[1].rstrip()}")
    return "\n".join(lines)


def format_summary(summary):
    """The summary as the text ``paper-kd info`` prints."""
    counts = summary["counts"]
    lines = [
        f"{summary['path']}: {summary['n_jets']} jets (source {summary['source']}, "
        f"n_max {summary['n_max']})",
        f"classes: top {counts['top']}, QCD {counts['qcd']} "
        f"(top fraction {summary['top_fraction']:.3f})",
        "",
        _text_histogram("constituent multiplicity", summary["multiplicity"], ""),
        "",
        _text_histogram("jet mass", summary["mass"], "GeV"),
        "",
        _text_histogram("jet pT in the selection window", summary["pt"], "GeV"),
    ]
    return "\n".join(lines)


def plot_mass(summary, out_path):
    """Draw the normalized jet-mass distributions of top and QCD jets to ``out_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mplhep

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    edges = np.asarray(summary["mass"]["edges"])
    with plt.style.context(mplhep.style.CMS):
        figure, axis = plt.subplots(figsize=(8, 6))
        for name, label in (("top", "top jets"), ("qcd", "QCD jets")):
            counts = np.asarray(summary["mass"][name], float)
            density = counts / max(counts.sum(), 1) / np.diff(edges)
            n_class = summary["counts"][name]
            mplhep.histplot(density, edges, ax=axis, label=f"{label} ({n_class})")
        axis.set_xlabel("jet mass [GeV]")
        axis.set_ylabel("fraction of jets / GeV")
        axis.set_xlim(edges[0], edges[-1])
        axis.legend()
        axis.set_title(Path(summary["path"]).name, fontsize=14, loc="right")
        tmp = out_path.with_name(f".{out_path.name}.tmp{out_path.suffix}")
        figure.savefig(tmp, dpi=100, bbox_inches="tight")
        plt.close(figure)
    tmp.replace(out_path)
    return out_path


def add_arguments(parser):
    parser.add_argument("file", type=Path, help="a canonical jet file (e.g. data/train.h5)")
    parser.add_argument("--figure", type=Path, help="write the jet-mass figure (PNG, PDF) here")
    parser.add_argument("--max-jets", type=int, help="read only the first jets")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def main(args):
    summary = summarize(args.file, max_jets=args.max_jets)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    if args.figure:
        plot_mass(summary, args.figure)
        print(f"figure: {args.figure}")
    return 0
