"""Images for JAFAR's task-agnostic training: any folder, searched recursively.

Determinism: the order of the images and every random draw of the data pipeline are functions
of ``(seed, step)`` alone (:class:`StepBatchSampler` hands each sample its own seed), so a run
resumed from a checkpoint at step ``k`` sees exactly the batches an uninterrupted run sees from
step ``k`` on, whatever the number of worker processes.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..utils import atomic_path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def find_images(root, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> List[Path]:
    """Every image file under ``root`` (recursively, sorted); one clear error if there is none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist (set data.root to a folder of images).")
    exts = tuple(e.lower() for e in extensions)
    files = sorted(Path(d) / f for d, _, names in os.walk(root, followlinks=True) for f in names
                   if f.lower().endswith(exts) and not f.startswith("."))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(exts)}) found under {str(root)!r}.")
    return files


def split_holdout(files: List[Path], num_val: int, seed: int) -> Tuple[List[Path], List[Path]]:
    """Hold out ``num_val`` images, chosen with ``seed``, for validation."""
    if num_val <= 0:
        return list(files), []
    if num_val >= len(files):
        raise ValueError(f"cannot hold out {num_val} validation images from {len(files)} images: "
                         "set data.val_images lower or give data.val_root.")
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    held = set(order[:num_val])
    return [f for i, f in enumerate(files) if i not in held], [f for i, f in enumerate(files) if i in held]


def _decode(path: Path) -> torch.Tensor:
    """RGB uint8 (3, H, W). Raises on unreadable files."""
    from PIL import Image

    with Image.open(path) as im:
        arr = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
        w, h = im.size
    return arr.view(h, w, 3).permute(2, 0, 1)


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to ``size`` (bilinear, antialiased like PIL), then the central ``size x size``.

    The official transform is ``T.Resize(size)`` + ``T.CenterCrop(size)`` on PIL images
    (github PaulCouairon/JAFAR @ 94d4d54, ``utils/training.py``).
    """
    _, h, w = image.shape
    # torchvision's rule for the longer side: int(size * long / short)
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))  # torchvision's centre crop
    return x[:, top:top + size, left:left + size]


def random_resized_crop(image: torch.Tensor, size: int, scale: Tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """A random square crop covering ``scale`` of the shorter side's square, resized to ``size``,
    flipped horizontally with probability 0.5 (the demo's augmentation; the official recipe has none)."""
    _, h, w = image.shape
    side = min(h, w)
    frac = scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=gen).item()
    crop = max(8, int(round(side * math.sqrt(frac))))
    top = int(torch.randint(0, h - crop + 1, (), generator=gen))
    left = int(torch.randint(0, w - crop + 1, (), generator=gen))
    x = image[:, top:top + crop, left:left + crop][None].float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    if torch.rand((), generator=gen).item() < 0.5:
        x = x.flip(-1)
    return x


class ImageFiles(Dataset):
    """Images as float tensors in [0, 1], ``(3, size, size)``; unreadable files give ``None``.

    Items are addressed as ``(index, seed)`` (see :class:`StepBatchSampler`) or plain ``index``.
    """

    def __init__(self, files: Sequence[Path], size: int, random_crop: Optional[Tuple[float, float]] = None):
        self.files = list(files)
        self.size = int(size)
        self.random_crop = tuple(random_crop) if random_crop else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, 0)
        path = self.files[index]
        try:
            image = _decode(path)
        except Exception as exc:  # unreadable: skipped by the collate function, counted, reported
            return {"path": str(path), "error": f"{type(exc).__name__}: {exc}"}
        if self.random_crop:
            x = random_resized_crop(image, self.size, self.random_crop, torch.Generator().manual_seed(seed))
        else:
            x = resize_center_crop(image, self.size)
        return {"path": str(path), "image": (x / 255.0).clamp_(0, 1)}


def collate_skipping(items):
    """Stack the readable images; report the unreadable ones in ``batch["skipped"]``."""
    good = [it for it in items if "image" in it]
    bad = [(it["path"], it["error"]) for it in items if "image" not in it]
    batch = {"skipped": bad, "paths": [it["path"] for it in good]}
    batch["image"] = torch.stack([it["image"] for it in good]) if good else None
    return batch


def make_loader(dataset: Dataset, batch_sampler=None, batch_size: int = 1, num_workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    kwargs = dict(num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate_skipping,
                  persistent_workers=False)
    if num_workers > 0:
        kwargs["prefetch_factor"] = 2
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# Offline demo photographs
# ---------------------------------------------------------------------------------------------

#: Real photographs shipped inside installed packages (scikit-image, scikit-learn, matplotlib).
DEMO_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "stereo_motorcycle_left", "stereo_motorcycle_right", "colorwheel", "camera", "moon", "coins", "clock",
    "brick", "grass", "gravel", "cell", "page", "text", "sklearn_china", "sklearn_flower",
    "matplotlib_grace_hopper", "matplotlib_minduka",
)


def _demo_photo(name: str):
    import numpy as np

    if name.startswith("sklearn_"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(name[len("sklearn_"):] + ".jpg")
    if name.startswith("matplotlib_"):
        import matplotlib
        from PIL import Image

        files = {"grace_hopper": "grace_hopper.jpg", "minduka": "Minduka_Present_Blue_Pack.png"}
        with Image.open(Path(matplotlib.get_data_path()) / "sample_data" / files[name[len("matplotlib_"):]]) as im:
            return np.asarray(im.convert("RGB"))
    import skimage.data

    if name.startswith("stereo_motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        return left if name.endswith("left") else right
    return getattr(skimage.data, name)()


def write_demo_photos(folder, names: Sequence[str] = DEMO_PHOTOS) -> List[Path]:
    """Write the package photographs as PNG files into ``folder`` (kept if already there)."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / f"{name}.png"
        if not path.exists():
            arr = np.asarray(_demo_photo(name))
            if arr.dtype == bool:
                arr = arr.astype(np.uint8) * 255
            if arr.ndim == 2:
                arr = np.stack([arr] * 3, -1)
            with atomic_path(path) as tmp:
                Image.fromarray(arr[..., :3].astype(np.uint8)).save(tmp, format="PNG")
        paths.append(path)
    return paths
