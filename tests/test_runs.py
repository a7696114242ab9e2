"""jafar/runs.py, what the three tools share: a run directory belongs to one configuration (another
seed there is refused in one sentence before any work, the same configuration resumes, resume=null
starts afresh), the record travels in every checkpoint, the per-choice settings of an experiment
stay under the command line, and bev/ uses only public names of jafar."""

import ast
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import ROOT, CountSteps, KillAt, compose_bev_demo
from jafar import runs, utils
from jafar.runs import RunConfigMismatch

SENTENCE = r"holds a run of another configuration \(seed: 0 -> 1\): give this one a new name= .*or pass resume=null"


# ---------------------------------------------------------------------------------------------
# the helpers
# ---------------------------------------------------------------------------------------------


def test_result_config_leaves_out_names_paths_logging_and_devices():
    cfg = OmegaConf.create({"name": "a", "seed": 0, "resume": "auto", "data": {"root": "${oc.env:NOPE_NOT_SET}",
                            "batch_size": 2}, "trainer": {"devices": 4, "precision": "bf16-mixed",
                            "enable_progress_bar": True}, "lr": "${seed}"})
    # the unresolvable path is never resolved: it is not part of the identity
    assert runs.result_config(cfg, ("data.root",)) == {"seed": 0, "data": {"batch_size": 2},
                                                        "trainer": {"precision": "bf16-mixed"}, "lr": 0}
    assert runs.result_config(cfg, ("data",)) == {"seed": 0, "trainer": {"precision": "bf16-mixed"}, "lr": 0}


def test_config_changes_name_every_differing_key():
    old = {"seed": 0, "optimizer": {"lr": 1e-3, "betas": [0.9, 0.999]}, "gone": 1}
    new = {"seed": 1, "optimizer": {"lr": 1e-3, "betas": [0.9, 0.99]}, "added": "x"}
    assert runs.config_changes(old, new) == ["added: (absent) -> 'x'", "gone: 1 -> (absent)",
                                             "optimizer.betas: [0.9, 0.999] -> [0.9, 0.99]", "seed: 0 -> 1"]
    assert runs.config_changes(old, old) == []


def test_check_run_dir_refuses_another_configuration_and_write_results_never_overwrites(tmp_path):
    runs.claim_run_dir(tmp_path, {"seed": 0}, "auto")
    runs.check_run_dir(tmp_path, {"seed": 0}, "auto")  # the same: fine
    runs.check_run_dir(tmp_path, {"seed": 1}, None)  # resume=null: a fresh start is always allowed
    with pytest.raises(RunConfigMismatch, match=SENTENCE):
        runs.check_run_dir(tmp_path, {"seed": 1}, "auto")
    runs.write_results(tmp_path, {"iou": 0.5}, {"seed": 0})
    with pytest.raises(RunConfigMismatch, match="seed: 0 -> 1"):
        runs.write_results(tmp_path, {"iou": 0.1}, {"seed": 1})
    assert json.loads((tmp_path / "results.json").read_text()) == {"iou": 0.5}
    runs.check_run_dir(tmp_path / "new", {"seed": 1}, "auto")  # an empty directory belongs to no one yet


def test_a_fresh_start_removes_the_previous_runs_artefacts_only(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step0000100.ckpt").write_text("x")
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "photos").mkdir()  # data living in the run directory is not an artefact
    runs.claim_run_dir(tmp_path, {"seed": 1}, None)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "results.json").exists()
    assert (tmp_path / "photos").is_dir() and runs.recorded_config(tmp_path) == {"seed": 1}


def test_per_choice_settings_apply_to_their_choice_only_and_the_command_line_wins():
    cfg = OmegaConf.create({"model": {"name": "bevformer", "query_downsample": 1, "latent_dim": 128},
                            "per_model": {"bevformer": {"model": {"query_downsample": 2}},
                                          "pointbev": {"model": {"N_coarse": 5}}}})
    out = runs.apply_per_choice(cfg, "per_model", "bevformer")
    assert out.model == {"name": "bevformer", "query_downsample": 2, "latent_dim": 128} and out.per_model == {}
    assert runs.apply_per_choice(out, "per_model", "bevformer") == out  # applied once
    wins = runs.apply_per_choice(cfg, "per_model", "bevformer", ["model=bevformer", "model.query_downsample=1",
                                                                  "model.latent_dim=16"])
    assert wins.model.query_downsample == 1 and wins.model.latent_dim == 128  # only keys the settings touch
    assert cfg.per_model.bevformer.model.query_downsample == 2  # the input is left as it was


