"""`flowtuner finetune --fsdp`: FSDP2 refusals and wrap units (fast), and real runs under torchrun with gloo on the
CPU (slow): the weights of 2 sharded processes equal one unsharded process with the same global batch, sharded
states resume on 1 process from 2 and on 2 from 1, and a rank killed mid-run leaves the last state whole."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from flowtuner.cli import main
from flowtuner.errors import ConfigError
from flowtuner.families.qwen_image.family import QwenImageFamily
from flowtuner.families.qwen_image.tiny import tiny_dit
from flowtuner.families.sdxl.family import SDXLFamily
from flowtuner.train import fsdp
from tests.sdxl_models import tiny_unet
from tests.test_distributed import args, assert_same, cached, kill_rank_1_once, torchrun  # noqa: F401 (cached: a fixture)


# ---------------------------------------------------------------- choices and refusals
def cfg_of(**kw):
    base = dict(fsdp=True, fsdp_reshard_after_forward=False, fused_backward_pass=False, full_bf16=False,
                sample_prompts=None, validation_dataset_config=None, mixed_precision="bf16")
    return SimpleNamespace(**{**base, **kw})


def test_flags_and_the_accelerate_config_choose_fsdp2(monkeypatch):
    for k in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_RESHARD_AFTER_FORWARD", "FSDP_OFFLOAD_PARAMS"):
        monkeypatch.delenv(k, raising=False)
    assert fsdp.requested(cfg_of(fsdp=False)) is None
    assert fsdp.requested(cfg_of()) == fsdp.FsdpOptions(False)
    with pytest.raises(ConfigError, match="add --fsdp"):
        fsdp.requested(cfg_of(fsdp=False, fsdp_reshard_after_forward=True))
    # `accelerate launch` with an FSDP config exports these
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "true")
    assert fsdp.requested(cfg_of(fsdp=False)).reshard_after_forward
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="fsdp_version: 2") as err:
        fsdp.requested(cfg_of(fsdp=False))
    assert "\n" not in str(err.value)
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ConfigError, match="fsdp_offload_params"):
        fsdp.requested(cfg_of(fsdp=False))


def test_what_fsdp_refuses_is_one_line():
    opts = fsdp.FsdpOptions()
    with pytest.raises(ConfigError, match="`flowtuner train` under the same launcher without FSDP"):
        fsdp.check(opts, cfg_of(), full=False)  # LoRA: DDP is the tool
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node N"):
        fsdp.check(opts, cfg_of(), full=True)  # no process group: no launcher
    with pytest.raises(ConfigError, match="a sharded \\(FSDP2\\) state; resume it with --fsdp"):
        fsdp.check_resume({"format": "sharded"}, "run/x-state", fsdp=False)
    with pytest.raises(ConfigError, match="without FSDP; resume it without --fsdp"):
        fsdp.check_resume({"weights": {}}, "run/x-state", fsdp=True)
    fsdp.check_resume({"format": "sharded"}, "run/x-state", fsdp=True)


def test_wrap_units_are_the_blocks():
    dit = tiny_dit(layers=2)
    assert fsdp_units_ids(QwenImageFamily(), dit) == [id(b) for b in dit.transformer_blocks]
    unet = tiny_unet()
    units = SDXLFamily().fsdp_units(unet)
    names = {id(m): n for n, m in unet.named_modules()}
    got = [names[id(u)] for u in units]
    assert "mid_block.attentions.0" in got and "mid_block.resnets.1" in got and "up_blocks.0.resnets.0" in got
    assert all(re.fullmatch(r"(down_blocks\.\d|mid_block|up_blocks\.\d)\.(attentions|resnets)\.\d", n) for n in got)
    # every resnet and attention of the UNet is a unit; nothing is wrapped twice
    every = [n for n, _ in unet.named_modules() if re.fullmatch(r".*\.(attentions|resnets)\.\d", n)]
    assert sorted(got) == sorted(every) and len(set(got)) == len(got)


def fsdp_units_ids(family, module):
    return [id(u) for u in family.fsdp_units(module)]


# ---------------------------------------------------------------- gradients over gloo (pytorch#162338)
def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def inputs(world: int = 2) -> torch.Tensor:
    return torch.randn(4 * world, 8, generator=torch.Generator().manual_seed(1))


def _grad_worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = mlp()
        family = SimpleNamespace(fsdp_units=lambda m: [m[0], m[2]])
        fsdp.shard(family, model, torch.device("cpu"), fsdp.FsdpOptions())
        model(inputs(world)[rank::world]).pow(2).mean().backward()
        params = list(model.parameters())
        raw = [p.grad.full_tensor() for p in params]
        norm = fsdp.clip_grad_norm_(params, 0.01)
        clipped = [p.grad.full_tensor() for p in params]
        if rank == 0:
            torch.save({"raw": raw, "norm": norm, "clipped": clipped}, out)
    finally:
        torch.distributed.destroy_process_group()


def test_sharded_gradients_and_their_clipping_equal_one_process(tmp_path):
    """FSDP2's reduce-scatter must average (a sum doubles every gradient on 2 ranks), and the clipping norm must be
    the whole gradient's, not one shard's."""
    import torch.multiprocessing as mp

    out = tmp_path / "grads.pt"
    # fork, as accelerate's debug_launcher: the children start without importing anything again
    mp.start_processes(_grad_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=2, join=True,
                       start_method="fork")
    got = torch.load(out)
    model = mlp()
    model(inputs()).pow(2).mean().backward()
    params = list(model.parameters())
    for g, p in zip(got["raw"], params, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
    norm = torch.nn.utils.clip_grad_norm_(params, 0.01)
    torch.testing.assert_close(got["norm"], norm, rtol=1e-5, atol=1e-7)
    assert norm > 0.01  # the clipping acted
    for g, p in zip(got["clipped"], params, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- real processes
FULL = ("--save_precision", "fp32", "--mixed_precision", "no")
# SGD with momentum and no clipping: the update is proportional to the gradient, so a gloo reduce-scatter that
# summed instead of averaging (pytorch#162338) doubles it (AdamW normalises a constant factor away, and clipping
# to a norm hides it); the momentum buffers are optimizer state that resuming must reshard
SGD = ("--optimizer_type", "SGD", "--optimizer_args", "momentum=0.9", "--max_grad_norm", "0", "--learning_rate", "1e-2")


@pytest.mark.slow
def test_fsdp_on_two_processes_equals_one_and_resumes_across_world_sizes(tmp_path, cached, tiny_files):  # noqa: F811
    steps = ("--max_train_steps", "3", *SGD)
    # reference: one unsharded process accumulating the global batch of 2 micro-batches
    assert main(args(cached, tiny_files, tmp_path / "one", "finetune", *FULL, *steps, "--gradient_accumulation_steps", "2")) == 0
    ref = tmp_path / "one/lora.safetensors"
    torchrun(args(cached, tiny_files, tmp_path / "two", "finetune", "--fsdp", *FULL, *steps,
                  "--save_every_n_steps", "1", "--save_state"))
    # a gloo reduce-scatter that summed instead of averaging (pytorch#162338) doubles every step: far off 1e-6
    assert_same(ref, tmp_path / "two/lora.safetensors", atol=2e-6)
    state = tmp_path / "two/lora-step00000001-state"
    assert (state / "sharded/.metadata").is_file()
    assert json.loads((state / "state.json").read_text())["__dict__"]["format"] == "sharded"
    # 1 process from the 2-process state (DCP reshards), keeping the global batch; saves its own sharded states
    torchrun(args(cached, tiny_files, tmp_path / "one_from_two", "finetune", "--fsdp", *FULL, *steps, "--resume", str(state),
                  "--gradient_accumulation_steps", "2", "--save_every_n_steps", "1", "--save_state"), processes=1)
    assert_same(ref, tmp_path / "one_from_two/lora.safetensors", atol=2e-6)
    # 2 processes from the 1-process state at step 2, with FULL_SHARD and recomputed blocks this time: the same numbers
    torchrun(args(cached, tiny_files, tmp_path / "two_from_one", "finetune", "--fsdp", "--fsdp_reshard_after_forward",
                  "--gradient_checkpointing", *FULL,
                  *steps, "--resume", str(tmp_path / "one_from_two/lora-step00000002-state")))
    assert_same(ref, tmp_path / "two_from_one/lora.safetensors", atol=2e-6)


@pytest.mark.slow
def test_a_killed_fsdp_rank_leaves_the_last_sharded_state_valid(tmp_path, cached, tiny_files):  # noqa: F811
    out = tmp_path / "two"
    # AdamW (its state resharded 2 -> 1 below) and the bf16 autocast
    proc = torchrun(args(cached, tiny_files, out, "finetune", "--fsdp", *FULL, "--mixed_precision", "bf16",
                         "--max_train_steps", "100000",
                         "--save_every_n_steps", "2", "--save_state"), wait=False)
    kill_rank_1_once(proc, out / "lora-step00000004-state")
    states = sorted(out.glob("lora-step*-state"))
    last = states[-1]
    step = int(re.search(r"step(\d+)", last.name).group(1))
    assert step >= 4
    # the last state resumes on one process and trains a step further
    torchrun(args(cached, tiny_files, tmp_path / "after", "finetune", "--fsdp", *FULL, "--resume", str(last),
                  "--max_train_steps", str(step + 1), "--gradient_accumulation_steps", "2"), processes=1)
    after = load_file(str(tmp_path / "after/lora.safetensors"))
    assert after and all(torch.isfinite(v).all() for v in after.values())


@pytest.mark.slow
def test_sdxl_unet_shards_by_attention_and_resnet_and_saves_the_same_checkpoint(tmp_path):
    """SDXL's units (28 attentions and resnets of the tiny UNet) and its ldm single-file save from gathered weights."""
    import numpy as np
    from PIL import Image

    from tests.sdxl_models import tiny_sdxl, write_single_file
    from tests.shared import shared_path

    ckpt = write_single_file(tmp_path / "tiny_sdxl.safetensors", *tiny_sdxl(0))
    images = tmp_path / "images"
    images.mkdir()
    for i, rgb in enumerate([(220, 30, 30), (30, 200, 60), (40, 60, 220), (240, 240, 240)]):
        Image.fromarray(np.full((64, 64, 3), rgb, dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a square {i}")
    config = tmp_path / "dataset.toml"
    config.write_text(f'[general]\nresolution = 64\ncaption_extension = ".txt"\nbatch_size = 1\n\n'
                      f'[[datasets]]\nimage_directory = "{images}"\ncache_directory = "{tmp_path / "cache"}"\n')
    model = ["--model_version", "sdxl", "--model", str(ckpt)]
    data = ["--dataset_config", str(config), "--device", "cpu"]
    assert main(["cache-latents", *data, *model]) == 0
    assert main(["cache-text", *data, *model, "--tokenizer", str(shared_path("fixtures/tokenizers/clip"))]) == 0
    train = [*data, *model, "--prediction_type", "flow", "--max_train_steps", "2", "--seed", "1",
             "--max_data_loader_n_workers", "0", *FULL, *SGD]
    assert main(["finetune", *train, "--output_dir", str(tmp_path / "one"), "--gradient_accumulation_steps", "2"]) == 0
    run = torchrun(["finetune", *train, "--output_dir", str(tmp_path / "two"), "--fsdp"])
    assert "28 block units + the root" in run.stdout + run.stderr
    assert_same(tmp_path / "one/lora.safetensors", tmp_path / "two/lora.safetensors", atol=2e-6)  # VAE and CLIPs too
