"""`flowtuner generate` vs diffusers' QwenImagePipeline on the same tiny model and settings.

Two comparisons, each the median of several runs, printed as a ratio (flowtuner / diffusers; <= 1.0
means flowtuner is no slower):
  - end to end: load the weights from the same Hugging Face folder, encode, sample, decode, save a PNG;
  - sampling only: both with their models already in memory.

    python bench/generate_speed.py [--runs 5] [--steps 20] [--size 256 256]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.reference / tests.layouts

from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel  # noqa: E402
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer  # noqa: E402

from flowtuner.config.generate import GenerateConfig  # noqa: E402
from flowtuner.families.qwen_image.tiny import tiny_dit, tiny_text_encoder, tiny_vae  # noqa: E402
from flowtuner.generate import run  # noqa: E402
from tests.layouts import write_hf_repo  # noqa: E402
from tests.reference import reference_pipeline  # noqa: E402

PROMPT = "a red circle on a blue background"


def median_times(ours, theirs, runs: int) -> tuple[float, float]:
    """Medians over `runs` alternating runs (alternating cancels slow drifts of a shared machine)."""
    ours(), theirs()  # warm-up
    times: dict = {ours: [], theirs: []}
    for _ in range(runs):
        for fn in (ours, theirs):
            t = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - t)
    return statistics.median(times[ours]), statistics.median(times[theirs])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, nargs=2, default=[256, 256])
    ap.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[2] / "shared/fixtures/tokenizers/qwen25"))
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    h, w = args.size
    tmp = Path(tempfile.mkdtemp())
    models = {"dit": tiny_dit(layers=4), "vae": tiny_vae(), "te": tiny_text_encoder()}
    repo = write_hf_repo(models, Path(args.tokenizer), tmp / "repo")
    call = dict(prompt=PROMPT, negative_prompt=" ", true_cfg_scale=4.0, height=h, width=w, num_inference_steps=args.steps)

    def ours_e2e():
        run(GenerateConfig(model=str(repo), prompt=PROMPT, image_size=[h, w], infer_steps=args.steps, seed=1,
                           save_path=str(tmp / "out"), device="cpu"))

    def theirs_e2e():
        pipe = reference_pipeline({"dit": QwenImageTransformer2DModel.from_pretrained(repo / "transformer"),
                                   "vae": AutoencoderKLQwenImage.from_pretrained(repo / "vae"),
                                   "te": Qwen2_5_VLForConditionalGeneration.from_pretrained(repo / "text_encoder")},
                                  Qwen2Tokenizer.from_pretrained(repo / "tokenizer"))
        pipe.set_progress_bar_config(disable=True)
        image = pipe(**call, generator=torch.Generator("cpu").manual_seed(1)).images[0]
        image.save(tmp / "diffusers.png")

    from flowtuner.families.qwen_image.family import QwenImageDenoiser
    from flowtuner.families.qwen_image.text_encoder import QwenTextEncoder
    from flowtuner.flow.samplers import euler
    from flowtuner.families.qwen_image.family import SHIFT_LINE
    from flowtuner.flow.schedules import reference_sigmas
    from flowtuner.guidance import guided_model

    pipe = reference_pipeline(models, Qwen2Tokenizer.from_pretrained(repo / "tokenizer"))
    pipe.set_progress_bar_config(disable=True)
    encoder = QwenTextEncoder(models["te"].model.language_model, pipe.tokenizer)
    den = QwenImageDenoiser(models["dit"])

    @torch.no_grad()  # as flowtuner.generate.sample_job runs it
    def ours_sampling():
        cond, uncond = encoder.encode([PROMPT, " "])
        g = den.geometry(h, w)
        model = guided_model(lambda x, s, c: den.predict(x, s, c, g), cond, uncond, 4.0)
        euler(model, den.noise(g, 1), reference_sigmas(args.steps, g.image_tokens, SHIFT_LINE))

    def theirs_sampling():
        pipe(**call, generator=torch.Generator("cpu").manual_seed(1), output_type="latent")

    for name, ours, theirs in (("end to end", ours_e2e, theirs_e2e), ("sampling only", ours_sampling, theirs_sampling)):
        t_ours, t_theirs = median_times(ours, theirs, args.runs)
        print(f"{name:>14}: flowtuner {t_ours:.3f} s, diffusers {t_theirs:.3f} s, ratio {t_ours / t_theirs:.3f}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
