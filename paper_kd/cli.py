"""The ``paper-kd`` command line: one subcommand per step of the pipeline.

Each subcommand lives in the module that does the work; that module defines
``add_arguments(parser)`` and ``main(args) -> int``. Modules are imported only
when their command runs, so ``paper-kd --help`` stays fast.
"""

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "generate": ("paper_kd.data.generate", "simulate top and QCD jets with Pythia 8 and FastJet"),
    "convert": ("paper_kd.data.readers", "convert a public dataset to the canonical format"),
    "info": ("paper_kd.data.info", "counts, balance and histograms of a jet file"),
    "parity": ("paper_kd.models.parity", "compare Keras models with published logits"),
    "convert-weights": ("paper_kd.models.weights", "convert a PyTorch checkpoint to Keras"),
    "train": ("paper_kd.train", "train a teacher or a student from a YAML config"),
    "evaluate": ("paper_kd.evaluate", "tagging metrics and the boost scan, as JSON"),
    "bench": ("paper_kd.bench", "measure speed against this machine's limits"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    summary = __doc__.splitlines()[0].replace("``", "")  # plain text, not reST
    parser = argparse.ArgumentParser(prog="paper-kd", description=summary)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)

    known, _ = parser.parse_known_args(argv)
    if known.command is None:
        parser.print_help()
        return 2

    module = importlib.import_module(COMMANDS[known.command][0])
    command_parser = argparse.ArgumentParser(
        prog=f"paper-kd {known.command}", description=COMMANDS[known.command][1]
    )
    command_parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    module.add_arguments(command_parser)
    position = argv.index(known.command)
    args = command_parser.parse_args(argv[:position] + argv[position + 1 :])
    logging.basicConfig(
        level=logging.DEBUG if (args.verbose or known.verbose) else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(module.main(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as error:
        # Bad input is reported in one line; a bug still gets its traceback with -v.
        if args.verbose:
            raise
        print(f"paper-kd {known.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
