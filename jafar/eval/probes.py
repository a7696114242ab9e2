"""Linear probes on upsampled features: a frozen backbone, a frozen upsampler and a trainable 1x1
convolution, as in the official evaluation (github PaulCouairon/JAFAR @ 94d4d54,
``evaluation/train_probes.py``, ``config/eval.yaml``):

* features: ``upsampler(image, backbone(image), (T, T))`` under ``no_grad``, ``T`` the label
  size; logits resized bilinearly to the label size when an upsampler overshoots;
* training: AdamW on the probe only (lr 5e-4, betas (0.9, 0.999), weight decay 1e-5:
  ``config/eval.yaml`` overriding ``config/optimizer/adamw.yaml``), a horizontal flip of the
  whole batch with probability 0.5, a cosine schedule (``CosineAnnealingLR``, see below);
* segmentation (:class:`SegmentationProbe`): ``Conv2d(C, K, 1)``, cross-entropy over the
  pixels not labelled 255; mIoU and pixel accuracy (:mod:`jafar.eval.metrics`);
* depth (:class:`DepthProbe`): the features concatenated with the L2-normalised class token
  broadcast over the image, ``Conv2d(2C, 256, 1)``, ReLU + 0.1, normalised over the 256 bins,
  depth = the bins' expectation (bins ``linspace(min_depth, max_depth, 256)``); loss
  ``SigLoss`` (with its 100-step warm-up) + 0.5 ``GradientLoss``; delta_1, RMSE and the others.

The learning-rate schedule (``scheduler``; the paper names none) is one of three cosines
(``CosineAnnealingLR`` down to 0):

* ``official``: ``T_max = epochs`` stepped after every *batch*, as the official
  ``UpsamplerEvaluator.set_optimizer`` / ``train`` (``self.scheduler.step()`` inside the batch
  loop): a cosine with a period of ``2 x epochs`` batches. The released probes and logs (VOC
  84.45, ADE20K 40.29, Cityscapes 61.27 mIoU) came from it, so it is the default;
* ``naf``: ``T_max = epochs x batches per epoch`` stepped per batch, one half-cosine over the run
  (the authors' later code, github valeoai/NAF ``evaluation/eval_seg_probing.py``,
  ``set_optimizer``);
* ``per_epoch``: ``T_max = epochs`` stepped once per epoch.

``normalize_input``: the backbone (and the upsampler) get the image normalised with the
backbone's mean/std (True, as the official segmentation run), or the image in [0, 1] as it is
(False: the official depth run builds its loaders with mean 0 and std 1, ``main`` of
``train_probes.py``). Batch size 4 by default (the paper; official 2). The official
``GradientLoss`` slices the batch and channel dimensions (``x[0:-2, :]``) instead of the image's
rows and columns, which makes it zero at batch size 2; the intended multi-scale gradient-matching
loss (MegaDepth) is used here, on rows and columns (``gradient_weight: 0`` is the official run at
batch 2). Backbones without a class token (MobileNetV2) use the mean of their features instead
(``global_token``).

The randomness of a step (the flip) is a function of ``(seed, step)`` and the shuffling of a
function of ``(seed, epoch)``, so a run resumed from its last epoch checkpoint replays the rest.
Checkpoints hold the probe only, not the frozen backbone and upsampler. ``cache_features`` keeps
their output per (image, flip) in memory (float16) so that later epochs only train the probe: for
small data sets such as the demos.

Joint training (``train_upsampler=True``): the paper's protocol for its task-dependent rows
(CARAFE, SAPA, DySample, ReSFU; section 4.3: "we jointly train both the upsampler and the linear
probe on each dataset and task"). The upsampler is then an ordinary child: in training mode during
the fit, its parameters optimised with the probe's (``upsampler_lr``: their own learning rate; None:
the probe's, one optimiser over both as the official ``set_optimizer`` would be with its unused
``params_model`` added), the same schedule, and its weights saved in the probe's checkpoints. The
backbone stays frozen; ``cache_features`` then keeps the backbone's output only, and the upsampler
runs at every step.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Dict, List, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler

from ..frozen import FrozenChildren
from ..runs.samplers import step_seed
from .metrics import IGNORE_INDEX, DepthMetrics, segmentation_metrics

log = logging.getLogger(__name__)


#: the probes' learning-rate schedules (module docstring): official, naf, per_epoch
SCHEDULERS = ("official", "naf", "per_epoch")


def scheduler_plan(scheduler: str, epochs: int, total_steps) -> tuple:
    """``(T_max, interval)`` of the cosine named ``scheduler`` for a run of ``epochs`` epochs;
    ``total_steps``: a callable giving the run's number of optimiser steps (``naf`` only)."""
    if scheduler == "official":
        return int(epochs), "step"
    if scheduler == "naf":
        return int(total_steps()), "step"
    if scheduler == "per_epoch":
        return int(epochs), "epoch"
    raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}.")


