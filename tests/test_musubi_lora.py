"""flowtuner's LoRA against musubi-tuner's own code (networks.lora_qwen_image, its Qwen-Image DiT, its merge, its
metadata and hash functions): the same default modules, files that load both ways, a musubi LoRA continued by
flowtuner's trainer, and generate merging it as musubi-tuner does."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flowtuner.cli import main
from flowtuner.config.train import TrainConfig
from flowtuner.train.checkpoints import lora_metadata
from flowtuner.train.lora import LoRANetwork, kohya_name, select_modules
from flowtuner.train.lora_formats import read_lora_file, write_lora_file
from tests.datasets import good_dataset
from tests.test_lora import FAMILY, TABLES, mixed_lora, random_lora, velocity

DIT_CONFIG = ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim", "num_attention_heads",
              "joint_attention_dim", "axes_dims_rope")


def musubi_dit(dit):
    """musubi-tuner's own Qwen-Image DiT at the tiny config, holding the tiny diffusers model's weights."""
    from musubi_tuner.qwen_image.qwen_image_model import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(**{k: dit.config[k] for k in DIT_CONFIG})
    model.load_state_dict(dit.state_dict(), strict=True)  # the same module names and shapes as diffusers'
    return model


def musubi_network(dit, dim=4, alpha=1.0, apply=False, **network_args):
    """musubi-tuner's network as its trainer makes it (create_arch_network, then apply_to the DiT)."""
    from musubi_tuner.networks import lora_qwen_image

    network = lora_qwen_image.create_arch_network(1.0, dim, alpha, None, None, dit, **network_args)
    if apply:
        network.apply_to(None, dit, apply_text_encoder=False, apply_unet=True)
    return network


def names(network) -> list[str]:
    return sorted(lora.lora_name for lora in network.unet_loras)


def test_default_targets_are_musubis(musubi, tiny_models):
    dit = tiny_models["dit"]
    ours = select_modules(dit, FAMILY.lora_default_targets(dit), [], [])
    assert names(musubi_network(musubi_dit(dit))) == sorted(kohya_name(p) for p in ours)
    assert len(ours) == 2 * 14 and "transformer_blocks.0.img_mod.1" in ours
    # the pattern that does leave modulation out gives the same smaller set in both
    lean = select_modules(dit, FAMILY.lora_default_targets(dit), [], [r".*_mod\..*"])
    assert names(musubi_network(musubi_dit(dit), exclude_patterns=r"['.*_mod\..*']")) == sorted(kohya_name(p) for p in lean)
    assert len(lean) == 2 * 12


def test_our_kohya_file_loads_strict_into_musubis_network(musubi, tmp_path, tiny_models):
    from musubi_tuner.networks import lora_qwen_image

    dit = tiny_models["dit"]
    ours = random_lora(dit, rank=4, alpha=8.0)
    path = tmp_path / "ours.safetensors"
    write_lora_file(ours.weights(), path, "kohya")
    sd = load_file(path)
    a = copy.deepcopy(dit)
    theirs = musubi_network(a, 4, 8.0, apply=True)
    result = theirs.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(v, sd[k]) for k, v in theirs.state_dict().items())
    # running: musubi's patched Linears in one copy, our hooks in another
    b = copy.deepcopy(dit)
    LoRANetwork.from_weights(b, read_lora_file(path, *TABLES), str(path)).attach()
    assert (velocity(a) - velocity(dit)).abs().max() > 0.05
    torch.testing.assert_close(velocity(a), velocity(b), atol=2e-5, rtol=1e-5)
    # musubi's network built from the file (its --dim_from_weights / inference path) has the same modules
    assert names(lora_qwen_image.create_arch_network_from_weights(1.0, sd, unet=copy.deepcopy(dit))) == names(theirs)


