"""flowtuner train: exact resume, Ctrl-C, non-finite loss, config files, previews through the generate
code, validation, and LoRAs that diffusers loads."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flowtuner.cli import main
from tests.datasets import good_dataset


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_files):
    root = tmp_path_factory.mktemp("train")
    cfg = good_dataset(root, sizes=[(64, 64)] * 3 + [(96, 64)] * 3)
    for kind in ("latents", "text"):
        assert main([f"cache-{kind}", "--dataset_config", str(cfg), "--model", str(tiny_files["repo"]), "--device", "cpu"]) == 0
    return cfg


def train(cached, tiny_files, out, *extra, command="train"):
    return main([command, "--dataset_config", str(cached), "--model", str(tiny_files["repo"]), "--device", "cpu",
                 "--output_dir", str(out), "--seed", "3", "--max_data_loader_n_workers", "0", *extra])


RESUME_ARGS = ("--max_train_steps", "20", "--gradient_accumulation_steps", "2", "--network_dropout", "0.1",
               "--lr_scheduler", "cosine", "--lr_warmup_steps", "0.2", "--learning_rate", "1e-3", "--network_dim", "2")


def weights(path):
    return load_file(str(path))


def test_resume_is_bit_identical(tmp_path, cached, tiny_files):
    assert train(cached, tiny_files, tmp_path / "straight", *RESUME_ARGS) == 0
    assert train(cached, tiny_files, tmp_path / "first", *RESUME_ARGS, "--save_every_n_steps", "10", "--save_state") == 0
    state = tmp_path / "first" / "lora-step00000010-state"
    assert train(cached, tiny_files, tmp_path / "resumed", *RESUME_ARGS, "--resume", str(state)) == 0
    a, b = weights(tmp_path / "straight/lora.safetensors"), weights(tmp_path / "resumed/lora.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_up" in k)  # it trained


def test_ctrl_c_saves_a_state_that_resumes_exactly(tmp_path, cached, tiny_files, monkeypatch):
    from flowtuner.train import loop

    assert train(cached, tiny_files, tmp_path / "straight", *RESUME_ARGS) == 0
    original, calls = loop.Trainer.loss, {"n": 0}

    def interrupted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 15:  # mid-way through the accumulation of step 8
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(loop.Trainer, "loss", interrupted)
    assert train(cached, tiny_files, tmp_path / "cut", *RESUME_ARGS) == 130
    monkeypatch.setattr(loop.Trainer, "loss", original)
    state = tmp_path / "cut" / "lora-interrupted-state"
    assert state.is_dir()
    assert train(cached, tiny_files, tmp_path / "cut", *RESUME_ARGS, "--resume", str(state)) == 0
    a, b = weights(tmp_path / "straight/lora.safetensors"), weights(tmp_path / "cut/lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, cached, tiny_files, monkeypatch, capsys):
    from flowtuner.data import loader

    original, calls = loader.CacheDataset.__getitem__, {"n": 0}

    def poisoned(self, batch):
        out = original(self, batch)
        calls["n"] += 1
        if calls["n"] == 4:
            out["latents"] = out["latents"] * float("nan")
        return out

    monkeypatch.setattr(loader.CacheDataset, "__getitem__", poisoned)
    rc = train(cached, tiny_files, tmp_path, "--max_train_steps", "6", "--save_every_n_steps", "2")
    err = capsys.readouterr().err
    assert rc == 2 and "the loss became nan at step 4" in err and "last saved checkpoint is intact" in err
    saved = weights(tmp_path / "lora-step00000002.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert not (tmp_path / "lora.safetensors").exists()


def test_config_file_flags_override_and_patterns(tmp_path, cached, tiny_files):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[model]\nnetwork_dim = 3\nnetwork-alpha = 3.0\n[training]\nmax_train_steps = 2\nlearning_rate = 0.5\n'
                   'network_args = ["exclude_patterns=[\'.*attn.*\']"]\nnetwork_module = "networks.lora_qwen_image"\n')
    assert train(cached, tiny_files, tmp_path / "o", "--config_file", str(cfg), "--network_dim", "5") == 0
    w = weights(tmp_path / "o/lora.safetensors")
    down = [v for k, v in w.items() if k.endswith("lora_down.weight")]
    assert {d.shape[0] for d in down} == {5}  # the flag beats the file
    assert not any("attn" in k for k in w) and len(down) == 2 * 6  # 4 MLP + 2 modulation Linears per block, attention excluded
    assert float(w[next(k for k in w if k.endswith(".alpha"))]) == 3.0


def test_bad_options_are_one_line_errors(tmp_path, cached, tiny_files, capsys):
    for extra, message in ((("--network_module", "lycoris.kohya"), "--network_module lycoris.kohya: unknown"),
                           (("--network_args", "rank_dropout=0.1"), "--network_args rank_dropout: per-rank dropout is not available"),
                           (("--lr_scheduler", "adafactor"), "--lr_scheduler adafactor: not available: it is Adafactor's own"),
                           (("--log_with", "wandb"), "--log_with wandb: wandb is not available"),
                           (("--blocks_to_swap", "99"), "can be swapped"),
                           (("--log_with", "tensorboard"), "needs the tensorboard package"),
                           (("--optimizer_type", "NoSuchOpt"), "--optimizer_type NoSuchOpt: unknown")):
        if extra == ("--log_with", "tensorboard") and importlib.util.find_spec("tensorboard") is not None:
            continue  # installed here: nothing to refuse
        rc = train(cached, tiny_files, tmp_path, "--max_train_steps", "1", *extra)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and message in err and "\n" not in err, err


def test_show_timesteps_writes_a_png(tmp_path, cached, tiny_files):
    out = tmp_path / "t.png"
    assert train(cached, tiny_files, tmp_path, "--show_timesteps", str(out), "--weighting_scheme", "cosmap") == 0
    assert Image.open(out).size == (800, 500)


def test_samples_use_the_generate_code_and_validation_is_repeatable(tmp_path, cached, tiny_files):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 3 --d 9\n"
                       "a blue square --w 64 --h 64 --s 3 --d 4 --sampler heun --guidance apg:eta=0.5 --guidance pag:scale=2\n")
    out = tmp_path / "run"
    assert train(cached, tiny_files, out, "--max_train_steps", "4", "--learning_rate", "0.05", "--save_every_n_steps", "4",
                 "--sample_prompts", str(prompts), "--sample_every_n_steps", "4", "--sample_at_first",
                 "--validation_dataset_config", str(cached)) == 0
    samples = sorted(p.name for p in (out / "sample").glob("*.png"))
    assert samples == ["lora_000000_00_9.png", "lora_000000_01_4.png", "lora_000004_00_9.png", "lora_000004_01_4.png"]
    import numpy as np

    lora = str(out / "lora-step00000004.safetensors")
    for sample, extra in ((samples[2], ["--prompt", "a red circle", "--seed", "9"]),
                          (samples[3], ["--prompt", "a blue square", "--seed", "4", "--sampler", "heun",
                                        "--guidance", "apg:eta=0.5", "--guidance", "pag:scale=2"])):
        gen = tmp_path / f"gen-{sample}"
        assert main(["generate", "--model", str(tiny_files["repo"]), "--lora_weight", lora, "--image_size", "64", "64",
                     "--infer_steps", "3", "--save_path", str(gen), "--device", "cpu", *extra]) == 0
        a = np.asarray(Image.open(out / "sample" / sample)).astype(int)
        b = np.asarray(Image.open(next(gen.glob("*.png")))).astype(int)
        assert np.abs(a - b).max() <= 1, sample
    assert (out / "loss.png").exists()


def test_save_cadence_pruning_continue_and_convert(tmp_path, cached, tiny_files, capsys):
    out = tmp_path / "run"
    assert train(cached, tiny_files, out, "--max_train_steps", "6", "--save_every_n_steps", "2", "--save_last_n_steps", "3",
                 "--save_every_n_epochs", "1", "--learning_rate", "0.01", "--save_format", "comfyui") == 0
    names = sorted(p.name for p in out.glob("*.safetensors"))
    # 4 batches per epoch (buckets of 3 + 3 items, batch 2): epoch 1 ends at step 4; step 2 is pruned
    assert names == ["lora-000001.safetensors", "lora-step00000004.safetensors", "lora-step00000006.safetensors",
                     "lora.safetensors"]
    first = load_file(out / "lora.safetensors")
    assert all(k.startswith("diffusion_model.") for k in first)
    # continue from it: the first step starts from those weights
    assert train(cached, tiny_files, tmp_path / "more", "--max_train_steps", "1", "--learning_rate", "0",
                 "--network_weights", str(out / "lora.safetensors")) == 0
    more = load_file(tmp_path / "more/lora.safetensors")
    ups = lambda sd: sorted(v.float().sum().item() for k, v in sd.items() if "lora_B" in k or "lora_up" in k)  # noqa: E731
    assert ups(more) == pytest.approx(ups(first), abs=1e-6)
    assert main(["convert-lora", str(out / "lora.safetensors"), str(tmp_path / "k.safetensors"), "--format", "kohya"]) == 0
    assert "28 modules, kohya layout" in capsys.readouterr().out
    kohya = load_file(tmp_path / "k.safetensors")
    assert all(k.startswith("lora_unet_transformer_blocks_") for k in kohya)


def test_trained_lora_loads_in_diffusers_with_the_same_image(tmp_path, cached, tiny_files, tiny_models, qwen_tokenizer):
    import copy

    from tests.reference import reference_pipeline, reference_run
    from tests.test_generate_parity import PROMPT, run_cli

    out = tmp_path / "run"
    assert train(cached, tiny_files, out, "--max_train_steps", "6", "--learning_rate", "0.05", "--network_dim", "4",
                 "--network_alpha", "4", "--network_args", "include_patterns=['.*_mod\\.1', 'img_in']") == 0
    lora = out / "lora.safetensors"
    pipe = reference_pipeline({**tiny_models, "dit": copy.deepcopy(tiny_models["dit"])}, qwen_tokenizer)
    base, _ = reference_run(pipe, PROMPT, 64, 96, 4, 4.0, seed=5)
    pipe.load_lora_weights(str(lora))
    ref, _ = reference_run(pipe, PROMPT, 64, 96, 4, 4.0, seed=5)
    assert (ref - base).abs().max() > 1e-3  # the trained LoRA changes the image
    ours, _ = run_cli(tmp_path / "gen", "--model", str(tiny_files["repo"]), "--lora_weight", str(lora),
                      height=64, width=96, cfg=4.0, seed=5)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_gradient_checkpointing_gives_the_same_weights(tmp_path, cached, tiny_files):
    args = ("--max_train_steps", "3", "--learning_rate", "0.01")
    assert train(cached, tiny_files, tmp_path / "a", *args) == 0
    assert train(cached, tiny_files, tmp_path / "b", *args, "--gradient_checkpointing") == 0
    a, b = weights(tmp_path / "a/lora.safetensors"), weights(tmp_path / "b/lora.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_tensorboard_logging(tmp_path, cached, tiny_files, monkeypatch):
    """With a stand-in SummaryWriter (the tensorboard package is not a dependency)."""
    import sys
    import types

    calls = []

    class Writer:
        def __init__(self, logdir):
            calls.append(("init", logdir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, step))

        def add_histogram(self, tag, values, step):
            calls.append((tag, step, len(values)))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    assert train(cached, tiny_files, tmp_path, "--max_train_steps", "130", "--log_with", "tensorboard",
                 "--validation_dataset_config", str(cached), "--validate_every_n_steps", "65") == 0
    tags = {c[0] for c in calls}
    assert {"init", "loss", "lr", "timesteps/sigma", "validation/loss", "close"} <= tags
    assert calls[0] == ("init", str(tmp_path / "logs"))


def test_validation_is_repeatable(tmp_path, cached, tiny_files):
    from flowtuner.config.train import TrainConfig
    from flowtuner.train.loop import Trainer, TrainModule

    cfg = TrainConfig(dataset_config=str(cached), model=str(tiny_files["repo"]), device="cpu", output_dir=str(tmp_path),
                      validation_dataset_config=str(cached), seed=0)
    trainer = Trainer(cfg)
    denoiser = trainer.family.load_denoiser(trainer.family.resolve_paths(model=tiny_files["repo"]), torch.device("cpu"))
    module = TrainModule(denoiser, None)
    validator = trainer._validator(denoiser, torch.device("cpu"))
    first, second = validator(module), validator(module)
    assert first == second and first > 0


def test_lr_schedules_and_missing_optional_packages():
    import importlib.util

    from flowtuner.errors import ConfigError
    from flowtuner.train.optim import make_optimizer, make_schedule

    from flowtuner.train.optim import ScheduleOptions

    p = [torch.nn.Parameter(torch.zeros(1))]
    # 4 steps, 2 of warmup: lr factor at steps 0..3 (transformers' warmup starts at 0, as musubi-tuner's runs do;
    # every schedule is compared with musubi-tuner's get_lr_scheduler in test_musubi_flags.py)
    expected = {"constant": [1, 1, 1, 1], "constant_with_warmup": [0, 0.5, 1, 1], "linear": [0, 0.5, 1, 0.5],
                "cosine": [0, 0.5, 1, 0.5], "cosine_with_min_lr": [0, 0.5, 1, 0.55]}
    for name, lrs in expected.items():
        opt = torch.optim.SGD(p, lr=1.0)
        sched = make_schedule(name, opt, 4, ScheduleOptions(warmup=0 if name == "constant" else 2, min_lr_ratio=0.1))
        got = []
        for _ in range(4):
            got.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert got == pytest.approx(lrs, abs=1e-6), name
    with pytest.raises(ConfigError, match="use constant_with_warmup"):
        make_schedule("constant", torch.optim.SGD(p, lr=1.0), 4, ScheduleOptions(warmup=2))
    assert isinstance(make_optimizer("SGD", p, 0.1, {"momentum": 0.9}), torch.optim.SGD)
    assert isinstance(make_optimizer("torch.optim.Adam", p, 0.1, {}), torch.optim.Adam)
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ConfigError, match="adamw8bit needs bitsandbytes"):
            make_optimizer("adamw8bit", p, 0.1, {})


@pytest.mark.slow
def test_accelerate_launch_runs_the_trainer(tmp_path, cached, tiny_files):
    import subprocess
    import sys

    out = tmp_path / "acc"
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "flowtuner",
                           "train", "--dataset_config", str(cached), "--model", str(tiny_files["repo"]), "--max_train_steps", "2",
                           "--output_dir", str(out), "--seed", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "lora.safetensors").exists()


def test_loraplus_puts_lora_up_at_ratio_times_the_lr_and_verbose_lists_modules(tmp_path, cached, tiny_files, caplog):
    """musubi-tuner's LoRA+: lora_up (B) in its own group at lr x ratio. One plain-SGD step from lora_up = 0: the
    lora_down gradient is zero, so B moves by -lr x ratio x grad and A stays; the ratio shows exactly."""
    import logging

    caplog.set_level(logging.INFO)
    sgd = ("--max_train_steps", "1", "--optimizer_type", "SGD", "--learning_rate", "0.1", "--max_grad_norm", "0",
           "--network_dim", "2")
    assert train(cached, tiny_files, tmp_path / "plain", *sgd) == 0
    assert train(cached, tiny_files, tmp_path / "plus", *sgd, "--network_args", "loraplus_lr_ratio=4", "verbose=True") == 0
    plain, plus = weights(tmp_path / "plain/lora.safetensors"), weights(tmp_path / "plus/lora.safetensors")
    ups = [k for k in plain if k.endswith("lora_up.weight")]
    assert ups and any(plain[k].abs().sum() > 0 for k in ups)
    for k in ups:
        assert torch.allclose(plus[k], 4 * plain[k], rtol=1e-5, atol=1e-12), k
    for k in (k for k in plain if k.endswith("lora_down.weight")):
        assert torch.equal(plus[k], plain[k]), k
    listed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LoRA module ")]
    assert len(listed) == len(ups) and "LoRA module lora_unet_transformer_blocks_0_attn_to_q: rank 2, alpha 1" in listed


def test_musubi_samplers_schedules_and_loraplus_resume_bit_identically(tmp_path, cached, tiny_files):
    """The new pieces keep --resume exact: sigma sampling with a density, cosine_with_restarts, two LoRA+ groups."""
    args = ("--max_train_steps", "6", "--timestep_sampling", "sigma", "--weighting_scheme", "logit_normal",
            "--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_num_cycles", "2", "--lr_warmup_steps", "1",
            "--network_args", "loraplus_lr_ratio=8", "--learning_rate", "1e-3", "--network_dim", "2")
    assert train(cached, tiny_files, tmp_path / "first", *args, "--save_every_n_steps", "3", "--save_state") == 0
    state = tmp_path / "first" / "lora-step00000003-state"
    assert train(cached, tiny_files, tmp_path / "resumed", *args, "--resume", str(state)) == 0
    # saving a state draws no random numbers, so the first run is the straight one
    a, b = weights(tmp_path / "first/lora.safetensors"), weights(tmp_path / "resumed/lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_show_timesteps_image_and_console(tmp_path, cached, tiny_files, capsys):
    """musubi-tuner's --show_timesteps values: image writes OUTPUT_DIR/OUTPUT_NAME_timesteps.png, console prints."""
    assert train(cached, tiny_files, tmp_path, "--show_timesteps", "image", "--timestep_sampling", "sigma") == 0
    assert Image.open(tmp_path / "lora_timesteps.png").size == (800, 500)
    capsys.readouterr()
    assert train(cached, tiny_files, tmp_path, "--show_timesteps", "console", "--timestep_sampling", "uniform") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 20 and lines[0].startswith("0.00-0.05 ") and all(line.endswith("%") for line in lines)
    shares = [float(line.rsplit(" ", 1)[1].rstrip("%")) for line in lines]
    assert sum(shares) == pytest.approx(100, abs=0.1) and max(shares) < 5.5  # uniform: 5 % per bin


