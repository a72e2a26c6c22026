"""Small PNG plots drawn with PIL (no plotting dependency): line charts and histograms for loss
curves, sigma distributions and schedules."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from flowtuner.weights.writer import atomic_write_bytes

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194)]
W, H, PAD = 800, 500, 60


def _frame(title: str, x_range: tuple[float, float], y_range: tuple[float, float], xlabel: str, ylabel: str):
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle((PAD, PAD // 2, W - PAD // 2, H - PAD), outline="black")
    draw.text((PAD, 8), title, fill="black")
    (x0, x1), (y0, y1) = x_range, y_range
    for i in range(5):
        fx, fy = i / 4, i / 4
        px = PAD + fx * (W - 1.5 * PAD)
        py = H - PAD - fy * (H - 1.5 * PAD)
        draw.text((px - 15, H - PAD + 5), f"{x0 + fx * (x1 - x0):.3g}", fill="black")
        draw.text((5, py - 6), f"{y0 + fy * (y1 - y0):.3g}", fill="black")
    draw.text((W // 2 - 20, H - 18), xlabel, fill="black")
    draw.text((5, 14), ylabel, fill="black")

    def to_px(x: float, y: float) -> tuple[float, float]:
        fx = (x - x0) / ((x1 - x0) or 1)
        fy = (y - y0) / ((y1 - y0) or 1)
        return PAD + fx * (W - 1.5 * PAD), H - PAD - fy * (H - 1.5 * PAD)

    return img, draw, to_px


def _save(img: Image.Image, path: str | Path) -> Path:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(buf.getvalue(), path)
    return Path(path)


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, title: str,
              xlabel: str = "", ylabel: str = "") -> Path:
    xs = [x for s in series.values() for x in s[0]] or [0, 1]
    ys = [y for s in series.values() for y in s[1]] or [0, 1]
    img, draw, to_px = _frame(title, (min(xs), max(xs)), (min(ys), max(ys)), xlabel, ylabel)
    for i, (name, (sx, sy)) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        points = [to_px(x, y) for x, y in zip(sx, sy)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for p in points if len(points) <= 60 else []:
            draw.ellipse((p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2), fill=color)
        draw.text((W - PAD - 150, PAD // 2 + 6 + 14 * i), name, fill=color)
    return _save(img, path)


def histogram(values: Sequence[float], path: str | Path, title: str, bins: int = 50, lo: float = 0.0, hi: float = 1.0,
              overlay: tuple[Sequence[float], Sequence[float]] | None = None, xlabel: str = "") -> Path:
    counts = [0] * bins
    for v in values:
        if lo <= v <= hi:
            counts[min(bins - 1, int((v - lo) / (hi - lo) * bins))] += 1
    density = [c / max(1, len(values)) * bins / (hi - lo) for c in counts]
    top = max(density + (list(overlay[1]) if overlay else [])) or 1
    img, draw, to_px = _frame(title, (lo, hi), (0, top), xlabel, "density")
    for i, d in enumerate(density):
        a, b = to_px(lo + i * (hi - lo) / bins, 0), to_px(lo + (i + 1) * (hi - lo) / bins, d)
        draw.rectangle((a[0], b[1], b[0] - 1, a[1]), fill=COLORS[0])
    if overlay:
        draw.line([to_px(x, y) for x, y in zip(*overlay)], fill=COLORS[3], width=2)
    return _save(img, path)