def trainable_parameters(module: nn.Module) -> List[nn.Parameter]:
    """The parameters of ``module`` that a joint training would optimise: all but those of a
    frozen backbone it holds (the re-encoding rows hold the backbone itself)."""
    from ..backbones import Backbone

    frozen = {id(p) for child in module.modules() if isinstance(child, Backbone) for p in child.parameters()}
    return [p for p in module.parameters() if id(p) not in frozen]


class EpochShuffleSampler(Sampler):
    """A permutation of ``range(n)`` drawn from ``(seed, epoch)``; Lightning calls ``set_epoch``."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        gen = torch.Generator().manual_seed(step_seed(self.seed, self.epoch, 5))
        return iter(torch.randperm(self.n, generator=gen).tolist())


def encode(backbone, normalized: torch.Tensor, global_token: str = "none"):
    """Backbone features ``(B, C, h, w)`` and, if asked, a global descriptor ``(B, C)``:
    ``"cls"``: the L2-normalised class token of a timm ViT (as the official depth probe), or the
    mean of the features where there is none; ``"mean"``: the L2-normalised mean feature."""
    if global_token == "none":
        return backbone(normalized), None
    model = getattr(backbone, "model", None)
    if global_token == "cls" and getattr(model, "cls_token", None) is not None:
        with torch.no_grad():
            ((spatial, prefix),) = model.forward_intermediates(
                normalized, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True,
                return_prefix_tokens=True)
        return spatial, F.normalize(prefix[:, 0], dim=-1)
    if global_token not in ("cls", "mean"):
        raise ValueError(f"global_token must be 'cls', 'mean' or 'none', got {global_token!r}.")
    feats = backbone(normalized)
    return feats, F.normalize(feats.mean(dim=(2, 3)), dim=1)


class LinearProbe(FrozenChildren, L.LightningModule):
    """Frozen ``backbone`` + frozen ``upsampler`` + a trainable ``classifier`` (1x1 conv).

    Subclasses set ``self.classifier`` and implement :meth:`loss`, :meth:`update_metrics`,
    :meth:`compute_metrics` and :meth:`prediction` (a picture of the output).
    """

    def __init__(self, backbone, upsampler: nn.Module, target_size: int, lr: float = 5e-4,
                 betas: Sequence[float] = (0.9, 0.999), weight_decay: float = 1e-5, epochs: int = 20,
                 scheduler: str = "official", hflip: float = 0.5, seed: int = 0, picture_indices: Sequence[int] = (),
                 cache_features: bool = False, normalize_input: bool = True, optimizer: Optional[Callable] = None,
                 train_upsampler: bool = False, upsampler_lr: Optional[float] = None):
        super().__init__()
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}.")
        # frozen and shared between runs: moved with the probe, kept out of its checkpoints; the
        # upsampler's dropout / batch norm (FeatUp, LiFT) stay in inference mode
        self.add_frozen("backbone", backbone)
        self.train_upsampler = bool(train_upsampler)
        self.upsampler_lr = None if upsampler_lr is None else float(upsampler_lr)
        if self.train_upsampler:
            params = trainable_parameters(upsampler)
            if not params:
                raise ValueError(f"train_upsampler=True, but {type(upsampler).__name__} has no trainable parameter.")
            for param in params:
                param.requires_grad_(True)
            self.upsampler = upsampler  # trained with the probe, saved in its checkpoints
        else:
            self.add_frozen("upsampler", upsampler)
        self.target_size = int(target_size)
        self.lr, self.betas, self.weight_decay = float(lr), tuple(float(b) for b in betas), float(weight_decay)
        self.optimizer_factory = optimizer
        self.epochs, self.schedule = int(epochs), scheduler
        self.normalize_input = bool(normalize_input)
        self.hflip, self.seed = float(hflip), int(seed)
        self.picture_indices = set(int(i) for i in picture_indices)
        self.pictures: List[dict] = []
        # frozen backbone + upsampler: their output for an (image, flip) never changes, so it can be
        # computed once and kept (float16, CPU); for small data sets (the demos)
        self.cache_features = bool(cache_features)
        self._cache: Dict[tuple, tuple] = {}
        self.val_results: Dict[str, float] = {}
        self.strict_loading = False  # checkpoints hold the probe only

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        kept = ("classifier.", "upsampler.") if self.train_upsampler else ("classifier.",)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith(kept)}

    def encoded(self, image: torch.Tensor):
        """Image in [0, 1] -> the upsampler's image input, the backbone's features ``(B, C, h, w)``
        and the global token ``(B, C)`` (None unless the probe uses one)."""
        x = self.backbone.normalize(image) if self.normalize_input else image
        with torch.no_grad():
            feats, token = encode(self.backbone, x, getattr(self, "global_token", "none"))
        return x, feats, token

    def upsample(self, x: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """The upsampler at the target size: with gradients when it trains with the probe."""
        with torch.set_grad_enabled(self.train_upsampler and torch.is_grad_enabled()):
            return self.upsampler(x, feats, (self.target_size, self.target_size)).float()

    def upsampled(self, image: torch.Tensor):
        """Image in [0, 1] -> upsampled features ``(B, C, T, T)`` and the global token ``(B, C)``
        (None unless the probe uses one)."""
        x, feats, token = self.encoded(image)
        return self.upsample(x, feats), None if token is None else token.float()

    def features(self, image: torch.Tensor, key: Optional[Sequence[tuple]] = None):
        """:meth:`upsampled`, through the cache when ``cache_features`` (``key``: one hashable per
        image): the upsampled features of a frozen upsampler, the backbone's output of a trained one."""
        if not self.cache_features or key is None:
            return self.upsampled(image)
        missing = [j for j, k in enumerate(key) if k not in self._cache]
        if missing:
            if self.train_upsampler:
                _, kept, token = self.encoded(image[missing])
            else:
                kept, token = self.upsampled(image[missing])
            for n, j in enumerate(missing):
                self._cache[key[j]] = (kept[n].half().cpu(), None if token is None else token[n].float().cpu())
        kept = torch.stack([self._cache[k][0] for k in key]).to(image.device).float()
        token = None if self._cache[key[0]][1] is None else torch.stack([self._cache[k][1] for k in key]).to(image.device)
        if self.train_upsampler:
            x = self.backbone.normalize(image) if self.normalize_input else image
            kept = self.upsample(x, kept.to(x.dtype))
        return kept, token

    def logits(self, image: torch.Tensor, size, key: Optional[Sequence[tuple]] = None) -> torch.Tensor:
        hr, token = self.features(image, key)
        if token is None:
            out = self.classifier(hr)
        else:
            # classifier(cat(hr, token broadcast)) without materialising the broadcast: the token's
            # half of the 1x1 convolution is one vector per image
            c, w = hr.shape[1], self.classifier.weight
            out = F.conv2d(hr, w[:, :c]) + F.linear(token, w[:, c:, 0, 0], self.classifier.bias)[:, :, None, None]
        if tuple(out.shape[-2:]) != tuple(size):  # official: some baselines overshoot the target size
            out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)
        return out

    # ------------------------------------------------------------------ training
    def targets(self, batch: dict, image: torch.Tensor) -> torch.Tensor:
        return batch["label"]

    def training_step(self, batch, batch_idx):
        image, label = batch["image"], batch["label"]
        gen = torch.Generator().manual_seed(step_seed(self.seed, self.global_step, 3))
        flip = self.hflip > 0 and torch.rand((), generator=gen).item() < self.hflip
        if flip:
            image, label = image.flip(-1), label.flip(-1) if label.numel() else label
        target = self.targets({**batch, "label": label}, image)
        key = [("train", int(i), flip) for i in batch["index"]] if "index" in batch else None
        loss = self.loss(self.logits(image, target.shape[-2:], key), target)
        self.log("train/loss", loss, prog_bar=True, batch_size=image.shape[0])
        return loss

    def configure_optimizers(self):
        # optimizer(params) when given (the tool: task.probe.optimizer), else the official AdamW
        params = [{"params": list(self.classifier.parameters())}]
        if self.train_upsampler:
            group = {"params": trainable_parameters(self.upsampler)}
            if self.upsampler_lr is not None:
                group["lr"] = self.upsampler_lr
            params.append(group)
        if self.optimizer_factory is not None:
            opt = self.optimizer_factory(params)
        else:
            opt = torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        t_max, interval = scheduler_plan(self.schedule, self.epochs,
                                         lambda: int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, t_max))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": interval}}

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch, batch_idx):
        image = batch["image"]
        target = self.targets(batch, image)
        key = [("val", int(i), False) for i in batch["index"]] if "index" in batch else None
        out = self.logits(image, target.shape[-2:], key)
        self.update_metrics(out, target)
        for j, index in enumerate(batch["index"].tolist()):
            if index in self.picture_indices:
                self.pictures.append({"index": index, "name": batch["name"][j], "image": image[j].cpu(),
                                      "target": target[j].cpu(), "prediction": self.prediction(out[j]).cpu()})

    def on_validation_epoch_start(self) -> None:
        self.pictures = []
        self.reset_metrics()

    def on_validation_epoch_end(self) -> None:
        results = {k: float(v) for k, v in self.compute_metrics().items()}
        self.val_results = results
        self.log_dict({f"val/{k}": v for k, v in results.items()}, sync_dist=False)


