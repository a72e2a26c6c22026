"""LoRA: module selection, file formats both ways, diffusers loading every format flowtuner writes (and
flowtuner reading what diffusers writes), continuing from a file, and generation with LoRAs equal to diffusers'."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from flowtuner.cli import main
from flowtuner.errors import ConfigError
from flowtuner.families.qwen_image import QwenImageFamily
from flowtuner.train.lora import LoRANetwork, LoRAWeights, kohya_name, merge_into, select_modules
from flowtuner.train.lora_formats import FORMATS, parse_lora, read_lora_file, write_lora_file
from tests.reference import reference_pipeline, reference_run
from tests.test_generate_parity import PROMPT, run_cli

FAMILY = QwenImageFamily()
TABLES = FAMILY.lora_names()
STEMS = ["img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1"]


def random_lora(dit, paths=None, rank=4, alpha=8.0, seed=0, shapes=None) -> LoRANetwork:
    torch.manual_seed(seed)
    net = LoRANetwork(dit, paths or FAMILY.lora_default_targets(dit), rank, alpha, shapes=shapes)
    for lora in net.loras.values():
        torch.nn.init.normal_(lora.up.weight, std=0.2)  # non-zero, so the LoRA changes the output
    return net


def mixed_lora(dit) -> LoRANetwork:
    """Block and stem modules, the modulation layers among them, with three (rank, alpha) pairs."""
    paths = FAMILY.lora_default_targets(dit) + STEMS
    shapes = {"transformer_blocks.0.img_mod.1": (2, 3.0), "transformer_blocks.1.txt_mod.1": (2, 3.0), "img_in": (6, 1.5)}
    return random_lora(dit, paths, 4, 8.0, shapes=shapes)


def velocity(dit, seed=0) -> torch.Tensor:
    """The DiT's output on fixed random inputs (a 4 x 6 patch image, 7 text tokens)."""
    g = torch.Generator().manual_seed(seed)
    x, txt = torch.randn(1, 24, 64, generator=g), torch.randn(1, 7, 128, generator=g)
    with torch.no_grad():
        return dit(hidden_states=x, encoder_hidden_states=txt, encoder_hidden_states_mask=torch.ones(1, 7),
                   timestep=torch.tensor([0.6]), img_shapes=[(1, 4, 6)], return_dict=False)[0]


def merged(dit, weights, multiplier=1.0):
    out = copy.deepcopy(dit)
    merge_into(out, weights, multiplier)
    return out


def test_default_targets_are_musubis_and_patterns(tiny_models):
    dit = tiny_models["dit"]
    default = FAMILY.lora_default_targets(dit)
    # all 14 block Linears, modulation included: what musubi-tuner's network trains (tests/test_musubi_lora.py)
    assert len(default) == 2 * 14 and "transformer_blocks.1.txt_mod.1" in default
    assert set(select_modules(dit, default, [], [])) == set(default)
    for pattern in (r".*(_mod_).*", r".*_mod\.1"):  # kohya-style and dotted patterns both match
        assert len(select_modules(dit, default, [], [pattern])) == 2 * 12
    with_stems = select_modules(dit, default, ["img_in", "proj_out"], [])
    assert {"img_in", "proj_out"} <= set(with_stems)


@pytest.mark.parametrize("fmt", FORMATS)
def test_formats_round_trip(tmp_path, tiny_models, fmt):
    net = mixed_lora(tiny_models["dit"])
    write_lora_file(net.weights(), tmp_path / "l.safetensors", fmt)
    back = read_lora_file(tmp_path / "l.safetensors", *TABLES)
    assert set(back) == set(net.paths)
    for path, w in net.weights().items():
        assert back[path].rank == w.rank
        torch.testing.assert_close(back[path].delta(), w.delta(), atol=1e-6, rtol=1e-5)


