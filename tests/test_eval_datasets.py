"""Each 2-D data set loader on a tiny tree in its real on-disk layout, written by the test."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from jafar.eval.datasets import ADE20K, Cityscapes, COCOStuff, DepthFolder, VOCSegmentation, load_depth
from jafar.eval.demo_data import SEG_CLASS_NAMES, voc_palette, write_demo_depth, write_demo_segmentation


def _rgb(path, w, h, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((h, w, 3), value, np.uint8)
    arr[:, : w // 2, 0] = 255  # a red left half: checks the crop keeps the centre
    Image.fromarray(arr).save(path)


def _labels(path, arr, mode="L", palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(arr, np.uint8), mode=mode)
    if palette:
        im.putpalette(voc_palette().reshape(-1).tolist())
    im.save(path)


def _halves(w, h, left, right):
    """A w x h label map: ``left`` on the left half, ``right`` on the right half."""
    arr = np.full((h, w), right, np.uint8)
    arr[:, : w // 2] = left
    return arr


def test_voc_layout_resize_crop_and_void(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    # 40 x 20 image: shorter side -> 16 gives 32 x 16, the centre 16 x 16 crop keeps columns 8..23
    _rgb(base / "JPEGImages" / "2007_000032.jpg", 40, 20)
    lab = _halves(40, 20, 15, 255)  # person | void
    lab[:, 15:20] = 1  # aeroplane just left of the centre line
    _labels(base / "SegmentationClass" / "2007_000032.png", lab, mode="P", palette=True)
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n")
    ds = VOCSegmentation(tmp_path, "train", image_size=16)
    assert len(ds) == 1 and ds.num_classes == 21 and ds.class_names[15] == "person"
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    label = item["label"]
    assert label.shape == (16, 16) and label.dtype == torch.int64
    # resized columns 0..31 map to source columns 0..39 (x 1.25); crop columns 0..7 -> resized 8..15
    # -> source 10..19: person (10..14), aeroplane (15..19); crop 8..15 -> source 20..39: void
    assert set(label[:, :4].unique().tolist()) == {15}
    assert set(label[:, 4:8].unique().tolist()) == {1}
    assert set(label[:, 8:].unique().tolist()) == {255}
    assert item["image"][0, :, 0].mean() > 0.9 and item["image"][0, :, -1].mean() < 0.6  # red left half kept
    # the same tree found from VOCdevkit/VOC2012 itself
    assert len(VOCSegmentation(base, "train", image_size=16)) == 1
    with pytest.raises(FileNotFoundError, match="val"):
        VOCSegmentation(tmp_path, "val")


def test_voc_target_size_differs_from_image_size(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    _rgb(base / "JPEGImages" / "a.jpg", 32, 32)
    _labels(base / "SegmentationClass" / "a.png", _halves(32, 32, 3, 4), mode="P", palette=True)
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    item = VOCSegmentation(tmp_path, "val", image_size=16, target_size=8)[0]
    assert item["image"].shape == (3, 16, 16) and item["label"].shape == (8, 8)
    assert item["label"][:, :4].eq(3).all() and item["label"][:, 4:].eq(4).all()


def test_ade20k_keeps_other_as_class_zero(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    _rgb(root / "images" / "training" / "ADE_train_00000001.jpg", 16, 16)
    lab = np.array([[0, 1], [150, 7]], np.uint8).repeat(8, 0).repeat(8, 1)
    _labels(root / "annotations" / "training" / "ADE_train_00000001.png", lab)
    ds = ADE20K(tmp_path, "train", image_size=16)  # the folder holding ADEChallengeData2016 works too
    assert ds.num_classes == 151
    label = ds[0]["label"]
    assert label[0, 0] == 0 and label[0, 15] == 1 and label[15, 0] == 150 and label[15, 15] == 7
    skipped = ADE20K(root, "train", image_size=16, skip_other_class=True)[0]["label"]
    assert skipped[0, 0] == 255 and skipped[0, 15] == 1
    with pytest.raises(ValueError, match="split"):
        ADE20K(root, "test")
    (root / "images" / "training" / "ADE_train_00000002.jpg").write_bytes(
        (root / "images" / "training" / "ADE_train_00000001.jpg").read_bytes())
    with pytest.raises(FileNotFoundError, match="no annotation"):
        ADE20K(root, "train")


def _cityscapes(tmp_path):
    ids = np.array([[0, 7, 8, 26], [33, 4, 9, 23]], np.uint8)  # unlabeled, road, sidewalk, car / bicycle, ground, parking, sky
    stem = "aachen_000000_000019"
    _rgb(tmp_path / "leftImg8bit" / "train" / "aachen" / f"{stem}_leftImg8bit.png", 32, 16)
    _labels(tmp_path / "gtFine" / "train" / "aachen" / f"{stem}_gtFine_labelIds.png", ids.repeat(8, 0).repeat(8, 1))
    return tmp_path


def test_cityscapes_19_and_27_classes(tmp_path):
    root = _cityscapes(tmp_path)
    # 32 x 16 -> shorter side 16 keeps 32 x 16, centre crop = columns 8..23 = id columns 1, 2
    ds19 = Cityscapes(root, "train", image_size=16)
    assert ds19.num_classes == 19 and ds19.class_names[13] == "car"
    lab = ds19[0]["label"]
    assert lab[0, 0] == 0 and lab[0, 15] == 1  # road, sidewalk
    assert lab[15, 0] == 255 and lab[15, 15] == 255  # ground (4) and parking (9) are not among the 19
    ds27 = Cityscapes(root, "train", image_size=32)
    lab27 = ds27[0]["label"]  # 32 x 16 -> 64 x 32, centre 32 crop = id columns 1, 2 again
    assert ds27.num_classes == 19
    full = Cityscapes(root, "train", image_size=16, classes=27)
    assert full.num_classes == 27 and full.class_names[2] == "parking"
    lab = full[0]["label"]
    assert lab[0, 0] == 0 and lab[0, 15] == 1 and lab[15, 0] == 255 and lab[15, 15] == 2  # parking = 9 - 7
    assert lab27.shape == (32, 32)
    with pytest.raises(ValueError, match="19 or 27"):
        Cityscapes(root, "train", classes=20)
    with pytest.raises(FileNotFoundError, match="val"):
        Cityscapes(root, "val")


def test_cityscapes_ids_map_to_train_ids(tmp_path):
    from jafar.eval.datasets import CITYSCAPES_19, CITYSCAPES_27

    assert CITYSCAPES_19[26] == 13 and CITYSCAPES_19[33] == 18 and 9 not in CITYSCAPES_19 and len(CITYSCAPES_19) == 19
    assert CITYSCAPES_27[7] == 0 and CITYSCAPES_27[33] == 26 and len(CITYSCAPES_27) == 27


def test_coco_stuff_fine_to_coarse(tmp_path):
    from jafar.eval.datasets import COCO_27_CLASSES, COCO_FINE_TO_COARSE

    image_id = "000000000009"
    _rgb(tmp_path / "dataset" / "images" / "train2017" / f"{image_id}.jpg", 16, 16)
    fine = np.array([[0, 91], [181, 255]], np.uint8).repeat(8, 0).repeat(8, 1)  # person, banner, wood, unlabelled
    _labels(tmp_path / "dataset" / "annotations" / "train2017" / f"{image_id}.png", fine)
    listing = tmp_path / "curated" / "train2017" / "Coco164kFull_Stuff_Coarse.txt"
    listing.parent.mkdir(parents=True)
    listing.write_text(image_id + "\n")
    ds = COCOStuff(tmp_path, "train", image_size=16)
    lab = ds[0]["label"]
    assert ds.num_classes == 27 and len(COCO_FINE_TO_COARSE) == 182
    assert COCO_27_CLASSES[lab[0, 0]] == "person" and COCO_27_CLASSES[lab[0, 15]] == "textile"
    assert COCO_27_CLASSES[lab[15, 0]] == "solid" and lab[15, 15] == 255
    assert len(COCOStuff(tmp_path, "train", image_size=16, image_list=None)) == 1
    listing.write_text(image_id + "\n000000000025\n")
    with pytest.raises(FileNotFoundError, match="000000000025"):
        COCOStuff(tmp_path, "train")
    (tmp_path / "dataset" / "images" / "val2017").mkdir()
    (tmp_path / "dataset" / "annotations" / "val2017").mkdir()
    with pytest.raises(FileNotFoundError, match="curated image list"):
        COCOStuff(tmp_path, "val")


def test_depth_folder_png_npy_and_invalid_pixels(tmp_path):
    for split in ("train",):
        _rgb(tmp_path / split / "images" / "a.png", 16, 16)
        _rgb(tmp_path / split / "images" / "b.jpg", 16, 16)
        mm = np.full((16, 16), 2500, np.uint16)
        mm[:8, :8] = 0  # invalid quarter
        (tmp_path / split / "depth").mkdir(parents=True)
        Image.fromarray(mm).save(tmp_path / split / "depth" / "a.png")
        np.save(tmp_path / split / "depth" / "b.npy", np.full((32, 32), 3.0, np.float32))
    ds = DepthFolder(tmp_path, "train", image_size=8, depth_scale=0.001)
    a, b = ds[0], ds[1]
    assert a["label"].dtype == torch.float32 and a["label"].shape == (8, 8)
    assert a["label"][:4, :4].eq(0).all() and torch.allclose(a["label"][4:, 4:], torch.tensor(2.5))
    assert np.allclose(load_depth(tmp_path / "train" / "depth" / "b.npy"), 3.0)
    assert np.allclose(load_depth(tmp_path / "train" / "depth" / "a.png", scale=0.001)[8:, 8:], 2.5)
    assert b["label"].shape == (8, 8)  # 0.001 applies to every file, also the npy: 3.0 -> 0.003
    assert torch.allclose(b["label"], torch.tensor(0.003))
    _rgb(tmp_path / "train" / "images" / "c.png", 16, 16)
    with pytest.raises(FileNotFoundError, match="no depth map for 'c.png'"):
        DepthFolder(tmp_path, "train")
    loose = DepthFolder(tmp_path, "train", image_size=8, depth_required=False)
    assert loose[2]["label"].numel() == 0 and loose[0]["label"].shape == (8, 8)


def test_demo_segmentation_is_a_voc_tree_with_image_edges_at_label_edges(tmp_path):
    root = write_demo_segmentation(tmp_path / "seg", train=3, val=2, size=64, seed=1)
    manifest = (root / "demo_manifest.json").read_text()
    assert json.loads(manifest)["classes"] == list(SEG_CLASS_NAMES)
    ds = VOCSegmentation(root, "train", image_size=64, num_classes=len(SEG_CLASS_NAMES))
    assert len(ds) == 3 and len(VOCSegmentation(root, "val", image_size=64, num_classes=6)) == 2
    item = ds[0]
    assert item["label"].max() < 6 and len(item["label"].unique()) >= 2
    # the image changes more across label boundaries than inside regions
    img, lab = item["image"], item["label"]
    diff = (img[:, :, 1:] - img[:, :, :-1]).abs().sum(0)
    edge = lab[:, 1:] != lab[:, :-1]
    assert diff[edge].mean() > diff[~edge].mean()
    mtime = (root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "demo_train_0000.jpg").stat().st_mtime_ns
    write_demo_segmentation(tmp_path / "seg", train=3, val=2, size=64, seed=1)  # kept, not rewritten
    assert (root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "demo_train_0000.jpg").stat().st_mtime_ns == mtime


def test_demo_depth_scenes_have_metric_depth(tmp_path):
    root = write_demo_depth(tmp_path / "depth", train=2, val=1, size=64, seed=0)
    ds = DepthFolder(root, "train", image_size=64, depth_scale=0.001)
    depth = ds[0]["label"]
    assert depth.shape == (64, 64) and (depth > 1.0).all() and (depth < 10.0).all()
    # ground rows below every billboard: depth falls towards the bottom of the image
    assert depth[-1].median() < depth[-10].median()
    assert len(DepthFolder(root, "val", image_size=64, depth_scale=0.001)) == 1
