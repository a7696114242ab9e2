"""Datasets of the 2-D probes, read from their standard on-disk layouts.

Every item is ``{"image": (3, S, S) float in [0, 1], "label": (T, T) int64 (segmentation, 255 =
ignored) or float32 depth (0 = invalid), "name": str, "index": int}``. Normalisation is left to
the backbone (``Backbone.normalize``), so one dataset serves every encoder.

Transforms, as in the official evaluation (github PaulCouairon/JAFAR @ 94d4d54,
``utils/training.py::get_dataloaders``): the image is resized so that its shorter side is
``image_size`` (bilinear; PIL, so antialiased) and centre-cropped to ``image_size`` x
``image_size`` (448 in ``config/eval.yaml``); the label map likewise with nearest-exact
resampling to ``target_size`` (``target_size: ${img_size}``). Label ids are mapped to class
indices after resizing, as the official datasets do.

Layouts and class definitions (each class below cites its source):

* :class:`VOCSegmentation`: ``VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}``;
  21 classes (background + 20), 255 = void border.
* :class:`ADE20K`: ``ADEChallengeData2016/{images,annotations}/{training,validation}``; 151
  classes: the 150 categories plus 0 = "other", which the official config keeps as a class
  (``num_classes: 151``, ``skip_other_class: false``).
* :class:`Cityscapes`: ``{leftImg8bit,gtFine}/{split}/{city}/``; ``classes=19`` (the official
  config's default, the usual train ids) or ``classes=27`` (label ids 7..33, the 27-class
  setting of STEGO/PiCIE that the paper names).
* :class:`COCOStuff`: ``dataset/{images,annotations}/{train2017,val2017}`` and the curated image
  lists ``curated/{split}2017/Coco164kFull_Stuff_Coarse.txt`` (IIC/STEGO); 182 fine labels mapped
  to 27 coarse classes.
* :class:`DepthFolder`: ``{split}/images/*`` with ``{split}/depth/<stem>.{png,npy,tif}``.
* :class:`ImageNetFolder`: ImageNet-1k classification, ``{split}/<wnid>/*`` (the validation set
  sorted into one folder per synset); ``label`` is the class index (an int64 scalar).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

IGNORE_INDEX = 255
IMAGE_SIZE = 448  # official config/eval.yaml img_size


# ---------------------------------------------------------------------------------------------
# transforms (official utils/training.py: T.Resize(size) + T.CenterCrop(size) on PIL images)
# ---------------------------------------------------------------------------------------------


def _resize_crop(img, size: int, interpolation):
    import torchvision.transforms.functional as TF

    img = TF.resize(img, size, interpolation=interpolation)
    return TF.center_crop(img, [size, size])


def load_image(path, size: int) -> torch.Tensor:
    """RGB image -> shorter side ``size`` (bilinear) -> centre ``size`` crop -> (3, size, size) in [0, 1]."""
    import torchvision.transforms.functional as TF
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    with Image.open(path) as im:
        img = _resize_crop(im.convert("RGB"), size, InterpolationMode.BILINEAR)
    return TF.to_tensor(img)


def load_label(path, size: int) -> np.ndarray:
    """Label map -> shorter side ``size`` (nearest-exact) -> centre crop, as an integer array."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"label map {str(path)!r} has mode {im.mode!r}; expected one channel of ids (L, P, I).")
        img = _resize_crop(im, size, InterpolationMode.NEAREST_EXACT)
        return np.asarray(img).astype(np.int64)


def apply_label_map(ids: np.ndarray, lut: Optional[np.ndarray]) -> np.ndarray:
    """``lut[ids]``; ids outside the table map to 255. ``lut=None``: ids as they are."""
    if lut is None:
        return ids
    out = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    ok = (ids >= 0) & (ids < len(lut))
    out[ok] = lut[ids[ok]]
    return out


def _lut(mapping: Dict[int, int], size: int = 256) -> np.ndarray:
    lut = np.full(size, IGNORE_INDEX, dtype=np.int64)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {str(path)!r} is missing.")
    return path


# ---------------------------------------------------------------------------------------------
# segmentation
# ---------------------------------------------------------------------------------------------


