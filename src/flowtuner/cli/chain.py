"""`python -m flowtuner.cli.chain JSON`: several flowtuner commands one after another in one process, so that they
share one interpreter start and one import of torch, diffusers and transformers (~5 s per process on a small CPU).
JSON is a list of argument lists, e.g. `[["cache-latents", ...], ["cache-text", ...]]`. It stops at the first
command that fails and exits with its code. Before each command it prints `flowtuner: running COMMAND` on stderr,
so that a program reading the output (the ComfyUI training node) knows whose lines follow.
Not a subcommand: a program's tool, not a user's."""

from __future__ import annotations

import json
import sys

from flowtuner.cli import main

MARKER = "flowtuner: running "


def run(commands: list[list[str]]) -> int:
    for argv in commands:
        print(f"{MARKER}{argv[0]}", file=sys.stderr, flush=True)
        code = main(argv)
        if code:
            return code
    return 0


if __name__ == "__main__":
    raise SystemExit(run(json.loads(sys.argv[1])))