@pytest.fixture(scope="module")
def musubi_files(musubi, tmp_path_factory, tiny_models):
    """LoRAs saved by musubi-tuner's network (dim 4, alpha 2, trained-looking weights): its default targets in bf16
    and in fp32 (musubi-tuner's load-time merge computes in the LoRA's dtype: fp32 compares exactly), and
    attention excluded (`mlp`: modules that are not flowtuner's defaults)."""
    folder = tmp_path_factory.mktemp("musubi")
    for name, dtype, args in (("bf16", torch.bfloat16, {}), ("fp32", torch.float32, {}),
                              ("mlp", torch.bfloat16, {"exclude_patterns": "['.*attn.*']"})):
        dit = copy.deepcopy(tiny_models["dit"])
        network = musubi_network(dit, 4, 2.0, apply=True, **args)
        torch.manual_seed(0)
        for lora in network.unet_loras:
            torch.nn.init.normal_(lora.lora_up.weight, std=0.1)
        network.save_weights(str(folder / f"{name}.safetensors"), dtype, {"ss_network_module": "networks.lora_qwen_image"})
    return {name: folder / f"{name}.safetensors" for name in ("bf16", "fp32", "mlp")}


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_files):
    root = tmp_path_factory.mktemp("musubi-train")
    cfg = good_dataset(root, sizes=[(64, 64)] * 2)
    for kind in ("latents", "text"):
        assert main([f"cache-{kind}", "--dataset_config", str(cfg), "--model", str(tiny_files["repo"]), "--device", "cpu"]) == 0
    return cfg


def train(cached, tiny_files, out, *extra):
    return main(["train", "--dataset_config", str(cached), "--model", str(tiny_files["repo"]), "--device", "cpu",
                 "--output_dir", str(out), "--seed", "3", "--max_data_loader_n_workers", "0", *extra])


def up_keys(sd) -> set[str]:
    return {k for k in sd if k.endswith("lora_up.weight")}


@pytest.mark.slow
def test_flowtuner_continues_a_musubi_lora(musubi, tmp_path, cached, tiny_files, musubi_files):
    from musubi_tuner.utils import model_utils

    # learning rate 0: the run keeps exactly the file's modules (attention excluded, modulation in), ranks,
    # alphas and weights, whatever the defaults and --network_dim say
    mlp = load_file(musubi_files["mlp"])
    assert len(up_keys(mlp)) == 2 * 6 and not any("attn" in k for k in mlp)
    assert train(cached, tiny_files, tmp_path / "same", "--network_weights", str(musubi_files["mlp"]), "--network_dim", "2",
                 "--learning_rate", "0", "--max_train_steps", "1") == 0
    same = load_file(tmp_path / "same/lora.safetensors")
    assert same.keys() == mlp.keys()
    assert all(torch.equal(same[k].float(), mlp[k].float()) for k in mlp)
    meta = safe_open(str(tmp_path / "same/lora.safetensors"), "pt").metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert model_utils.precalculate_safetensors_hashes(same, meta) == (meta["sshs_model_hash"], meta["sshs_legacy_hash"])
    # two real steps train every module of the file, the modulation layers included; only the last block's
    # text-stream outputs stay put (the text stream is dropped after it, so they get no gradient)
    theirs = load_file(musubi_files["bf16"])
    assert len(up_keys(theirs)) == 28 and kohya_name("transformer_blocks.1.txt_mod.1") + ".lora_up.weight" in theirs
    assert train(cached, tiny_files, tmp_path / "more", "--network_weights", str(musubi_files["bf16"]), "--learning_rate",
                 "1e-2", "--max_train_steps", "2") == 0
    more = load_file(tmp_path / "more/lora.safetensors")
    assert more.keys() == theirs.keys()
    unchanged = {k for k in up_keys(theirs) if torch.equal(more[k].float(), theirs[k].float())}
    dead = {kohya_name(f"transformer_blocks.1.{m}") + ".lora_up.weight"
            for m in ("attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")}
    assert unchanged == dead