class SegmentationDataset(Dataset):
    """Pairs of (image, label map) files, resized and centre-cropped, ids mapped through ``lut``.

    Args:
        pairs: ``[(image_path, label_path), ...]``.
        num_classes: number of classes (the probe's output width).
        image_size, target_size: side of the image and of the label map (``target_size=None``:
            ``image_size``).
        lut: table from the file's label ids to class indices (255 = ignored); None: as stored.
        class_names: optional names, index-aligned.
    """

    def __init__(self, pairs: Sequence[Tuple[Path, Path]], num_classes: int, image_size: int = IMAGE_SIZE,
                 target_size: Optional[int] = None, lut: Optional[np.ndarray] = None,
                 class_names: Optional[Sequence[str]] = None):
        if not pairs:
            raise FileNotFoundError(f"{type(self).__name__}: no images found.")
        self.pairs = [(Path(a), Path(b)) for a, b in pairs]
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.target_size = int(target_size or image_size)
        self.lut = lut
        self.class_names = list(class_names) if class_names is not None else None
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes.")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        image_path, label_path = self.pairs[index]
        label = apply_label_map(load_label(label_path, self.target_size), self.lut)
        return {"image": load_image(image_path, self.image_size), "label": torch.from_numpy(label),
                "name": image_path.stem, "index": index}


#: Pascal VOC 2012 classes (background first), in the order of the label ids.
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


class VOCSegmentation(SegmentationDataset):
    """Pascal VOC 2012 segmentation (as torchvision's ``VOCSegmentation``, which the official
    ``evaluation/dataset/voc.py`` wraps): ``root`` is the folder holding ``VOCdevkit`` (or
    ``VOCdevkit/VOC2012`` itself); ``split`` names ``ImageSets/Segmentation/<split>.txt``
    (train: 1,464 images, val: 1,449). Palette PNG labels: 0..20, 255 = void."""

    def __init__(self, root, split: str = "train", image_size: int = IMAGE_SIZE, target_size: Optional[int] = None,
                 num_classes: int = 21, class_names: Optional[Sequence[str]] = None):
        root = Path(root)
        base = root if (root / "JPEGImages").is_dir() else root / "VOCdevkit" / "VOC2012"
        listing = _require(base / "ImageSets" / "Segmentation" / f"{split}.txt", f"VOC split {split!r}")
        ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        pairs = [(base / "JPEGImages" / f"{i}.jpg", base / "SegmentationClass" / f"{i}.png") for i in ids]
        for image, label in pairs[:1]:
            _require(image, "VOC image")
            _require(label, "VOC label map")
        if class_names is None and int(num_classes) == len(VOC_CLASSES):
            class_names = VOC_CLASSES
        lut = np.arange(256, dtype=np.int64)
        lut[int(num_classes):] = IGNORE_INDEX
        super().__init__(pairs, num_classes, image_size, target_size, lut, class_names)


#: ADE20K SceneParsing's 150 classes (the benchmark's objectInfo150, first name of each entry, as
#: mmsegmentation's ADE20KDataset lists them), after id 0 "other": index = annotation id.
ADE20K_CLASSES = ("other", "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
                 "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
                 "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
                 "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
                 "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
                 "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
                 "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
                 "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
                 "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
                 "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
                 "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
                 "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van",
                 "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
                 "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
                 "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle",
                 "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase",
                 "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
                 "bulletin board", "shower", "radiator", "glass", "clock", "flag")


