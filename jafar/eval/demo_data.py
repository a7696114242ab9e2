"""Offline data for the 2-D probes' demos, written in the real on-disk layouts.

No labelled data set can be downloaded here, so the demos make their own from the photographs
that ship inside scikit-image, scikit-learn and matplotlib (:data:`jafar.train.data.DEMO_PHOTOS`):

* :func:`write_demo_segmentation`: texture mosaics in the Pascal VOC layout. Each image is one
  texture class as background with a few random polygons and ellipses of other classes pasted on
  it; the label of a pixel is the class of the texture it shows. Every label boundary is an edge
  of the image, the case where an image-guided upsampler should beat interpolation.
* :func:`write_demo_depth`: a camera 1.5 m above a textured ground plane, looking at textured
  billboards and a back wall, rendered with their exact depth (z, metres, below 10 m: the
  official ``max_depth``) and written in :class:`jafar.eval.datasets.DepthFolder`'s layout
  (16-bit PNG in millimetres). Depth edges are image edges here too.
* :func:`write_demo_classification`: random crops of three photographs whose subject is an
  ImageNet-1k class (:data:`CAM_PHOTOS`), in the ImageNet validation layout
  (:class:`jafar.eval.datasets.ImageNetFolder`), for the Grad-CAM demo.

Both are deterministic functions of ``seed`` and reuse what is already on disk.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Dict, List

import numpy as np

from ..utils import atomic_path

#: texture classes of the segmentation demo: (name, photograph, tint RGB or None, crop box as
#: fractions (top, left, bottom, right) of the photograph). Grey-level textures are tinted so
#: that colour, as well as texture, tells the classes apart.
SEG_CLASSES = (
    ("grass", "grass", (0.55, 1.0, 0.45), (0.0, 0.0, 1.0, 1.0)),
    ("brick", "brick", (1.0, 0.6, 0.45), (0.0, 0.0, 1.0, 1.0)),
    ("gravel", "gravel", None, (0.0, 0.0, 1.0, 1.0)),
    ("fur", "chelsea", None, (0.25, 0.08, 0.95, 0.45)),
    ("cells", "immunohistochemistry", None, (0.0, 0.0, 1.0, 1.0)),
    ("stars", "hubble_deep_field", None, (0.0, 0.0, 1.0, 1.0)),
)
SEG_CLASS_NAMES = tuple(c[0] for c in SEG_CLASSES)


def voc_palette() -> np.ndarray:
    """The Pascal VOC colour map, (256, 3) uint8: index bits spread over R, G, B (the devkit's
    ``labelcolormap``)."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def _photo(name: str, cache: Dict[str, np.ndarray]) -> np.ndarray:
    if name not in cache:
        from ..train.data import _demo_photo

        arr = np.asarray(_demo_photo(name))
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        cache[name] = arr[..., :3].astype(np.float32) / 255.0
    return cache[name]


def _texture(spec, size: int, rng: np.random.Generator, cache) -> np.ndarray:
    """A ``size x size`` RGB patch of a class's texture: a random square crop (35-100 % of the
    usable region's shorter side) resized to ``size``, randomly flipped."""
    from PIL import Image

    _, photo, tint, (t, l, b, r) = spec
    img = _photo(photo, cache)
    h, w = img.shape[:2]
    region = img[int(t * h):int(b * h), int(l * w):int(r * w)]
    rh, rw = region.shape[:2]
    side = int(min(rh, rw) * rng.uniform(0.35, 1.0))
    y, x = rng.integers(0, rh - side + 1), rng.integers(0, rw - side + 1)
    crop = (region[y:y + side, x:x + side] * 255).astype(np.uint8)
    patch = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if tint is not None:
        patch = patch * np.asarray(tint, dtype=np.float32)
    return np.clip(patch, 0, 1)


