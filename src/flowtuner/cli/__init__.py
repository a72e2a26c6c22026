"""The `flowtuner` command: one small module per subcommand. User errors become one line, exit 2."""

from __future__ import annotations

import argparse
import logging
import sys

from flowtuner import __version__
from flowtuner.errors import FlowtunerError

# subcommand -> module under flowtuner.cli with `register(subparsers)` and `run(args)`
COMMANDS = ("generate", "dataset", "caching", "train", "plan", "demo", "sigmas", "comfyui")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="flowtuner", description="Fine-tune and run flow-matching image models.")
    parser.add_argument("--version", action="version", version=f"flowtuner {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"flowtuner.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.subcommand_argv = argv[argv.index(args.command) + 1:]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s: %(message)s")
    try:
        return args.handler(args) or 0
    except FlowtunerError as exc:
        print(f"flowtuner {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flowtuner {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        close_process_group()


def close_process_group() -> None:
    """End the process group a multi-process run opened (accelerate opens it, and never closes it). Left to
    interpreter shutdown, gloo's worker threads can still hold tensors whose release needs the GIL while the
    interpreter is being torn down: the process aborts ("terminate called without an active exception",
    SIGABRT) after a run that succeeded, and torchrun reports the run failed (pytorch/pytorch#190489). Seen
    once in CI on a two-process FSDP run."""
    dist = sys.modules.get("torch.distributed")  # no torch import for commands that never loaded it
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