@pytest.mark.slow
def test_documented_musubi_commands_train(tmp_path, cached, tiny_files):
    """The LoRA and fine-tuning commands of musubi-tuner's Qwen-Image document, run as written except: tiny model
    files and the cached test dataset for the paths, one epoch, and adamw instead of adamw8bit when bitsandbytes
    is missing."""
    from tests.test_musubi_flags import documented_commands

    comfy = tiny_files["comfy"] / "models"
    paths = {"path/to/dit_model": str(comfy / "diffusion_models/qwen_image_tiny.safetensors"),
             "path/to/vae_model": str(next((comfy / "vae").glob("*.safetensors"))),
             "path/to/text_encoder": str(next((comfy / "text_encoders").glob("*.safetensors"))),
             "path/to/toml": str(cached), "path/to/output_dir": str(tmp_path)}
    runs = [(c, a) for c, a in documented_commands() if c in ("train", "finetune") and "--edit" not in a]
    assert [c for c, _ in runs] == ["train", "finetune"]
    for command, argv in runs:
        argv = [paths.get(t, t) for t in argv]
        argv[argv.index("--max_train_epochs") + 1] = "1"
        if importlib.util.find_spec("bitsandbytes") is None and "adamw8bit" in argv:
            argv[argv.index("adamw8bit")] = "adamw"
        assert main([command, *argv, "--device", "cpu"]) == 0, command
        name = argv[argv.index("--output_name") + 1]
        assert (tmp_path / f"{name}.safetensors").exists()
