"""Sampling options end to end: presets (explicit flags win), model-sampling modes, the CFG function,
inline options in prompt lines, and the `generate --help` / docs catalogue of every method."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from flowtuner.cli import main
from flowtuner.config.prompt_lines import parse_prompt_line
from flowtuner.config.sampling import PRESETS
from flowtuner.errors import ConfigError
from flowtuner.flow.samplers import SAMPLERS
from flowtuner.flow.schedulers import SCHEDULERS
from flowtuner.guidance.methods import METHODS

DOCS = Path(__file__).resolve().parents[1] / "docs"


def generate(tiny_files, out, *extra) -> tuple[torch.Tensor, dict]:
    assert main(["generate", "--model", str(tiny_files["repo"]), "--save_path", str(out), "--device", "cpu",
                 "--image_size", "64", "64", "--seed", "5", "--prompt", "x", "--output_type", "latent", *extra]) == 0
    path = next(Path(out).glob("*.safetensors"))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return load_file(path)["latent"], meta


@pytest.mark.slow
def test_presets_equal_their_flags_and_explicit_flags_win(tmp_path, tiny_files):
    ln3 = str(math.log(3))
    preset, meta = generate(tiny_files, tmp_path / "p", "--preset", "lightning")
    flags, _ = generate(tiny_files, tmp_path / "f", "--guidance_scale", "1", "--infer_steps", "8", "--base_shift", ln3,
                        "--max_shift", ln3, "--shift_terminal", "0")
    assert torch.equal(preset, flags)
    assert json.loads(meta["steps"]) == 8 and json.loads(meta["guidance_scale"]) == 1.0
    _, meta4 = generate(tiny_files, tmp_path / "p4", "--preset", "lightning", "--infer_steps", "4")
    assert json.loads(meta4["steps"]) == 4
    comfy, meta = generate(tiny_files, tmp_path / "c", "--preset", "comfy-qwen", "--infer_steps", "3")
    comfy_flags, _ = generate(tiny_files, tmp_path / "cf", "--scheduler", "simple", "--model_sampling", "aura_flow",
                              "--shift", "3.1", "--cfg_mode", "plain", "--infer_steps", "3")
    assert torch.equal(comfy, comfy_flags) and meta["cfg_mode"] == "plain" and meta["scheduler"] == "simple"


@pytest.mark.slow
def test_cfg_modes_and_model_sampling_modes_change_the_result(tmp_path, tiny_files):
    base = ("--infer_steps", "3")
    rescaled, _ = generate(tiny_files, tmp_path / "r", *base)
    plain, _ = generate(tiny_files, tmp_path / "p", *base, "--cfg_mode", "plain")
    assert (rescaled - plain).abs().max() > 1e-3
    runs = {}
    for name, extra in {"default": (), "aura": ("--shift", "3.1"), "sd3": ("--model_sampling", "sd3", "--shift", "3.1"),
                        "flux": ("--model_sampling", "flux"), "mu": ("--mu", "0.8")}.items():
        runs[name], _ = generate(tiny_files, tmp_path / name, *base, "--scheduler", "simple", *extra)
    assert torch.equal(runs["aura"], runs["sd3"])  # SD3's x1000 multiplier is the family's business: same sigmas
    assert (runs["default"] - runs["aura"]).abs().max() > 1e-3 and (runs["flux"] - runs["mu"]).abs().max() > 1e-3


def test_inline_options_in_prompt_lines(tmp_path, tiny_files):
    prompt, opts = parse_prompt_line("a cat --w 64 --sampler heun --guidance apg:eta=0.5 --guidance cfg_norm --cfg-mode plain "
                                     "--base_shift 0.6 --strength 0.5")
    assert prompt == "a cat" and opts == {"width": 64, "sampler": "heun", "guidance": ["apg:eta=0.5", "cfg_norm"],
                                          "cfg_mode": "plain", "base_shift": 0.6, "strength": 0.5}
    with pytest.raises(ConfigError, match="unknown option --nope"):
        parse_prompt_line("x --nope 1")
    lines = tmp_path / "p.txt"
    lines.write_text("x --guidance apg:eta=0.5 --guidance cfg_norm --sampler heun\n")
    from_file, meta = generate(tiny_files, tmp_path / "l", "--infer_steps", "2", "--from_file", str(lines), "--guidance", "mahiro")
    direct, _ = generate(tiny_files, tmp_path / "d", "--infer_steps", "2", "--sampler", "heun", "--guidance", "apg:eta=0.5",
                         "--guidance", "cfg_norm")
    assert torch.equal(from_file, direct)  # the line's --guidance list replaces the command line's
    assert json.loads(meta["guidance"]) == ["apg:eta=0.5", "cfg_norm"]


@pytest.mark.slow
def test_comfyui_reproduction_options(tmp_path, tiny_files, monkeypatch):
    """A ComfyUI graph's settings: dpmpp_2m_sde starts at the AuraFlow 3.1 table's percent_to_sigma(1e-4), and
    --guidance_layout comfyui gives FreSca's 5-D result (plain CFG at w scale_high, what scale_low = scale_high
    gives on the grid), from flags and from a prompt line alike."""
    from flowtuner.flow import samplers
    from flowtuner.flow.model_sampling import aura_flow

    first = []
    offset = samplers._offset_first_sigma
    monkeypatch.setattr(samplers, "_offset_first_sigma", lambda *a: first.append(float(offset(*a)[0])) or offset(*a))
    base = ("--infer_steps", "2", "--sampler", "dpmpp_2m_sde", "--scheduler", "simple", "--shift", "3.1")
    comfy, meta = generate(tiny_files, tmp_path / "c", *base, "--guidance", "fresca", "--guidance_layout", "comfyui")
    assert first == [pytest.approx(aura_flow(3.1).percent_to_sigma(1e-4), abs=1e-7)] and meta["guidance_layout"] == "comfyui"
    flat, _ = generate(tiny_files, tmp_path / "f", *base, "--guidance", "fresca:scale_low=1.25")
    torch.testing.assert_close(comfy, flat, atol=1e-5, rtol=1e-5)
    lines = tmp_path / "p.txt"
    lines.write_text("x --guidance fresca --guidance-layout comfyui\n")
    from_file, _ = generate(tiny_files, tmp_path / "l", *base, "--from_file", str(lines))
    assert torch.equal(from_file, comfy)
    grid, _ = generate(tiny_files, tmp_path / "g", *base, "--guidance", "fresca")
    assert (grid - comfy).abs().max() > 1e-4
    assert main(["generate", "--model", str(tiny_files["repo"]), "--prompt", "x", "--guidance", "cfg_norm",
                 "--guidance_layout", "comfyui"]) == 2  # changes nothing there: an error, not a silent no-op


def test_help_and_docs_list_every_method(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = capsys.readouterr().out
    docs = (DOCS / "sampling.md").read_text()
    for name in [*SAMPLERS, *SCHEDULERS, *METHODS, *PRESETS, "reference"]:
        assert f"\n  {name} " in help_text, name
        assert f"`{name}`" in docs, name


def test_comfy_qwen_edit_preset_is_the_official_template_and_flags_win():
    from dataclasses import asdict

    from flowtuner.cli import build_parser
    from flowtuner.cli.generate import apply_preset, configure

    def cfg(*argv):
        parser = build_parser()
        args = parser.parse_args(["generate", "--prompt", "x", *argv])
        args.subcommand_argv = ["--prompt", "x", *argv]
        sub = parser._subparsers._group_actions[0].choices["generate"]
        return asdict(configure(apply_preset(args, sub)))

    preset = cfg("--preset", "comfy-qwen-edit")
    flags = cfg("--infer_steps", "20", "--guidance_scale", "2.5", "--scheduler", "simple", "--sampler", "euler",
                "--model_sampling", "aura_flow", "--shift", "3", "--cfg_mode", "plain", "--guidance", "cfg_norm:strength=1")
    assert {k: v for k, v in preset.items() if k != "preset"} == {k: v for k, v in flags.items() if k != "preset"}
    assert cfg("--preset", "comfy-qwen-edit", "--infer_steps", "4", "--guidance_scale", "1")["infer_steps"] == 4