class ADE20K(SegmentationDataset):
    """ADE20K (SceneParsing, ``ADEChallengeData2016``): ``images/{training,validation}/*.jpg`` and
    ``annotations/{training,validation}/*.png`` (ids 0..150, 0 = "other"). Like the official
    ``evaluation/dataset/ade20k.py`` with ``skip_other_class: false``, 0 is a class (151 in all);
    ``skip_other_class=True`` maps it to 255 instead (the probe keeps 151 outputs either way)."""

    split_dirs = {"train": "training", "val": "validation"}

    def __init__(self, root, split: str = "train", image_size: int = IMAGE_SIZE, target_size: Optional[int] = None,
                 num_classes: int = 151, skip_other_class: bool = False,
                 class_names: Optional[Sequence[str]] = None):
        if split not in self.split_dirs:
            raise ValueError(f"ADE20K split must be one of {sorted(self.split_dirs)}, got {split!r}.")
        root = Path(root)
        if not (root / "images").is_dir() and (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        images = _require(root / "images" / self.split_dirs[split], "ADE20K images")
        labels = _require(root / "annotations" / self.split_dirs[split], "ADE20K annotations")
        files = sorted(f for f in os.listdir(images) if f.lower().endswith((".jpg", ".jpeg", ".png")))
        pairs = [(images / f, labels / (Path(f).stem + ".png")) for f in files]
        missing = [str(b) for _, b in pairs if not b.is_file()]
        if missing:
            raise FileNotFoundError(f"ADE20K: {len(missing)} images have no annotation, e.g. {missing[0]!r}.")
        lut = np.arange(256, dtype=np.int64)
        lut[int(num_classes):] = IGNORE_INDEX
        if skip_other_class:
            lut[0] = IGNORE_INDEX
        if class_names is None and int(num_classes) == len(ADE20K_CLASSES):
            class_names = ADE20K_CLASSES
        super().__init__(pairs, num_classes, image_size, target_size, lut, class_names)


#: Cityscapes label id -> train id of the 19 evaluated classes (cityscapesScripts ``labels.py``; the
#: same table as ``_key`` in the official ``evaluation/dataset/cityscapes.py``).
CITYSCAPES_19 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
                 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_19_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                         "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                         "bicycle")
#: The 27-class setting of unsupervised segmentation (PiCIE, STEGO): every label id from 7 (road)
#: to 33 (bicycle) is a class, ``id - 7``; ids 0..6 (void) are ignored. github mhamilton723/STEGO
#: ``src/data.py::CityscapesSeg`` (``first_nonvoid = 7``, ``target - first_nonvoid``, negatives -> -1).
CITYSCAPES_27 = {i: i - 7 for i in range(7, 34)}
CITYSCAPES_27_CLASSES = ("road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
                         "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
                         "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
                         "motorcycle", "bicycle")


class Cityscapes(SegmentationDataset):
    """Cityscapes fine annotations: ``leftImg8bit/<split>/<city>/<x>_leftImg8bit.png`` and
    ``gtFine/<split>/<city>/<x>_gtFine_labelIds.png`` (torchvision's ``Cityscapes`` layout, which
    the official loader wraps; train: 2,975 images, val: 500). ``classes``: 19 (default: the
    official config) or 27 (the paper's setting)."""

    def __init__(self, root, split: str = "train", image_size: int = IMAGE_SIZE, target_size: Optional[int] = None,
                 classes: int = 19, num_classes: Optional[int] = None):
        if int(classes) not in (19, 27):
            raise ValueError(f"Cityscapes classes must be 19 or 27, got {classes}.")
        if num_classes is not None and int(num_classes) != int(classes):
            raise ValueError(f"Cityscapes num_classes={num_classes} disagrees with classes={classes}.")
        root = Path(root)
        images = _require(root / "leftImg8bit" / split, f"Cityscapes images of split {split!r}")
        labels = _require(root / "gtFine" / split, f"Cityscapes fine labels of split {split!r}")
        pairs = []
        for city in sorted(os.listdir(images)):
            for f in sorted(os.listdir(images / city)):
                if f.endswith("_leftImg8bit.png"):
                    stem = f[: -len("_leftImg8bit.png")]
                    pairs.append((images / city / f, labels / city / f"{stem}_gtFine_labelIds.png"))
        missing = [str(b) for _, b in pairs if not b.is_file()]
        if missing:
            raise FileNotFoundError(f"Cityscapes: {len(missing)} images have no gtFine labelIds map, "
                                    f"e.g. {missing[0]!r}.")
        if int(classes) == 19:
            table, names = CITYSCAPES_19, CITYSCAPES_19_CLASSES
        else:
            table, names = CITYSCAPES_27, CITYSCAPES_27_CLASSES
        super().__init__(pairs, int(classes), image_size, target_size, _lut(table), names)


#: COCO-Stuff fine label (0..181, the value stored in ``stuffthingmaps_trainval2017`` PNGs) ->
#: the 27 coarse classes (12 thing + 15 stuff supercategories). The table of the official
#: ``evaluation/dataset/coco.py`` (``fine_to_coarse``), itself github mhamilton723/STEGO
#: ``src/data.py::Coco``.
COCO_FINE_TO_COARSE = dict(enumerate(
    [9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6,
     10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 5, 5, 5, 5, 5, 5, 5, 5, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
     3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4, 17, 17, 22, 20, 20, 22, 15, 25,
     16, 13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22, 26, 14, 14, 15, 22, 21, 21,
     24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21, 17, 22, 16, 21, 21, 25, 21, 26, 21, 24, 20, 17, 14,
     21, 26, 15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18, 18, 18, 26, 26, 19,
     19, 24]))
COCO_27_CLASSES = ("electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal",
                   "outdoor", "person", "sports", "vehicle", "ceiling", "floor", "food-stuff", "furniture-stuff",
                   "raw-material", "textile", "wall", "window", "building", "ground", "plant", "sky", "solid",
                   "structural", "water")


class COCOStuff(SegmentationDataset):
    """COCO-Stuff 164k with 27 coarse classes, in the layout of the official ``docs/datasets.md``:
    ``root/dataset/images/<split>2017/<id>.jpg``, ``root/dataset/annotations/<split>2017/<id>.png``
    (``stuffthingmaps_trainval2017``: fine ids 0..181, 255 unlabelled) and the curated image list
    ``root/curated/<split>2017/<image_list>`` (IIC's ``Coco164kFull_Stuff_Coarse.txt`` by default,
    as in the official ``evaluation/dataset/coco.py``). ``image_list=None``: every image that
    has an annotation."""

    def __init__(self, root, split: str = "train", image_size: int = IMAGE_SIZE, target_size: Optional[int] = None,
                 image_list: Optional[str] = "Coco164kFull_Stuff_Coarse.txt", num_classes: int = 27):
        if split not in ("train", "val"):
            raise ValueError(f"COCO-Stuff split must be 'train' or 'val', got {split!r}.")
        if int(num_classes) != 27:
            raise ValueError(f"COCO-Stuff here has the 27 coarse classes, got num_classes={num_classes}.")
        root = Path(root)
        images = _require(root / "dataset" / "images" / f"{split}2017", "COCO-Stuff images")
        labels = _require(root / "dataset" / "annotations" / f"{split}2017", "COCO-Stuff annotations")
        if image_list:
            listing = _require(root / "curated" / f"{split}2017" / image_list, "COCO-Stuff curated image list")
            ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        else:
            ids = sorted(Path(f).stem for f in os.listdir(labels) if f.endswith(".png"))
        pairs = [(images / f"{i}.jpg", labels / f"{i}.png") for i in ids]
        missing = [str(p) for pair in pairs for p in pair if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"COCO-Stuff: {len(missing)} listed files are missing, e.g. {missing[0]!r}.")
        super().__init__(pairs, 27, image_size, target_size, _lut(COCO_FINE_TO_COARSE), COCO_27_CLASSES)


# ---------------------------------------------------------------------------------------------
# depth
# ---------------------------------------------------------------------------------------------

_DEPTH_EXTS = (".npy", ".png", ".tif", ".tiff")
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


def load_depth(path, scale: float = 1.0) -> np.ndarray:
    """A depth map as float32: ``.npy`` (any float/int array) or a one-channel image (16-bit
    PNG/TIFF, float TIFF), times ``scale`` (e.g. 0.001 for millimetre PNGs)."""
    path = Path(path)
    if path.suffix == ".npy":
        arr = np.load(path)
    else:
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im)
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"depth map {str(path)!r} must have one channel, got shape {arr.shape}.")
    return arr * np.float32(scale)