class SegmentationProbe(LinearProbe):
    """``Conv2d(C, num_classes, 1)`` trained with cross-entropy (ignore 255); mIoU and accuracy."""

    def __init__(self, backbone, upsampler, num_classes: int, feature_dim: Optional[int] = None, **kwargs):
        super().__init__(backbone, upsampler, **kwargs)
        self.num_classes = int(num_classes)
        self.classifier = nn.Conv2d(int(feature_dim or backbone.embed_dim), self.num_classes, 1)
        self.metrics = segmentation_metrics(self.num_classes)

    def loss(self, logits, target):
        return F.cross_entropy(logits, target.long(), ignore_index=IGNORE_INDEX)

    def reset_metrics(self):
        self.metrics.reset()

    def update_metrics(self, logits, target):
        self.metrics.update(logits.argmax(1), target.long())

    def compute_metrics(self):
        return self.metrics.compute()

    def prediction(self, logits):
        return logits.argmax(0).to(torch.uint8)


# ------------------------------------------------------------------------------------------
# depth
# ------------------------------------------------------------------------------------------


def sig_loss(pred: torch.Tensor, target: torch.Tensor, max_depth: Optional[float] = None, warm_up: bool = False,
             eps: float = 1e-3) -> torch.Tensor:
    """Scale-invariant log loss (AdaBins), as the official ``SigLoss`` with ``valid_mask``:
    pixels with ``0 < target (<= max_depth)``; ``g = log(pred + eps) - log(target + eps)``;
    ``sqrt(var(g) + 0.15 mean(g)^2)``, or ``sqrt(0.15 mean(g)^2)`` during the warm-up."""
    mask = target > 0
    if max_depth is not None:
        mask &= target <= max_depth
    g = torch.log(pred[mask] + eps) - torch.log(target[mask] + eps)
    if g.numel() == 0:
        return pred.sum() * 0
    if warm_up:
        return torch.sqrt(0.15 * g.mean() ** 2)
    var = g.var() if g.numel() > 1 else g.new_zeros(())
    return torch.sqrt(var + 0.15 * g.mean() ** 2)


