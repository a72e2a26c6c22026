"""`--fp8_base`: block Linears stored as float8_e4m3fn while the file streams in, up-cast in the forward; generate
(LoRAs unmerged), LoRA training on a frozen fp8 base, fp8 files loaded as they are, and the refusals."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flowtuner.cli import main
from flowtuner.families.qwen_image.dit import load_dit
from flowtuner.train.lora import LoRANetwork, LoRAWeights
from flowtuner.weights.fp8 import FP8, Fp8Linear, fp8_base, fp8_bytes, quantise
from tests.datasets import good_dataset
from tests.test_edit_dit import loud_dit

BF16 = torch.bfloat16


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def block_linears(model) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("transformer_blocks.")}


@pytest.fixture(scope="module")
def loud_file(tmp_path_factory):
    """The loud tiny DiT as a bf16 ComfyUI-style file (bf16: the compute dtype of a real run)."""
    path = tmp_path_factory.mktemp("fp8") / "loud_dit.safetensors"
    save_file({k: v.to(BF16) for k, v in state(loud_dit()).items()}, path)
    return path


def call(dit, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, text = torch.randn(1, 16, 64, generator=g), torch.randn(1, 7, 128, generator=g)
    dtype = dit.img_in.weight.dtype
    with torch.no_grad():
        return dit(hidden_states=x.to(dtype), encoder_hidden_states=text.to(dtype), timestep=torch.tensor([0.5]),
                   img_shapes=[[(1, 4, 4)]], return_dict=False)[0].float()


def test_block_linears_are_stored_in_e4m3fn_and_the_bytes_shrink(loud_file):
    plain, _ = load_dit(loud_file)
    with fp8_base():  # the commands choose through this context
        model, _ = load_dit(loud_file)
    linears = block_linears(model)
    assert linears and all(isinstance(m, Fp8Linear) and m.weight.dtype == FP8 for m in linears.values())
    rest = [(n, p) for n, p in model.named_parameters() if p.dtype != FP8]
    assert {n.split(".")[0] for n, _ in rest} >= {"img_in", "txt_in", "proj_out", "norm_out", "time_text_embed", "txt_norm"}
    assert all(p.dtype == BF16 for _, p in rest)  # stems, norms, biases: the file's dtype
    assert all(".norm" in n or n.endswith(".bias") for n, _ in rest if n.startswith("transformer_blocks."))
    fp8, total = fp8_bytes(model)
    _, plain_total = fp8_bytes(plain)
    linear_numel = sum(m.weight.numel() for m in linears.values())
    assert fp8 == linear_numel and total == plain_total - linear_numel  # 2 bytes -> 1 byte per block weight
    assert total / plain_total < 0.6  # measured 0.55 on the 2-block loud DiT
    for name, m in linears.items():  # quantised from the file's values, nothing else
        assert torch.equal(m.weight, quantise(plain.get_submodule(name).weight))


def test_fp8_output_is_close_to_bf16_but_not_equal(loud_file):
    plain, _ = load_dit(loud_file)
    model, _ = load_dit(loud_file, fp8=True)
    a, b = call(plain), call(model)
    err = float((a - b).abs().max() / a.abs().max())
    assert 0 < err < 0.06, err  # measured 0.023 (docs/memory.md "fp8 base")


def test_generate_latents_with_fp8_base(tmp_path, loud_file, tiny_files):
    comfy = tiny_files["comfy"] / "models"
    args = ["generate", "--dit", str(loud_file), "--vae", str(comfy / "vae/qwen_image_vae_tiny.safetensors"),
            "--text_encoder", str(comfy / "text_encoders/qwen_2.5_vl_tiny.safetensors"), "--tokenizer",
            str(tiny_files["tokenizer"]), "--prompt", "a red fox", "--image_size", "64", "64", "--infer_steps", "4",
            "--seed", "5", "--output_type", "latent", "--device", "cpu"]
    latents = {}
    for tag, extra in (("bf16", []), ("fp8", ["--fp8_base"]), ("fp8_musubi", ["--fp8"]), ("scaled", ["--fp8_scaled"])):
        out = tmp_path / tag
        assert main([*args, "--save_path", str(out), *extra]) == 0
        latents[tag] = load_file(next(out.glob("*_latent.safetensors")))["latent"].float()
    ref, fp8 = latents["bf16"], latents["fp8"]
    assert torch.equal(fp8, latents["fp8_musubi"])  # musubi-tuner's inference name is the same switch
    err = float((ref - fp8).abs().max() / ref.abs().max())
    print(f"generate latents, fp8 vs bf16: max rel error {err:.4f}")
    assert 0 < err < 0.06, err  # measured 0.028
    scaled_err = float((ref - latents["scaled"]).abs().max() / ref.abs().max())
    print(f"generate latents, fp8_scaled vs bf16: max rel error {scaled_err:.4f}")
    # measured 0.060 (norm 0.023 vs 0.017 plain): on this tiny model the scale's gain is within the noise of a
    # 4-step run (docs/memory.md "fp8 scaled"); the weight-level gain is tested below
    assert 0 < scaled_err < 0.1 and not torch.equal(latents["scaled"], fp8), scaled_err


def write_fp8_files(folder, model):
    """A plain float8_e4m3fn file and a ComfyUI fp8_scaled file (per-tensor scale_weight + marker) of `model`."""
    sd = state(model)
    plain, scaled = {}, {"scaled_fp8": torch.zeros(2, dtype=FP8)}
    for key, value in sd.items():
        if key.startswith("transformer_blocks.") and key.endswith(".weight") and value.ndim == 2:
            plain[key] = quantise(value)
            scale = value.abs().max().float() / 448
            scaled[key], scaled[key[:-len("weight")] + "scale_weight"] = quantise(value / scale), scale.reshape(1)
        else:
            plain[key] = scaled[key] = value.to(BF16)
    save_file(plain, folder / "plain_fp8.safetensors")
    save_file(scaled, folder / "scaled_fp8.safetensors")
    return plain, scaled


def test_fp8_files_load_as_they_are(tmp_path):
    plain_sd, scaled_sd = write_fp8_files(tmp_path, loud_dit())
    for name, sd in (("plain_fp8", plain_sd), ("scaled_fp8", scaled_sd)):
        file = tmp_path / f"{name}.safetensors"
        model, _ = load_dit(file, fp8=True)
        dequantised, _ = load_dit(file)  # without --fp8_base: bf16 weights (the scale multiplied in)
        for path, m in block_linears(model).items():
            assert torch.equal(m.weight.view(torch.uint8), sd[path + ".weight"].view(torch.uint8)), path  # bits kept
            assert hasattr(m, "scale_weight") == (name == "scaled_fp8")
        a, b = call(dequantised), call(model)
        assert float((a - b).abs().max() / a.abs().max()) < 0.02, name  # only bf16 rounding of w * scale differs


def random_lora(model, rank=2, seed=0) -> dict[str, LoRAWeights]:
    g = torch.Generator().manual_seed(seed)
    return {p: LoRAWeights(torch.randn(rank, m.in_features, generator=g) * 0.1,
                           torch.randn(m.out_features, rank, generator=g) * 0.1, float(rank))
            for p, m in sorted(block_linears(model).items())}


def lora_step(model, weights, autocast: bool):
    """Loss and LoRA gradients of one forward / backward with the LoRA attached by hooks."""
    network = LoRANetwork.from_weights(model, weights, "test").attach()
    g = torch.Generator().manual_seed(3)
    x, text = torch.randn(1, 16, 64, generator=g), torch.randn(1, 7, 128, generator=g)
    with torch.autocast("cpu", BF16, enabled=autocast):
        out = model(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]],
                    return_dict=False)[0]
    loss = out.float().square().mean()
    loss.backward()
    network.detach()
    # the last block's text stream feeds nothing: its LoRAs get no gradient, on any base
    return loss.detach(), {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("autocast", [False, True])
def test_lora_gradients_through_fp8_base_match_the_rounded_weights(autocast):
    """The LoRA trains on the fp8 base exactly as on a high-precision model holding the fp8-rounded weights;
    the base gets no gradient, and backward keeps no up-cast weight copy (only the fp8 tensor)."""
    base = loud_dit()  # float32
    fp8_model, rounded = load_into_fp8(base), loud_dit()
    with torch.no_grad():
        for path, m in block_linears(rounded).items():
            m.weight.copy_(quantise(m.weight).float())
    weights = random_lora(base)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, grads = lora_step(fp8_model, weights, autocast)
    ref_loss, ref_grads = lora_step(rounded, weights, autocast)
    tol = dict(rtol=2e-2, atol=1e-4) if autocast else dict(rtol=1e-5, atol=1e-7)
    assert torch.allclose(loss, ref_loss, **tol)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0.8 * 2 * len(weights)
    assert all(torch.allclose(grads[k], ref_grads[k], **tol) for k in grads)
    assert sum(bool(g.abs().sum() > 0) for g in grads.values()) > 0.8 * len(grads)  # gradients flow through fp8
    assert all(p.grad is None for p in fp8_model.parameters())
    weight_shapes = {tuple(m.weight.shape) for m in block_linears(fp8_model).values()}
    assert not [s for s in saved if s[0] in weight_shapes and s[1] != FP8]


def load_into_fp8(model):
    """An in-memory model through the streaming loader's path (a file round trip)."""
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    try:
        save_file(state(model), folder / "dit.safetensors")
        return load_dit(folder / "dit.safetensors", fp8=True)[0]
    finally:
        shutil.rmtree(folder)