def _shape_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random star-shaped polygon or rotated ellipse, 12-40 % of the image across."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = rng.uniform(0.1, 0.9, size=2) * size
    radius = rng.uniform(0.06, 0.2) * size
    if rng.random() < 0.5:
        n = int(rng.integers(5, 10))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = radius * rng.uniform(0.5, 1.3, n)
        draw.polygon([(float(cx + r * np.cos(a)), float(cy + r * np.sin(a))) for a, r in zip(angles, radii)], fill=1)
    else:
        ry = radius * rng.uniform(0.4, 1.0)
        theta = rng.uniform(0, np.pi)
        a = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        xs, ys = radius * np.cos(a), ry * np.sin(a)
        pts = [(float(cx + x * np.cos(theta) - y * np.sin(theta)), float(cy + x * np.sin(theta) + y * np.cos(theta)))
               for x, y in zip(xs, ys)]
        draw.polygon(pts, fill=1)
    return np.asarray(mask, dtype=bool)


def make_mosaic(size: int, rng: np.random.Generator, cache=None, classes=SEG_CLASSES):
    """One texture mosaic: (RGB float image (size, size, 3), int label map (size, size))."""
    cache = {} if cache is None else cache
    k = len(classes)
    bg = int(rng.integers(k))
    image = _texture(classes[bg], size, rng, cache)
    label = np.full((size, size), bg, dtype=np.uint8)
    for _ in range(int(rng.integers(3, 7))):
        c = int(rng.choice([i for i in range(k) if i != bg]))
        mask = _shape_mask(size, rng)
        image[mask] = _texture(classes[c], size, rng, cache)[mask]
        label[mask] = c
    return image, label


def _write_manifest(root: Path, info: dict) -> None:
    with atomic_path(root / "demo_manifest.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n")


def _done(root: Path, info: dict) -> bool:
    path = root / "demo_manifest.json"
    return path.is_file() and json.loads(path.read_text()) == info


