"""A LoRA network over a model's Linear layers, attached with forward hooks so the base model's
modules and state-dict keys stay untouched (merging and full-model saves need no unwrapping).

delta(x) = multiplier * (alpha / rank) * up(down(dropout(x))), down: [rank, in], up: [out, rank] (zero-init).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from flowtuner.errors import ConfigError


@dataclass
class LoRAWeights:
    """One module's LoRA: the format-independent form every file format converts to and from."""

    down: torch.Tensor  # [rank, in]
    up: torch.Tensor  # [out, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        return (self.up.float() @ self.down.float()) * self.scale


def kohya_name(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def select_modules(model: nn.Module, candidates: Iterable[str], include: list[str], exclude: list[str]) -> list[str]:
    """Linear module paths to train. A pattern (regex, full match) matches a module by its dotted path
    (`transformer_blocks.0.img_mod.1`) or its kohya name (`lora_unet_transformer_blocks_0_img_mod_1`),
    so patterns written for either convention work. include adds to the candidates, exclude removes."""
    compiled = lambda pats: [re.compile(p) for p in pats]  # noqa: E731
    inc, exc = compiled(include), compiled(exclude)
    hit = lambda pats, path: any(p.fullmatch(path) or p.fullmatch(kohya_name(path)) for p in pats)  # noqa: E731
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = [p for p in linears if (p in set(candidates) or hit(inc, p)) and not hit(exc, p)]
    return sorted(chosen, key=natural_key)


def natural_key(path: str) -> list:
    """Sort key that puts transformer_blocks.2 before transformer_blocks.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


class LoRAModule(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        # alpha 0 means "no scaling" (alpha = rank), as in kohya / musubi-tuner, not a LoRA that does nothing
        self.alpha, self.rank, self.dropout = float(alpha or rank), rank, dropout
        self.multiplier = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.down.weight.dtype)
        if self.training and self.dropout:
            h = nn.functional.dropout(h, self.dropout)
        return self.up(self.down(h)) * (self.multiplier * self.alpha / self.rank)


class LoRANetwork(nn.Module):
    def __init__(self, model: nn.Module, paths: list[str], rank: int, alpha: float, dropout: float = 0.0,
                 shapes: dict[str, tuple[int, float]] | None = None):
        """One LoRAModule per path, each of `rank` / `alpha` unless `shapes` gives that path its own (rank, alpha)."""
        super().__init__()
        if not paths:
            raise ConfigError("the LoRA targets no module; check --network_args include/exclude patterns.")
        self.paths = paths
        self.loras = nn.ModuleDict()
        for path in paths:
            m = model.get_submodule(path)
            r, a = (shapes or {}).get(path, (rank, alpha))
            self.loras[path.replace(".", "_")] = LoRAModule(m.in_features, m.out_features, r, a, dropout)
        self._handles: list = []
        self._model = [model]  # not a submodule: the base model's weights are not the network's

    @classmethod
    def from_weights(cls, model: nn.Module, weights: dict[str, LoRAWeights], source: str, dropout: float = 0.0,
                     selected: list[str] | None = None) -> "LoRANetwork":
        """A network over exactly the modules a LoRA file has, each with the file's rank and alpha, holding
        the file's weights: continuing a LoRA trains what it trained (musubi-tuner's LoRAs include img_mod.1 /
        txt_mod.1, for instance), whatever the default targets are. `selected`: the modules the user's
        include / exclude patterns pick, which must then be the file's."""
        check_modules(model, weights, source)
        paths = sorted(weights, key=natural_key)
        if selected is not None and set(selected) != set(paths):
            differ = sorted(set(selected) ^ set(paths), key=natural_key)
            raise ConfigError(f"{source} has {len(paths)} LoRA modules, the --network_args patterns select {len(selected)} "
                              f"({len(differ)} differ, e.g. {differ[0]}); a continued LoRA trains the file's modules: "
                              "drop include_patterns / exclude_patterns.")
        network = cls(model, paths, 0, 0.0, dropout, {p: (w.rank, w.alpha) for p, w in weights.items()})
        network.load_weights(weights, source)
        return network

    def attach(self) -> "LoRANetwork":
        model = self._model[0]
        for path in self.paths:
            lora = self.module_of(path)
            self._handles.append(model.get_submodule(path).register_forward_hook(
                lambda mod, args, out, lora=lora: out + lora(args[0]).to(out.dtype)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def set_multiplier(self, value: float) -> None:
        for lora in self.loras.values():
            lora.multiplier = value

    def module_of(self, path: str) -> LoRAModule:
        return self.loras[path.replace(".", "_")]  # ModuleDict keys cannot hold dots

    def loraplus_groups(self, lr: float, ratio: float) -> list[dict]:
        """LoRA+ optimizer groups as musubi-tuner's prepare_optimizer_params: lora_down (A) at lr, lora_up (B) at lr x ratio."""
        up = [m.up.weight for m in self.loras.values()]
        ups = {id(p) for p in up}
        return [{"params": [p for p in self.parameters() if id(p) not in ups], "lr": lr}, {"params": up, "lr": lr * ratio}]

    def common_shape(self) -> tuple[int, float]:
        """The most frequent (rank, alpha): what `ss_network_dim` / `ss_network_alpha` describe."""
        counts = Counter((m.rank, m.alpha) for m in self.loras.values())
        return counts.most_common(1)[0][0]

    def weights(self) -> dict[str, LoRAWeights]:
        return {path: LoRAWeights(m.down.weight.detach(), m.up.weight.detach(), m.alpha)
                for path in self.paths for m in [self.module_of(path)]}

    def load_weights(self, weights: dict[str, LoRAWeights], source: str) -> None:
        missing = sorted(set(self.paths) - set(weights))
        extra = sorted(set(weights) - set(self.paths))
        if missing or extra:
            raise ConfigError(f"{source}: LoRA modules do not match the network ({len(missing)} missing, e.g. "
                              f"{(missing or ['-'])[0]}; {len(extra)} extra, e.g. {(extra or ['-'])[0]}).")
        for path, w in weights.items():
            lora = self.module_of(path)
            if w.down.shape != lora.down.weight.shape or w.up.shape != lora.up.weight.shape:
                raise ConfigError(f"{source}: {path} has rank {w.rank}, the network has rank {lora.rank}.")
            with torch.no_grad():
                lora.down.weight.copy_(w.down)
                lora.up.weight.copy_(w.up)
            lora.alpha = w.alpha


def check_modules(model: nn.Module, weights: dict[str, LoRAWeights], source: str) -> None:
    """Every LoRA module must be a Linear of `model` with the LoRA's in / out sizes."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    foreign = sorted((p for p in weights if p not in linears), key=natural_key)
    if foreign:
        raise ConfigError(f"{source}: {len(foreign)} of its {len(weights)} LoRA modules are not Linear layers of this DiT "
                          f"(e.g. {foreign[0]}); the LoRA was made for another model.")
    for path, w in weights.items():
        linear = linears[path]
        if (w.down.shape[1], w.up.shape[0]) != (linear.in_features, linear.out_features):
            raise ConfigError(f"{source}: {path} maps {w.down.shape[1]} -> {w.up.shape[0]} features in the LoRA, "
                              f"{linear.in_features} -> {linear.out_features} in this DiT; the LoRA was made for "
                              "another model size.")


@torch.no_grad()
def merge_into(model: nn.Module, weights: dict[str, LoRAWeights], multiplier: float = 1.0, source: str = "LoRA") -> None:
    """W <- W + multiplier * (alpha / rank) * up @ down, computed in float32 (fp8 weights: re-quantised)."""
    from flowtuner.weights.fp8 import Fp8Linear

    check_modules(model, weights, source)
    for path, w in weights.items():
        linear = model.get_submodule(path)
        if isinstance(linear, Fp8Linear):
            linear.merge_(multiplier * w.delta())
            continue
        linear.weight.copy_((linear.weight.float() + multiplier * w.delta().to(linear.weight.device)).to(linear.weight.dtype))
