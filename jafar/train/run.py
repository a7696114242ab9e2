"""The pretraining tool (:class:`Pretraining`, run by :func:`jafar.runs.run`): data, backbone, the
upsampler it trains (JAFAR by default; FeatUp's JBU stack and LiFT with their own objectives,
:mod:`jafar.train.objectives`), Lightning trainer.

Entry point: ``tools/pretrain_jafar.py`` (``configs/pretrain.yaml``; schema in
:mod:`jafar.train.config`). The protocol, trainer, checkpoints, resume and run identity are the
tools' shared ones (:mod:`jafar.runs`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .. import runs
from ..runs.samplers import StepBatchSampler
from ..upsamplers.jafar import KEY_MODES, OPTION_DEFAULTS, save_checkpoint
from ..utils import atomic_path
from .config import ROOT, JafarUpsampler, PretrainConfig
from .data import ImageFiles, find_images, make_loader, split_holdout, write_demo_photos
from .losses import CosineMSELoss
from .module import CONSISTENCY, JafarPretraining
from .objectives import DOWNSAMPLERS, LIFT_LOSSES, FeatUpObjective, LiftObjective, lift_grids

log = logging.getLogger(__name__)

#: keys that do not change a pretraining's result (besides :data:`jafar.runs.NOT_IDENTITY`): where
#: the images are and how they are loaded
NOT_IDENTITY = ("data.root", "data.val_root", "data.num_workers", "data.pin_memory", "per_upsampler")
#: the upsamplers pretraining trains, and how the pictures and messages name them
TRAINABLE = {"jafar": "JAFAR", "featup": "FeatUp", "lift": "LiFT"}
#: what the run writes (removed by a fresh start, resume=null): the trained upsampler's weights are
#: ``<run dir>/<upsampler>.safetensors``
ARTEFACTS = runs.RUN_ARTEFACTS + tuple(f"{name}.safetensors" for name in TRAINABLE)
#: the official global batch: train.py on one device, config/dataloader/train.yaml batch_size 4
#: (github PaulCouairon/JAFAR @ 94d4d54)
OFFICIAL_BATCH = 4
#: the global batch of each upsampler's own training code, on one device: FeatUp's
#: configs/jbu_upsampler.yaml (batch_size 4, num_gpus 1), LiFT's README command for a patch-16 ViT
#: (train_lift.py --batch_size 256)
OFFICIAL_BATCHES = {"jafar": OFFICIAL_BATCH, "featup": 4, "lift": 256}


class PretrainData(L.LightningDataModule):
    """Training batches indexed by step (resumable), validation on held-out images."""

    def __init__(self, train_files, val_files, cfg: DictConfig, image_size: int, total_steps: int, seed: int):
        super().__init__()
        self.train_files, self.val_files = train_files, val_files
        self.cfg, self.image_size, self.total_steps, self.seed = cfg, int(image_size), int(total_steps), int(seed)

    def train_dataloader(self):
        crop = self.cfg.get("random_crop")
        data = ImageFiles(self.train_files, self.image_size, tuple(crop) if crop else None)
        trainer = self.trainer
        sampler = StepBatchSampler(len(data), self.cfg.batch_size, self.total_steps, self.seed,
                                   start_step=lambda: trainer.global_step,
                                   rank=trainer.global_rank, world_size=trainer.world_size)
        return make_loader(data, sampler, num_workers=self.cfg.num_workers, pin_memory=self.cfg.pin_memory)

    def val_dataloader(self):
        # every rank validates every held-out image: a few images, and DDP needs every rank to run
        # the same number of forward passes
        files = self.val_files
        return make_loader(ImageFiles(files, self.image_size), batch_size=self.cfg.batch_size,
                           num_workers=min(self.cfg.num_workers, len(files)), pin_memory=self.cfg.pin_memory)


def check_upsampler(cfg: DictConfig) -> str:
    """The name of the upsampler to train; an untrainable one refused in one sentence, and JAFAR's
    keys checked against their schema (:class:`jafar.train.config.JafarUpsampler`)."""
    name = cfg.upsampler.get("name")
    if name not in TRAINABLE:
        raise ValueError(f"pretraining trains {', '.join(TRAINABLE)} (upsampler=<name>, configs/upsampler/<name>.yaml), "
                         f"not {name!r}.")
    if name == "jafar":
        from omegaconf.errors import OmegaConfBaseException

        try:
            node = OmegaConf.merge(OmegaConf.structured(JafarUpsampler), cfg.upsampler)
        except OmegaConfBaseException as err:
            raise ValueError(f"upsampler (upsampler/jafar.yaml): {err.msg.splitlines()[0]}") from None
        missing = sorted(OmegaConf.missing_keys(node))
        if missing:
            raise ValueError(f"upsampler (upsampler/jafar.yaml) lacks {', '.join(missing)}.")
    return name


def check_objective(cfg: DictConfig, name: str) -> None:
    """FeatUp's (``featup:``) or LiFT's (``lift:``) settings, in one sentence naming the key."""
    if name == "featup":
        f = cfg.featup
        if int(f.n_jitters) < 1:
            raise ValueError(f"featup.n_jitters must be a positive number of jitters, got {f.n_jitters}.")
        if int(f.max_pad) < 0 or float(f.max_zoom) < 1:
            raise ValueError(f"featup.max_pad must be >= 0 and featup.max_zoom >= 1, got {f.max_pad} and {f.max_zoom}.")
        if f.downsampler not in DOWNSAMPLERS:
            raise ValueError(f"featup.downsampler must be one of {', '.join(DOWNSAMPLERS)}, got {f.downsampler!r}.")
        if f.random_projection is not None and int(f.random_projection) < 1:
            raise ValueError(f"featup.random_projection must be null or a positive width, got {f.random_projection}.")
        if float(f.crf_weight) < 0 or int(f.crf_samples) < 2:
            raise ValueError(f"featup.crf_weight must be >= 0 and featup.crf_samples >= 2, got {f.crf_weight} and "
                             f"{f.crf_samples}.")
    elif name == "lift":
        if cfg.upsampler.get("iterative"):
            raise ValueError("LiFT's objective trains its x2 module (train_lift.py): pretrain with "
                             "upsampler.iterative=false; its weights serve iterative=true at evaluation.")
        if cfg.lift.loss not in LIFT_LOSSES:
            raise ValueError(f"lift.loss must be one of {', '.join(LIFT_LOSSES)}, got {cfg.lift.loss!r}.")
        if not 0 <= float(cfg.lift.color_jitter) <= 0.5:
            raise ValueError(f"lift.color_jitter must be in [0, 0.5], got {cfg.lift.color_jitter}.")


def check_config(cfg: DictConfig) -> None:
    """Refuse values that would fail (or silently misbehave) later, naming the key."""
    name = check_upsampler(cfg)
    if int(cfg.trainer.max_steps) <= 0:
        raise ValueError(f"trainer.max_steps must be a positive number of steps, got {cfg.trainer.max_steps}.")
    r = cfg.recipe
    lo, hi = (float(x) for x in r.lr_scale)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"recipe.lr_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(r.lr_scale)}.")
    if not 0 < float(r.guidance_scale) <= 4:
        raise ValueError(f"recipe.guidance_scale must be in (0, 4], got {r.guidance_scale}.")
    if int(r.image_size) < 16:
        raise ValueError(f"recipe.image_size must be at least 16 pixels, got {r.image_size}.")
    if int(cfg.data.batch_size) < 1:
        raise ValueError(f"data.batch_size must be a positive integer, got {cfg.data.batch_size}.")
    if not cfg.validation.ratios or any(int(x) < 1 for x in cfg.validation.ratios):
        raise ValueError(f"validation.ratios must be a list of positive integers, got {cfg.validation.ratios}.")
    if float(r.consistency_weight) < 0:
        raise ValueError(f"recipe.consistency_weight must be >= 0, got {r.consistency_weight}.")
    if r.consistency not in CONSISTENCY:
        raise ValueError(f"recipe.consistency must be one of {CONSISTENCY}, got {r.consistency!r}.")
    if int(cfg.checkpoint_every) < 1:
        raise ValueError(f"checkpoint_every must be a positive number of steps, got {cfg.checkpoint_every}.")
    runs.check_optimizer(cfg.optimizer)
    check_objective(cfg, name)
    if name == "jafar" and cfg.upsampler.key_mode not in KEY_MODES:
        raise ValueError(f"upsampler.key_mode must be one of {', '.join(KEY_MODES)} (the paper's Table 5 key "
                         f"strategies), got {cfg.upsampler.key_mode!r}.")


#: how many images :func:`check_readable` decodes at most before refusing the folder
READABLE_PROBE = 32


def check_readable(files, root, limit: int = READABLE_PROBE) -> None:
    """Decode images until one reads (at most ``limit``); refuse the folder if none does."""
    probe = ImageFiles(files[:limit], 16)
    for i in range(len(probe)):
        if "image" in probe[i]:
            return
    every = "all" if len(files) <= limit else f"the first {limit} of"
    raise ValueError(f"no readable image under {root}: {every} its {len(files)} images failed to decode "
                     f"(e.g. {probe[0]['path']}: {probe[0]['error']}).")


class Pretraining(runs.Tool):
    """``tools/pretrain_jafar.py``: the task-agnostic training of JAFAR, or of FeatUp's JBU stack or
    LiFT with their own objectives (:func:`jafar.runs.run` owns the protocol): the images read and
    checked, the backbone and the upsampler built, then training, validation on the held-out
    images, ``<upsampler>.safetensors`` (``jafar.safetensors``, ...) and ``results.json``."""

    root, schema, script = ROOT, PretrainConfig, "tools/pretrain_jafar.py"
    not_identity, artefacts = NOT_IDENTITY, ARTEFACTS
    checkpoint_keys = ("upsampler.",)

    def configure(self, cfg: DictConfig, overrides) -> DictConfig:
        """The chosen upsampler's own recipe (``per_upsampler.<name>``: FeatUp's, LiFT's) merged over
        the config, under the command line's ``overrides``."""
        return runs.apply_per_choice(cfg, "per_upsampler", str(cfg.upsampler.get("name")), overrides)

    def check(self, cfg: DictConfig) -> None:
        check_config(cfg)

    def identity(self, cfg: DictConfig) -> dict:
        """The resolved config less :data:`NOT_IDENTITY` and less what the trained upsampler's
        objective does not read: for JAFAR the ``featup`` and ``lift`` sections (so JAFAR's recorded
        runs keep their identity), and ``upsampler.key_mode`` and ``upsampler.rope`` where they are the
        official architecture's (``jafar.upsamplers.jafar.OPTION_DEFAULTS``: those keys came after runs
        had recorded their configuration, which stays the official run's; any other value is part of
        the identity, an ablation run has its own); for FeatUp and LiFT, JAFAR's ``loss`` and its
        ``recipe`` but the image size, and the other objective's section."""
        config = super().identity(cfg)
        name = cfg.upsampler.get("name")
        for other in ("featup", "lift"):
            if other != name:
                config.pop(other, None)
        if name == "jafar":
            upsampler = config.get("upsampler", {})
            for key, default in OPTION_DEFAULTS.items():
                if key in upsampler and upsampler[key] == default:
                    del upsampler[key]
        else:
            config.pop("loss", None)
            config["recipe"] = {"image_size": config.get("recipe", {}).get("image_size")}
        return config

    def prepare(self, cfg: DictConfig, run_dir: Path) -> dict:
        data_cfg = cfg.data
        if data_cfg.get("prepare") == "demo_photos":
            write_demo_photos(data_cfg.root)
        files = find_images(data_cfg.root)
        if data_cfg.get("val_root"):
            train_files, val_files = files, find_images(data_cfg.val_root)
        else:
            train_files, val_files = split_holdout(files, int(data_cfg.val_images), int(cfg.seed))
        check_readable(train_files, data_cfg.root)
        log.info("%d training images, %d validation images; run directory %s", len(train_files), len(val_files),
                 run_dir)
        return {"train": train_files, "val": val_files}

    def build(self, cfg: DictConfig, run_dir: Path, data: dict) -> JafarPretraining:
        recipe = cfg.recipe
        backbone = instantiate(cfg.backbone)
        upsampler = instantiate(cfg.upsampler, feature_dim=int(backbone.embed_dim))
        name = str(cfg.upsampler.name)
        if name != "jafar":
            objective = build_objective(cfg, name, backbone)
            return JafarPretraining(
                backbone, upsampler, optimizer=runs.build_partial(cfg.optimizer), seed=int(cfg.seed),
                val_ratios=tuple(cfg.validation.ratios), picture_dir=str(run_dir / "pictures"), objective=objective,
                name=name, label=TRAINABLE[name])
        return JafarPretraining(
            backbone, upsampler, CosineMSELoss(**cfg.loss), optimizer=runs.build_partial(cfg.optimizer),
            guidance_scale=recipe.guidance_scale, lr_scale=tuple(recipe.lr_scale),
            consistency_weight=recipe.consistency_weight, blur_prob=recipe.blur_prob, blur_kernel=recipe.blur_kernel,
            blur_sigma=recipe.blur_sigma, noise_prob=recipe.noise_prob, noise_std=recipe.noise_std,
            consistency=recipe.consistency,
            seed=int(cfg.seed), val_ratios=tuple(cfg.validation.ratios), picture_dir=str(run_dir / "pictures"))

    def execute(self, job: runs.Job) -> dict:
        cfg, run_dir, module = job.cfg, job.run_dir, job.model
        data_cfg, total_steps = cfg.data, int(cfg.trainer.max_steps)
        train_files, val_files = job.data["train"], job.data["val"]
        datamodule = PretrainData(train_files, val_files, data_cfg, cfg.recipe.image_size, total_steps, int(cfg.seed))
        trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
        if val_files and trainer_kwargs.get("val_check_interval"):
            trainer_kwargs["val_check_interval"] = min(int(trainer_kwargs["val_check_interval"]), total_steps)
        if not val_files:
            trainer_kwargs["limit_val_batches"] = 0
        every = min(int(cfg.checkpoint_every), total_steps)
        # use_distributed_sampler=False: StepBatchSampler and val_dataloader already give each rank its share
        trainer = runs.make_trainer(run_dir, trainer_kwargs, checkpointing=runs.step_checkpoints(job.checkpoint_dir, every),
                                    callbacks=job.callbacks, run_config=job.identity, tool=self.script, max_epochs=-1,
                                    use_distributed_sampler=False)
        name = str(cfg.upsampler.name)
        if trainer.world_size > 1 and trainer.is_global_zero:
            log.warning(devices_sentence(trainer.world_size, int(data_cfg.batch_size), total_steps,
                                         float(cfg.optimizer.lr), OFFICIAL_BATCHES[name]))
        with runs.quiet_lightning():
            trainer.fit(module, datamodule=datamodule, ckpt_path=job.resume_from)
            if val_files:
                trainer.validate(module, datamodule=datamodule, verbose=False)

        if module.trained_steps == 0 and job.resume_from is None:
            raise RuntimeError(f"no training step ran: every batch of the {len(train_files)} training images under "
                               f"{data_cfg.root} was unreadable ({len(module.skipped)} unreadable images).")
        results = {**module.val_results, "step": trainer.global_step, "train_images": len(train_files),
                   "val_images": len(val_files), "skipped_images": module.skipped}
        if trainer.is_global_zero:
            meta = {"backbone": str(cfg.backbone.name), "steps": str(trainer.global_step),
                    "recipe": json.dumps(OmegaConf.to_container(cfg.recipe, resolve=True))}
            if name == "jafar":
                save_checkpoint(module.upsampler, run_dir / "jafar.safetensors", metadata=meta)
            else:
                save_weights(module.upsampler, run_dir / f"{name}.safetensors", {**meta, "format": name})
            runs.write_results(run_dir, results, job.identity)
            if module.skipped:
                log.warning("%d unreadable images were skipped: %s", len(module.skipped), ", ".join(module.skipped))
            log.info("results: %s", json.dumps({k: v for k, v in results.items() if k.startswith("x")}))
        return results