def test_generate_applies_loras_unmerged_on_fp8(tmp_path, loud_file):
    from flowtuner.families.qwen_image import QwenImageFamily
    from flowtuner.families.base import ModelPaths
    from flowtuner.generate import load_denoiser_with_loras
    from flowtuner.train.lora_formats import write_lora_file

    plain, _ = load_dit(loud_file)
    lora = tmp_path / "lora.safetensors"
    write_lora_file(random_lora(plain), lora, "kohya", {})
    family, paths = QwenImageFamily(), ModelPaths(dit=loud_file)
    fp8 = load_denoiser_with_loras(family, paths, "cpu", "torch", [(str(lora), 0.5)], fp8=True).module
    fp8_bare, _ = load_dit(loud_file, fp8=True)
    merged = load_denoiser_with_loras(family, paths, "cpu", "torch", [(str(lora), 0.5)]).module
    assert all(torch.equal(a, b) for a, b in zip(fp8.state_dict().values(), fp8_bare.state_dict().values()))  # unmerged
    ref, out, bare = call(merged), call(fp8), call(fp8_bare)
    assert float((out - bare).norm() / (ref - call(plain)).norm()) > 0.5  # the LoRA acts
    assert float((out - ref).abs().max() / ref.abs().max()) < 0.08


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_files):
    root = tmp_path_factory.mktemp("fp8_train")
    cfg = good_dataset(root, sizes=[(64, 64)] * 2)
    for kind in ("latents", "text"):
        assert main([f"cache-{kind}", "--dataset_config", str(cfg), "--model", str(tiny_files["repo"]), "--device", "cpu"]) == 0
    return cfg