def test_diffusers_metadata_is_what_diffusers_writes(tmp_path, tiny_models):
    """diffusers' save_lora_weights stores the PEFT config with every field prefixed `transformer.`; without the
    prefix its loader sees no config (KeyError 'model_type'). Ours: a subset of its fields, same values."""
    from diffusers import QwenImagePipeline
    from diffusers.training_utils import _collate_lora_metadata
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    dit = copy.deepcopy(tiny_models["dit"])
    targets = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mod.1", "img_in"]
    dit.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, rank_pattern={"img_in": 2},
                               alpha_pattern={"img_in": 2}))
    QwenImagePipeline.save_lora_weights(tmp_path / "d", transformer_lora_layers=get_peft_model_state_dict(dit),
                                        **_collate_lora_metadata({"transformer": dit}))
    ours = random_lora(tiny_models["dit"], targets, 4, 4.0, shapes={"img_in": (2, 2.0)})
    write_lora_file(ours.weights(), tmp_path / "ours.safetensors", "diffusers")
    theirs_raw, ours_raw = (safe_open(str(p), "pt").metadata() for p in (tmp_path / "d/pytorch_lora_weights.safetensors",
                                                                       tmp_path / "ours.safetensors"))
    assert ours_raw["format"] == theirs_raw["format"] == "pt"
    theirs, mine = json.loads(theirs_raw["lora_adapter_metadata"]), json.loads(ours_raw["lora_adapter_metadata"])
    assert set(mine) <= set(theirs) and all(k.startswith("transformer.") for k in mine)
    listed = "transformer.target_modules"  # diffusers writes a set as a list in arbitrary order
    assert {k: v for k, v in mine.items() if k != listed} == {k: theirs[k] for k in mine if k != listed}
    assert sorted(mine[listed]) == sorted(theirs[listed])
    assert ours_raw["lora_adapter_metadata"] == json.dumps(mine, indent=2, sort_keys=True)  # diffusers' layout
    with safe_open(str(tmp_path / "ours.safetensors"), "pt") as f, \
            safe_open(str(tmp_path / "d/pytorch_lora_weights.safetensors"), "pt") as g:
        assert set(f.keys()) == set(g.keys())


@pytest.mark.parametrize("fmt", FORMATS)
def test_diffusers_loads_every_format_we_write(tmp_path, tiny_models, fmt):
    """QwenImagePipeline.load_lora_weights on each of our layouts: the same velocities as our own merge."""
    from diffusers import QwenImagePipeline

    base = tiny_models["dit"]
    net = mixed_lora(base)
    path = tmp_path / f"{fmt}.safetensors"
    write_lora_file(net.weights(), path, fmt)
    ours = velocity(merged(base, read_lora_file(path, *TABLES)))
    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=copy.deepcopy(base))
    pipe.load_lora_weights(str(path))
    theirs = velocity(pipe.transformer)
    assert (theirs - velocity(base)).abs().max() > 0.5  # the LoRA moves the output
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


def test_we_read_what_diffusers_writes(tmp_path, tiny_models):
    """A PEFT adapter with lora_alpha != r and per-module rank / alpha patterns, saved by diffusers (nothing
    folded, alpha only in the metadata): our merge equals diffusers running the adapter."""
    from diffusers import QwenImagePipeline
    from diffusers.training_utils import _collate_lora_metadata
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    dit = copy.deepcopy(tiny_models["dit"])
    dit.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_add_out", "img_mod.1", "proj_out"],
                               rank_pattern={"img_mod.1": 2}, alpha_pattern={"img_mod.1": 5, "proj_out": 1}))
    torch.manual_seed(1)
    for name, p in dit.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    QwenImagePipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(dit),
                                        **_collate_lora_metadata({"transformer": dit}))
    weights = read_lora_file(tmp_path / "pytorch_lora_weights.safetensors", *TABLES)
    assert weights["transformer_blocks.0.img_mod.1"].scale == 2.5 and weights["proj_out"].scale == 0.25
    assert weights["transformer_blocks.1.attn.to_q"].scale == 2.0
    theirs = velocity(dit)
    assert (theirs - velocity(tiny_models["dit"])).abs().max() > 0.1
    torch.testing.assert_close(velocity(merged(tiny_models["dit"], weights)), theirs, atol=2e-5, rtol=1e-5)