def write_demo_segmentation(root, train: int = 64, val: int = 24, size: int = 256, seed: int = 0) -> Path:
    """Write the texture-mosaic data set under ``root`` in the VOC 2012 layout
    (``VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation/{train,val}.txt}``;
    JPEG quality 95, palette PNG labels) and return ``root``. Kept if already written with the
    same arguments."""
    from PIL import Image

    root = Path(root)
    info = {"kind": "texture_mosaics_voc_layout", "train": int(train), "val": int(val), "size": int(size),
            "seed": int(seed), "classes": list(SEG_CLASS_NAMES)}
    if _done(root, info):
        return root
    base = root / "VOCdevkit" / "VOC2012"
    (base / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (base / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    (base / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    palette = voc_palette().reshape(-1).tolist()
    cache: dict = {}
    for split, count, offset in (("train", train, 0), ("val", val, 1)):
        rng = np.random.default_rng([seed, offset])
        ids = []
        for i in range(count):
            image, label = make_mosaic(size, rng, cache)
            name = f"demo_{split}_{i:04d}"
            with atomic_path(base / "JPEGImages" / f"{name}.jpg") as tmp:
                Image.fromarray((image * 255).round().astype(np.uint8)).save(tmp, format="JPEG", quality=95)
            lab = Image.fromarray(label, mode="P")
            lab.putpalette(palette)
            with atomic_path(base / "SegmentationClass" / f"{name}.png") as tmp:
                lab.save(tmp, format="PNG")
            ids.append(name)
        with atomic_path(base / "ImageSets" / "Segmentation" / f"{split}.txt") as tmp:
            tmp.write_text("\n".join(ids) + "\n")
    _write_manifest(root, info)
    return root


# ---------------------------------------------------------------------------------------------
# depth
# ---------------------------------------------------------------------------------------------

_GROUND = ("gravel", "grass", "brick")
_OBJECTS = ("chelsea", "coffee", "astronaut", "immunohistochemistry", "sklearn_flower", "retina",
            "matplotlib_grace_hopper", "rocket")
_WALLS = ("sklearn_china", "camera", "moon", "brick", "coins")


def render_depth_scene(size: int, rng: np.random.Generator, cache=None, camera_height: float = 1.5,
                       max_depth: float = 9.5):
    """One scene: (RGB float image (size, size, 3), depth in metres (size, size) float32).

    A pinhole camera (focal ``0.8 * size``, horizon at 35 % of the height) ``camera_height``
    above a ground plane textured in world coordinates (so the texture shrinks with distance); a
    fronto-parallel wall at 6-``max_depth`` m closes the view; 2-5 textured billboards (rectangles
    or ellipses, 0.4-2 m wide) stand on the ground at 1.5 m to the wall, drawn far to near.
    """
    cache = {} if cache is None else cache
    f, cx, v0 = 0.8 * size, size / 2.0, 0.35 * size
    v, u = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    z_wall = rng.uniform(6.0, max_depth)
    depth = np.full((size, size), z_wall)
    with np.errstate(divide="ignore"):
        z_ground = np.where(v > v0, f * camera_height / (v - v0), np.inf)
    ground = z_ground < z_wall
    depth[ground] = z_ground[ground]

    wall_tex = _texture(("wall", _WALLS[rng.integers(len(_WALLS))], None, (0, 0, 1, 1)), size, rng, cache)
    image = wall_tex.copy()
    gname = _GROUND[rng.integers(len(_GROUND))]
    tint = {"grass": (0.55, 1.0, 0.45), "brick": (1.0, 0.6, 0.45)}.get(gname)
    gtex = _photo(gname, cache) * (np.asarray(tint, dtype=np.float32) if tint else 1.0)
    th, tw = gtex.shape[:2]
    texel = rng.uniform(0.004, 0.008)  # metres per texel
    x_world = (u - cx) * z_ground / f
    ty = np.mod(np.floor(z_ground[ground] / texel), th).astype(int)
    tx = np.mod(np.floor(x_world[ground] / texel + rng.uniform(0, tw)), tw).astype(int)
    image[ground] = gtex[ty, tx]

    n = int(rng.integers(2, 6))
    zs = np.sort(rng.uniform(1.5, z_wall - 0.3, n))[::-1]
    for z in zs:
        w, h = rng.uniform(0.4, 2.0), rng.uniform(0.4, 2.2)
        xc = rng.uniform(-1.0, 1.0) * z * cx / f
        u0, u1 = cx + f * (xc - w / 2) / z, cx + f * (xc + w / 2) / z
        vb = v0 + f * camera_height / z
        vt = vb - f * h / z
        inside = (u >= u0) & (u < u1) & (v >= vt) & (v < vb)
        if rng.random() < 0.5:  # an ellipse inscribed in the rectangle
            inside &= ((u - (u0 + u1) / 2) / ((u1 - u0) / 2)) ** 2 + ((v - (vt + vb) / 2) / ((vb - vt) / 2)) ** 2 <= 1
        if not inside.any():
            continue
        tex = _texture(("obj", _OBJECTS[rng.integers(len(_OBJECTS))], None, (0, 0, 1, 1)), size, rng, cache)
        # the texture spans the billboard's box
        rows = np.clip(((v - vt) / max(vb - vt, 1e-6) * size).astype(int), 0, size - 1)
        cols = np.clip(((u - u0) / max(u1 - u0, 1e-6) * size).astype(int), 0, size - 1)
        image[inside] = tex[rows[inside], cols[inside]]
        depth[inside] = z
    return np.clip(image, 0, 1).astype(np.float32), depth.astype(np.float32)


def write_demo_depth(root, train: int = 64, val: int = 24, size: int = 256, seed: int = 0) -> Path:
    """Write rendered scenes under ``root`` in :class:`~jafar.eval.datasets.DepthFolder`'s layout:
    ``<split>/images/<name>.png`` and ``<split>/depth/<name>.png`` (uint16 millimetres: load with
    ``depth_scale=0.001``). Kept if already written with the same arguments."""
    from PIL import Image

    root = Path(root)
    info = {"kind": "rendered_depth_scenes", "train": int(train), "val": int(val), "size": int(size),
            "seed": int(seed), "depth_unit": "mm"}
    if _done(root, info):
        return root
    cache: dict = {}
    for split, count, offset in (("train", train, 0), ("val", val, 1)):
        rng = np.random.default_rng([seed, 100 + offset])
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "depth").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, depth = render_depth_scene(size, rng, cache)
            name = f"scene_{split}_{i:04d}"
            with atomic_path(root / split / "images" / f"{name}.png") as tmp:
                Image.fromarray((image * 255).round().astype(np.uint8)).save(tmp, format="PNG")
            with atomic_path(root / split / "depth" / f"{name}.png") as tmp:
                Image.fromarray(np.round(depth * 1000).astype(np.uint16)).save(tmp, format="PNG")
    _write_manifest(root, info)
    return root


# ---------------------------------------------------------------------------------------------
# classification (Grad-CAM)
# ---------------------------------------------------------------------------------------------

#: photographs whose subject is one ImageNet-1k class: (photo, ImageNet class index), the class
#: read from the picture, not from a classifier: scikit-image's ``coffee`` (a cup of espresso) and
#: ``camera`` (the cameraman's camera on its tripod), matplotlib's ``grace_hopper`` (Grace Hopper
#: in her US Navy uniform). (``chelsea`` is left out: which of ImageNet's cat breeds it shows is
#: not clear from the picture.)
CAM_PHOTOS = (("coffee", 967), ("camera", 872), ("matplotlib_grace_hopper", 652))


def write_demo_classification(root, crops: int = 8, size: int = 256, seed: int = 0, train_crops: int = 0) -> Path:
    """Write ``crops`` random crops of each photograph of :data:`CAM_PHOTOS` under
    ``root/val/<wnid>/<photo>_<i>.png`` (a square of 55-100 % of the shorter side, anywhere in
    the picture, randomly flipped, resized to ``size``), and ``train_crops`` other crops under
    ``root/train/`` (for the rows ``task=cam`` trains), and return ``root``. Kept if already
    written with the same arguments."""
    from PIL import Image

    from .datasets import imagenet_wnids

    root = Path(root)
    info = {"kind": "photo_crops_imagenet_layout", "crops": int(crops), "size": int(size), "seed": int(seed),
            "photos": [list(p) for p in CAM_PHOTOS]}
    if train_crops:
        info["train_crops"] = int(train_crops)
    if _done(root, info):
        return root
    wnids = imagenet_wnids()
    cache: dict = {}
    for (split, n, stream), (k, (photo, cls)) in itertools.product(
            (("val", crops, 200), ("train", train_crops, 201)), enumerate(CAM_PHOTOS)):
        if not n:
            continue
        rng = np.random.default_rng([seed, stream, k])
        folder = root / split / wnids[cls]
        folder.mkdir(parents=True, exist_ok=True)
        img = _photo(photo, cache)
        h, w = img.shape[:2]
        for i in range(int(n)):
            side = int(min(h, w) * rng.uniform(0.55, 1.0))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = Image.fromarray((img[y:y + side, x:x + side] * 255).round().astype(np.uint8))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            with atomic_path(folder / f"{photo}_{i:03d}.png") as tmp:
                crop.resize((size, size), Image.BILINEAR).save(tmp, format="PNG")
    _write_manifest(root, info)
    return root


def prepare(kind: str, root, **kwargs) -> Path:
    """Write a demo data set by name (``demo_seg``, ``demo_depth`` or ``demo_cam``) into ``root``."""
    writers = {"demo_seg": write_demo_segmentation, "demo_depth": write_demo_depth,
               "demo_cam": write_demo_classification}
    if kind not in writers:
        raise ValueError(f"unknown demo data {kind!r}; expected one of {sorted(writers)}.")
    return writers[kind](root, **kwargs)


__all__: List[str] = ["CAM_PHOTOS", "write_demo_classification", "SEG_CLASSES", "SEG_CLASS_NAMES", "make_mosaic",
                      "render_depth_scene", "voc_palette", "write_demo_segmentation", "write_demo_depth", "prepare"]
