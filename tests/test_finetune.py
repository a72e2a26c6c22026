"""Full fine-tuning: Adafactor (vs transformers'), stochastic rounding, fused backward, streaming saves,
exact resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from flowtuner.train.adafactor import Adafactor, FusedBackward, copy_stochastic_
from flowtuner.weights.writer import stream_save_safetensors
from tests.test_train import cached, train  # noqa: F401  (module fixture reused)


def _trajectory(opt_cls, kwargs, steps=5, seed=0):
    torch.manual_seed(seed)
    w = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(5))]
    opt = opt_cls(w, **kwargs)
    for i in range(steps):
        loss = sum(((p - i) ** 2).sum() for p in w)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in w]


@pytest.mark.parametrize("kwargs", [dict(lr=1e-2), dict(lr=1e-2, beta1=0.9, weight_decay=0.1, scale_parameter=True),
                                    dict(lr=None, relative_step=True, warmup_init=True, scale_parameter=True)])
def test_adafactor_matches_transformers(kwargs):
    from transformers.optimization import Adafactor as Reference

    ref_kwargs = {"scale_parameter": False, "relative_step": False, "warmup_init": False, **kwargs}
    ours = _trajectory(Adafactor, ref_kwargs)
    theirs = _trajectory(Reference, ref_kwargs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_stochastic_rounding_is_unbiased_and_keeps_small_updates():
    x = torch.full((200_000,), 1.0 + 1e-3)  # between two bf16 values (1.0 and 1.0078)
    out = torch.empty_like(x, dtype=torch.bfloat16)
    copy_stochastic_(out, x, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) == {1.0, 1.0078125}
    assert out.float().mean().item() == pytest.approx(1.001, abs=1e-4)
    # 100 steps of -1e-4 on a bf16 weight: round-to-nearest never moves, stochastic rounding does
    p = torch.nn.Parameter(torch.ones(10_000, dtype=torch.bfloat16))
    nearest = torch.ones(10_000, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    for _ in range(100):
        copy_stochastic_(p.data, p.data.float() - 1e-4, gen)
        nearest = (nearest.float() - 1e-4).to(torch.bfloat16)
    assert nearest.float().mean() == 1.0
    assert p.float().mean().item() == pytest.approx(0.99, abs=2e-3)


def test_fused_backward_equals_a_normal_step():
    def run(fused: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        opt = Adafactor(model.parameters(), lr=1e-2)
        hooks = FusedBackward(opt, list(model.parameters())) if fused else None
        for i in range(4):
            loss = model(torch.randn(5, 8, generator=torch.Generator().manual_seed(i))).pow(2).mean()
            loss.backward()
            if fused:
                assert all(p.grad is None for p in model.parameters())  # freed as soon as used
            else:
                opt.step()
                opt.zero_grad(set_to_none=True)
        if hooks:
            hooks.remove()
        return [p.detach() for p in model.parameters()]

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)


def test_stream_save_equals_save_file(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4)}
    stream_save_safetensors(tensors, tmp_path / "s.safetensors", {"k": "v"}, dtype=torch.float16)
    save_file({"a": tensors["a"].half(), "b": tensors["b"].half(), "c": tensors["c"]}, tmp_path / "r.safetensors")
    s, r = load_file(tmp_path / "s.safetensors"), load_file(tmp_path / "r.safetensors")
    assert s.keys() == r.keys() and all(torch.equal(s[k], r[k]) for k in s)


FULL = ("--max_train_steps", "6", "--learning_rate", "1e-3")


def test_finetune_resume_exact_and_bf16_fused_path(tmp_path, cached, tiny_files, capsys):  # noqa: F811
    assert train(cached, tiny_files, tmp_path / "a", *FULL, command="finetune") == 0
    assert train(cached, tiny_files, tmp_path / "b", *FULL, "--save_every_n_steps", "3", "--save_state", command="finetune") == 0
    assert train(cached, tiny_files, tmp_path / "c", *FULL, "--resume", str(tmp_path / "b/lora-step00000003-state"),
                 "--save_precision", "fp32", command="finetune") == 0
    a = load_file(tmp_path / "a/lora.safetensors")
    c = load_file(tmp_path / "c/lora.safetensors")
    assert all(torch.equal(a[k].float(), c[k].to(torch.bfloat16).float()) for k in a)  # a was saved in bf16
    assert "transformer_blocks.0.attn.to_q.weight" in a and a["img_in.weight"].dtype == torch.bfloat16
    args = ("--optimizer_type", "adafactor", "--fused_backward_pass", "--max_grad_norm", "0", "--full_bf16",
            "--mixed_precision", "bf16", "--mem_eff_save", "--max_train_steps", "3", "--learning_rate", "1e-3")
    assert train(cached, tiny_files, tmp_path / "f", *args, command="finetune") == 0
    assert train(cached, tiny_files, tmp_path / "g", *args[:3], "--max_train_steps", "1", command="finetune") == 2
    assert "no global gradient norm can be clipped" in capsys.readouterr().err