#: the pretraining tool (``tools/pretrain_jafar.py`` is ``jafar.runs.main(PRETRAINING)``)
PRETRAINING = Pretraining()


def run(cfg: DictConfig, run_dir: Path, callbacks=None) -> dict:
    """:func:`jafar.runs.run` of :data:`PRETRAINING`: train, validate on the held-out images,
    export ``jafar.safetensors`` and ``results.json`` in ``run_dir``."""
    return runs.run(PRETRAINING, cfg, run_dir, callbacks)


def devices_sentence(world: int, batch: int, max_steps: int, lr: float, official: int = OFFICIAL_BATCH) -> str:
    """What more than one process changes (said once, before training): the global batch, what
    the step count then means, and that the learning rate is not scaled (``official``: the global
    batch of the upsampler's own recipe, :data:`OFFICIAL_BATCHES`)."""
    keep = (f"keep it with data.batch_size={official // world}" if official % world == 0
            else f"{world} processes cannot share a global batch of {official} evenly")
    return runs.global_batch_sentence(
        world, batch, "images", f"trainer.max_steps={max_steps} counts global batches, so the run sees {world}x the "
        f"images of one process with the same batch", lr, f"the official recipe: one GPU, batch {official}; {keep}")


def build_objective(cfg: DictConfig, name: str, backbone):
    """FeatUp's or LiFT's objective for ``backbone`` at ``recipe.image_size``; a size the objective
    cannot use is refused in one sentence."""
    size, patch = int(cfg.recipe.image_size), int(backbone.patch_size)
    if name == "featup":
        small = [r for r in cfg.validation.ratios if max(1, round(size / int(r) / patch)) < 2]
        if small:
            raise ValueError(f"FeatUp's JBU needs a 2x2 feature grid: validation.ratios {small} leave under 2x2 cells "
                             f"of a {size}-pixel image at patch {patch} (drop them or raise recipe.image_size).")
        f = cfg.featup
        # upstream's downsampler maps the image-size map to the backbone's grid with patch-size windows
        # (train_jbu_upsampler.py: kernel_size 14, final_size 16 for DINOv2 at 224 px; 16 and 14 otherwise)
        return FeatUpObjective(int(backbone.embed_dim), patch, size // patch, n_jitters=f.n_jitters, max_pad=f.max_pad,
                               max_zoom=f.max_zoom, flips=f.flips, random_projection=f.random_projection,
                               downsampler=f.downsampler, outlier_detection=f.outlier_detection,
                               crf_weight=f.crf_weight, crf_samples=f.crf_samples, clip_steps=f.clip_steps,
                               clip_norm=f.clip_norm)
    if lift_grids(size, patch)[2] < 2:
        raise ValueError(f"LiFT trains from the image subsampled by 4: recipe.image_size={size} gives it a feature "
                         f"grid under 2x2 at patch {patch} (use at least {8 * patch}).")
    return LiftObjective(loss=cfg.lift.loss, color_jitter=cfg.lift.color_jitter)


def save_weights(upsampler, path: Path, metadata: dict) -> Path:
    """``upsampler``'s state dict (its own parameter names: the ones its ``load_weights`` reads) as one
    ``.safetensors`` file with ``metadata``, written atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in upsampler.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={str(k): str(v) for k, v in metadata.items()})
    return path