@pytest.mark.parametrize("flag", ["--fp8_base", "--fp8_scaled"])
def test_lora_training_on_an_fp8_base(flag, tmp_path, cached, tiny_files, monkeypatch):
    from flowtuner.families.qwen_image import QwenImageFamily

    seen = {}
    original = QwenImageFamily.load_denoiser

    def recording(self, *a, **k):
        seen["denoiser"] = original(self, *a, **k)
        seen["before"] = state(seen["denoiser"].module)
        return seen["denoiser"]

    monkeypatch.setattr(QwenImageFamily, "load_denoiser", recording)
    out = tmp_path / "out"
    assert main(["train", "--dataset_config", str(cached), "--model", str(tiny_files["repo"]), "--device", "cpu",
                 "--output_dir", str(out), "--seed", "1", "--max_data_loader_n_workers", "0", "--max_train_steps", "2",
                 "--learning_rate", "1e-2", "--network_dim", "2", flag]) == 0
    dit = seen["denoiser"].module
    assert all(m.weight.dtype == FP8 for m in block_linears(dit).values())
    assert all(hasattr(m, "scale_weight") == (flag == "--fp8_scaled") for m in block_linears(dit).values())
    after = state(dit)
    assert all(torch.equal(seen["before"][k].view(torch.uint8) if v.dtype == FP8 else seen["before"][k],
                           v.view(torch.uint8) if v.dtype == FP8 else v) for k, v in after.items())  # frozen
    lora = load_file(str(out / "lora.safetensors"))
    ups = {k: v for k, v in lora.items() if "lora_up" in k and "blocks_0_" in k}  # block 0: every module feeds the loss
    assert ups and all(v.abs().sum() > 0 for v in ups.values())  # zero-init ups moved: gradients flowed through fp8
    from flowtuner.weights import open_checkpoint

    assert open_checkpoint(out / "lora.safetensors").metadata["ss_fp8_base"] == "True"


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--fp8_base"], "--fp8_base: full fine-tuning trains every DiT weight"),
    (["finetune", "--fp8_scaled"], "--fp8_scaled: full fine-tuning trains every DiT weight"),
    (["generate", "--fp8_scaled", "--save_merged_model", "m.safetensors"], "--save_merged_model with --fp8_base"),
    (["plan", "finetune", "--fp8_scaled"], "cannot train fp8 weights"),
    (["generate", "--fp8", "--save_merged_model", "m.safetensors"], "--save_merged_model with --fp8_base"),
    (["plan", "finetune", "--fp8_base"], "cannot train fp8 weights"),
])
def test_refusals_are_one_line(argv, message, capsys, tmp_path, loud_file):
    extra = ["--dit", str(loud_file), "--dataset_config", str(tmp_path / "none.toml")] if argv[0] == "finetune" else []
    extra += ["--dit", str(loud_file)] if argv[0] == "generate" else []
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


