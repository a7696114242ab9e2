"""LightningModule of JAFAR's task-agnostic training (paper section 3.2).

The official recipe (github PaulCouairon/JAFAR @ 94d4d54, ``train.py``), which is the default:

* target: the frozen backbone's features of the ``448 x 448`` image;
* input: the backbone's features of the image downscaled bilinearly by a factor drawn uniformly
  from ``[0.25, 0.5]`` (``np.random.uniform(0.25, 0.5)``; the paper says a factor in [2, 4]),
  each side rounded to the nearest multiple of the patch size;
* guidance: the image downscaled by 0.5 (``224 x 224``); JAFAR upsamples the input features to
  the target's grid;
* loss: ``Cosine_MSE(pred, target)`` plus ``0.1 x Cosine_MSE`` between JAFAR guided by a
  blurred (p=0.5, Gaussian kernel 5, sigma 1) and noised (p=0.3, std 0.02) guidance image and
  a no-grad pass guided by the clean image, both upsampling the *target* features to the
  guidance resolution (``add_blur_noise``); one blur draw and one noise draw per batch;
* backbone and both feature extractions under the bf16 autocast of the step.

The consistency perturbation, ``consistency`` (``recipe.consistency``):

* ``"official"`` (default): the official ``train.py``, ``add_blur_noise`` and its call in
  ``trainer``, transcribed. It perturbs the guidance image the model sees, which is the
  *normalised* image (the official loader ends with ``T.Normalize``, ``utils/training.py``,
  ``get_dataloaders``): Gaussian blur of the normalised image (torchvision ``GaussianBlur(5,
  sigma=1.0)``, reflect padding), then ``+ 0.02 x N(0, 1)`` in normalised units, then the
  *normalised* image clamped to ``[0, 1]`` (so the model learns invariance to a saturated
  guidance image: every value below the mean is cut). The official noise is added in place
  (``x += ...``): when it is drawn without the blur, ``x`` is the clean guidance tensor itself,
  so the no-grad target pass of that step sees the noised, unclamped image; this is transcribed
  too (:func:`official_blur_noise`). The released checkpoints were trained this way.
* ``"pixel"`` (a variant, ours): blur and noise applied to a copy of the guidance image in pixel
  space (``[0, 1]``), clamped there and normalised again; the target pass sees the clean image.
  Reason: the clamp then removes only out-of-range pixels instead of saturating the normalised
  image, and the clean target is never modified. Its noise is ``0.02`` in pixel units, about
  1/std ~ 4.4x stronger than the official ``0.02`` in normalised units.

All randomness of a step comes from a generator seeded with ``(seed, step)`` (the same on every
DDP rank), so resuming at step ``k`` replays exactly what an uninterrupted run does from ``k`` on.

The same module trains FeatUp's JBU stack and LiFT with their own objectives (``objective``, one of
:mod:`jafar.train.objectives`): the step is then the objective's (manual optimisation: each of its
losses back-propagated on its own, as FeatUp's training loop does, then one optimiser step over the
upsampler and the objective's own parameters, with the objective's gradient clipping). The global
generator (the modules' dropout) is seeded with ``(seed, step, rank)`` for the step, so those runs
resume exactly too. Validation is the same for every upsampler; JAFAR is guided by the image at
``guidance_scale``, the others by the image the low-res features came from (what the evaluations give
them: the image the backbone was given).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from ..backbones import Backbone
from ..frozen import FrozenChildren
from ..runs.samplers import step_seed
from ..viz import pca_rgb, save_panels
from .losses import CosineMSELoss

log = logging.getLogger(__name__)

BASELINES = ("bilinear", "nearest")
#: the consistency perturbations (``recipe.consistency``; the module docstring says what each does)
CONSISTENCY = ("official", "pixel")


def blur_noise(x: torch.Tensor, blur: bool, noise: Optional[torch.Tensor], kernel: int = 5, sigma: float = 1.0,
               std: float = 0.02) -> torch.Tensor:
    """``x`` blurred (torchvision ``gaussian_blur``: ``kernel`` x ``kernel``, ``sigma``, reflect
    padding) when ``blur``, plus ``std x noise`` when ``noise`` is given; not clamped, ``x`` untouched."""
    if blur:
        x = gaussian_blur(x, [kernel, kernel], [sigma, sigma])
    if noise is not None:
        x = x + std * noise.to(x)
    return x


def official_blur_noise(guidance: torch.Tensor, blur: bool, noise: Optional[torch.Tensor], kernel: int = 5,
                        sigma: float = 1.0, std: float = 0.02):
    """The official ``add_blur_noise`` (github PaulCouairon/JAFAR @ 94d4d54, ``train.py``) on the
    normalised guidance image, with its draws given: ``(perturbed, clean)``. ``perturbed`` is the
    blurred and noised normalised image clamped to ``[0, 1]``; ``clean`` is the image the official
    no-grad target pass then sees: the guidance itself, or, when noise was added without blur
    (the in-place ``x += ...`` on the caller's tensor), the guidance plus the noise, unclamped."""
    perturbed = blur_noise(guidance, blur, noise, kernel, sigma, std)
    clean = perturbed if (noise is not None and not blur) else guidance
    return perturbed.clamp(0, 1), clean


def round_to_multiple(value: float, multiple: int) -> int:
    """Official ``round_to_nearest_multiple`` (Python's round), at least one multiple."""
    return max(multiple, multiple * round(value / multiple))


class JafarPretraining(FrozenChildren, L.LightningModule):
    def __init__(self, backbone: Backbone, upsampler: torch.nn.Module, loss: Optional[CosineMSELoss] = None,
                 lr: float = 2e-4, betas: Sequence[float] = (0.9, 0.999), weight_decay: float = 1e-5,
                 guidance_scale: float = 0.5, lr_scale: Sequence[float] = (0.25, 0.5),
                 consistency_weight: float = 0.1, blur_prob: float = 0.5, blur_kernel: int = 5,
                 blur_sigma: float = 1.0, noise_prob: float = 0.3, noise_std: float = 0.02,
                 consistency: str = "official", seed: int = 0, val_ratios: Sequence[int] = (2, 4, 8),
                 picture_dir: Optional[str] = None, optimizer: Optional[Callable] = None,
                 objective: Optional[torch.nn.Module] = None, name: str = "jafar", label: str = "JAFAR"):
        super().__init__()
        if consistency not in CONSISTENCY:
            raise ValueError(f"recipe.consistency must be one of {CONSISTENCY}, got {consistency!r}.")
        self.consistency = consistency
        self.upsampler = upsampler
        #: FeatUp's or LiFT's objective (jafar.train.objectives); None: JAFAR's
        self.objective = objective
        #: the upsampler's key in the validation results and its title in the pictures
        self.name, self.label = str(name), str(label)
        if objective is not None:
            self.automatic_optimization = False
            norm = getattr(upsampler, "norm", None)
            if isinstance(norm, torch.nn.Module):  # FeatUp's ChannelNorm is not trained (not in its optimiser)
                norm.requires_grad_(False)
        self.add_frozen("backbone", backbone)  # moves with .to(), not part of the checkpoints
        self.loss = loss if loss is not None else CosineMSELoss()
        self.lr, self.betas, self.weight_decay = float(lr), tuple(betas), float(weight_decay)
        self.optimizer_factory = optimizer
        self.guidance_scale, self.lr_scale = float(guidance_scale), tuple(lr_scale)
        self.consistency_weight = float(consistency_weight)
        self.blur_prob, self.blur_kernel, self.blur_sigma = float(blur_prob), int(blur_kernel), float(blur_sigma)
        self.noise_prob, self.noise_std = float(noise_prob), float(noise_std)
        self.seed, self.val_ratios = int(seed), tuple(int(r) for r in val_ratios)
        self.picture_dir = Path(picture_dir) if picture_dir else None
        self.skipped: Dict[str, str] = {}
        #: training steps this process ran (a batch with no readable image is not one)
        self.trained_steps = 0
        self.val_results: Dict[str, dict] = {}
        self._val_sums: Dict[tuple, torch.Tensor] = {}
        self._val_example = None
        self.register_buffer("_mean", torch.tensor(backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(backbone.std).view(1, 3, 1, 1), persistent=False)

    # ---------------------------------------------------------------------------- features
    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self._mean) / self._std

    def _lowres_image(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """The normalised image ``x`` downscaled bilinearly by ``scale``, each side rounded to a
        multiple of the patch size."""
        p = self.backbone.patch_size
        size = (round_to_multiple(x.shape[-2] * scale, p), round_to_multiple(x.shape[-1] * scale, p))
        return F.interpolate(x, size=size, mode="bilinear")

    @torch.no_grad()
    def _lowres_features(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """Features of :meth:`_lowres_image`."""
        return self.backbone(self._lowres_image(x, scale))

    def _target_norm(self, feats: torch.Tensor) -> torch.Tensor:
        """What the upsampler does to its input features first (FeatUp's LayerNorm, ``norm=true``)."""
        norm = getattr(self.upsampler, "norm", None)
        if not isinstance(norm, torch.nn.Module):
            return feats
        return norm(feats.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def _guidance(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.guidance_scale, mode="bilinear")

    def _draw_perturbation(self, shape, gen: torch.Generator):
        """``(blur, noise)`` of one step: one blur draw, one noise draw (the official draws one of
        each per batch, ``torch.rand(1)``), and the noise tensor (CPU) or None."""
        blur = torch.rand((), generator=gen).item() < self.blur_prob
        noise = torch.randn(shape, generator=gen) if torch.rand((), generator=gen).item() < self.noise_prob else None
        return blur, noise

    def _perturbed_guidance(self, guidance: torch.Tensor, pixels: torch.Tensor, gen: torch.Generator):
        """``(perturbed, clean)`` guidance images of the consistency term (module docstring)."""
        blur, noise = self._draw_perturbation(tuple(guidance.shape), gen)
        args = (self.blur_kernel, self.blur_sigma, self.noise_std)
        if self.consistency == "official":
            return official_blur_noise(guidance, blur, noise, *args)
        return self.normalize(blur_noise(self._guidance(pixels), blur, noise, *args).clamp(0, 1)), guidance

    # ---------------------------------------------------------------------------- training
    def training_step(self, batch, batch_idx):
        for path, error in batch["skipped"]:
            if path not in self.skipped:
                log.warning("skipping unreadable image %s (%s)", path, error)
            self.skipped[path] = error
        pixels = batch["image"]
        if pixels is None:  # every image of the batch was unreadable
            return None
        if self.objective is not None:
            return self._objective_step(pixels, batch)
        # one draw per global batch (the same on every DDP rank), as the official code draws one scale per batch
        gen = torch.Generator().manual_seed(step_seed(self.seed, self.global_step, 1))
        lo, hi = self.lr_scale
        scale = lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64).item()
        x = self.normalize(pixels)
        with torch.no_grad():
            hr = self.backbone(x)
        lr = self._lowres_features(x, scale)
        guidance = self._guidance(x)
        pred = self.upsampler(guidance, lr, tuple(hr.shape[-2:]))
        loss_hr = self.loss(pred, hr)
        logs = {"train/loss_hr": loss_hr}
        loss = loss_hr
        if self.consistency_weight > 0:
            size = tuple(guidance.shape[-2:])
            noised, clean = self._perturbed_guidance(guidance, pixels, gen)
            pred_u = self.upsampler(noised, hr, size)
            with torch.no_grad():
                target_u = self.upsampler(clean, hr, size)
            loss_reg = self.consistency_weight * self.loss(pred_u, target_u.detach())
            logs["train/loss_consistency"] = loss_reg
            loss = loss + loss_reg
        logs["train/loss"] = loss
        if not torch.isfinite(loss.detach()).all():  # one scalar check; the diagnosis only on failure
            named = (("the images", pixels), ("the backbone's target features", hr),
                     ("the low-res input features", lr), ("JAFAR's output", pred))
            bad = next((name for name, t in named if not torch.isfinite(t).all()), "the loss alone")
            raise FloatingPointError(f"non-finite loss at step {self.global_step}: {bad} held NaN or infinite "
                                     f"values, batch images {', '.join(batch.get('paths', []))}.")
        self.trained_steps += 1
        logs["train/lr_scale"] = torch.tensor(scale)
        self.log_dict(logs, prog_bar=False, on_step=True, batch_size=pixels.shape[0])
        self.log("loss", loss, prog_bar=True, logger=False, on_step=True, batch_size=pixels.shape[0])
        return loss

    def _objective_step(self, pixels: torch.Tensor, batch) -> torch.Tensor:
        """One step of FeatUp's or LiFT's objective (module docstring)."""
        step = self.global_step
        gen = torch.Generator().manual_seed(step_seed(self.seed, step, 1))
        opt = self.optimizers()
        opt.zero_grad()
        total, logs = 0.0, {}
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(step_seed(self.seed, step, 2 + self.global_rank))
            x = self.objective.inputs(pixels, gen, self.normalize)
            for loss, parts in self.objective.losses(self.backbone, self.upsampler, x, gen, self._target_norm):
                if not torch.isfinite(loss.detach()).all():
                    raise FloatingPointError(f"non-finite loss at step {step}: {self.label}'s objective gave "
                                             f"{loss.item()}, batch images {', '.join(batch.get('paths', []))}.")
                self.manual_backward(loss)
                total = total + loss.detach()
                for key, value in parts.items():
                    logs[f"train/{key}"] = logs.get(f"train/{key}", 0.0) + value
        bound = self.objective.gradient_clip(step)
        if bound is not None:
            self.clip_gradients(opt, gradient_clip_val=bound, gradient_clip_algorithm="norm")
        opt.step()
        self.trained_steps += 1
        logs["train/loss"] = total
        self.log_dict(logs, prog_bar=False, on_step=True, batch_size=pixels.shape[0])
        self.log("loss", total, prog_bar=True, logger=False, on_step=True, batch_size=pixels.shape[0])
        return total

    def configure_optimizers(self):
        """``optimizer(params)`` when the module was given a factory (the tools: the config's
        ``optimizer``), else AdamW with ``lr``, ``betas``, ``weight_decay`` (the official one).
        The parameters: the upsampler's, and the objective's own (FeatUp's downsampler and scale net)."""
        params = [p for p in self.upsampler.parameters() if p.requires_grad]
        if self.objective is not None:
            params += [p for p in self.objective.parameters() if p.requires_grad]
        if self.optimizer_factory is not None:
            return self.optimizer_factory(params)
        return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["skipped_images"] = dict(self.skipped)

    def on_load_checkpoint(self, checkpoint):
        self.skipped = dict(checkpoint.get("skipped_images", {}))

    # ---------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self):
        names = (self.name,) + BASELINES
        self._val_sums = {(f"x{r}", n): torch.zeros(3, device=self.device) for r in self.val_ratios for n in names}
        self._val_example = None

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        pixels = batch["image"]
        if pixels is None:
            return
        x = self.normalize(pixels)
        hr = self.backbone(x)
        size = tuple(hr.shape[-2:])
        guidance = self._guidance(x)
        for ratio in self.val_ratios:
            low = self._lowres_image(x, 1.0 / ratio)
            lr = self.backbone(low)
            preds = {self.name: self.upsampler(guidance if self.objective is None else low, lr, size)}
            preds["bilinear"] = F.interpolate(lr, size=size, mode="bilinear", align_corners=False)
            preds["nearest"] = F.interpolate(lr, size=size, mode="nearest")
            for name, pred in preds.items():
                pred, target = pred.float(), hr.float()
                cos = F.cosine_similarity(pred, target, dim=1).flatten(1).mean(1)  # per image
                mse = (pred - target).pow(2).flatten(1).mean(1)
                acc = torch.stack([cos.sum(), mse.sum(), torch.tensor(float(len(cos)), device=cos.device)])
                self._val_sums[(f"x{ratio}", name)] += acc
            if self._val_example is None and ratio == (4 if 4 in self.val_ratios else self.val_ratios[0]):
                self._val_example = (ratio, pixels[0].float().cpu(), lr[0].float().cpu(),
                                     preds["bilinear"][0].float().cpu(), preds[self.name][0].float().cpu(),
                                     hr[0].float().cpu())

    def on_validation_epoch_end(self):
        results: Dict[str, dict] = {}
        for (ratio, name), acc in sorted(self._val_sums.items()):
            if acc[2] == 0:
                continue
            cos, mse = (acc[0] / acc[2]).item(), (acc[1] / acc[2]).item()
            results.setdefault(ratio, {})[name] = {"cos": cos, "mse": mse}
            # every rank validated every held-out image: the values agree across ranks
            self.log(f"val/{ratio}/{name}/cos", cos, sync_dist=self.trainer.world_size > 1)
            self.log(f"val/{ratio}/{name}/mse", mse, sync_dist=self.trainer.world_size > 1)
        self.val_results = results
        if self._val_example is not None and self.picture_dir is not None and self.global_rank == 0:
            ratio, image, low, bil, jaf, target = self._val_example
            maps = pca_rgb([low, bil, jaf, target], size=image.shape[-1])
            titles = ["image", f"low-res (x{ratio})", "bilinear", self.label, "target"]
            for name in (f"pca_step{self.global_step:07d}.png", "pca_latest.png"):
                save_panels([image] + maps, self.picture_dir / name, titles)
