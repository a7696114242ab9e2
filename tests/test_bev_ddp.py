"""DDP on the CPU (Lightning, ``accelerator=cpu devices=2``, gloo) for both training tools, each
process started as Lightning's launcher starts it (the script run again, as torchrun or SLURM
would): training, checkpoints, a killed run resumed, ``results.json`` written once by rank 0, and
the BeV validation IoU of a fixed checkpoint identical under two processes and one.

Slower than the other tests, for a reason: each launch starts two Python processes that import
torch and Lightning, and DDP needs them (270 s for both tests on 2 cores shared with other jobs
at load average ~8); the cases share launches (BeV: 2 launches + one in-process run; pretraining:
2 launches)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "ddp_driver.py"

pytest.importorskip("nuscenes")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

DDP = ("trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp")


def _env():
    # one thread per process (two processes on a small machine); no GPU; a free port per launch
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                MASTER_PORT=str(20000 + os.getpid() % 20000))


def _launch(tool, run_dir, record, *overrides, kill_at=-1, expect=0):
    cmd = [sys.executable, str(DRIVER), "--kill-at", str(kill_at), tool, str(run_dir), str(record), *overrides]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def _bev_overrides(root):
    return ("experiment=demo", f"data.dataroot={root}", "data.prepare=null", "data.image_size=[32,64]",
            "data.batch_size=1", "data.num_workers=0", "grid.x_bounds=[-16,16]", "grid.y_bounds=[-16,16]",
            "grid.resolution=2.0", "encoder.guidance_size=[16,32]", "pictures=1", "model.latent_dim=16",
            "upsampler=jafar", "trainer.max_steps=3", "checkpoint_every=1", "trainer.val_check_interval=3",
            "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1")


@pytest.fixture(scope="module")
def odd_val_root(tmp_path_factory):
    """Synthetic nuScenes with 3 training and 3 validation samples: under two processes the
    validation shards are 2 + 1 samples (a padding sampler would count one twice)."""
    from bev.data.synthetic import generate

    root = tmp_path_factory.mktemp("ddp") / "nuscenes"
    generate(root, scenes=2, samples_per_scene=3, image_size=(160, 90), val_scenes=1, workers=1)
    return root


def test_bev_ddp_trains_resumes_and_validates_like_one_process(odd_val_root, tmp_path):
    from bev.config import compose
    from bev.run import run

    over = _bev_overrides(odd_val_root)
    run_dir, rec = tmp_path / "run", tmp_path / "record"
    _launch("bev", run_dir, rec, *over, *DDP, kill_at=2, expect=3)  # killed at the start of step 2
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert not (run_dir / "results.json").exists()

    (rec / "steps_rank0.json").unlink(missing_ok=True)
    proc = _launch("bev", run_dir, rec, *over, *DDP)  # the same command: resumes from last.ckpt
    assert proc.stderr.count("the learning rate is not scaled") == 1  # said once, by rank 0, before training
    for rank in (0, 1):
        done = json.loads((rec / f"steps_rank{rank}.json").read_text())
        assert done["steps"] == 1 and done["world_size"] == 2  # one step left, on both processes
        assert done["sync_batchnorm_layers"] == 0  # off on the CPU (PyTorch syncs GPU tensors only)
    assert (rec / "results_writes.txt").read_text().split() == ["0"]  # once, by rank 0
    ddp = json.loads((run_dir / "results.json").read_text())
    assert ddp["step"] == 3 and ddp["val_samples"] == 3 and ddp["val"]["trained_min_visibility"] == 2

    # one process, same configuration and run directory: resumes the finished run and validates
    # its final checkpoint on the 3 samples alone
    single = run(compose(*over, "trainer.accelerator=cpu", "trainer.devices=1"), run_dir)
    assert single["step"] == 3
    for key in ("iou_vis1", "iou_vis2"):
        assert single["val"][key] == ddp["val"][key]  # the synced counts: the same IoU to the float
    assert single["prior"] == ddp["prior"]


def test_pretraining_ddp_resumes_and_writes_results_once(tmp_path):
    from test_pretrain import _write_images

    data = _write_images(tmp_path / "imgs", 6) or tmp_path / "imgs"
    over = ("backbone=tiny_vit", f"data.root={data}", "data.num_workers=0", "data.batch_size=1",
            "data.val_images=2", "recipe.image_size=56", "upsampler.qk_dim=32", "trainer.max_steps=3",
            "trainer.precision=32-true", "trainer.val_check_interval=3", "trainer.enable_progress_bar=false",
            "checkpoint_every=1", "validation.ratios=[2]")
    run_dir, rec = tmp_path / "run", tmp_path / "record"
    _launch("pretrain", run_dir, rec, *over, *DDP, kill_at=2, expect=3)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    _launch("pretrain", run_dir, rec, *over, *DDP)
    for rank in (0, 1):
        done = json.loads((rec / f"steps_rank{rank}.json").read_text())
        assert done["steps"] == 1 and done["world_size"] == 2
    assert (rec / "results_writes.txt").read_text().split() == ["0"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["step"] == 3 and (run_dir / "jafar.safetensors").is_file()