def test_other_layouts_parse(tiny_models):
    down, up = torch.randn(2, 128), torch.randn(128, 2)
    path = "transformer_blocks.1.attn.to_add_out"
    bare = parse_lora({f"{path}.lora_down.weight": down, f"{path}.lora_up.weight": up, f"{path}.alpha": torch.tensor(1.0)}, {}, *TABLES, "x")
    peft = parse_lora({f"{path}.lora_A.default.weight": down, f"{path}.lora_B.default.weight": up}, {}, *TABLES, "x")
    assert bare[path].scale == 0.5 and peft[path].scale == 1.0
    # the unprefixed PEFT config that flowtuner wrote before it followed diffusers still reads
    old = parse_lora({f"transformer.{path}.lora_A.weight": down, f"transformer.{path}.lora_B.weight": up},
                     {"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": 2})}, *TABLES, "x")
    assert old[path].scale == 1.0
    with pytest.raises(ConfigError, match="LoHa / LoKr"):
        parse_lora({"lora_unet_transformer_blocks_0_attn_to_q.hada_w1_a": down}, {}, *TABLES, "x.safetensors")
    with pytest.raises(ConfigError, match="matches no LoRA-able layer of this model"):
        parse_lora({"lora_unet_transformer_blocks_0_attn_to_zz.lora_down.weight": down,
                    "lora_unet_transformer_blocks_0_attn_to_zz.lora_up.weight": up}, {}, *TABLES, "x")


def test_continuing_builds_the_files_network_and_refuses_foreign_modules(tiny_models):
    dit = copy.deepcopy(tiny_models["dit"])
    source = mixed_lora(tiny_models["dit"])
    weights = source.weights()
    net = LoRANetwork.from_weights(dit, weights, "f.safetensors", selected=None)
    assert set(net.paths) == set(weights)
    for path, w in weights.items():
        assert (net.module_of(path).rank, net.module_of(path).alpha) == (w.rank, w.alpha)
        torch.testing.assert_close(net.weights()[path].delta(), w.delta())
    assert net.common_shape() == (4, 8.0)
    net.attach()
    torch.testing.assert_close(velocity(dit), velocity(merged(tiny_models["dit"], weights)), atol=2e-5, rtol=1e-5)
    net.detach()

    def one_line_error(weights, **kw):
        with pytest.raises(ConfigError) as info:
            LoRANetwork.from_weights(copy.deepcopy(tiny_models["dit"]), weights, "f.safetensors", **kw)
        assert "\n" not in str(info.value)
        return str(info.value)

    w = weights["transformer_blocks.0.attn.to_q"]
    assert "1 of its 2 LoRA modules are not Linear layers of this DiT (e.g. transformer_blocks.5.attn.to_q)" in \
        one_line_error({"transformer_blocks.0.attn.to_q": w, "transformer_blocks.5.attn.to_q": w})
    assert "not Linear layers" in one_line_error({"transformer_blocks.0.norm1": w})
    wide = LoRAWeights(torch.zeros(4, 256), w.up, 4.0)
    assert "256 -> 128 features in the LoRA, 128 -> 128 in this DiT" in one_line_error({"transformer_blocks.0.attn.to_q": wide})
    assert "patterns select 1" in one_line_error(weights, selected=["transformer_blocks.0.attn.to_q"])
    with pytest.raises(ConfigError, match="--lora_weight x: 1 of its 1 LoRA modules"):
        merge_into(copy.deepcopy(tiny_models["dit"]), {"transformer_blocks.9.attn.to_q": w}, source="--lora_weight x")


def test_alpha_zero_means_rank(tiny_models):
    net = LoRANetwork(tiny_models["dit"], ["img_in"], 4, 0.0)
    assert net.module_of("img_in").alpha == 4.0  # kohya / musubi-tuner: alpha 0 = no scaling


