"""Table 1 of arXiv:2311.14160: teacher and students, size, tagging metrics, invariance.

Usage:
    python reproduce/table1.py [--profile smoke|cpu|paper] [--data-dir DIR]
                               [--teacher-weights FILE] [--update-readme]

Writes ``figures/table1.md``, ``.csv``, ``.tex`` and ``table1.json`` (the
aggregated numbers), prints the table, and logs everything to MLflow
(experiment ``table1``). ``--update-readme`` copies the table and the measured
comparison into the README's Results section.
"""

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paper_kd import experiment  # noqa: E402

README = experiment.REPO_ROOT / "README.md"
RESULTS_START = "<!-- results:start -->"
RESULTS_END = "<!-- results:end -->"


def results_section(results, markdown, published_teacher=None):
    """The README's Results section: the table, the figures and the measured comparison."""
    flags = f"--profile {results['profile']} --update-readme"
    if published_teacher is not None:
        flags += f" --published-teacher .../{Path(published_teacher).name}"
    return "\n".join([
        RESULTS_START,
        f"Produced by `python reproduce/table1.py {flags}` (the last step of `make results`) "
        f"on {results['date']} (commit `{results['git_commit'][:12]}`).",
        "",
        markdown.strip(),
        "",
        "Measured against the paper's two claims (differences of means; error = "
        "standard deviations of the two rows added in quadrature):",
        "",
        experiment.claims(results) or "- (no student pairs in this profile)",
        "",
        "![ROC curves](figures/figure_roc.png) ![Accuracy versus boost](figures/figure_boost.png)",
        RESULTS_END,
    ])  # fmt: skip


def update_readme(section, readme=README):
    text = readme.read_text()
    pattern = re.compile(re.escape(RESULTS_START) + ".*?" + re.escape(RESULTS_END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{readme}: no '{RESULTS_START}' ... '{RESULTS_END}' block to replace")
    experiment.write_atomic(readme, pattern.sub(lambda _: section, text))


def body(exp, args):
    results = exp.collect(args.published_jets)
    markdown, table_csv, latex = experiment.format_table(results)
    out = Path(args.output_dir)
    paths = [
        experiment.write_atomic(out / "table1.md", markdown),
        experiment.write_atomic(out / "table1.csv", table_csv),
        experiment.write_atomic(out / "table1.tex", latex),
        experiment.write_atomic(out / "table1.json", json.dumps(results, indent=1, default=str)),
    ]
    exp.log_artifacts(paths, "tables")
    print(markdown)
    print(experiment.claims(results))
    if args.update_readme:
        update_readme(results_section(results, markdown, args.published_teacher))
    return 0


def main(argv=None):
    def extra_arguments(parser):
        parser.add_argument("--update-readme", action="store_true",
                            help="copy the table into the README's Results section")  # fmt: skip
        parser.add_argument(
            "--published-teacher",
            type=Path,
            default=None,
            help="published LorentzNet state dict (.npz/.pt) to evaluate on the "
            "test jets: the gap between these jets and the reference dataset",
        )
        parser.add_argument("--published-jets", type=int, default=1000,
                            help="test jets for --published-teacher (default 1000)")  # fmt: skip

    return experiment.run_script("table1", __doc__.splitlines()[0], body, argv, extra_arguments)


if __name__ == "__main__":
    sys.exit(main())
