"""Figure style of the reproduce scripts: mplhep's HEP look, one colour per model.

Teacher in black, Deep Sets in blue, MLPs in orange; a distilled student is
drawn solid and its from-scratch twin dashed, so "with and without KD" reads
at a glance. Figures are saved as PDF and PNG, each written to a temporary
name and renamed.
"""

from pathlib import Path

from paper_kd.atomic import atomic_path

__all__ = ["ROW_STYLES", "label_figure", "save_figure", "use_style"]

ROW_STYLES = {
    "teacher": {"color": "black", "linestyle": "-"},
    "deepset": {"color": "#1f77b4", "linestyle": "--"},
    "deepset_kd": {"color": "#1f77b4", "linestyle": "-"},
    "mlp": {"color": "#ff7f0e", "linestyle": "--"},
    "mlp_kd": {"color": "#ff7f0e", "linestyle": "-"},
    "deepset_aug": {"color": "#2ca02c", "linestyle": ":"},
}


def use_style():
    """Switch matplotlib to a non-interactive backend and the mplhep style."""
    import matplotlib

    matplotlib.use("Agg")
    import mplhep

    mplhep.style.use("CMS")
    matplotlib.rcParams.update({"legend.fontsize": 16, "axes.labelsize": 22})


def label_figure(ax, right_text):
    """A neutral label: simulation, no experiment claimed; ``right_text`` names data and profile."""
    ax.text(0.0, 1.01, "Simulation", transform=ax.transAxes, fontsize=20,
            fontstyle="italic", va="bottom", ha="left")  # fmt: skip
    ax.text(1.0, 1.01, right_text, transform=ax.transAxes, fontsize=16, va="bottom", ha="right")


def save_figure(fig, out_dir, stem):
    """Write ``<stem>.pdf`` and ``<stem>.png`` into ``out_dir``; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, options in ((".pdf", {}), (".png", {"dpi": 150})):
        path = out_dir / f"{stem}{suffix}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, bbox_inches="tight", **options)
        paths.append(path)
    return paths