def test_convert_lora_across_all_formats(tmp_path, tiny_models, capsys):
    net = mixed_lora(tiny_models["dit"])
    src = tmp_path / "kohya.safetensors"
    write_lora_file(net.weights(), src, "kohya", {"ss_network_dim": "4", "modelspec.title": "t"})
    previous = src
    for fmt in ("diffusers", "comfyui", "kohya", "diffusers"):
        out = tmp_path / f"{fmt}-{previous.stem}.safetensors"
        assert main(["convert-lora", str(previous), str(out), "--format", fmt]) == 0
        assert f"{len(net.paths)} modules, {fmt} layout" in capsys.readouterr().out
        back = read_lora_file(out, *TABLES)
        for path, w in net.weights().items():
            torch.testing.assert_close(back[path].delta(), w.delta(), atol=1e-6, rtol=1e-5)
        meta = safe_open(str(out), "pt").metadata()
        assert meta["ss_network_dim"] == "4" and meta["modelspec.title"] == "t" and len(meta["sshs_legacy_hash"]) == 8
        previous = out
    last = safe_open(str(tmp_path / "kohya-comfyui-diffusers-kohya.safetensors"), "pt")
    assert any(k.startswith(kohya_name("transformer_blocks.0.img_mod.1")) for k in last.keys())


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, tiny_models):
    path = tmp_path_factory.mktemp("lora") / "kohya.safetensors"
    net = random_lora(tiny_models["dit"])
    write_lora_file(net.weights(), path, "kohya")
    return path, net


def test_generate_with_lora_equals_diffusers_load_lora_weights(tmp_path, tiny_files, tiny_models, qwen_tokenizer, lora_file):
    path, _ = lora_file
    models = {**tiny_models, "dit": copy.deepcopy(tiny_models["dit"])}
    pipe = reference_pipeline(models, qwen_tokenizer)
    base_latent, _ = reference_run(pipe, PROMPT, 64, 96, 4, 4.0, seed=2)
    pipe.load_lora_weights(str(path))
    ref_latent, ref_image = reference_run(pipe, PROMPT, 64, 96, 4, 4.0, seed=2)
    assert (ref_latent - base_latent).abs().max() > 1e-2  # the LoRA matters
    latent, image = run_cli(tmp_path, "--model", str(tiny_files["repo"]), "--lora_weight", str(path),
                            height=64, width=96, cfg=4.0, seed=2)
    torch.testing.assert_close(latent, ref_latent, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_layouts_give_the_same_image_and_multipliers_add(tmp_path, tiny_files, lora_file):
    path, net = lora_file
    repo = ("--model", str(tiny_files["repo"]))
    ref, _ = run_cli(tmp_path / "ref", *repo, "--lora_weight", str(path), height=64, width=64, cfg=4.0, seed=1)
    for fmt in ("diffusers", "comfyui"):
        other = tmp_path / f"{fmt}.safetensors"
        write_lora_file(net.weights(), other, fmt)
        latent, _ = run_cli(tmp_path / fmt, *repo, "--lora_weight", str(other), height=64, width=64, cfg=4.0, seed=1)
        torch.testing.assert_close(latent, ref, atol=1e-5, rtol=0)
    half, _ = run_cli(tmp_path / "half", *repo, "--lora_weight", str(path), str(path), "--lora_multiplier", "0.25", "0.75",
                      height=64, width=64, cfg=4.0, seed=1)
    torch.testing.assert_close(half, ref, atol=1e-5, rtol=0)


def test_save_merged_model(tmp_path, tiny_files, lora_file, capsys):
    path, _ = lora_file
    merged_file = tmp_path / "merged.safetensors"
    assert main(["generate", "--model", str(tiny_files["repo"]), "--lora_weight", str(path),
                 "--save_merged_model", str(merged_file)]) == 0
    repo = str(tiny_files["repo"])
    a, _ = run_cli(tmp_path / "a", "--model", repo, "--lora_weight", str(path), height=64, width=64, cfg=1.0, seed=4)
    b, _ = run_cli(tmp_path / "b", "--model", repo, "--dit", str(merged_file), height=64, width=64, cfg=1.0, seed=4)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
