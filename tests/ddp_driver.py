"""A script that runs one tool's ``run()`` in-process, launched by tests/test_bev_ddp.py with
``trainer.devices=2 trainer.accelerator=cpu``: Lightning's DDP launcher starts the second process
by running this script again (as torchrun or SLURM would run every process), so each process runs
the whole tool. It records, per process, what the test checks: which ranks wrote results.json and
how many training steps each ran; ``--kill-at S`` dies at the start of step S (after its
checkpoint), like a killed job, and exits with status 3.

    python tests/ddp_driver.py [--kill-at S] bev|pretrain RUN_DIR RECORD_DIR [override ...]
"""

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import lightning as L  # noqa: E402


class Record(L.Callback):
    """Writes ``steps_rank<r>.json``: the training steps this process ran, and the SyncBatchNorm
    layers of its model (0 on the CPU, where PyTorch cannot synchronise them)."""

    def __init__(self, folder: Path, kill_at: int):
        self.folder, self.kill_at, self.steps = folder, kill_at, 0

    def on_train_batch_start(self, trainer, module, *args):
        if trainer.global_step == self.kill_at:
            raise RuntimeError("killed")
        self.steps += 1

    def on_train_end(self, trainer, module):
        import torch

        sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules())
        (self.folder / f"steps_rank{trainer.global_rank}.json").write_text(json.dumps(
            {"steps": self.steps, "world_size": trainer.world_size, "sync_batchnorm_layers": sync}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("tool", choices=["bev", "pretrain"])
    p.add_argument("run_dir", type=Path)
    p.add_argument("record_dir", type=Path)
    p.add_argument("--kill-at", type=int, default=-1)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    args.record_dir.mkdir(parents=True, exist_ok=True)

    from jafar import runs

    write_results = runs.write_results

    def recording_write_results(run_dir, results, config):
        rank = os.environ.get("LOCAL_RANK", "0")
        with open(args.record_dir / "results_writes.txt", "a") as f:
            f.write(f"{rank}\n")
        write_results(run_dir, results, config)

    runs.write_results = recording_write_results
    record = Record(args.record_dir, args.kill_at)
    try:
        if args.tool == "bev":
            from bev.config import compose
            from bev.run import run

            run(compose(*args.overrides), args.run_dir, callbacks=[record])
        else:
            from jafar.train import run as pretrain
            from jafar.train.config import compose

            cfg = compose(*args.overrides)
            # pretraining takes no extra callbacks: the recorder joins its trainer's list
            make_trainer = runs.make_trainer
            pretrain.runs.make_trainer = lambda *a, callbacks=(), **k: make_trainer(
                *a, callbacks=list(callbacks) + [record], **k)
            pretrain.run(cfg, args.run_dir)
    except RuntimeError as err:
        if "killed" in str(err):
            sys.exit(3)
        raise


if __name__ == "__main__":
    main()
