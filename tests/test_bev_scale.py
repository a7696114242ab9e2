"""BeV at real scale: the streamed prior baseline equals the stacked one to the float,
the validation shards, the validation interval, the device sentence, and the trainval-sized
tables generator at CI size (a few scenes)."""


import numpy as np
import pytest
import torch

from bev.module import LabelCounts, best_prior_threshold, prior_baseline, stacked_prior_baseline
from bev.run import label_counts, validation_interval
from jafar.runs.samplers import ShardSampler


def _counts(seg, vis, levels):
    counts = LabelCounts(seg.shape[1:], levels)
    for s, v in zip(seg, vis):
        counts.add(s, v)
    return counts


@pytest.mark.parametrize("case", range(6))
def test_streamed_prior_equals_the_stacked_one_to_the_float(case):
    """Random maps with few samples (many tied frequencies), cells never covered, all visibility
    levels; one case without any vehicle in training, one where the best threshold is 0.5 exactly."""
    rng = np.random.default_rng(case)
    n_train, n_val, shape = (5, 4, (9, 11)) if case % 2 else (13, 7, (16, 6))
    often = rng.random(shape) ** 3
    often[:, :2] = 0  # empty cells: never a vehicle
    train = (rng.random((n_train, *shape)) < often).astype(np.float32)
    if case == 4:
        train[:] = 0
    val = (rng.random((n_val, *shape)) < often).astype(np.float32)
    train_vis = (train * rng.integers(1, 5, train.shape)).astype(np.uint8)
    val_vis = (val * rng.integers(1, 5, val.shape)).astype(np.uint8)
    for level in (1, 2, 3):
        want = stacked_prior_baseline(train, train_vis, val, val_vis, min_visibility=level)
        got = prior_baseline(_counts(train, train_vis, (level,)), _counts(val, val_vis, (1, 2)),
                             min_visibility=level)
        assert got == want  # every float identical, the threshold included


def test_threshold_search_takes_the_smallest_of_tied_thresholds():
    """Two cells, frequencies 1/4 and 3/4, one sample each way: by hand, the thresholds 3/4 and
    0.5 give the same map ({cell 1}), and 0.5 is the smaller one."""
    seg = np.zeros((4, 1, 2), dtype=np.float32)
    seg[0, 0, 0] = 1
    seg[:3, 0, 1] = 1
    counts = _counts(seg, (seg * 4).astype(np.uint8), (2,))
    freq = counts.frequency()
    assert freq.tolist() == [[0.25, 0.75]]
    # t = 1/4: predicts both cells: TP 4, FP 3 + 1, FN 0 -> 4/8; t in {0.5, 3/4}: TP 3, FP 1, FN 1 -> 3/5
    assert best_prior_threshold(freq, counts, 2) == (0.5, 3 / 5)


def test_label_counts_streams_with_workers():
    """The counts of a data set, summed over chunks in two loader workers, are those of its stack."""
    rng = np.random.default_rng(3)
    seg = (rng.random((11, 6, 5)) < 0.3).astype(np.float32)
    vis = (seg * rng.integers(1, 5, seg.shape)).astype(np.uint8)

    class Labels:
        def __len__(self):
            return len(seg)

        def targets(self, i):
            return {"seg": seg[i][None], "visibility": vis[i][None]}

    want = _counts(seg, vis, (1, 2))
    got = label_counts(Labels(), (6, 5), levels=(1, 2), num_workers=2, chunk=3)
    assert got.samples == 11 and np.array_equal(got.seg, want.seg)
    for v in (1, 2):
        assert np.array_equal(got.kept[v], want.kept[v]) and np.array_equal(got.positive[v], want.positive[v])


