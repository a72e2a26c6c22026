"""The model-family seam: the family is chosen once from --model_version through the registry, and the
model-specific defaults and names shared code uses come from that family object."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from flowtuner import families
from flowtuner.config.models import resolve_model_version
from flowtuner.config.train import TrainConfig
from flowtuner.errors import ConfigError
from flowtuner.families.qwen_image import QwenImageFamily

SRC = Path(__file__).resolve().parents[1] / "src" / "flowtuner"


class OtherFamily(QwenImageFamily):
    """Qwen-Image's code under other names and defaults: whatever shared code reads must follow."""

    name = "other"
    network_module = "networks.lora_other"
    default_timestep_sampling = "uniform"
    lora_blocks = "layers"


@pytest.fixture
def other_registered(monkeypatch):
    monkeypatch.setitem(families.FAMILIES, "other", OtherFamily)
    monkeypatch.setitem(families.VERSIONS, "edit", families.Version("Other", "other"))


def test_original_runs_qwen_image_and_unregistered_versions_are_refused():
    cfg = TrainConfig()
    assert resolve_model_version(cfg) == "original" and isinstance(families.family_for(cfg), QwenImageFamily)
    cfg.model_version = "layered"
    with pytest.raises(ConfigError, match="--model_version layered: Qwen-Image-Layered is not available yet"):
        families.family_for(cfg)


def test_the_registry_decides_what_runs_and_the_family_supplies_the_defaults(other_registered):
    from flowtuner.train.loop import Trainer

    cfg = TrainConfig(edit=True, output_dir="unused")
    assert resolve_model_version(cfg) == "edit"  # no "not available yet": the registry has a family for it
    trainer = Trainer(cfg)
    assert isinstance(trainer.family, OtherFamily)
    assert trainer.cfg.timestep_sampling == "uniform"  # the family's default, resolved once
    assert Trainer(TrainConfig(edit=True, timestep_sampling="sigma")).cfg.timestep_sampling == "sigma"  # a flag wins
    Trainer(TrainConfig(edit=True, network_module="networks.lora_other"))
    with pytest.raises(ConfigError, match=r"networks\.lora_qwen_image: unknown; use lora \(networks\.lora_other is accepted\)"):
        Trainer(TrainConfig(edit=True, network_module="networks.lora_qwen_image"))


def test_kohya_names_are_read_with_the_familys_block_path():
    from flowtuner.train.lora_formats import parse_lora

    down, up = torch.zeros(2, 8), torch.zeros(8, 2)
    tensors = {"lora_unet_layers_3_attn_to_q.lora_down.weight": down, "lora_unet_layers_3_attn_to_q.lora_up.weight": up}
    assert list(parse_lora(tensors, {}, *OtherFamily().lora_names(), "x")) == ["layers.3.attn.to_q"]
    with pytest.raises(ConfigError, match="matches no LoRA-able layer"):
        parse_lora(tensors, {}, *QwenImageFamily().lora_names(), "x")


def test_guidance_at_or_below_one_skips_the_unconditional_pass():
    from flowtuner.guidance import guided_model, runs_uncond

    assert not runs_uncond(1.0) and runs_uncond(1.01)
    calls = []

    def predict(x, sigma, cond):
        calls.append(cond)
        return x

    guided_model(predict, "c", "u", 1.0, -1)(torch.zeros(1), torch.ones(1))
    guided_model(predict, "c", "u", 2.0, -1)(torch.zeros(1, 2), torch.ones(1))
    assert calls == ["c", "c", "u"]


