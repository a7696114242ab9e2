"""Pictures of features: PCA to RGB with one basis shared by every panel."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .utils import atomic_path


def pca_basis(features: Sequence[torch.Tensor], k: int = 3):
    """Mean and top-``k`` principal directions of the pixels of all ``(C, h, w)`` maps together."""
    x = torch.cat([f.detach().float().flatten(1).T for f in features])  # (N, C)
    mean = x.mean(0)
    _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
    return mean, v[:k].T  # (C,), (C, k)


def pca_rgb(features: Sequence[torch.Tensor], size: int = 224) -> list:
    """Each ``(C, h, w)`` map projected on the shared basis, scaled to [0, 1] with shared
    per-component ranges, and resized (nearest) to ``size x size`` RGB ``(3, size, size)``."""
    mean, basis = pca_basis(features)
    proj = [((f.detach().float().flatten(1).T - mean) @ basis).T.reshape(-1, *f.shape[-2:]) for f in features]
    allv = torch.cat([p.flatten(1) for p in proj], 1)
    lo, hi = allv.quantile(0.01, dim=1), allv.quantile(0.99, dim=1)
    out = []
    for p in proj:
        p = ((p - lo[:, None, None]) / (hi - lo).clamp_min(1e-8)[:, None, None]).clamp(0, 1)
        out.append(F.interpolate(p[None], size=(size, size), mode="nearest")[0])
    return out


def save_panels(panels: Sequence[torch.Tensor], path, titles: Sequence[str] = (), rows: int = 1) -> Path:
    """Save ``(3, H, W)`` images in [0, 1] side by side (``rows`` rows) as a PNG."""
    from PIL import Image, ImageDraw

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = panels[0].shape[-2:]
    cols = -(-len(panels) // rows)
    pad = 18 if titles else 0
    canvas = Image.new("RGB", (cols * w, rows * (h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, p in enumerate(panels):
        r, c = divmod(i, cols)
        arr = (p.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        canvas.paste(Image.fromarray(arr), (c * w, r * (h + pad) + pad))
        if titles:
            draw.text((c * w + 4, r * (h + pad) + 3), titles[i % len(titles)], fill="black")
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
