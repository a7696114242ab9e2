"""Tables and pictures of the 2-D evaluations: a Markdown table laid out like the paper's (one row
per upsampler, one group of metric columns per data set) and PNG grids of predictions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..utils import atomic_path
from ..viz import save_panels


@dataclass(frozen=True)
class Column:
    """One metric column: ``results[key] * scale`` with ``digits`` decimals; the best value of
    each column is bold (the highest, or the lowest when ``higher_is_better`` is False)."""

    key: str
    header: str
    higher_is_better: bool = True
    scale: float = 1.0
    digits: int = 2

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"


def _fmt(value, column: Column) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value * column.scale:.{column.digits}f}"


def markdown_table(title: str, datasets: Sequence[Tuple[str, str]], rows: Sequence[Tuple[str, str]],
                   results: Dict[str, Dict[str, dict]], columns: Sequence[Column],
                   notes: Sequence[str] = (), caption: Optional[str] = None) -> str:
    """``datasets``: ``[(key, title)]``; ``rows``: ``[(key, label)]``; ``results[dataset][row]``:
    a dict of metrics (missing: not run yet, shown as "–")."""
    header = ["Upsampler"] + [f"{title_} {c.header} {c.arrow}" for _, title_ in datasets for c in columns]
    lines = [f"## {title}", ""]
    if caption:
        lines += [caption, ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best: Dict[Tuple[str, str], float] = {}
    for ds, _ in datasets:
        for c in columns:
            vals = [results.get(ds, {}).get(r, {}).get(c.key) for r, _ in rows]
            vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
            if len(set(vals)) > 1:  # a column where every row ties has no best
                best[(ds, c.key)] = max(vals) if c.higher_is_better else min(vals)
    for r, label in rows:
        cells = [label]
        for ds, _ in datasets:
            for c in columns:
                v = results.get(ds, {}).get(r, {}).get(c.key)
                text = _fmt(v, c)
                if v is not None and best.get((ds, c.key)) == v:
                    text = f"**{text}**"
                cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_text(path, text: str) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# pictures
# ---------------------------------------------------------------------------------------------

_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32) / 255


def colorize_labels(label: torch.Tensor, palette: np.ndarray) -> torch.Tensor:
    """``(H, W)`` class map -> ``(3, H, W)`` in [0, 1] with ``palette`` ((256, 3) uint8)."""
    idx = label.long().clamp(0, 255).numpy()
    return torch.from_numpy(palette[idx].astype(np.float32) / 255).permute(2, 0, 1)


def colorize_depth(depth: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``(H, W)`` depth -> ``(3, H, W)`` viridis-like colours (near = dark); invalid (<= 0) white."""
    d = depth.float().numpy()
    t = np.clip((d - lo) / max(hi - lo, 1e-6), 0, 1) * (len(_VIRIDIS) - 1)
    i = np.minimum(np.floor(t).astype(int), len(_VIRIDIS) - 2)
    f = (t - i)[..., None]
    rgb = _VIRIDIS[i] * (1 - f) + _VIRIDIS[i + 1] * f
    rgb[d <= 0] = 1.0
    return torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)


def _fit(panel: torch.Tensor, size: int, nearest: bool) -> torch.Tensor:
    if panel.shape[-1] == size and panel.shape[-2] == size:
        return panel
    mode = "nearest" if nearest else "bilinear"
    kw = {} if nearest else {"align_corners": False, "antialias": True}
    return F.interpolate(panel[None].float(), size=(size, size), mode=mode, **kw)[0]


def prediction_grid(path, pictures: Dict[str, List[dict]], kind: str, palette: Optional[np.ndarray] = None,
                    size: int = 160, target_title: str = "ground truth") -> Optional[Path]:
    """One row per picture image: the image, the ground truth (``target_title``), then each
    upsampler's prediction (``pictures[label] = [{"index", "image", "target", "prediction"},
    ...]``, the same images for every label). ``kind``: ``"seg"`` (class maps, ``palette``),
    ``"depth"`` or ``"heatmap"`` (maps in [0, 1], e.g. class activation maps)."""
    labels = [k for k, v in pictures.items() if v]
    if not labels:
        return None
    by_index = {k: {p["index"]: p for p in pictures[k]} for k in labels}
    indices = sorted(set.intersection(*(set(v) for v in by_index.values())))
    if not indices:
        return None
    panels = []
    for index in indices:
        ref = by_index[labels[0]][index]
        if kind == "depth":
            gt = ref["target"].reshape(ref["target"].shape[-2:])
            valid = gt[gt > 0]
            lo, hi = (float(valid.min()), float(valid.max())) if valid.numel() else (0.0, 1.0)
            paint = lambda d: colorize_depth(d.reshape(d.shape[-2:]), lo, hi)  # noqa: E731
        elif kind == "heatmap":
            paint = lambda d: colorize_depth(d.reshape(d.shape[-2:]).float().clamp(0, 1) + 1e-6, 0.0, 1.0)  # noqa: E731
        else:
            paint = lambda d: colorize_labels(d, palette)  # noqa: E731
        panels.append(_fit(ref["image"], size, nearest=False))
        panels.append(_fit(paint(ref["target"]), size, nearest=True))  # a coarse heatmap stays blocky
        panels += [_fit(paint(by_index[k][index]["prediction"]), size, nearest=True) for k in labels]
    return save_panels(panels, path, titles=["image", target_title] + labels, rows=len(indices))