def test_derive_seed_is_the_seed_every_earlier_run_used():
    # the values of the SplitMix64 mixer the data pipelines have always used (resumed runs replay them)
    assert utils.derive_seed(0, 1, 2) == 6575906650889035235 != utils.derive_seed(0, 2, 1)
    assert utils.derive_seed(7) == 7028064492237494762
    assert utils.derive_seed(2 ** 70, -1) == 6300384138898940615 < 2 ** 63


def test_a_misspelt_trainer_argument_is_one_sentence():
    with pytest.raises(ValueError, match="trainer.max_step is not an argument of lightning.Trainer"):
        runs.check_trainer({"max_step": 3})
    with pytest.raises(ValueError, match="trainer.callbacks is set by the tool"):
        runs.check_trainer({"callbacks": []}, reserved=("callbacks",))
    runs.check_trainer({"max_steps": 3, "precision": "32-true"})


def test_bev_imports_only_public_names_of_other_packages():
    for path in sorted((ROOT / "bev").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and not node.module.startswith("bev"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.relative_to(ROOT)} imports {private} from {node.module}"


# ---------------------------------------------------------------------------------------------
# BeV: bev.run.run
# ---------------------------------------------------------------------------------------------


def test_bev_another_seed_is_refused_the_same_configuration_resumes(synthetic_root, tmp_path):
    pytest.importorskip("nuscenes")
    from bev.run import run

    args = ("model.latent_dim=16", "upsampler=bilinear", "trainer.max_steps=2", "checkpoint_every=1",
            "trainer.val_check_interval=2")
    with pytest.raises(RuntimeError, match="killed"):
        run(compose_bev_demo(synthetic_root, *args), tmp_path, callbacks=[KillAt(1)])
    last = tmp_path / "checkpoints" / "last.ckpt"
    record = json.loads((tmp_path / "run_config.json").read_text())["config"]
    assert torch.load(last, weights_only=False)["run_config"] == record  # the record travels with the checkpoint
    assert record["seed"] == 0 and "name" not in record and "dataroot" not in record["data"]
    stamp = last.stat().st_mtime_ns

    # another seed in the same directory: one sentence, before any work
    count = CountSteps()
    with pytest.raises(RunConfigMismatch, match=SENTENCE):
        run(compose_bev_demo(synthetic_root, *args, "seed=1"), tmp_path, callbacks=[count])
    assert count.steps == 0 and last.stat().st_mtime_ns == stamp and not (tmp_path / "results.json").exists()

    # the same configuration (names, progress bars, workers aside) resumes from step 1
    results = run(compose_bev_demo(synthetic_root, *args, "name=other", "trainer.enable_progress_bar=true"),
                  tmp_path, callbacks=[count])
    assert results["step"] == 2 and count.steps == 1
    finished = (tmp_path / "results.json").read_text()
    with pytest.raises(RunConfigMismatch, match="optimizer.lr: 0.001 -> 0.002"):
        run(compose_bev_demo(synthetic_root, *args, "optimizer.lr=2e-3"), tmp_path)
    assert (tmp_path / "results.json").read_text() == finished  # a finished run keeps its numbers

    # resume=null: afresh, from step 0, and the directory now belongs to seed 1
    fresh = CountSteps()
    results = run(compose_bev_demo(synthetic_root, *args, "seed=1", "resume=null"), tmp_path, callbacks=[fresh])
    assert fresh.steps == 2 and results["step"] == 2 and runs.recorded_config(tmp_path)["seed"] == 1


# ---------------------------------------------------------------------------------------------
# pretraining: jafar.train.run.run
# ---------------------------------------------------------------------------------------------


def _images(folder, n=4):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def _pretrain_cfg(data, *overrides):
    from jafar.train.config import compose

    return compose("backbone=tiny_vit", f"data.root={data}", "data.num_workers=0", "data.batch_size=2",
                   "data.val_images=1", "recipe.image_size=56", "upsampler.qk_dim=32", "trainer.max_steps=2",
                   "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true",
                   "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", "checkpoint_every=1",
                   "validation.ratios=[2]", *overrides)


def test_pretraining_another_seed_is_refused_the_same_configuration_resumes(tmp_path, monkeypatch):
    from jafar.train.module import JafarPretraining
    from jafar.train.run import run

    data = _images(tmp_path / "imgs")
    first = run(_pretrain_cfg(data), tmp_path / "run")
    weights = tmp_path / "run" / "jafar.safetensors"
    stamp, finished = weights.stat().st_mtime_ns, (tmp_path / "run" / "results.json").read_text()
    record = runs.recorded_config(tmp_path / "run")
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["run_config"] == record
    assert record["upsampler"]["qk_dim"] == 32 and "root" not in record["data"]

    steps = []
    step = JafarPretraining.training_step
    monkeypatch.setattr(JafarPretraining, "training_step", lambda self, *a: steps.append(1) or step(self, *a))
    with pytest.raises(RunConfigMismatch, match=SENTENCE):
        run(_pretrain_cfg(data, "seed=1"), tmp_path / "run")
    with pytest.raises(RunConfigMismatch, match="upsampler.checkpoint: None -> 'jafar'"):
        run(_pretrain_cfg(data, "upsampler.checkpoint=jafar"), tmp_path / "run")
    assert not steps and weights.stat().st_mtime_ns == stamp
    assert (tmp_path / "run" / "results.json").read_text() == finished

    # the same configuration, its data moved elsewhere: continues from the last checkpoint (step 2 of 2)
    moved = tmp_path / "moved"
    (tmp_path / "imgs").rename(moved)
    again = run(_pretrain_cfg(moved, "name=renamed"), tmp_path / "run")
    assert not steps and again["step"] == 2 and again["x2"] == first["x2"]


# ---------------------------------------------------------------------------------------------
# the 2-D evaluation runs the pretraining tool for a missing demo checkpoint
# ---------------------------------------------------------------------------------------------


def test_the_eval_runs_the_pretraining_tool_for_a_missing_demo_checkpoint(tmp_path, monkeypatch):
    """The demo's missing checkpoint is trained by ``tools/pretrain_jafar.py experiment=demo`` in a
    process of its own, its run directory where the checkpoint is expected; a tool that fails, or
    writes nothing, is said in one sentence."""
    import subprocess
    import sys

    from jafar.eval import run as eval_run

    seen = []

    def fake_run(cmd, check=False):
        seen.append(cmd)
        (tmp_path / "pre").mkdir(parents=True, exist_ok=True)
        (tmp_path / "pre" / "jafar.safetensors").write_bytes(b"x")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(eval_run.subprocess, "run", fake_run)
    eval_run._run_pretraining_demo(tmp_path / "pre" / "jafar.safetensors")
    assert seen == [[sys.executable, str(ROOT / "tools" / "pretrain_jafar.py"), "experiment=demo",
                     f"hydra.run.dir={tmp_path / 'pre'}", f"data.root={tmp_path / 'pre' / 'photos'}"]]

    monkeypatch.setattr(eval_run.subprocess, "run", lambda cmd, check=False: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(RuntimeError, match="exited with status 1 without writing"):
        eval_run._run_pretraining_demo(tmp_path / "other" / "jafar.safetensors")


def test_a_refused_rerun_leaves_the_finished_runs_hydra_record(tmp_path):
    """Hydra writes .hydra/config.yaml before the tool's identity check, so a refused rerun under
    an existing name would overwrite the finished run's record. The tools' configs set
    ``hydra.output_subdir: null`` and the record is written by claim_run_dir, after the checks."""
    import subprocess
    import sys

    for root in ("pretrain", "train_bev", "eval_2d"):
        cfg = OmegaConf.load(ROOT / "configs" / f"{root}.yaml")
        assert cfg.hydra.output_subdir is None, root
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("finished: run\n")
    runs.write_json(run_dir / runs.RUN_CONFIG, {"config": {"seed": 12345}})  # a run of another configuration
    proc = subprocess.run([sys.executable, "tools/pretrain_jafar.py", "experiment=demo", f"hydra.run.dir={run_dir}",
                           f"data.root={tmp_path / 'photos'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "holds a run of another configuration" in proc.stderr, proc.stderr[-2000:]
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "finished: run\n"
    assert not (tmp_path / "photos").exists()  # refused before any work


def test_claim_run_dir_writes_the_hydra_record(tmp_path):
    cfg = OmegaConf.create({"seed": 3, "name": "${seed}_x"})
    runs.claim_run_dir(tmp_path, {"seed": 3}, "auto", record=cfg)
    assert OmegaConf.load(tmp_path / ".hydra" / "config.yaml") == cfg  # unresolved, as Hydra saves it
    assert OmegaConf.load(tmp_path / ".hydra" / "overrides.yaml") == []


# ---------------------------------------------------------------------------------------------
# the optimizer comes from the config
# ---------------------------------------------------------------------------------------------


def test_the_optimizer_is_the_configs_any_torch_optim_class(tmp_path):
    """``optimizer._target_`` picks the class, its keys are its arguments: SGD with momentum for
    pretraining and the BeV run (OneCycle then peaks at the SGD learning rate), built by the
    tools' own build step; a class that is not an optimizer is refused in one sentence."""
    from bev.run import BEV_TRAINING
    from jafar.train.config import compose as compose_pretrain
    from jafar.train.run import PRETRAINING

    sgd = ("optimizer._target_=torch.optim.SGD", "~optimizer.betas", "~optimizer.weight_decay",
           "+optimizer.momentum=0.5", "optimizer.lr=0.01")
    cfg = compose_pretrain("backbone=tiny_vit", "upsampler.qk_dim=16", *sgd)
    runs.check_optimizer(cfg.optimizer)
    module = PRETRAINING.build(cfg, tmp_path, None)
    opt = module.configure_optimizers()
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.5 and opt.defaults["lr"] == 0.01
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in module.upsampler.parameters() if p.requires_grad}

    from bev.module import BevSegmentation

    bev = compose_bev_demo(tmp_path / "none", *sgd)
    runs.check_optimizer(bev.optimizer)
    module = BevSegmentation(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1), optimizer=runs.build_partial(bev.optimizer),
                             scheduler=runs.build_partial(bev.scheduler), total_steps=100)
    out = module.configure_optimizers()
    assert type(out["optimizer"]) is torch.optim.SGD and out["optimizer"].defaults["momentum"] == 0.5
    assert out["lr_scheduler"]["scheduler"].get_last_lr()[0] == pytest.approx(0.01 / float(bev.scheduler.div_factor))
    assert BEV_TRAINING.checkpoint_keys == ("encoder.", "head.")
    # any other scheduler is called with the optimizer alone, and stepped every batch too
    import functools

    module = BevSegmentation(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1), optimizer=runs.build_partial(bev.optimizer),
                             scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=7))
    out = module.configure_optimizers()
    assert type(out["lr_scheduler"]["scheduler"]) is torch.optim.lr_scheduler.StepLR
    assert out["lr_scheduler"]["interval"] == "step"
    with pytest.raises(ValueError, match=r"scheduler._target_ must name a torch.optim.lr_scheduler.LRScheduler class"):
        from bev.run import check_config

        check_config(compose_bev_demo(tmp_path / "none", "scheduler._target_=torch.nn.Linear"))

    cfg = compose_pretrain("optimizer._target_=torch.nn.Linear")
    with pytest.raises(ValueError, match=r"optimizer._target_ must name a torch.optim.Optimizer class \(e.g. "
                                         r"torch.optim.AdamW\), got 'torch.nn.Linear'"):
        runs.check_optimizer(cfg.optimizer)