def test_a_lora_for_another_dit_is_one_line(musubi, tmp_path, cached, tiny_files, musubi_files, capsys):
    """A musubi LoRA of a deeper DiT (block 5 of a 2-block model) at --network_weights: one line, no traceback."""
    sd = load_file(musubi_files["mlp"])
    sd.update({k.replace("blocks_1_", "blocks_5_"): v.clone() for k, v in sd.items() if "blocks_1_" in k})
    save_file(sd, tmp_path / "deeper.safetensors")
    assert train(cached, tiny_files, tmp_path / "out", "--network_weights", str(tmp_path / "deeper.safetensors"),
                 "--max_train_steps", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "6 of its 18 LoRA modules are not Linear layers of this DiT (e.g. transformer_blocks.5." in err
    assert err.startswith("flowtuner train: error: --network_weights ")


def test_generate_merges_a_musubi_lora_as_musubi_does(musubi, tmp_path, tiny_files, musubi_files):
    from musubi_tuner.utils.lora_utils import load_safetensors_with_lora_and_fp8

    musubi_file = musubi_files["fp32"]
    dit_file = tiny_files["comfy"] / "models/diffusion_models/qwen_image_tiny.safetensors"
    theirs = load_safetensors_with_lora_and_fp8(str(dit_file), [load_file(musubi_file)], [0.7], False, torch.device("cpu"))
    out = tmp_path / "merged.safetensors"
    assert main(["generate", "--model", str(tiny_files["repo"]), "--dit", str(dit_file), "--lora_weight", str(musubi_file),
                 "--lora_multiplier", "0.7", "--save_merged_model", str(out)]) == 0
    ours, base = load_file(out), load_file(dit_file)
    assert ours.keys() == theirs.keys()
    mod = "transformer_blocks.0.img_mod.1.weight"
    assert (ours[mod] - base[mod]).abs().max() > 1e-3  # the modulation layers are merged too
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k].to(ours[k].dtype), atol=1e-6, rtol=1e-6)


def test_hashes_are_musubis(musubi, tmp_path, tiny_models, musubi_files):
    """sshs_model_hash / sshs_legacy_hash by musubi-tuner's own function, on a file past 1 MiB (so the legacy
    hash reads real bytes) and on musubi's own file."""
    from musubi_tuner.utils import model_utils

    from flowtuner.train.lora_formats import addnet_hashes

    path = tmp_path / "big.safetensors"
    write_lora_file(random_lora(tiny_models["dit"], rank=64).weights(), path, "kohya",
                    {"ss_network_dim": "64", "modelspec.title": "not hashed"})
    assert path.stat().st_size > 0x110000
    tensors, meta = load_file(path), safe_open(str(path), "pt").metadata()
    assert model_utils.precalculate_safetensors_hashes(tensors, meta) == (meta["sshs_model_hash"], meta["sshs_legacy_hash"])
    assert meta["sshs_legacy_hash"] != model_utils.precalculate_safetensors_hashes({}, {})[1]
    their_file = musubi_files["bf16"]
    theirs, their_meta = load_file(their_file), safe_open(str(their_file), "pt").metadata()
    assert addnet_hashes(theirs, their_meta) == (their_meta["sshs_model_hash"], their_meta["sshs_legacy_hash"])


def test_metadata_keys_are_musubis(musubi, tiny_models):
    """ss_network_args is musubi-tuner's dict of raw strings (absent without --network_args); --no_metadata keeps
    musubi's minimum keys plus the modelspec block."""
    from musubi_tuner.training import trainer_base

    network = mixed_lora(tiny_models["dit"])
    args = ["exclude_patterns=['.*attn.*']", "verbose=True"]

    def meta(**cfg):
        trainer = SimpleNamespace(cfg=TrainConfig(**cfg), family=FAMILY, seed=1, version="test")
        return lora_metadata(trainer, SimpleNamespace(step=3, epoch=1), network)

    full = meta(network_args=args, min_timestep=100)
    assert json.loads(full["ss_network_args"]) == {"exclude_patterns": "['.*attn.*']", "verbose": "True"}
    assert (full["ss_network_dim"], full["ss_network_alpha"]) == ("4", "8.0")  # the network's most common
    assert full["modelspec.timestep_range"] == "100,1000"
    assert "ss_network_args" not in meta()
    minimal = meta(network_args=args, no_metadata=True)
    assert {k for k in minimal if not k.startswith("modelspec.")} == set(trainer_base.SS_METADATA_MINIMUM_KEYS)
    without_args = {k for k in meta(no_metadata=True) if k.startswith("ss_")}
    assert without_args == set(trainer_base.SS_METADATA_MINIMUM_KEYS) - {"ss_network_args"}