def gradient_loss(pred: torch.Tensor, target: torch.Tensor, max_depth: Optional[float] = None,
                  eps: float = 1e-3) -> torch.Tensor:
    """Multi-scale gradient matching of log depths (MegaDepth), at strides 1, 2, 4, 6 as the
    official ``GradientLoss``: ``sum |d(y, x) - d(y + 2, x)| + |d(y, x) - d(y, x + 2)|`` over
    pairs of valid pixels, ``d = log(pred + eps) - log(target + eps)``, divided by the number of
    valid pixels at that scale. ``pred`` and ``target`` are ``(B, 1, H, W)``."""
    total = pred.new_zeros(())
    for s in (1, 2, 4, 6):
        p, t = pred[..., ::s, ::s], target[..., ::s, ::s]
        mask = t > 0
        if max_depth is not None:
            mask &= t <= max_depth
        n = mask.sum()
        if n == 0:
            continue
        m = mask.to(p.dtype)
        d = (torch.log(p + eps) - torch.log(t + eps)) * m
        v = (d[..., :-2, :] - d[..., 2:, :]).abs() * m[..., :-2, :] * m[..., 2:, :]
        h = (d[..., :, :-2] - d[..., :, 2:]).abs() * m[..., :, :-2] * m[..., :, 2:]
        total = total + (v.sum() + h.sum()) / n
    return total