def _resize_crop_depth(depth: np.ndarray, size: int) -> np.ndarray:
    """Nearest-exact resize (shorter side ``size``) and centre crop: invalid (0) pixels stay
    invalid instead of being blended into their neighbours."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    t = torch.from_numpy(np.ascontiguousarray(depth))[None]
    t = TF.resize(t, size, interpolation=InterpolationMode.NEAREST_EXACT, antialias=False)
    return TF.center_crop(t, [size, size])[0].numpy()


class DepthFolder(Dataset):
    """Images with depth maps: ``root/<split>/images/<stem>.<ext>`` and
    ``root/<split>/depth/<stem>.{npy,png,tif}`` (values times ``depth_scale``; 0 or less =
    invalid). ``depth_required=False`` lists images without depth maps too (labels then come
    from a pseudo-labeller, e.g. Depth Anything V2); their ``label`` is an empty tensor."""

    def __init__(self, root, split: str = "train", image_size: int = IMAGE_SIZE, target_size: Optional[int] = None,
                 depth_scale: float = 1.0, depth_required: bool = True):
        root = Path(root)
        images = _require(root / split / "images", f"depth folder images of split {split!r}")
        depth_dir = root / split / "depth"
        files = sorted(f for f in os.listdir(images) if f.lower().endswith(_IMAGE_EXTS) and not f.startswith("."))
        if not files:
            raise FileNotFoundError(f"no images under {str(images)!r}.")
        self.items: List[Tuple[Path, Optional[Path]]] = []
        for f in files:
            stem = Path(f).stem
            found = next((depth_dir / (stem + e) for e in _DEPTH_EXTS if (depth_dir / (stem + e)).is_file()), None)
            if found is None and depth_required:
                raise FileNotFoundError(f"no depth map for {f!r}: expected {str(depth_dir / stem)}.(npy|png|tif).")
            self.items.append((images / f, found))
        self.image_size = int(image_size)
        self.target_size = int(target_size or image_size)
        self.depth_scale = float(depth_scale)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        image_path, depth_path = self.items[index]
        if depth_path is None:
            label = torch.zeros(0)
        else:
            depth = _resize_crop_depth(load_depth(depth_path, self.depth_scale), self.target_size)
            label = torch.from_numpy(np.where(np.isfinite(depth) & (depth > 0), depth, 0).astype(np.float32))
        return {"image": load_image(image_path, self.image_size), "label": label, "name": image_path.stem,
                "index": index}


# ---------------------------------------------------------------------------------------------
# classification (Grad-CAM)
# ---------------------------------------------------------------------------------------------


def imagenet_wnids() -> List[str]:
    """The 1,000 ImageNet-1k synset ids in class-index order (sorted, as torchvision's
    ``ImageFolder`` and every ImageNet classifier number them), from timm's ``ImageNetInfo``."""
    return list(_imagenet_wnids())


