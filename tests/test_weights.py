"""The safetensors reader and fp8 dequantisation on synthetic files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from flowtuner.errors import WeightsError
from flowtuner.weights import atomic_save_safetensors, open_checkpoint
from flowtuner.weights.materialize import read_dequantized


def test_single_file_round_trip_all_dtypes(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(6).reshape(2, 3),
               "d": torch.tensor(2.5), "e": torch.randn(4, 4).to(torch.float8_e4m3fn), "f": torch.zeros(0, 3)}
    atomic_save_safetensors(tensors, tmp_path / "x.safetensors", {"k": "v"})
    ckpt = open_checkpoint(tmp_path / "x.safetensors")
    assert ckpt.metadata == {"k": "v"}
    for key, value in tensors.items():
        got = ckpt.read(key)
        assert got.dtype == value.dtype and got.shape == value.shape
        assert torch.equal(got.reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8))


def test_sharded_folder_and_shard_path(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "m-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(3)}, tmp_path / "m-00002-of-00002.safetensors")
    index = {"weight_map": {"a": "m-00001-of-00002.safetensors", "b": "m-00002-of-00002.safetensors"}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    assert sorted(open_checkpoint(tmp_path).keys()) == ["a", "b"]
    assert sorted(open_checkpoint(tmp_path / "m-00001-of-00002.safetensors").keys()) == ["a", "b"]
    (tmp_path / "m-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="incomplete; missing m-00002-of-00002"):
        open_checkpoint(tmp_path)


def test_bad_files_give_clear_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(64, 64)}, good)
    data = good.read_bytes()
    cases = {
        "trunc.safetensors": (data[: len(data) - 100], "truncated"),
        "empty.safetensors": (b"", "empty or truncated"),
        "garbage.safetensors": (b"hello world, not weights" * 10, "not a safetensors file"),
        "model.gguf": (b"GGUF" + b"\0" * 64, "GGUF"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(WeightsError, match=message):
            open_checkpoint(tmp_path / name)
    torch.save({"w": torch.ones(2)}, tmp_path / "model.ckpt")
    with pytest.raises(WeightsError, match="pickled PyTorch checkpoint"):
        open_checkpoint(tmp_path / "model.ckpt")
    (tmp_path / "model.ckpt").rename(tmp_path / "renamed.safetensors")  # a pickle in disguise
    with pytest.raises(WeightsError, match="pickled PyTorch checkpoint"):
        open_checkpoint(tmp_path / "renamed.safetensors")


def test_fp8_plain_and_scaled_dequantisation(tmp_path):
    w = torch.randn(32, 16) * 3
    scale = w.abs().max() / 448.0
    q_plain = w.to(torch.float8_e4m3fn)
    q_scaled = (w / scale).to(torch.float8_e4m3fn)
    save_file({"lin.weight": q_plain}, tmp_path / "plain.safetensors")
    save_file({"lin.weight": q_scaled, "lin.scale_weight": scale.reshape(1), "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)},
              tmp_path / "scaled.safetensors")
    plain = read_dequantized(open_checkpoint(tmp_path / "plain.safetensors"), "lin.weight", torch.float32)
    scaled = read_dequantized(open_checkpoint(tmp_path / "scaled.safetensors"), "lin.weight", torch.float32)
    assert torch.equal(plain, q_plain.to(torch.float32))
    assert torch.equal(scaled, q_scaled.to(torch.float32) * scale)
    assert (scaled - w).abs().max() / w.abs().max() < 0.07  # within fp8 e4m3 precision
    assert (q_scaled.to(torch.float32) - w).abs().max() > 1.0  # what ignoring the scale would load