class DepthProbe(LinearProbe):
    """The official depth probe: 256 depth bins over ``[min_depth, max_depth]``.

    ``pseudo_labeler``: a module mapping images in [0, 1] to depth ``(B, H, W)`` (Depth Anything
    V2, :mod:`jafar.eval.pseudo_depth`); None: the dataset's depth maps (0 = invalid).
    """

    def __init__(self, backbone, upsampler, min_depth: float = 1e-3, max_depth: float = 10.0, bins: int = 256,
                 global_token: str = "cls", gradient_weight: float = 0.5, warm_up_steps: int = 100,
                 pseudo_labeler: Optional[nn.Module] = None, feature_dim: Optional[int] = None, **kwargs):
        super().__init__(backbone, upsampler, **kwargs)
        self.global_token = global_token
        c = int(feature_dim or backbone.embed_dim)
        self.classifier = nn.Conv2d(2 * c if global_token != "none" else c, int(bins), 1)
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.register_buffer("bins", torch.linspace(self.min_depth, self.max_depth, int(bins)), persistent=False)
        self.gradient_weight, self.warm_up_steps = float(gradient_weight), int(warm_up_steps)
        self.add_frozen("pseudo_labeler", pseudo_labeler)
        self.metrics = DepthMetrics(self.min_depth, self.max_depth)

    def logits(self, image, size, key=None):
        out = super().logits(image, size, key)
        probs = F.relu(out) + 0.1
        probs = probs / probs.sum(dim=1, keepdim=True)
        return torch.einsum("bkhw,k->bhw", probs, self.bins.to(probs.dtype)).unsqueeze(1)

    def targets(self, batch, image):
        if self.pseudo_labeler is None:
            label = batch["label"]
            if label.numel() == 0:
                raise ValueError("this depth data set has no depth maps: set task.pseudo_labels (e.g. depth_anything).")
            return label.float().unsqueeze(1)
        with torch.no_grad():
            depth = self.pseudo_labeler(image)
        return F.interpolate(depth.unsqueeze(1).float(), size=(self.target_size, self.target_size), mode="bilinear",
                             align_corners=False)

    def loss(self, pred, target):
        warm = self.training and self.global_step < self.warm_up_steps
        loss = sig_loss(pred, target, self.max_depth, warm_up=warm)
        if self.gradient_weight:
            loss = loss + self.gradient_weight * gradient_loss(pred, target, self.max_depth)
        return loss

    def reset_metrics(self):
        self.metrics.reset()

    def update_metrics(self, pred, target):
        self.metrics.update(pred, target)

    def compute_metrics(self):
        out = self.metrics.compute()
        return {k: v for k, v in out.items() if not (k != "images" and math.isnan(float(v)))}

    def prediction(self, pred):
        return pred[0]
