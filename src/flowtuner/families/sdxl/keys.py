"""SDXL key names both ways: the ldm / sgm names of single-file checkpoints (A1111, civitai, ComfyUI) and the
diffusers / transformers names of the modules flowtuner builds.

Tables of module renames (a diffusers module path -> an ldm module path; the rest of a key is kept), generated
for a layout (block counts, which blocks attend), plus the few value changes: the VAE's attention projections are
1x1 convolutions in ldm files, OpenCLIP stores `text_projection` transposed (x @ P) and fuses q/k/v into
`in_proj_weight`. `to_diffusers` / `to_ldm` are pure functions over a state dict; the loaders use the streaming
forms (`*_items`) so that each tensor is read once."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from flowtuner.errors import WeightsError

# where each component lives in a single-file SDXL checkpoint
PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip_l": "conditioner.embedders.0.transformer.",
    "clip_g": "conditioner.embedders.1.model.",
}

UNET_STEM = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}
UNET_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
VAE_STEM = {
    "encoder.conv_in": "encoder.conv_in", "encoder.conv_out": "encoder.conv_out", "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in", "decoder.conv_out": "decoder.conv_out", "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv",
}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
CLIP_G_STEM = {
    "text_model.embeddings.token_embedding": "token_embedding",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm": "ln_final",
    "text_projection.weight": "text_projection",
}
CLIP_G_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                "self_attn": "attn"}
# OpenCLIP's fused attention input projection -> transformers' three Linears (rows q, k, v)
FUSED_QKV = {"in_proj_weight": ("q_proj.weight", "k_proj.weight", "v_proj.weight"),
             "in_proj_bias": ("q_proj.bias", "k_proj.bias", "v_proj.bias")}
# ldm keys that are no module weight: read past on load (position_ids is a buffer transformers rebuilds; OpenCLIP's
# contrastive temperature and causal mask are unused by a text encoder)
DROPPED = {"clip_l": ("text_model.embeddings.position_ids",), "clip_g": ("logit_scale", "attn_mask"),
           "unet": (), "vae": ()}


def _flat(value: torch.Tensor) -> torch.Tensor:
    return value.reshape(value.shape[0], value.shape[1]) if value.ndim == 4 else value


def _conv1x1(value: torch.Tensor) -> torch.Tensor:
    return value.reshape(*value.shape, 1, 1) if value.ndim == 2 else value


def _transpose(value: torch.Tensor) -> torch.Tensor:
    return value.t().contiguous()


@dataclass(frozen=True)
class KeyTable:
    """One component's renames: `modules` maps a diffusers module path (or whole key) to its ldm path; `values`
    (regex on the diffusers key, ldm -> diffusers, diffusers -> ldm) for tensors whose layout differs too."""

    modules: dict[str, str]
    values: tuple[tuple[str, Callable, Callable], ...] = ()
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()

    def __post_init__(self):
        back = {v: k for k, v in self.modules.items()}
        if len(back) != len(self.modules):
            raise AssertionError("key table is not one-to-one")
        object.__setattr__(self, "_back", back)

    def _rename(self, key: str, table: dict[str, str]) -> str | None:
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            head = ".".join(parts[:n])
            if head in table:
                return ".".join([table[head], *parts[n:]])
        return None

    def diffusers_name(self, ldm_key: str) -> str | None:
        return self._rename(ldm_key, self._back)

    def ldm_name(self, diffusers_key: str) -> str | None:
        return self._rename(diffusers_key, self.modules)

    def value_fn(self, diffusers_key: str, to_ldm: bool) -> Callable | None:
        for pattern, to_d, to_l in self.values:
            if re.search(pattern, diffusers_key):
                return to_l if to_ldm else to_d
        return None


def _unknown(component: str, key: str) -> WeightsError:
    return WeightsError(f"{component}: key {key!r} has no place in an SDXL {component} (not SDXL, or a modified model).")


def to_diffusers_items(keys: Iterable[str], read: Callable[[str], torch.Tensor], table: KeyTable,
                       component: str = "model") -> Iterator[tuple[str, torch.Tensor]]:
    """(diffusers key, tensor) for ldm `keys`, each read once through `read`."""
    for key in keys:
        if key in table.dropped:
            continue
        module, _, leaf = key.rpartition(".")
        if leaf in table.fused and (target := table.diffusers_name(module)) is not None:
            value = read(key)
            width = value.shape[0] // 3
            for i, name in enumerate(table.fused[leaf]):
                yield f"{target}.{name}", value[i * width:(i + 1) * width].clone()
            continue
        name = table.diffusers_name(key)
        if name is None:
            raise _unknown(component, key)
        fn = table.value_fn(name, to_ldm=False)
        yield name, fn(read(key)) if fn else read(key)


def to_ldm_items(keys: Iterable[str], read: Callable[[str], torch.Tensor], table: KeyTable,
                 component: str = "model") -> Iterator[tuple[str, torch.Tensor]]:
    """(ldm key, tensor) for diffusers `keys` (q/k/v fused where the ldm layout fuses them)."""
    parts = {name: (leaf, i) for leaf, names in table.fused.items() for i, name in enumerate(names)}
    keys = list(keys)
    present = set(keys)
    for key in keys:
        for name, (leaf, i) in parts.items():
            if key.endswith("." + name):
                break
        else:
            leaf = None
        if leaf is not None:
            if i:  # k and v travel with q
                continue
            module = key[: -len(name) - 1]
            sources = [f"{module}.{n}" for n in table.fused[leaf]]
            missing = [s for s in sources if s not in present]
            target = table.ldm_name(module)
            if missing or target is None:
                raise _unknown(component, missing[0] if missing else key)
            yield f"{target}.{leaf}", torch.cat([read(s) for s in sources])
            continue
        name = table.ldm_name(key)
        if name is None:
            raise _unknown(component, key)
        fn = table.value_fn(key, to_ldm=True)
        yield name, fn(read(key)) if fn else read(key)


def diffusers_shapes(keys: Iterable[str], shape: Callable[[str], tuple[int, ...]], table: KeyTable,
                     component: str = "model") -> dict[str, tuple[int, ...]]:
    """The diffusers-named shapes of ldm `keys`, converted on the meta device (nothing read)."""
    meta = lambda key: torch.empty(shape(key), device="meta")  # noqa: E731
    return {k: tuple(v.shape) for k, v in to_diffusers_items(keys, meta, table, component)}


def to_diffusers(state: Mapping[str, torch.Tensor], table: KeyTable, component: str = "model") -> dict[str, torch.Tensor]:
    return dict(to_diffusers_items(state.keys(), state.__getitem__, table, component))


def to_ldm(state: Mapping[str, torch.Tensor], table: KeyTable, component: str = "model") -> dict[str, torch.Tensor]:
    return dict(to_ldm_items(state.keys(), state.__getitem__, table, component))


# ---- layouts: what the tables depend on -------------------------------------------------------------------------

@dataclass(frozen=True)
class UNetLayout:
    layers_per_block: int
    attends: tuple[bool, ...]  # per down block (up blocks mirror it)

    @classmethod
    def from_config(cls, config: Mapping) -> "UNetLayout":
        return cls(config["layers_per_block"], tuple(t.startswith("CrossAttn") for t in config["down_block_types"]))

    @classmethod
    def from_ldm_keys(cls, keys: Iterable[str]) -> "UNetLayout":
        keys = list(keys)
        ops = sorted(int(m.group(1)) for k in keys if (m := re.match(r"^input_blocks\.(\d+)\.0\.op\.weight$", k)))
        outputs = {int(m.group(1)) for k in keys if (m := re.match(r"^output_blocks\.(\d+)\.", k))}
        if not ops or not outputs:
            raise WeightsError("UNet: no downsampling or output blocks: not an SDXL UNet.")
        per = ops[0]  # the first downsampler follows layers_per_block resnets after the stem
        n = len(outputs) // per
        attends = tuple(f"input_blocks.{1 + b * per}.1.proj_in.weight" in keys for b in range(n))
        return cls(per - 1, attends)

    @classmethod
    def from_diffusers_keys(cls, keys: Iterable[str]) -> "UNetLayout":
        keys = list(keys)
        n = len({int(m.group(1)) for k in keys if (m := re.match(r"^down_blocks\.(\d+)\.", k))})
        layers = len({m.group(1) for k in keys if (m := re.match(r"^down_blocks\.0\.resnets\.(\d+)\.", k))})
        return cls(layers, tuple(any(k.startswith(f"down_blocks.{b}.attentions.") for k in keys) for b in range(n)))


def _resnet(diffusers: str, ldm: str, leaves: Mapping[str, str]) -> dict[str, str]:
    return {f"{diffusers}.{d}": f"{ldm}.{sub}" for d, sub in leaves.items()}


def unet_table(layout: UNetLayout) -> KeyTable:
    modules = dict(UNET_STEM)
    per, n = layout.layers_per_block + 1, len(layout.attends)
    for b, attends in enumerate(layout.attends):
        for j in range(layout.layers_per_block):
            i = 1 + b * per + j
            modules.update(_resnet(f"down_blocks.{b}.resnets.{j}", f"input_blocks.{i}.0", UNET_RESNET))
            if attends:
                modules[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
        if b < n - 1:
            modules[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{1 + b * per + layout.layers_per_block}.0.op"
    modules.update(_resnet("mid_block.resnets.0", "middle_block.0", UNET_RESNET))
    modules["mid_block.attentions.0"] = "middle_block.1"
    modules.update(_resnet("mid_block.resnets.1", "middle_block.2", UNET_RESNET))
    for u, attends in enumerate(reversed(layout.attends)):
        for j in range(per):
            i = u * per + j
            modules.update(_resnet(f"up_blocks.{u}.resnets.{j}", f"output_blocks.{i}.0", UNET_RESNET))
            if attends:
                modules[f"up_blocks.{u}.attentions.{j}"] = f"output_blocks.{i}.1"
        if u < n - 1:
            modules[f"up_blocks.{u}.upsamplers.0.conv"] = f"output_blocks.{u * per + per - 1}.{2 if attends else 1}.conv"
    return KeyTable(modules, dropped=DROPPED["unet"])


@dataclass(frozen=True)
class VAELayout:
    blocks: int
    layers_per_block: int

    @classmethod
    def from_config(cls, config: Mapping) -> "VAELayout":
        return cls(len(config["block_out_channels"]), config["layers_per_block"])

    @classmethod
    def from_ldm_keys(cls, keys: Iterable[str]) -> "VAELayout":
        keys = list(keys)
        blocks = {int(m.group(1)) for k in keys if (m := re.match(r"^encoder\.down\.(\d+)\.", k))}
        layers = {int(m.group(1)) for k in keys if (m := re.match(r"^encoder\.down\.0\.block\.(\d+)\.", k))}
        return cls(len(blocks), len(layers))

    @classmethod
    def from_diffusers_keys(cls, keys: Iterable[str]) -> "VAELayout":
        keys = list(keys)
        blocks = {int(m.group(1)) for k in keys if (m := re.match(r"^encoder\.down_blocks\.(\d+)\.", k))}
        layers = {int(m.group(1)) for k in keys if (m := re.match(r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))}
        return cls(len(blocks), len(layers))


def vae_table(layout: VAELayout) -> KeyTable:
    modules = dict(VAE_STEM)
    n = layout.blocks
    for b in range(n):
        for j in range(layout.layers_per_block):
            modules.update(_resnet(f"encoder.down_blocks.{b}.resnets.{j}", f"encoder.down.{b}.block.{j}", VAE_RESNET))
        if b < n - 1:
            modules[f"encoder.down_blocks.{b}.downsamplers.0.conv"] = f"encoder.down.{b}.downsample.conv"
    for u in range(n):
        b = n - 1 - u  # ldm numbers decoder stages from the latent side's far end
        for j in range(layout.layers_per_block + 1):
            modules.update(_resnet(f"decoder.up_blocks.{u}.resnets.{j}", f"decoder.up.{b}.block.{j}", VAE_RESNET))
        if u < n - 1:
            modules[f"decoder.up_blocks.{u}.upsamplers.0.conv"] = f"decoder.up.{b}.upsample.conv"
    for side in ("encoder", "decoder"):
        modules.update(_resnet(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", VAE_RESNET))
        modules.update(_resnet(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", VAE_RESNET))
        modules.update(_resnet(f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", VAE_ATTENTION))
    attention_weight = r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$"
    return KeyTable(modules, values=((attention_weight, _flat, _conv1x1),), dropped=DROPPED["vae"])


def clip_l_table() -> KeyTable:
    """transformers' CLIPTextModel names are the ldm names (under conditioner.embedders.0.transformer.)."""
    return KeyTable({"text_model": "text_model"}, dropped=DROPPED["clip_l"])


def clip_g_layers(ldm_keys: Iterable[str]) -> int:
    return len({m.group(1) for k in ldm_keys if (m := re.match(r"^transformer\.resblocks\.(\d+)\.", k))})


def clip_g_table(layers: int) -> KeyTable:
    """OpenCLIP bigG (every one of its layers: SDXL reads the penultimate one's output, the pooled vector needs the
    last one and ln_final) <-> transformers' CLIPTextModelWithProjection."""
    modules = dict(CLIP_G_STEM)
    for i in range(layers):
        for d, o in CLIP_G_LAYER.items():
            modules[f"text_model.encoder.layers.{i}.{d}"] = f"transformer.resblocks.{i}.{o}"
    return KeyTable(modules, values=((r"^text_projection\.weight$", _transpose, _transpose),), fused=FUSED_QKV,
                    dropped=DROPPED["clip_g"])
