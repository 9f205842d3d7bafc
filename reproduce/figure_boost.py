"""Robustness to Lorentz boosts (arXiv:2311.14160, Fig. 3): accuracy versus boost velocity β.

Usage:
    python reproduce/figure_boost.py [--profile smoke|cpu|paper] [--data-dir DIR]
                                     [--teacher-weights FILE]

Every test jet's constituents are boosted along the profile's direction (x,
as in the paper); the band is the standard deviation over seeds. Reuses the
models Table 1 trained and writes ``figures/figure_boost.pdf`` and ``.png``;
logged to MLflow (experiment ``figure_boost``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from paper_kd import experiment, style  # noqa: E402


def plot(results, out_dir):
    """Accuracy versus β per model, mean over seeds with a ±1σ band; return the file paths."""
    import matplotlib.pyplot as plt

    style.use_style()
    fig, ax = plt.subplots(figsize=(9, 8))
    for row in results["rows"]:
        beta = np.asarray(row["boost"]["beta"])
        mean = np.asarray(row["boost"]["accuracy_mean"])
        std = np.asarray(row["boost"]["accuracy_std"])
        score = experiment.format_value(row["invariance"])
        line_style = style.ROW_STYLES[row["row"]]
        ax.plot(beta, mean, marker="o", markersize=4, label=f"{row['label']} (inv. {score})",
                **line_style)  # fmt: skip
        if np.any(std > 0):
            ax.fill_between(beta, mean - std, mean + std, color=line_style["color"], alpha=0.15,
                            linewidth=0)  # fmt: skip
    ax.axhline(0.5, color="grey", linewidth=1, linestyle=":")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.2, 1.0)  # the legend sits below chance level (0.5), clear of the curves
    ax.set_xlabel(rf"Boost velocity $\beta$ (along {results['direction']})")
    ax.set_ylabel("Accuracy")
    ax.legend(loc="lower left", fontsize=14)
    n_test = results["data"]["n_jets"]["test"]
    style.label_figure(ax, f"{n_test:,} test jets, profile {results['profile']}")
    paths = style.save_figure(fig, out_dir, "figure_boost")
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
    return experiment.run_script("figure_boost", __doc__.splitlines()[0], body, argv)


if __name__ == "__main__":
    sys.exit(main())