def test_fp8_linear_refuses_training_its_weight():
    layer = load_into_fp8_linear()
    layer.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen"):
        layer(torch.randn(2, 4))


def load_into_fp8_linear() -> Fp8Linear:
    layer = nn.Linear(4, 3)
    layer.__class__ = Fp8Linear
    layer.weight = nn.Parameter(quantise(layer.weight.data), requires_grad=False)
    return layer


def test_merge_into_an_fp8_linear_requantises():
    from flowtuner.train.lora import merge_into

    layer = load_into_fp8_linear()
    model = nn.Sequential(layer)
    before = layer.dequantised()
    w = LoRAWeights(torch.ones(1, 4), torch.ones(3, 1), 1.0)
    merge_into(model, {"0": w}, 0.5)
    assert layer.weight.dtype == FP8
    assert torch.equal(layer.weight, quantise(before + 0.5))



def test_fp8_vl_stores_the_text_encoders_linears_in_fp8_and_caches_stay_bf16(tmp_path, tiny_files):
    """--fp8_vl (cache-text, generate, training previews): the decoder layers' Linears in e4m3fn, embeddings and
    norms as the file has them; the embeddings come out close to the high-precision ones, in the compute dtype."""
    from flowtuner.families.qwen_image.text_encoder import load_text_model
    from flowtuner.weights.fp8 import fp8_text_encoder
    from tests.datasets import good_dataset

    te = tiny_files["comfy"] / "models" / "text_encoders" / "qwen_2.5_vl_tiny.safetensors"
    plain = load_text_model(te)
    with fp8_text_encoder():
        small = load_text_model(te)
    linears = {n: m for n, m in small.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears and all(m.weight.dtype == FP8 for m in linears.values())
    assert small.embed_tokens.weight.dtype == plain.embed_tokens.weight.dtype != FP8
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    a, b = plain(input_ids=ids).last_hidden_state, small(input_ids=ids).last_hidden_state
    err = float((a - b).abs().max() / a.abs().max())
    assert b.dtype == a.dtype and 0 < err < 0.1, err
    config = good_dataset(tmp_path)
    args = ["cache-text", "--dataset_config", str(config), "--text_encoder", str(te), "--tokenizer", str(tiny_files["tokenizer"]),
            "--device", "cpu"]
    assert main([*args, "--fp8_vl"]) == 0
    cache = sorted((tmp_path / "cache").glob("*_qi_te.safetensors"))
    assert cache and all(t.dtype == torch.bfloat16 for f in cache for t in load_file(f).values())


def test_fp8_vl_for_the_edit_models_keeps_the_vision_tower(tiny_files):
    from flowtuner.families.qwen_image.vision import load_vl_model
    from flowtuner.weights.fp8 import fp8_text_encoder

    with fp8_text_encoder():
        model = load_vl_model(tiny_files["repo"] / "text_encoder")
    dtypes = {n: m.weight.dtype for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {d for n, d in dtypes.items() if n.startswith("language_model.layers.")} == {FP8}
    assert FP8 not in {d for n, d in dtypes.items() if n.startswith("visual.")}


# --fp8_scaled: weights quantised with a per-output-channel scale while the file streams in (docs/memory.md
# "fp8 scaled"); fp8 files keep their own values.

def test_fp8_scaled_stores_a_scale_per_output_channel_and_is_closer_to_bf16(loud_file):
    from flowtuner.weights.fp8 import fp8_scaled, quantise_scaled

    plain, _ = load_dit(loud_file)
    unscaled, _ = load_dit(loud_file, fp8=True)
    with fp8_scaled():  # --fp8_scaled implies --fp8_base
        model, _ = load_dit(loud_file)
    for path, m in block_linears(model).items():
        assert isinstance(m, Fp8Linear) and m.weight.dtype == FP8
        assert m.scale_weight.shape == (m.out_features, 1) and m.scale_weight.dtype == torch.float32
        q, scale = quantise_scaled(plain.get_submodule(path).weight)
        assert torch.equal(m.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(m.scale_weight, scale)
    def weight_error(m) -> float:
        pairs = [(lin.dequantised(), plain.get_submodule(p).weight.float()) for p, lin in block_linears(m).items()]
        return float(sum((a - b).norm() ** 2 for a, b in pairs) ** 0.5 / sum(b.norm() ** 2 for _, b in pairs) ** 0.5)

    assert weight_error(model) < 0.98 * weight_error(unscaled)  # measured 0.0252 vs 0.0260
    ref = call(plain)
    err = float((ref - call(model)).abs().max() / ref.abs().max())
    assert 0 < err < 0.06, err  # measured norm 0.0158 (plain e4m3fn 0.0172)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block64", "tile128"])
def test_quantise_scaled_layouts_round_trip_and_chunks_agree(granularity, monkeypatch):
    from flowtuner.weights import fp8

    g = torch.Generator().manual_seed(0)
    w = (torch.distributions.StudentT(5.0).sample((256, 384)) * 0.02).to(BF16)
    q, scale = fp8.quantise_scaled(w, granularity)
    assert scale.shape == fp8.scale_shape(tuple(w.shape), granularity)
    deq = fp8._dequantised(q, scale, torch.float32)
    err = float((deq - w.float()).norm() / w.float().norm())
    assert err < 0.9 * float((quantise(w).float() - w.float()).norm() / w.float().norm()), err
    assert float(deq.abs().max()) == pytest.approx(float(w.float().abs().max()), rel=0.01)  # the max maps to 448
    monkeypatch.setattr(fp8, "CHUNK_ELEMENTS", 1000)  # a few rows at a time: the same result
    q2, scale2 = fp8.quantise_scaled(w, granularity)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(scale, scale2)
    del g


def test_fp8_scaled_keeps_the_bytes_of_fp8_files(tmp_path, caplog):
    """--fp8_scaled on an e4m3fn file (plain or ComfyUI fp8_scaled): the file's fp8 values and scales as stored,
    never quantised again, said in one log line."""
    plain_sd, scaled_sd = write_fp8_files(tmp_path, loud_dit())
    for name, sd in (("plain_fp8", plain_sd), ("scaled_fp8", scaled_sd)):
        caplog.clear()
        with caplog.at_level("INFO", logger="flowtuner"):
            model, _ = load_dit(tmp_path / f"{name}.safetensors", scaled=True)
        for path, m in block_linears(model).items():
            assert torch.equal(m.weight.view(torch.uint8), sd[path + ".weight"].view(torch.uint8)), path
            if name == "scaled_fp8":
                assert torch.equal(m.scale_weight, sd[path + ".scale_weight"].float())
            else:
                assert not hasattr(m, "scale_weight")  # a plain e4m3fn file stays unscaled
        lines = [r.getMessage() for r in caplog.records if "kept as stored" in r.getMessage()]
        assert len(lines) == 1 and "--fp8_scaled" in lines[0], lines


def scaled_linear(out=192, inp=256, seed=0) -> Fp8Linear:
    from flowtuner.weights.fp8 import quantise_scaled

    torch.manual_seed(seed)
    layer = nn.Linear(inp, out)
    w = (torch.distributions.StudentT(5.0).sample((out, inp)) * 0.02)
    layer.__class__ = Fp8Linear
    q, scale = quantise_scaled(w)
    layer.weight = nn.Parameter(q, requires_grad=False)
    layer.register_buffer("scale_weight", scale)
    return layer


def test_merge_into_a_scaled_fp8_linear_recomputes_the_scale():
    from flowtuner.train.lora import merge_into
    from flowtuner.weights.fp8 import quantise_scaled

    layer = scaled_linear()
    before, old_scale = layer.dequantised(), layer.scale_weight.clone()
    g = torch.Generator().manual_seed(1)
    w = LoRAWeights(torch.randn(4, 256, generator=g) * 0.05, torch.randn(192, 4, generator=g) * 0.05, 4.0)
    delta = 0.5 * w.delta()
    delta[0, 0] = before[0].abs().max() * 3  # grows row 0's largest value: the old scale would saturate it
    merge_into(nn.Sequential(layer), {"0": LoRAWeights(w.down, w.up, w.alpha)}, 0.5)
    layer.merge_(delta - 0.5 * w.delta())  # the rest of `delta` (row 0's outlier), through merge_ directly
    target = before + delta
    assert layer.weight.dtype == FP8 and layer.scale_weight.shape == old_scale.shape
    assert layer.scale_weight[0, 0] > 2 * old_scale[0, 0]  # recomputed, not reused
    err = float((layer.dequantised() - target).norm() / target.norm())
    requant = float((quantise_scaled(target)[0].float() * quantise_scaled(target)[1] - target).norm() / target.norm())
    assert err < 1.5 * requant and err < 0.04, (err, requant)  # two re-roundings at most; measured 0.026 / 0.023
    assert float((layer.dequantised() - target).abs().max()) < 0.1 * float(target[0, 0])  # the outlier kept


def test_plan_counts_the_scales(loud_file, capsys):
    import json

    from flowtuner.families.base import ModelPaths
    from flowtuner.families.qwen_image import QwenImageFamily
    from flowtuner.plan import PlanSettings, make_plan

    spec = QwenImageFamily().plan_spec(ModelPaths(dit=loud_file))
    weights = {scaled: make_plan(spec, PlanSettings("train", 64, 64, 1, 16, fp8_base=True, fp8_scaled=scaled))
               .components["weights"] for scaled in (False, True)}
    model, _ = load_dit(loud_file, scaled=True)
    scales = sum(m.scale_weight.numel() * 4 for m in block_linears(model).values())
    assert weights[True] - weights[False] == scales  # 1 + 2 blocks traced, 2 in the file: exact
    assert main(["plan", "train", "--dit", str(loud_file), "--resolution", "64", "64", "--json", "--fp8_scaled"]) == 0
    settings = json.loads(capsys.readouterr().out)["settings"]
    assert settings["fp8_scaled"] is True and settings["fp8_base"] is True  # implied