def _code_strings(tree: ast.AST):
    """String constants that are values, not text: docstrings, help texts (opt(...), Flag(...)) and
    musubi-tuner's sampler names (register(...)) are left out."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            skip.add(id(body[0].value))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("opt", "Flag", "register"):
            skip.update(id(n) for n in ast.walk(node) if isinstance(n, ast.Constant))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node


def test_shared_code_names_no_model():
    """Outside families/ (and the demo, which builds its own Qwen-Image models, and the ComfyUI patch for ComfyUI's
    Qwen model) no value in the code names a
    model: no family picked by name, no network module, block path or timestep default of Qwen-Image."""
    names = {"qwen_image", "networks.lora_qwen_image", "qwen_shift"}
    offenders = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        # comfyui/patches.py patches ComfyUI's own Qwen DiT (its block keys), not a flowtuner family
        if rel.startswith(("families/", "demo/")) or rel == "comfyui/patches.py":
            continue
        for node in _code_strings(ast.parse(path.read_text(encoding="utf-8"))):
            if node.value in names or "transformer_blocks" in node.value:
                offenders.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert not offenders, "\n".join(offenders)


def test_model_version_selects_the_family_on_dataset_check_sigmas_and_convert_lora(tmp_path, capsys):
    from flowtuner.cli import main

    dataset = tmp_path / "d.toml"
    dataset.write_text('[general]\nresolution = 64\n[[datasets]]\nimage_directory = "nowhere"\n')
    for argv in (["dataset", "check", "--dataset_config", str(dataset)], ["sigmas", "--steps", "2"],
                 ["convert-lora", str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"), "--format", "kohya"]):
        assert main([*argv, "--model_version", "layered"]) == 2
        err = capsys.readouterr().err.strip()
        assert "--model_version layered: Qwen-Image-Layered is not available yet" in err and "\n" not in err, (argv, err)
    assert main(["sigmas", "--steps", "2", "--model_version", "original"]) == 0
    assert capsys.readouterr().out.startswith('{"reference": [1.0, ')


def _version(tmp_path, **flags):
    cfg = TrainConfig(**flags)
    return resolve_model_version(cfg)


def test_the_files_name_the_version_where_they_are_unambiguous(tmp_path, monkeypatch, caplog):
    import json

    monkeypatch.setitem(families.VERSIONS, "edit-2511", families.Version("Qwen-Image-Edit-2511", "other"))
    monkeypatch.setitem(families.VERSIONS, "edit-2509", families.Version("Qwen-Image-Edit-2509", "other"))
    repo = tmp_path / "repo"
    (repo / "transformer").mkdir(parents=True)
    (repo / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPlusPipeline"}))
    (repo / "transformer" / "config.json").write_text(json.dumps({"zero_cond_t": False}))
    assert _version(tmp_path, model=str(repo)) == "edit-2509"  # EditPlus pipeline, no zero_cond_t
    (repo / "transformer" / "config.json").write_text(json.dumps({"zero_cond_t": True}))
    assert _version(tmp_path, model=str(repo)) == "edit-2511"
    assert _version(tmp_path, dit=str(repo / "transformer")) == "edit-2511"  # the transformer folder alone says it too
    assert _version(tmp_path, model=str(repo), model_version="EDIT-2511") == "edit-2511"
    with pytest.raises(ConfigError, match=r"^--edit_plus contradicts the model files \(.*zero_cond_t: true: Qwen-Image-Edit-2511\); "
                                          r"drop the flag or pass --model_version edit-2511\.$"):
        _version(tmp_path, model=str(repo), edit_plus=True)
    (repo / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPipeline"}))
    (repo / "transformer" / "config.json").write_text(json.dumps({}))
    assert _version(tmp_path, model=str(repo)) == "edit"
    monkeypatch.setitem(families.VERSIONS, "edit", families.Version("Qwen-Image-Edit"))
    with pytest.raises(ConfigError, match=r"model_index.json names QwenImageEditPipeline: Qwen-Image-Edit is not available yet"):
        _version(tmp_path, model=str(repo))  # detected, and refused in one line like the flag
    single = tmp_path / "qwen_image_edit_2509_bf16.safetensors"
    single.write_bytes(b"")
    with caplog.at_level("WARNING"):
        assert _version(tmp_path, dit=str(single)) == "original"  # a single file says nothing: musubi-tuner only warns
        assert _version(tmp_path, dit=str(single), model_version="edit-2509") == "edit-2509"
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["the DiT file name qwen_image_edit_2509_bf16.safetensors suggests Qwen-Image-Edit, but it runs as "
                        "Qwen-Image; pass --model_version if that is wrong."]
