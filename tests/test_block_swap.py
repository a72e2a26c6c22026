"""`--blocks_to_swap`: the schedule by its recorded order (forward, backward in reverse, the wrap-around of a
sampling pass), bit-identical LoRA losses / gradients (with and without gradient checkpointing, on fp8 too) and
generated latents, the wiring through `train` / `generate`, and the one-line refusals."""

from __future__ import annotations

import pytest
import torch

from flowtuner.cli import main
from flowtuner.families.qwen_image.tiny import tiny_dit
from flowtuner.train.lora import LoRANetwork, LoRAWeights
from flowtuner.weights.block_swap import BlockSwap, install, resident_blocks, streamed_indices
from tests.datasets import good_dataset

BLOCKS = 6


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """A weight used while its block is not loaded turns the result into NaN here (on a GPU its host master is on
    another device) instead of silently computing from the host copy."""
    monkeypatch.setattr(BlockSwap, "poison_evicted", True)


def dit(layers: int = BLOCKS, fp8: bool = False):
    model = tiny_dit(seed=0, layers=layers).requires_grad_(False)
    if fp8:
        from tests.test_fp8 import load_into_fp8

        model = load_into_fp8(model)
    return model


def lora_of(model, rank: int = 2, seed: int = 0) -> LoRANetwork:
    g = torch.Generator().manual_seed(seed)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("transformer_blocks.")}
    weights = {p: LoRAWeights(torch.randn(rank, m.in_features, generator=g) * 0.1,
                              torch.randn(m.out_features, rank, generator=g) * 0.1, float(rank))
               for p, m in sorted(linears.items())}
    return LoRANetwork.from_weights(model, weights, "test").attach()


def inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 7, 128, generator=g),
                timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]], return_dict=False)


def lora_steps(model, checkpointing: bool, steps: int = 2):
    """Two SGD steps of a LoRA: (loss, LoRA gradients) per step."""
    network = lora_of(model)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    opt = torch.optim.SGD(network.parameters(), lr=0.5)
    out = []
    for step in range(steps):
        loss = model(**inputs(step))[0].square().mean()
        loss.backward()
        out.append((loss.detach().clone(), {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}))
        opt.step()
        opt.zero_grad(set_to_none=True)
    network.detach()
    return out


def same(a, b) -> bool:
    return all(torch.equal(la, lb) and la_g.keys() == lb_g.keys() and all(torch.equal(la_g[k], lb_g[k]) for k in la_g)
               for (la, la_g), (lb, lb_g) in zip(a, b))


def test_resident_blocks_and_the_spread():
    assert resident_blocks(60, 0) == 60
    assert resident_blocks(60, 16) == 46
    assert resident_blocks(60, 45) == 17
    assert resident_blocks(60, 59) == 3
    assert resident_blocks(60, 45, ring_size=4) == 19
    assert resident_blocks(60, 1) == 60  # a ring of one slot for one block
    assert streamed_indices(6, 3) == [1, 3, 5]
    assert len(set(streamed_indices(60, 59))) == 59


def test_schedule_forward_then_backward_in_reverse():
    model = dit()
    network = lora_of(model)
    swap = install(model, model.transformer_blocks, 3, "cpu", ring_size=2)
    assert swap.order == [1, 3, 5]
    swap.trace = []
    loss = model(**inputs(0))[0].square().mean()
    forward = list(swap.trace)
    # ranks 0 and 1 were preloaded; after block 1 ran, its slot takes block 5; the tail (3, 5) stays for backward
    assert forward == [("forward", 1, 0), ("load", 5, 0), ("forward", 3, 1), ("forward", 5, 0)]
    swap.trace = []
    loss.backward()
    events = [e for e in swap.trace if e[0] != "unpack"]
    # reverse order; block 5's slot is reloaded with block 1 only when block 3's gradient arrives (5 is done)
    assert events == [("backward", 5, 0), ("load", 1, 0), ("backward", 3, 1), ("backward", 1, 0)]
    # without checkpointing the weights autograd saved are fetched from the ring, each while its block is loaded
    unpacked = [e for e in swap.trace if e[0] == "unpack"]
    assert {b for _, b, _ in unpacked} == {1, 3, 5}
    order = [b for kind, b, _ in swap.trace if kind in ("backward", "unpack")]
    assert order == sorted(order, reverse=True)
    # the next forward needs no load: the ring holds ranks 0 and 1 again
    swap.trace = []
    model(**inputs(1))
    assert swap.trace[:1] == [("forward", 1, 0)] and ("load", 1, 0) not in swap.trace
    network.detach()


def test_schedule_of_sampling_wraps_around():
    model = dit()
    swap = install(model, model.transformer_blocks, 4, "cpu", ring_size=2)
    assert swap.order == [0, 2, 3, 5]
    swap.trace = []
    with torch.no_grad():
        model(**inputs(0))
        model(**inputs(0))
    one = [("forward", 0, 0), ("load", 3, 0), ("forward", 2, 1), ("load", 5, 1), ("forward", 3, 0),
           ("forward", 5, 1), ("load", 0, 0), ("load", 2, 1)]
    assert swap.trace == one + one


