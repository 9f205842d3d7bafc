"""ROC curves of arXiv:2311.14160: background rejection 1/εB versus signal efficiency εS.

Usage:
    python reproduce/figure_roc.py [--profile smoke|cpu|paper] [--data-dir DIR]
                                   [--teacher-weights FILE]

Reuses the models Table 1 trained (same configuration and data) and writes
``figures/figure_roc.pdf`` and ``.png``; logged to MLflow (experiment ``figure_roc``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from paper_kd import experiment, style  # noqa: E402


def plot(results, out_dir):
    """One curve per model (median over seeds of 1/εB at each εS); return the file paths."""
    import matplotlib.pyplot as plt

    style.use_style()
    fig, ax = plt.subplots(figsize=(9, 8))
    for row in results["rows"]:
        eff_signal = np.asarray(row["roc"][0]["eff_signal"])
        eff_background = np.array([curve["eff_background"] for curve in row["roc"]])
        # No background jet passing is not an infinite rejection: such points are not drawn.
        rejection = np.full_like(eff_background, np.nan)
        np.divide(1.0, eff_background, out=rejection, where=eff_background > 0)
        drawn = np.any(np.isfinite(rejection), axis=0)
        median = np.full(eff_signal.shape, np.nan)
        median[drawn] = np.nanmedian(rejection[:, drawn], axis=0)
        auc = row["auc"]
        label = f"{row['label']} (AUC {experiment.format_value(auc)})"
        ax.plot(eff_signal, median, label=label,
                **style.ROW_STYLES[row["row"]])  # fmt: skip
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, 0.8), high * 300)  # room for the legend above the curves
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel(r"Signal efficiency $\varepsilon_S$")
    ax.set_ylabel(r"Background rejection $1/\varepsilon_B$")
    ax.legend(loc="upper right")
    n_test = results["data"]["n_jets"]["test"]
    style.label_figure(ax, f"{n_test:,} test jets, profile {results['profile']}")
    paths = style.save_figure(fig, out_dir, "figure_roc")
    plt.close(fig)
    return paths


def body(exp, args):
    results = exp.collect()
    paths = plot(results, args.output_dir)
    exp.log_artifacts(paths, "figures")
    for path in paths:
        print(path)
    return 0


def main(argv=None):
    return experiment.run_script("figure_roc", __doc__.splitlines()[0], body, argv)


if __name__ == "__main__":
    sys.exit(main())