@functools.lru_cache(maxsize=1)
def _imagenet_wnids() -> Tuple[str, ...]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(info.index_to_label_name(i) for i in range(info.num_classes()))


class ImageNetFolder(Dataset):
    """ImageNet-1k images with their class: ``root/<split>/<wnid>/<image>`` (the usual layout of
    the validation set after sorting it into synset folders, as for torchvision's
    ``ImageFolder``). A folder holding a subset of the 1,000 synsets keeps the 1,000-class indices
    (``label`` = position of the wnid among the sorted ImageNet-1k wnids).

    ``sample``: draw that many images at random (``sample_seed``) instead of taking them all.
    Images: shorter side resized to ``image_size`` (bilinear), centre crop.
    """

    def __init__(self, root, split: str = "val", image_size: int = 224, target_size: Optional[int] = None,
                 num_classes: int = 1000, sample: Optional[int] = None, sample_seed: int = 0):
        base = _require(Path(root) / split, f"ImageNet split {split!r}")
        wnids = imagenet_wnids()
        index = {w: i for i, w in enumerate(wnids)}
        if int(num_classes) != len(wnids):
            raise ValueError(f"ImageNetFolder has {len(wnids)} classes, got num_classes={num_classes}.")
        folders = sorted(d for d in os.listdir(base) if (base / d).is_dir() and not d.startswith("."))
        unknown = [d for d in folders if d not in index]
        if unknown:
            raise ValueError(f"{str(base)!r} holds folders that are not ImageNet-1k synsets, e.g. {unknown[0]!r}; "
                             f"expected one folder per wnid (n01440764, ...).")
        items = [(base / d / f, index[d]) for d in folders for f in sorted(os.listdir(base / d))
                 if f.lower().endswith(_IMAGE_EXTS) and not f.startswith(".")]
        if not items:
            raise FileNotFoundError(f"no images under {str(base)!r} (expected <wnid>/<image> files).")
        if sample is not None and int(sample) < len(items):
            gen = torch.Generator().manual_seed(int(sample_seed))
            keep = sorted(torch.randperm(len(items), generator=gen)[:int(sample)].tolist())
            items = [items[i] for i in keep]
        self.items = items
        self.image_size = int(image_size)
        self.num_classes = len(wnids)
        self.wnids = wnids

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, label = self.items[index]
        return {"image": load_image(path, self.image_size), "label": torch.tensor(label, dtype=torch.int64),
                "name": path.stem, "index": index}
