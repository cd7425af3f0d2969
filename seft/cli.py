"""`seft` command line: thin dispatch to one module per verb in seft/commands/.

Each command module defines `NAME`, `HELP`, `add_arguments(parser)` and
`run(args) -> int`. User errors (`SeftError`) print one line and exit 2;
Ctrl-C exits 130 and, because every output is written atomically, leaves
nothing half-written under the output name (`seft finetune` keeps its
checkpoints for --resume and says where).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import SeftError

COMMANDS = ("prune", "finetune", "eval", "validate", "inspect")


def _load(name: str):
    return importlib.import_module(f"seft.commands.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seft",
        description="Prune LLaMA/Mistral-family LMs and repair them with SEFT (Sparsity Evolution Fine-Tuning).",
        epilog="Run `seft COMMAND --help` for a command's options. The embedded default model is `smollm2-135m`.",
    )
    parser.add_argument("--version", action="version", version=f"seft {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = _load(name)
        except ModuleNotFoundError as exc:
            if exc.name != f"seft.commands.{name}":
                raise
            continue  # a verb not built yet
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except SeftError as exc:
        print(f"seft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"seft {args.command}: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