def test_validation_shards_are_disjoint_and_not_padded():
    shards = [list(ShardSampler(7, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(7))  # each sample once: no padding to even the shards
    assert [len(ShardSampler(7, r, 3)) for r in range(3)] == [3, 2, 2]


def test_validation_interval_in_steps():
    assert validation_interval(None, 28130, 2813000) == 28130          # once per epoch
    assert validation_interval(0.25, 28130, 2813000) == 7032           # round(0.25 x 28130)
    assert validation_interval(100, 150, 300) == 100 and validation_interval(500, 150, 300) == 300


def test_val_check_interval_is_checked(tmp_path):
    from bev.config import compose
    from bev.run import check_config

    for bad in ("0", "1.5", "-3"):
        cfg = compose("experiment=demo", f"trainer.val_check_interval={bad}")
        with pytest.raises(ValueError, match="val_check_interval must be null"):
            check_config(cfg)
    defaults = compose("data.dataroot=/data/nuscenes")
    assert defaults.trainer.devices == 1 and defaults.trainer.val_check_interval is None
    assert defaults.trainer.sync_batchnorm is True


def test_devices_sentence_states_the_arithmetic():
    from omegaconf import OmegaConf

    from bev.run import devices_sentence

    cfg = OmegaConf.create({"optimizer": {"lr": 3e-4}})
    text = devices_sentence(8, 1, 28130, 3517, 351700, cfg)
    assert "global batch is data.batch_size x 8 = 8" in text and "3517 steps" in text
    assert "351700 steps" in text and "not scaled" in text and "lr=0.0003" in text


@pytest.fixture(scope="module")
def trainval_root(tmp_path_factory):
    """The trainval-sized tables at CI size: 3 training and 1 validation scene of the official
    splits (scale 0.004), the real key frame's six images shared by every camera record."""
    pytest.importorskip("nuscenes")
    from bev.data.tables import CAMERAS
    from bev.data.trainval_tables import write_trainval_tables
    from conftest import FIXTURES

    frame = FIXTURES / "nuscenes_frame"
    images = {ch: str(next(frame.glob(f"*__{ch}__*.jpg"))) for ch in CAMERAS}
    root = tmp_path_factory.mktemp("trainval") / "nuscenes"
    counts = write_trainval_tables(root, scale=0.004, images=images)
    return root, counts


def test_trainval_tables_have_the_real_splits_and_record_ratios(trainval_root):
    from nuscenes.utils.splits import create_splits_scenes

    from bev.data.nuscenes import NuScenesBev

    root, counts = trainval_root
    official = create_splits_scenes(verbose=False)
    train = NuScenesBev(root, "v1.0-trainval", "train")
    val = NuScenesBev(root, "v1.0-trainval", "val")
    assert train.scenes == official["train"][:3] and val.scenes == official["val"][:1]
    # v1.0-trainval's 28,130 samples over 700 training scenes: 130 scenes of 41, then 40
    assert len(train) == 41 * 3 and len(val) == 41 and counts["sample"] == 164 and counts["scene"] == 4
    assert counts["sample_data"] == counts["ego_pose"] == 76 * 164  # 12 key frames + 64 sweeps per sample
    assert 20 * 164 <= counts["sample_annotation"] <= 48 * 164
    sample = train[0]
    assert sample["images"].shape == (6, 3, 224, 476) and len(train.boxes(0)) > 0
    # PointBeV's validation pipeline: scale 0.301, 481 columns stretched to 476 and centred
    sx = 0.301 * 476 / 481
    assert sample["intrinsics"][1, 0, 2] == pytest.approx(816.2670 * sx + (476 - 1600 * sx) / 2, rel=1e-5)


def test_tables_are_loaded_once_for_train_and_val(trainval_root, monkeypatch):
    import nuscenes.nuscenes

    from bev.config import compose
    from bev.run import build_datasets, build_grid

    loads = []
    real = nuscenes.nuscenes.NuScenes
    monkeypatch.setattr(nuscenes.nuscenes, "NuScenes", lambda *a, **k: loads.append(1) or real(*a, **k))
    root, _ = trainval_root
    cfg = compose(f"data.dataroot={root}")
    train, val = build_datasets(cfg.data, build_grid(cfg))
    assert len(loads) == 1 and (len(train), len(val)) == (123, 41)
    assert not any(hasattr(d, "nusc") for d in (train, val))  # workers get the compact arrays only
    with pytest.raises(ValueError, match="unknown nuScenes split 'vall'"):
        build_datasets(compose(f"data.dataroot={root}", "data.val_split=vall").data, build_grid(cfg))
    assert len(loads) == 1  # refused before loading the tables


def test_feature_cache_never_hits_across_settings_that_change_the_features(synthetic_root, tmp_path, caplog):
    """Changing data.image_size, the resize scale range or the camera order gives another cache file (a
    miss), the same settings read their own file back (a hit); without encoder.cache_dir the cache
    goes under the data root, said in the log; float16 is stored by default."""
    import logging

    from bev.run import SeededSamples, build_datasets, build_grid, build_model, collate, feature_cache_dir
    from conftest import compose_bev_demo

    cache = tmp_path / "cache"

    def features(*overrides):
        cfg = compose_bev_demo(synthetic_root, "data.cache_features=true", f"encoder.cache_dir={cache}",
                               "data.augment=false", *overrides)
        _, val = build_datasets(cfg.data, build_grid(cfg))
        encoder, _ = build_model(cfg, build_grid(cfg), feature_cache_dir(cfg))
        batch = collate([SeededSamples(val, cache_keys=True)[0]])
        before = set(cache.rglob("*.pt"))
        with torch.no_grad():
            feats = encoder._cached_features(encoder.backbone.normalize(batch["images"].flatten(0, 1)).unflatten(
                0, batch["images"].shape[:2]), batch["cache_keys"])
        return feats, set(cache.rglob("*.pt")) - before

    base, new = features()
    assert len(new) == 1 and torch.load(next(iter(new)))["features"].dtype == torch.float16
    again, new = features()
    assert not new and torch.equal(again, base)  # a hit: the stored features
    for change in ("data.image_size=[48,96]", "data.scale_range=[0.2,0.2]",
                   "data.cameras=[CAM_FRONT,CAM_FRONT_LEFT,CAM_FRONT_RIGHT,CAM_BACK_LEFT,CAM_BACK,CAM_BACK_RIGHT]"):
        _, new = features(change)
        assert len(new) == 1, change  # a miss: computed and stored under another name

    cfg = compose_bev_demo(synthetic_root, "data.cache_features=true")
    with caplog.at_level(logging.INFO, logger="bev.run"):
        assert feature_cache_dir(cfg) == synthetic_root / "cache" / "bev_features"
    assert "without encoder.cache_dir" in caplog.text
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(ValueError, match="cannot be written"):
        feature_cache_dir(compose_bev_demo(synthetic_root, "data.cache_features=true",
                                           f"encoder.cache_dir={blocked / 'sub'}"))
