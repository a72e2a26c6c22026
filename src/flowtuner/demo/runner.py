"""The demo run: every step goes through the same CLI entry points a user types."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from PIL import Image, ImageDraw

from flowtuner.cli import main as cli
from flowtuner.demo.config import DemoConfig
from flowtuner.demo.dataset import (
    BACKGROUNDS, SHAPE_COLORS, SHAPES, caption, classify, draw_pair, edit_caption, write_dataset, write_edit_dataset,
)
from flowtuner.demo.models import build_repo
from flowtuner.errors import FlowtunerError
from flowtuner.families.qwen_image.edit_text import prompt_text
from flowtuner.families.qwen_image.text_encoder import T2I_TEMPLATE

SIZE = 64
GOAL = 0.8
PER_COMBINATION = 6  # images per (colour, shape, background): 216 in all
EDIT_PER_COMBINATION = 2  # pairs per (colour before, colour after, shape, background): 216 in all
EDIT_VERSION = "edit-2509"  # the version most LoRAs are trained for
# One block: at the same CPU time, 1000 steps of one block reach the goal by a wider margin than 500 steps
# of two (95 % against 88 % of 96 samples over two seeds; docs/performance.md).
DIT_LAYERS = 1


class Stopwatch:
    """Seconds per demo stage, for the summary: where a slow machine spends its time."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    def run(self, stage: str, fn, *args):
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - t, 1)

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 1)


def _step(name: str, argv: list[str], allowed: tuple[int, ...] = (0,)) -> None:
    print(f"\n== {name}: flowtuner {' '.join(argv)}", flush=True)
    rc = cli(argv)
    if rc not in allowed:
        raise FlowtunerError(f"demo step '{name}' failed (exit code {rc}).")


