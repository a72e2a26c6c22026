"""`--progress_file FILE`: the run's progress as JSON lines, for a program watching it (the ComfyUI training node)
rather than a person (who has the console's progress bar, whose text is not meant to be parsed).

One object per line, appended and flushed as it happens:
- at the start: {"step": S, "total": T} (S = 0, or the step a --resume continues from);
- after each optimizer step: {"step": n, "total": T, "loss": the step's loss, "avg_loss": the mean of the last
  (up to) 50 steps (what the progress bar shows), "lr": the learning rate}.
A reader takes complete lines only (one ending in a newline): the last line may be half written. The file is
started afresh by each run; the main process alone writes it.
"""

from __future__ import annotations

import json
from pathlib import Path

from flowtuner.errors import ConfigError


class ProgressFile:
    def __init__(self, path: str | None, total: int, step: int = 0, enabled: bool = True):
        self.file = None
        if not path or not enabled:
            return
        try:
            self.file = open(Path(path), "w", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--progress_file {path}: cannot write it ({exc.strerror}).") from None
        self.total = total
        self._write({"step": step, "total": total})

    def step(self, step: int, loss: float, avg_loss: float, lr: float) -> None:
        if self.file is not None:
            self._write({"step": step, "total": self.total, "loss": loss, "avg_loss": avg_loss, "lr": lr})

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


def read_progress(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """The complete lines written since `offset` (parsed) and the offset after them."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    lines = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return lines, offset + end