def test_weights_stay_on_the_host_between_uses():
    model = dit()
    swap = install(model, model.transformer_blocks, 4, "cpu", ring_size=2)
    with torch.no_grad():
        model(**inputs(0))
    ring = {t.untyped_storage().data_ptr() for t in swap.slots}
    on_ring = {b for b in swap.order if model.transformer_blocks[b].img_mod[1].weight.untyped_storage().data_ptr() in ring}
    assert on_ring == {0, 2}  # the next call's first two; the others point at their host masters
    assert swap.slots[0].numel() == swap.streamed[0].host.numel()  # a slot holds one block


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_lora_training_is_bit_identical(checkpointing, fp8):
    ref = lora_steps(dit(fp8=fp8), checkpointing)
    for swapped, ring in ((3, 2), (BLOCKS - 1, 2), (4, 1), (4, 3)):
        model = dit(fp8=fp8)
        install(model, model.transformer_blocks, swapped, "cpu", ring_size=ring)
        got = lora_steps(model, checkpointing)
        assert same(got, ref), (swapped, ring)
    assert len(ref[0][1]) > 20 and ref[0][1].keys() == ref[1][1].keys()
    assert any(bool(g.abs().sum() > 0) for g in ref[1][1].values())


def test_full_fine_tuning_is_refused():
    model = tiny_dit(layers=4).requires_grad_(True)
    with pytest.raises(Exception, match="trainable weights"):
        install(model, model.transformer_blocks, 2, "cpu")


def test_too_many_blocks_is_one_line():
    model = dit(layers=4)
    with pytest.raises(Exception, match=r"--blocks_to_swap 4: the DiT has 4 blocks; at most 3 can be swapped"):
        install(model, model.transformer_blocks, 4, "cpu")


# ---------------------------------------------------------------- through the commands
@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("swap") / "dit4.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_dit(seed=1, layers=4).state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_files):
    root = tmp_path_factory.mktemp("swap_train")
    cfg = good_dataset(root, sizes=[(64, 64)] * 2)
    for kind in ("latents", "text"):
        assert main([f"cache-{kind}", "--dataset_config", str(cfg), "--model", str(tiny_files["repo"]), "--device", "cpu"]) == 0
    return cfg


def test_generate_latents_are_bit_identical(tmp_path, dit_file, tiny_files):
    from safetensors.torch import load_file

    comfy = tiny_files["comfy"] / "models"
    args = ["generate", "--dit", str(dit_file), "--vae", str(comfy / "vae/qwen_image_vae_tiny.safetensors"),
            "--text_encoder", str(comfy / "text_encoders/qwen_2.5_vl_tiny.safetensors"), "--tokenizer",
            str(tiny_files["tokenizer"]), "--prompt", "a red fox", "--image_size", "64", "64", "--infer_steps", "3",
            "--seed", "5", "--output_type", "latent", "--device", "cpu"]
    latents = {}
    for tag, extra in (("plain", []), ("swap", ["--blocks_to_swap", "3", "--use_pinned_memory_for_block_swap"]),
                       ("fp8", ["--fp8_base"]), ("fp8_swap", ["--fp8_base", "--blocks_to_swap", "2"])):
        out = tmp_path / tag
        assert main([*args, "--save_path", str(out), *extra]) == 0
        latents[tag] = load_file(next(out.glob("*_latent.safetensors")))["latent"]
    assert torch.equal(latents["plain"], latents["swap"])
    assert torch.equal(latents["fp8"], latents["fp8_swap"])
    assert not torch.equal(latents["plain"], latents["fp8"])  # the fp8 pair is a different computation


@pytest.mark.parametrize("checkpointing", [[], ["--gradient_checkpointing"]])
def test_lora_training_through_the_command_is_bit_identical(tmp_path, cached, dit_file, checkpointing):
    from safetensors.torch import load_file

    args = ["train", "--dataset_config", str(cached), "--dit", str(dit_file), "--device", "cpu", "--seed", "1",
            "--max_data_loader_n_workers", "0", "--max_train_steps", "2", "--learning_rate", "1e-2", "--network_dim", "2",
            *checkpointing]
    loras = {}
    for tag, extra in (("plain", []), ("swap", ["--blocks_to_swap", "3", "--block_swap_ring_size", "1",
                                                "--block_swap_h2d_only"])):
        out = tmp_path / tag
        assert main([*args, "--output_dir", str(out), *extra]) == 0
        loras[tag] = load_file(str(out / "lora.safetensors"))
    assert loras["plain"].keys() == loras["swap"].keys()
    assert all(torch.equal(loras["plain"][k], loras["swap"][k]) for k in loras["plain"])
    ups = [v for k, v in loras["plain"].items() if "lora_up" in k and "blocks_0_" in k]
    assert ups and all(v.abs().sum() > 0 for v in ups)  # the steps trained something


@pytest.mark.parametrize("command, swap, message", [
    ("generate", "4", "--blocks_to_swap 4: the DiT has 4 blocks; at most 3 can be swapped"),
    ("train", "9", "--blocks_to_swap 9: the DiT has 4 blocks; at most 3 can be swapped"),
    ("finetune", "1", "--blocks_to_swap: full fine-tuning trains the block weights"),
])
def test_refusals_are_one_line(tmp_path, capsys, cached, dit_file, tiny_files, command, swap, message):
    if command == "generate":
        argv = ["generate", "--dit", str(dit_file), "--model", str(tiny_files["repo"]), "--prompt", "x",
                "--image_size", "64", "64", "--infer_steps", "1", "--output_type", "latent", "--device", "cpu",
                "--save_path", str(tmp_path)]
    else:
        argv = [command, "--dataset_config", str(cached), "--dit", str(dit_file), "--device", "cpu",
                "--max_data_loader_n_workers", "0", "--max_train_steps", "1", "--output_dir", str(tmp_path)]
    assert main([*argv, "--blocks_to_swap", swap]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