def _grid(results: list[tuple[str, Path, str | None, str]], path: Path) -> None:
    cell, cols = SIZE * 2, 12
    rows = (len(results) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (cell + 4), rows * (cell + 18)), (30, 30, 30))
    draw = ImageDraw.Draw(sheet)
    for i, (prompt_color, image, predicted, shape) in enumerate(results):
        x, y = (i % cols) * (cell + 4), (i // cols) * (cell + 18)
        sheet.paste(Image.open(image).resize((cell, cell), Image.Resampling.NEAREST), (x, y + 16))
        ok = predicted == prompt_color
        draw.text((x + 2, y + 2), f"{prompt_color} {shape}"[:20], fill=(120, 255, 120) if ok else (255, 110, 110))
    sheet.save(path)


def _prompts(out: Path, cfg: DemoConfig) -> Path:
    """One prompt per colour and shape, backgrounds taking turns; noise seeds follow --seed and never repeat.
    With --edit each line also gets a fresh control image: the shape in another colour, which the prompt changes."""
    lines, colors = [], list(SHAPE_COLORS)
    for k, (color, shape) in enumerate((c, s) for c in SHAPE_COLORS for s in SHAPES):
        background = list(BACKGROUNDS)[k % len(BACKGROUNDS)]
        seed = 1000 * (cfg.seed + 1) + k * cfg.samples_per_prompt
        if cfg.edit:
            before = colors[(colors.index(color) + 1 + k % 3) % len(colors)]
            control = out / "sample_controls" / f"{k:02d}_{before}_{shape}.png"
            control.parent.mkdir(parents=True, exist_ok=True)
            draw_pair(SIZE, before, color, shape, background, cfg.seed * 1000 + k)[0].save(control)
            lines.append(f"{edit_caption(shape, color)} --ci {control} --d {seed}")
        else:
            lines.append(f"{caption(color, shape, background)} --d {seed}")
    path = out / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _prompted(prompt: str, edit: bool) -> tuple[str, str]:
    """(colour, shape) a sample's prompt asks for."""
    words = prompt.split()
    return (words[3], words[2]) if edit else (words[1], words[2])


def run_demo(cfg: DemoConfig) -> dict:
    cfg = cfg.check()
    out = Path(cfg.output_dir)
    if out.exists():
        shutil.rmtree(out)
    if cfg.family == "sdxl":
        from flowtuner.demo.sdxl import run_sdxl_demo

        return run_sdxl_demo(cfg)
    clock = Stopwatch()
    images, controls = out / "dataset", out / "controls"
    if cfg.edit:
        captions = clock.run("dataset", write_edit_dataset, images, controls, SIZE, EDIT_PER_COMBINATION, cfg.seed)
        print(f"dataset: {len(captions)} image pairs in {images} (targets) and {controls} (controls)")
    else:
        captions = clock.run("dataset", write_dataset, images, SIZE, PER_COMBINATION, cfg.seed)
        print(f"dataset: {len(captions)} images in {images}")
    repo = out / "models"
    pictures = sorted(images.glob("*.png")) + sorted(controls.glob("*.png"))  # the VAE learns both
    template = (lambda c: prompt_text(EDIT_VERSION, c, 1)) if cfg.edit else T2I_TEMPLATE.format
    built = build_repo(repo, captions, pictures, cfg.seed, cfg.vae_steps, DIT_LAYERS, clock, template)
    print(f"tiny models in {repo}: tokenizer of {built['vocab']} tokens, VAE reconstruction MSE {built['vae_mse']:.4f}")
    config = out / "dataset.toml"
    config.write_text(f'[general]\nresolution = {SIZE}\ncaption_extension = ".txt"\nbatch_size = {cfg.batch_size}\n\n'
                      f'[[datasets]]\nimage_directory = "{images}"\ncache_directory = "{out / "cache"}"\n'
                      + (f'control_directory = "{controls}"\n' if cfg.edit else ""))
    model = ["--model", str(repo), "--device", cfg.device] + (["--model_version", EDIT_VERSION] if cfg.edit else [])
    clock.run("dataset check", _step, "dataset check",
              ["dataset", "check", "--dataset_config", str(config), "--preview", str(out / "preview")])
    clock.run("cache latents", _step, "cache latents", ["cache-latents", "--dataset_config", str(config), *model])
    clock.run("cache text", _step, "cache text", ["cache-text", "--dataset_config", str(config), *model])
    train_dir = out / "train"
    clock.run("train", _step, "train", [
        "finetune", "--dataset_config", str(config), *model, "--output_dir", str(train_dir), "--output_name", "demo",
        "--max_train_steps", str(cfg.train_steps), "--learning_rate", str(cfg.learning_rate), "--seed", str(cfg.seed),
        "--lr_scheduler", "cosine", "--lr_warmup_steps", "0.05", "--save_precision", "fp32", "--max_data_loader_n_workers", "0",
        # the colour is decided at high noise: sigmas shifted towards it reach the goal in fewer steps (92 % against
        # 81 % after 400 steps; the default qwen_shift hardly shifts at 16 image tokens)
        "--timestep_sampling", "shift", "--discrete_flow_shift", "3"])
    prompts = _prompts(out, cfg)
    samples = out / "samples"
    clock.run("sample", _step, "sample", [
        "generate", *model, "--dit", str(train_dir / "demo.safetensors"), "--from_file", str(prompts),
        "--image_size", str(SIZE), str(SIZE), "--infer_steps", str(cfg.sample_steps), "--guidance_scale", "1.0",
        "--num_images", str(cfg.samples_per_prompt), "--save_path", str(samples),
        # the control at the output size for the VAE, as the training caches hold it (the dataset default)
        *(["--resize_control_to_image_size"] if cfg.edit else [])])
    return _score(out, samples, cfg, clock)


def _score(out: Path, samples: Path, cfg: DemoConfig, clock: Stopwatch) -> dict:
    results = []
    for path in sorted(samples.glob("*.png")):
        params = json.loads(Image.open(path).text["flowtuner"])
        color, shape = _prompted(params["prompt"], cfg.edit)
        results.append((color, path, classify(Image.open(path)), shape))
    correct = sum(pred == color for color, _, pred, _ in results)
    accuracy = correct / max(1, len(results))
    _grid(results, out / "samples_grid.png")
    summary = {"images": len(results), "correct": correct, "accuracy": accuracy, "goal": GOAL,
               "passed": accuracy >= GOAL, "seconds": clock.total(), "stage_seconds": clock.seconds,
               "config": asdict(cfg), "grid": str(out / "samples_grid.png"), "loss_curve": str(out / "train" / "loss.png")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in clock.seconds.items() if v >= 0.5)
    task = "the shape takes the colour the edit asks for" if cfg.edit else "the prompted colour dominates the shape"
    text = (f"flowtuner demo{' --edit' if cfg.edit else ''}: {task} in {correct}/{len(results)} samples "
            f"({accuracy:.0%}; goal {GOAL:.0%}) after {cfg.train_steps} training steps; {summary['seconds']} s in all "
            f"({stages}).\nsample grid: {summary['grid']}\nloss curve: {summary['loss_curve']}\n")
    (out / "summary.txt").write_text(text)
    print("\n" + text)
    return summary
