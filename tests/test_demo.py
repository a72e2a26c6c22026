"""flowtuner demo: the whole path end to end with few steps (the full run is timed by hand: ~7 min)."""

from __future__ import annotations

import json

from PIL import Image

from flowtuner.cli import main
from flowtuner.demo.dataset import BACKGROUNDS, SHAPE_COLORS, classify, draw_shape


def test_colour_classifier_on_drawn_shapes():
    import random

    rng = random.Random(0)
    for color in SHAPE_COLORS:
        for bg in BACKGROUNDS:
            assert classify(draw_shape(64, color, "circle", bg, rng)) == color
    assert classify(Image.new("RGB", (8, 8), BACKGROUNDS["gray"])) is None


def test_demo_runs_end_to_end_with_few_steps(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--output_dir", str(out), "--train_steps", "20", "--vae_steps", "5"])
    summary = json.loads((out / "summary.json").read_text())
    assert rc == (0 if summary["passed"] else 1)
    assert summary["images"] == 12 * 4 and 0 <= summary["accuracy"] <= 1
    assert Image.open(out / "samples_grid.png").size[0] > 0 and (out / "train" / "loss.png").exists()
    assert (out / "models" / "tokenizer" / "vocab.json").exists() and list((out / "preview").glob("*.png"))
    printed = capsys.readouterr().out
    assert "flowtuner demo: the prompted colour dominates the shape in" in printed
