"""Sample images during training, through the same sampling code as `flowtuner generate`."""

from __future__ import annotations

from pathlib import Path

from flowtuner.config.prompt_lines import read_prompt_file
from flowtuner.families.base import Conditioning, Denoiser, Family, ImageCodec
from flowtuner.init_images import encode_init_images, init_key
from flowtuner.outputs import save_png
from flowtuner.sampling import Job, check_sampling, check_size, sample_job

# musubi-tuner's sample defaults, except the flow shift: the model's dynamic shift, not a fixed 14.5
SAMPLE_DEFAULTS = dict(height=256, width=256, steps=20, guidance_scale=4.0, flow_shift=None, negative_prompt=" ", seed=42)


def sample_jobs(path: str | Path, family: Family) -> list[Job]:
    jobs = []
    for i, (prompt, overrides) in enumerate(read_prompt_file(path)):
        job = Job(prompt=prompt, **{**SAMPLE_DEFAULTS, "seed": SAMPLE_DEFAULTS["seed"] + i, **overrides})
        family.check_controls(len(job.control_images or ()))
        check_size(job.height, job.width, family.size_step, f"{path}: line {i + 1}: --h/--w")
        check_sampling(job)
        jobs.append(job)
    return jobs


def write_samples(family: Family, denoiser: Denoiser, codec: ImageCodec, jobs: list[Job],
                  conds: dict[tuple, Conditioning], folder: Path, name: str, tag: str) -> list[Path]:
    out = []
    inits = encode_init_images(codec, jobs)  # prompt lines may carry --image / --mask
    for i, job in enumerate(jobs):
        for _, seed, latent in sample_job(denoiser, family, job, conds, init=inits.get(init_key(job))):
            image = codec.decode(latent)[0]
            params = {**{k: v for k, v in vars(job).items() if k != "num_images" and not k.startswith("_")}, "seed": seed, "sampler": job.sampler}
            out.append(save_png(image, folder, params, stem=f"{name}_{tag}_{i:02d}_{seed}"))
    return out
