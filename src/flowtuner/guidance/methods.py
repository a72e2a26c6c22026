"""Guidance methods as composable hooks, in ComfyUI's order: pre-CFG hooks rewrite the (cond, uncond)
predictions, one CFG function combines them, post-CFG hooks rewrite the result. They work on denoised
predictions D (x0 space) laid out as an image grid.

The layout is a choice (`LAYOUTS`, `--guidance_layout`): by default the 2-D grid [B, C, H, W] the methods
are written for; `comfyui` adds ComfyUI's frame axis, [B, C, 1, H, W], the shape ComfyUI hands these
hooks for Qwen-Image. Each method reduces over the axes ComfyUI's code names (APG: the last three;
RescaleCFG: 1, 2, 3; FreSca: a centre box on every axis after the channels), so the same code gives the
intended result on the grid and ComfyUI's on the 5-D layout, where FreSca degenerates to a plain scale
and RescaleCFG / APG reduce over other axes. tests/test_comfyui_parity.py runs ComfyUI's own patch
functions against both. Formulas: ../shared/reference/guidance-and-sampling.md §3.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from flowtuner.errors import ConfigError


@dataclass
class Step:
    """What a hook sees: the current (grid) state x, sigma, the CFG scale, and the predictions."""

    x: torch.Tensor
    sigma: float
    scale: float
    cond: torch.Tensor  # D_c
    uncond: torch.Tensor | None  # D_u (None when the unconditional pass is skipped)
    perturbed: Callable[[str], torch.Tensor] | None = None  # blocks -> D_c with perturbed attention there
    # methods with `reads_attention`: the unconditional pass's self-attention probabilities [B x heads, HW, HW] at the
    # denoiser's recording site, and the model rerun with the unconditional conditioning: x (grid) -> D (grid)
    uncond_attention: torch.Tensor | None = None
    uncond_model: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class Method:
    stage: str  # "pre", "cfg", "post", "mask" (a denoise-mask function for inpainting) or "model" (a model patch)
    fn: Callable
    defaults: dict
    help: str
    state: dict = field(default_factory=dict)
    needs_uncond: bool = False  # runs the unconditional pass at any CFG scale (ComfyUI's disable_cfg1_optimization)
    reads_attention: bool = False  # records the unconditional pass's self-attention (the denoiser's recording site)
    check: Callable[[dict], None] | None = None  # validates the parsed options (a ConfigError names the bad one)


def _norm(t: torch.Tensor, dims) -> torch.Tensor:
    return torch.linalg.vector_norm(t, dim=dims, keepdim=True)


def plain_cfg(s: Step, p: dict, state: dict) -> torch.Tensor:
    return s.cond if s.uncond is None else s.uncond + s.scale * (s.cond - s.uncond)


def rescale_cfg(s: Step, p: dict, state: dict) -> torch.Tensor:
    """RescaleCFG: CFG in (VP) v-space, its std pulled toward the conditional one (std over axes 1-3)."""
    if s.uncond is None:
        return s.cond
    sig = s.sigma
    x = s.x / (sig**2 + 1)
    k = (sig**2 + 1) ** 0.5 / sig
    v_c, v_u = (x - s.cond) * k, (x - s.uncond) * k
    v_cfg = v_u + s.scale * (v_c - v_u)
    dims = (1, 2, 3)  # per sample on the grid; per width column on the 5-D layout, as ComfyUI
    ratio = v_c.std(dim=dims, keepdim=True) / v_cfg.std(dim=dims, keepdim=True)
    m = p["multiplier"]
    v = m * v_cfg * ratio + (1 - m) * v_cfg
    return x - v / k


def renorm_cfg(s: Step, p: dict, state: dict) -> torch.Tensor:
    """RenormCFG: CFG only while sigma < cfg_trunc, its norm capped at renorm_cfg x the conditional norm."""
    if s.uncond is None or not s.sigma < p["cfg_trunc"]:
        return s.cond
    h = s.uncond + s.scale * (s.cond - s.uncond)
    if p["renorm_cfg"] > 0:
        dims = tuple(range(1, h.dim()))
        n_c, n_h = _norm(s.cond, dims), _norm(h, dims)
        h = torch.where(n_h >= p["renorm_cfg"] * n_c, h * p["renorm_cfg"] * n_c / n_h, h)
    return h


def cfg_norm(s: Step, d: torch.Tensor, p: dict, state: dict) -> torch.Tensor:
    """CFGNorm: scale by min(1, |D_c| / |D_cfg|), norms over channels at each location; times strength."""
    ratio = (_norm(s.cond, 1) / (_norm(d, 1) + 1e-8)).clamp(0, 1)
    return d * ratio * p["strength"]


def cfg_zero_star(s: Step, d: torch.Tensor, p: dict, state: dict) -> torch.Tensor:
    if s.uncond is None:
        return d
    a, b = s.x - s.cond, s.x - s.uncond
    dims = tuple(range(1, d.dim()))
    alpha = (a * b).sum(dims, keepdim=True) / ((b * b).sum(dims, keepdim=True) + 1e-8)
    return d + s.uncond * (alpha - 1) + s.scale * s.uncond * (1 - alpha)


def mahiro(s: Step, d: torch.Tensor, p: dict, state: dict) -> torch.Tensor:
    uncond = s.uncond if s.uncond is not None else torch.zeros_like(s.cond)
    lead, lead_u = s.scale * s.cond, s.scale * uncond
    merged = (lead + d) / 2
    root = lambda t: t.sign() * t.abs().sqrt()  # noqa: E731
    sim = torch.nn.functional.cosine_similarity(root(lead_u), root(merged), dim=1, eps=1e-8).mean()
    k = 2 * (sim + 1)
    return (k * d + (4 - k) * lead) / 4


def apg(s: Step, p: dict, state: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Adaptive Projected Guidance: the guidance's component parallel to D_c is scaled by eta, its norm
    capped, optionally with momentum (reset when sigma rises: a new run). Norms over the last three axes:
    (C, H, W) on the grid, (T, H, W) per channel on the 5-D layout."""
    if s.uncond is None:
        return s.cond, s.uncond
    if state.get("prev_sigma") is not None and s.sigma > state["prev_sigma"]:
        state.pop("running", None)
    state["prev_sigma"] = s.sigma
    g = s.cond - s.uncond
    if p["momentum"] != 0:
        state["running"] = g if "running" not in state else p["momentum"] * state["running"] + g
        g = state["running"]
    dims = (-1, -2, -3)
    if p["norm_threshold"] > 0:
        g = g * torch.clamp(p["norm_threshold"] / _norm(g, dims), max=1.0)
    u = s.cond / _norm(s.cond, dims)
    parallel = (g * u).sum(dims, keepdim=True) * u
    g = (g - parallel) + p["eta"] * parallel
    return s.uncond + g + (s.cond - s.uncond) / s.scale, s.uncond


def tcfg(s: Step, p: dict, state: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tangential damping: keep only the uncond score's component along the top singular direction of
    [uncond score, cond score]."""
    if s.uncond is None:
        return s.cond, s.uncond
    b = s.x.shape[0]
    s_c, s_u = (s.x - s.cond).reshape(b, 1, -1).float(), (s.x - s.uncond).reshape(b, 1, -1).float()
    _, _, vh = torch.linalg.svd(torch.cat([s_u, s_c], dim=1), full_matrices=False)
    v1 = vh[:, 0:1, :]
    s_u = (s_u @ v1.transpose(-2, -1)) @ v1
    return s.cond, s.x - s_u.reshape(s.x.shape).to(s.x.dtype)


def fresca(s: Step, p: dict, state: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Frequency-scaled guidance over the 2-D grid: low frequencies x scale_low, high x scale_high.

    The low-frequency box spans every axis after the channels, as ComfyUI's: a single frame axis (the
    5-D layout) has no centre box, so there the whole spectrum is scaled by scale_high."""
    if s.uncond is None:
        return s.cond, s.uncond
    g = s.cond - s.uncond
    spec = torch.fft.fftshift(torch.fft.fftn(g.float(), dim=(-2, -1)), dim=(-2, -1))
    mask = torch.full(g.shape[2:], p["scale_high"], device=g.device)
    f = p["freq_cutoff"]
    mask[tuple(slice(n // 2 - min(f, n // 2), n // 2 + min(f, n // 2)) for n in g.shape[2:])] = p["scale_low"]
    g2 = torch.fft.ifftn(torch.fft.ifftshift(spec * mask, dim=(-2, -1)), dim=(-2, -1)).real.to(g.dtype)
    return s.uncond + g2, s.uncond


def pag(s: Step, d: torch.Tensor, p: dict, state: dict) -> torch.Tensor:
    """Perturbed-attention guidance: D + scale (D_c - D_pag), D_pag = the conditional pass with the image
    self-attention of `blocks` replaced by the identity (one extra forward per step)."""
    if p["scale"] == 0:
        return d
    return d + p["scale"] * (s.cond - s.perturbed(p["blocks"]))


def sag(s: Step, d: torch.Tensor, p: dict, state: dict) -> torch.Tensor:
    """Self-attention guidance: D_u blurred where the unconditional pass's self-attention concentrates, renoised to x
    and denoised again (one extra forward); D + scale (degraded - D_sag). Latents of side <= 4 are returned as
    they are (the blur's reflect padding needs more)."""
    if d.dim() != 4:
        raise ConfigError("--guidance sag works on the 2-D latent grid [B, C, H, W]; drop --guidance_layout comfyui.")
    if min(d.shape[2:]) <= 4:
        return d
    degraded = attention_blurred(s.uncond, s.uncond_attention, p["blur_sigma"])
    d_sag = s.uncond_model(degraded + s.x - s.uncond)
    return d + (degraded - d_sag) * p["scale"]


SAG_THRESHOLD = 1.0  # ComfyUI's: a key position whose head-averaged attention column sums above 1 gets blurred


def attention_mask(probs: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """[B x heads, n, n] attention probabilities -> [B, 1, height, width] 0/1 mask (probs' dtype): the key positions
    attended more than average (column sum of the head mean > 1), on the attention's own grid, nearest-upsampled."""
    hw = probs.shape[-1]
    mask = probs.reshape(batch, -1, probs.shape[-2], hw).mean(1).sum(1) > SAG_THRESHOLD
    rows = attention_rows(hw, height, width)
    mask = mask.reshape(batch, rows, hw // rows).unsqueeze(1).to(probs.dtype)
    return torch.nn.functional.interpolate(mask, (height, width))


def attention_rows(tokens: int, height: int, width: int) -> int:
    """The row count of the attention grid of `tokens` cells under a height x width latent: the divisor of `tokens`
    nearest round(sqrt(tokens height / width)), searched upward first (ComfyUI's search)."""
    guess = round(math.sqrt(height / width * tokens))
    for i in range(math.floor(math.sqrt(tokens) / 2)):
        for rows in (guess + i, max(1, guess - i)):
            if tokens % rows == 0:
                return rows
    raise ConfigError(f"--guidance sag: the recorded attention ({tokens} positions) does not tile a {height} x {width} latent.")


def gaussian_blur(img: torch.Tensor, sigma: float, size: int = 9) -> torch.Tensor:
    """Depthwise 2-D Gaussian blur, kernel `size` x `size` (outer product of the normalised 1-D exp(-x^2 / 2 sigma^2)
    at x = -(size-1)/2 .. (size-1)/2), reflect-padded to keep the size."""
    half = (size - 1) / 2
    taps = torch.exp(-0.5 * (torch.linspace(-half, half, size) / sigma) ** 2)
    taps = (taps / taps.sum()).to(img.device, img.dtype)
    channels = img.shape[-3]
    kernel = torch.outer(taps, taps).expand(channels, 1, size, size)
    padded = torch.nn.functional.pad(img, [size // 2] * 4, mode="reflect")
    return torch.nn.functional.conv2d(padded, kernel, groups=channels)


def attention_blurred(d: torch.Tensor, probs: torch.Tensor, sigma: float) -> torch.Tensor:
    """D blurred under the attention mask, kept elsewhere."""
    mask = attention_mask(probs, d.shape[0], d.shape[-2], d.shape[-1])
    return gaussian_blur(d, sigma) * mask + d * (1 - mask)


def _check_sag(p: dict) -> None:
    if not p["blur_sigma"] > 0:  # ComfyUI accepts 0 and divides 0 by 0: every latent NaN
        raise ConfigError(f"--guidance sag: blur_sigma={p['blur_sigma']:g} must be > 0 (0 blurs with 0/0, NaN images); "
                          "use e.g. 0.1 for almost no blur.")


def model_patch(name: str) -> Callable:
    """A patch of the model itself (stage "model"): `fn(denoiser, params)` is the context the whole run samples in;
    the denoiser decides whether it has the blocks (UNet families) or refuses in one line."""
    return lambda denoiser, params: denoiser.model_patch(name, params)


def differential_diffusion(mask: torch.Tensor, sigma_from: float, sigma_to: float, p: dict) -> Callable[[float], torch.Tensor]:
    """DifferentialDiffusion: the soft mask becomes, at each sigma, the region mask >= threshold, the
    threshold falling linearly in sigma from 1 at the first step to 0 at the end (flow models' timestep is
    sigma). 0 < strength < 1 blends that with the soft mask; strength 0 acts as 1, as in ComfyUI."""
    strength = p["strength"]

    def at(sigma: float) -> torch.Tensor:
        threshold = (sigma - sigma_to) / (sigma_from - sigma_to)
        binary = (mask >= threshold).to(mask.dtype)
        return strength * binary + (1 - strength) * mask if 0 < strength < 1 else binary

    return at


METHODS: dict[str, Method] = {
    "rescale_cfg": Method("cfg", rescale_cfg, {"multiplier": 0.7},
                          "CFG in VP v-space, v = m v_cfg std(v_c)/std(v_cfg) + (1 - m) v_cfg; tames over-saturation at high CFG"),
    "renorm_cfg": Method("cfg", renorm_cfg, {"cfg_trunc": 100.0, "renorm_cfg": 1.0},
                         "CFG only while sigma < cfg_trunc, |D_cfg| capped at renorm_cfg |D_c| (Lumina 2's)"),
    "cfg_norm": Method("post", cfg_norm, {"strength": 1.0},
                       "D min(1, |D_c|/|D|) strength, norms over channels per location (the official Qwen-Edit graph)"),
    "cfg_zero_star": Method("post", cfg_zero_star, {},
                            "uncond rescaled by alpha = <x - D_c, x - D_u> / |x - D_u|^2 (CFG-Zero*)"),
    "mahiro": Method("post", mahiro, {},
                     "blend D toward w D_c by the cosine of sqrt-signed uncond and merged predictions"),
    "apg": Method("pre", apg, {"eta": 1.0, "norm_threshold": 5.0, "momentum": 0.0},
                  "CFG on g = D_c - D_u with its part parallel to D_c x eta, |g| <= norm_threshold; high CFG without burn"),
    "tcfg": Method("pre", tcfg, {},
                   "uncond score x - D_u projected on the top singular direction of [uncond, cond] scores"),
    "fresca": Method("pre", fresca, {"scale_low": 1.0, "scale_high": 1.25, "freq_cutoff": 20},
                     "g = D_c - D_u in Fourier space: low frequencies x scale_low, high x scale_high (detail)"),
    "pag": Method("post", pag, {"scale": 3.0, "blocks": "middle"},
                  "D + scale (D_c - D_pag), D_pag with identity image self-attention in blocks (Qwen: N, A-B; SDXL: middle, "
                  "input.ID, output.ID[.INDEX]; '+' joins); +1 forward/step"),
    "sag": Method("post", sag, {"scale": 0.5, "blur_sigma": 2.0},
                  "UNet only: D + scale (B - D_sag), B = D_u Gaussian-blurred (9 taps, blur_sigma) where the uncond pass's "
                  "middle-block self-attention concentrates, D_sag = the uncond pass on B + x - D_u; uncond runs even at "
                  "CFG 1; +1 forward/step", needs_uncond=True, reads_attention=True, check=_check_sag),
    "freeu": Method("model", model_patch("freeu"), {"b1": 1.1, "b2": 1.2, "s1": 0.9, "s2": 0.2},
                    "UNet patch: backbone h x b on half its channels, skip's lowest frequencies x s, at h = 4 / 2 x model channels (b1 s1 / b2 s2)"),
    "freeu_v2": Method("model", model_patch("freeu_v2"), {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2},
                       "FreeU with the backbone scale 1 + (b - 1) m, m = its channel mean min-max normalised per image"),
    "differential_diffusion": Method("mask", differential_diffusion, {"strength": 1.0},
                                     "soft --mask: mask >= (sigma - sigma_min)/(sigma_0 - sigma_min) regenerates; region grows as sigma falls"),
}


def _with_frame_axis(grid: tuple[Callable, Callable]) -> tuple[Callable, Callable]:
    to_grid, from_grid = grid
    return (lambda x: to_grid(x).unsqueeze(2)), (lambda d: from_grid(d.squeeze(2)))


# --guidance_layout: how the predictions are laid out for the hooks, from the family's 2-D (to_grid, from_grid)
LAYOUTS: dict[str, Callable[[tuple[Callable, Callable]], tuple[Callable, Callable]]] = {
    "grid": lambda grid: grid,
    "comfyui": _with_frame_axis,
}
LAYOUT_DIFFERS = ("apg", "fresca", "rescale_cfg")  # the methods whose result depends on the layout


def parse_guidance(text: str) -> tuple[str, dict]:
    """'apg:eta=1,norm_threshold=20' -> ('apg', {...defaults, eta: 1.0, norm_threshold: 20.0})."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if name not in METHODS:
        raise ConfigError(f"--guidance {name}: unknown; choose one of {', '.join(METHODS)}.")
    params = dict(METHODS[name].defaults)
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in params:
            raise ConfigError(f"--guidance {name}: unknown option {key!r}; valid: {', '.join(params) or 'none'}.")
        try:
            params[key] = type(params[key])(float(value)) if isinstance(params[key], (int, float)) else value
        except ValueError:
            raise ConfigError(f"--guidance {name}: {key} needs a number, got {value!r}.") from None
    if METHODS[name].check is not None:
        METHODS[name].check(params)
    return name, params
