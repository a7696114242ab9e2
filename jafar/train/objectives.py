"""The training objectives of FeatUp's JBU stack and of LiFT, for the pretraining tool
(``tools/pretrain_jafar.py upsampler=featup`` / ``upsampler=lift``), as the paper's appendix A.2 trains
its task-agnostic baselines in its own code base.

An objective is a module (its own trained parameters, if any, are saved in the Lightning checkpoints
under ``objective.`` but not exported) whose :meth:`losses` yields the step's losses, each to be
back-propagated on its own (``(loss, logs)`` pairs): FeatUp back-propagates one loss per jitter
(``manual_backward`` in its training loop), so only one jitter's graph is alive at a time.
Every random draw written here comes from the step's generator ``gen``; the modules' dropout draws
from the global generator, which :class:`jafar.train.module.JafarPretraining` seeds per step.

FeatUp (github mhamilton723/FeatUp @ 6b5a6c0; :class:`FeatUpObjective`): multi-view reconstruction.
``featup/train_jbu_upsampler.py``, ``JBUFeatUp.training_step``: the JBU stack upsamples the frozen
backbone's features of the image to the image's size; for each of ``n_jitters`` (5,
``configs/jbu_upsampler.yaml``) jitters, the image and the upsampled features get the same random
pad + zoom + flip (``datasets/JitteredImage.py``, ``sample_transform``/``apply_jitter``), a learned
downsampler (``downsamplers.py``, ``AttentionDownsampler`` by default, ``downsampler_type:
"attention"``; ``SimpleDownsampler`` as ``downsampler: simple``) brings the jittered upsampled features
back to the patch grid, and both it and the backbone's features of the jittered image are projected
on 30 random unit directions (``random_projection: 30``); the loss is the Gaussian negative
log-likelihood with a predicted per-pixel scale (``outlier_detection: True``; ``ScaleNet``), plus
``crf_weight`` (0.001) x the sampled CRF loss (``losses.py``, ``SampledCRFLoss``) on the first jitter.
``tv_weight`` and ``filter_ent_weight`` are 0 in that config: the total-variation and filter-entropy
terms are left out. Optimiser NAdam, lr 1e-3, over the upsampler, the downsampler and the scale net
(``configure_optimizers``); the gradient norm is clipped to 1e-4 during the first 10 steps.

LiFT (github saksham-s/lift @ fd6d929; :class:`LiftObjective`): ``train_lift.py``, ``main``: the
backbone's features of the image (448 px), of the image subsampled by 2 and by 4 (``[:, :, ::2,
::2]``, ``[:, :, ::4, ::4]``); LiFT, given the subsampled image and its features, predicts the features
of the image at twice that resolution, at both scales; loss: the sum of the two
``CosineEmbeddingLoss`` (``--loss cosine``, per feature vector ``1 - cos``, averaged), or L1 / L2.
``--augment`` (the README's training commands): ``ColorJitter(0.2, 0.2, 0.2, 0.2)`` on each image.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.functional import gaussian_blur

#: the downsamplers of FeatUp's objective (``downsampler_type`` in its configs)
DOWNSAMPLERS = ("attention", "simple")
#: LiFT's losses (``train_lift.py --loss``)
LIFT_LOSSES = ("cosine", "l1", "l2")

Steps = Iterator[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]


# ---------------------------------------------------------------------------------------------
# FeatUp
# ---------------------------------------------------------------------------------------------


def sample_jitter(gen: torch.Generator, h: int, w: int, max_pad: int, max_zoom: float, flips: bool = True) -> dict:
    """One jitter's parameters, as FeatUp's ``sample_transform`` (``datasets/JitteredImage.py``) draws
    them: a flip with probability 1/2 (when ``flips``), a zoom with probability 1/2, uniform in ``[1,
    max_zoom]``, and a crop corner ``(x, y)`` uniform over the positions that keep an ``h x w`` window
    inside the padded, zoomed image."""
    flip = bool(flips and torch.rand((), generator=gen).item() > 0.5)
    zoom = 1.0
    if torch.rand((), generator=gen).item() > 0.5:
        zoom = torch.rand((), generator=gen, dtype=torch.float64).item() * (max_zoom - 1) + 1
    valid_h = int((h + 2 * max_pad) * zoom) - h + 1
    valid_w = int((w + 2 * max_pad) * zoom) - w + 1
    x = int(torch.randint(0, valid_h, (), generator=gen))
    y = int(torch.randint(0, valid_w, (), generator=gen))
    return {"x": x, "y": y, "zoom": zoom, "flip": flip}


def apply_jitter(t: torch.Tensor, max_pad: int, params: dict) -> torch.Tensor:
    """FeatUp's ``apply_jitter``: ``t`` reflect-padded by ``max_pad``, zoomed bilinearly by
    ``params["zoom"]`` when above 1, cropped back to its size at ``(x, y)``, flipped left-right."""
    h, w = t.shape[-2:]
    out = F.pad(t, [max_pad] * 4, mode="reflect")
    if params["zoom"] > 1.0:
        out = F.interpolate(out, scale_factor=params["zoom"], mode="bilinear")
    x, y = params["x"], params["y"]
    out = out[:, :, x:x + h, y:y + w]
    return torch.flip(out, [3]) if params["flip"] else out


def random_projection(gen: torch.Generator, batch: int, dim: int, out_dim: int) -> torch.Tensor:
    """``(batch, dim, out_dim)`` Gaussian directions, each of unit norm over ``dim`` (FeatUp's
    ``training_step``: ``proj /= proj.square().sum(1, keepdim=True).sqrt()``), one draw per image."""
    proj = torch.randn(batch, dim, out_dim, generator=gen)
    return proj / proj.square().sum(1, keepdim=True).sqrt()


def project(feats: torch.Tensor, proj: Optional[torch.Tensor]) -> torch.Tensor:
    """``feats`` ``(B, C, H, W)`` on the directions ``proj`` ``(B, C, D)``: ``(B, D, H, W)``."""
    return feats if proj is None else torch.einsum("bchw,bcd->bdhw", feats, proj.to(feats))


def uncertainty_mse(pred: torch.Tensor, target: torch.Tensor, scales: Optional[torch.Tensor]) -> torch.Tensor:
    """FeatUp's reconstruction loss (``training_step``): with predicted scales ``s`` (``outlier_detection``),
    the mean over every element of ``(pred - target)^2 / (2 s^2) + log s`` (``s`` broadcast over the
    channels), else the plain mean squared error."""
    sq = (pred - target).square()
    if scales is None:
        return sq.mean()
    return (sq / (2 * scales.square()) + scales.log()).mean()


def sampled_crf_loss(guidance: torch.Tensor, feats: torch.Tensor, gen: torch.Generator, n_samples: int = 1000,
                     alpha: float = 0.1, beta: float = 0.15, gamma: float = 0.005, w1: float = 10.0, w2: float = 3.0,
                     shift: float = 0.0) -> torch.Tensor:
    """FeatUp's ``SampledCRFLoss`` (``losses.py``; its constants from ``JBUFeatUp.__init__``): ``n_samples``
    pixels drawn uniformly; between every two of them, the squared feature distance weighted by an
    appearance kernel (``w1 exp(-|dp|^2 / 2 alpha - |dI|^2 / 2 beta)``, positions normalised by the
    image size) plus a smoothness kernel (``w2 exp(-|dp|^2 / 2 gamma)``) minus ``shift``; the mean. The
    feature distances are computed as ``|a|^2 + |b|^2 - 2 a.b`` (the same value, without upstream's
    ``(B, C, N, N)`` tensor of differences)."""
    if guidance.shape[0] != feats.shape[0] or guidance.shape[-2:] != feats.shape[-2:]:
        raise ValueError(f"the CRF loss needs guidance and features of one batch and size, got "
                         f"{tuple(guidance.shape)} and {tuple(feats.shape)}.")
    h, w = guidance.shape[-2:]
    rows = torch.randint(0, h, (n_samples,), generator=gen).to(feats.device)
    cols = torch.randint(0, w, (n_samples,), generator=gen).to(feats.device)
    pos = torch.stack([rows / h, cols / w]).to(feats.dtype)  # (2, N)
    coord_diff = (pos[:, :, None] - pos[:, None, :]).square().sum(0)[None]  # (1, N, N)
    g = guidance[:, :, rows, cols].to(feats.dtype)  # (B, 3, N)
    guidance_diff = (g[..., :, None] - g[..., None, :]).square().sum(1)  # (B, N, N)
    kernel = (w1 * torch.exp(-coord_diff / (2 * alpha) - guidance_diff / (2 * beta))
              + w2 * torch.exp(-coord_diff / (2 * gamma)) - shift)
    f = feats[:, :, rows, cols]  # (B, C, N)
    sq = f.square().sum(1)
    feat_diff = (sq[:, :, None] + sq[:, None, :] - 2 * torch.einsum("bcn,bcm->bnm", f, f)).clamp_min(0)
    return (feat_diff * kernel).mean()


def _patch_grid(size: int, kernel: int, final: int) -> int:
    """FeatUp's downsampler stride, ``(size - kernel) // (final - 1)``; refused in one sentence unless
    its windows tile exactly ``final`` positions."""
    stride = (size - kernel) // max(final - 1, 1)
    if final < 2 or stride < 1 or (size - kernel) // stride + 1 != final:
        raise ValueError(f"FeatUp's downsampler cannot map a {size}-pixel map to the backbone's {final}-cell grid "
                         f"with {kernel}x{kernel} windows (recipe.image_size must be about patch size x grid).")
    return stride


class AttentionDownsampler(nn.Module):
    """FeatUp's ``AttentionDownsampler`` (``downsamplers.py``, ``blur_attn=True``): the upsampled
    features blurred (Gaussian 5x5, sigma 1), cut into ``kernel x kernel`` windows (one per low-res
    cell); each window's pixels weighted by a softmax of ``w * logit + b``, where ``logit`` is a learned
    linear score of the pixel's features (after dropout 0.2) and ``w``, ``b`` are learned per position
    in the window; the whole window's logits are zeroed with probability 0.2 (upstream's own mask,
    drawn here from the step's generator)."""

    def __init__(self, dim: int, kernel_size: int, final_size: int):
        super().__init__()
        self.dim, self.kernel_size, self.final_size = int(dim), int(kernel_size), int(final_size)
        self.attention_net = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(self.dim, 1))
        k = self.kernel_size
        self.w = nn.Parameter(torch.ones(k, k) + 0.01 * torch.randn(k, k))
        self.b = nn.Parameter(torch.zeros(k, k) + 0.01 * torch.randn(k, k))

    def forward(self, hr_feats: torch.Tensor, guidance: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, c, h, w = hr_feats.shape
        k, final = self.kernel_size, self.final_size
        stride = _patch_grid(h, k, final)
        inputs = gaussian_blur(hr_feats, [5, 5], [1.0, 1.0])
        cols = (w - k) // stride + 1
        patches = F.unfold(inputs, k, stride=stride).reshape(b, c, k * k, final, cols).permute(0, 3, 4, 2, 1)
        logits = self.attention_net(patches).squeeze(-1)  # (B, final, cols, k*k)
        keep = (torch.rand(b, final, cols, 1, generator=gen) > 0.2).to(logits)
        attn = F.softmax(logits * keep * self.w.flatten() + self.b.flatten(), dim=-1)
        return torch.einsum("bhwpc,bhwp->bchw", patches, attn)


class SimpleDownsampler(nn.Module):
    """FeatUp's ``SimpleDownsampler`` (``downsamplers.py``): one learned ``kernel x kernel`` filter
    (``|k| / sum |k|``, initialised flat) applied to every channel with the window stride."""

    def __init__(self, dim: int, kernel_size: int, final_size: int):
        super().__init__()
        self.kernel_size, self.final_size = int(kernel_size), int(final_size)
        self.kernel_params = nn.Parameter(torch.ones(self.kernel_size, self.kernel_size))

    def forward(self, hr_feats: torch.Tensor, guidance: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, c, h, w = hr_feats.shape
        stride = _patch_grid(h, self.kernel_size, self.final_size)
        kernel = self.kernel_params.abs()
        kernel = (kernel / kernel.sum())[None, None]
        out = F.conv2d(hr_feats.reshape(b * c, 1, h, w), kernel.to(hr_feats), stride=stride)
        return out.reshape(b, c, *out.shape[-2:])


class ScaleNet(nn.Module):
    """FeatUp's ``ScaleNet`` (``train_jbu_upsampler.py``): a per-pixel scale ``exp(conv1x1(x) + 0.1)``,
    at least 1e-4, from the backbone's features; its initial weights and bias are the default
    initialisation x 0.1."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Conv2d(dim, 1, 1)
        with torch.no_grad():
            self.net.weight.mul_(0.1)
            self.net.bias.mul_(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.net(x) + 0.1).clamp_min(1e-4)


class FeatUpObjective(nn.Module):
    """FeatUp's JBU training objective (module docstring). ``dim``: the feature width; ``kernel_size``:
    the backbone's patch size (upstream: 14 for DINOv2, else 16); ``final_size``: its feature grid at
    the training image size (upstream: 16 for DINOv2 at 224 px, else 14)."""

    def __init__(self, dim: int, kernel_size: int, final_size: int, n_jitters: int = 5, max_pad: int = 20,
                 max_zoom: float = 2.0, flips: bool = True, random_projection: Optional[int] = 30,
                 downsampler: str = "attention", outlier_detection: bool = True, crf_weight: float = 0.001,
                 crf_samples: int = 1000, clip_steps: int = 10, clip_norm: float = 1e-4):
        super().__init__()
        if downsampler not in DOWNSAMPLERS:
            raise ValueError(f"featup.downsampler must be one of {', '.join(DOWNSAMPLERS)}, got {downsampler!r}.")
        cls = AttentionDownsampler if downsampler == "attention" else SimpleDownsampler
        self.downsampler = cls(dim, kernel_size, final_size)
        self.scale_net = ScaleNet(dim) if outlier_detection else None
        self.n_jitters, self.max_pad, self.max_zoom, self.flips = int(n_jitters), int(max_pad), float(max_zoom), bool(flips)
        self.random_projection = int(random_projection) if random_projection else None
        self.crf_weight, self.crf_samples = float(crf_weight), int(crf_samples)
        self.clip_steps, self.clip_norm = int(clip_steps), float(clip_norm)

    def inputs(self, pixels: torch.Tensor, gen: torch.Generator, normalize: Callable) -> torch.Tensor:
        """The normalised images of the step (upstream's loader: resize, centre crop, normalise)."""
        return normalize(pixels)

    def gradient_clip(self, step: int) -> Optional[float]:
        """The gradient-norm bound of ``step``: ``clip_norm`` during the first ``clip_steps`` steps
        (upstream: ``if self.global_step < 10: clip_gradients(opt, .0001, "norm")``), else None."""
        return self.clip_norm if step < self.clip_steps else None

    def losses(self, backbone: Callable, upsampler: nn.Module, x: torch.Tensor, gen: torch.Generator,
               target_norm: Callable = lambda f: f) -> Steps:
        """The losses of one step on the normalised images ``x``, one per jitter (each already divided by
        ``n_jitters``, as upstream), with what to log. ``target_norm``: what the upsampler does to its
        input features first (its LayerNorm, when it has one), applied to every backbone output."""
        with torch.no_grad():
            lr = target_norm(backbone(x))
        size = tuple(x.shape[-2:])
        for i in range(self.n_jitters):
            hr = upsampler(x, lr, size)
            params = sample_jitter(gen, size[0], size[1], self.max_pad, self.max_zoom, self.flips)
            with torch.no_grad():
                jit_img = apply_jitter(x, self.max_pad, params)
                lr_jit = target_norm(backbone(jit_img))
            proj = (random_projection(gen, lr.shape[0], lr.shape[1], self.random_projection)
                    if self.random_projection else None)
            hr_jit = apply_jitter(hr, self.max_pad, params)
            down = project(self.downsampler(hr_jit, jit_img, gen), proj)
            scales = self.scale_net(lr_jit) if self.scale_net is not None else None
            rec = uncertainty_mse(down.float(), project(lr_jit, proj).float(), scales) / self.n_jitters
            loss, logs = rec, {"loss_rec": rec.detach()}
            if self.crf_weight > 0 and i == 0:
                # upstream passes the un-jittered image with the jittered features (train_jbu_upsampler.py)
                crf = sampled_crf_loss(x, project(hr_jit, proj).float(), gen, self.crf_samples)
                loss = loss + self.crf_weight * crf
                logs["loss_crf"] = crf.detach()
            yield loss, logs


# ---------------------------------------------------------------------------------------------
# LiFT
# ---------------------------------------------------------------------------------------------


def color_jitter(pixels: torch.Tensor, gen: torch.Generator, strength: float = 0.2) -> torch.Tensor:
    """torchvision's ``ColorJitter(brightness, contrast, saturation, hue)``, all ``strength``, on each
    image of ``pixels`` (``[0, 1]``) with its own draws from ``gen``: factors uniform in ``[1 - s, 1 +
    s]`` (hue: ``[-s, s]``), applied in a random order, as ``ColorJitter.get_params`` draws them."""
    import torchvision.transforms.functional as TF

    out = []
    for img in pixels:
        order = torch.randperm(4, generator=gen).tolist()
        f = [1 + strength * (2 * torch.rand((), generator=gen).item() - 1) for _ in range(3)]
        hue = strength * (2 * torch.rand((), generator=gen).item() - 1)
        for op in order:
            if op == 0:
                img = TF.adjust_brightness(img, f[0])
            elif op == 1:
                img = TF.adjust_contrast(img, f[1])
            elif op == 2:
                img = TF.adjust_saturation(img, f[2])
            else:
                img = TF.adjust_hue(img, hue)
        out.append(img)
    return torch.stack(out)


def lift_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """LiFT's reconstruction loss (``train_lift.py``): ``cosine`` is ``nn.CosineEmbeddingLoss`` with
    target 1 over the feature vectors (the mean of ``1 - cos``), ``l1`` ``nn.L1Loss``, ``l2``
    ``nn.MSELoss``."""
    pred, target = pred.float(), target.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(pred, target, dim=1, eps=1e-12)).mean()
    if kind == "l1":
        return F.l1_loss(pred, target)
    return F.mse_loss(pred, target)


class LiftObjective(nn.Module):
    """LiFT's training objective (module docstring): no parameters of its own."""

    def __init__(self, loss: str = "cosine", color_jitter: float = 0.2):
        super().__init__()
        if loss not in LIFT_LOSSES:
            raise ValueError(f"lift.loss must be one of {', '.join(LIFT_LOSSES)}, got {loss!r}.")
        self.loss, self.color_jitter = loss, float(color_jitter)

    def gradient_clip(self, step: int) -> Optional[float]:
        return None

    def inputs(self, pixels: torch.Tensor, gen: torch.Generator, normalize: Callable) -> torch.Tensor:
        """The normalised, colour-jittered (``color_jitter > 0``) images of the step."""
        if self.color_jitter > 0:
            pixels = color_jitter(pixels, gen, self.color_jitter).clamp(0, 1)
        return normalize(pixels)

    def losses(self, backbone: Callable, upsampler: nn.Module, x: torch.Tensor, gen: torch.Generator,
               target_norm: Callable = lambda f: f) -> Steps:
        """One loss: LiFT from the ``::2`` image to the full image's features plus from the ``::4``
        image to the ``::2`` image's features."""
        x2, x4 = x[:, :, ::2, ::2], x[:, :, ::4, ::4]
        with torch.no_grad():
            f1, f2, f4 = backbone(x), backbone(x2), backbone(x4)
        g1 = upsampler(x2, f2, tuple(f1.shape[-2:]))
        g2 = upsampler(x4, f4, tuple(f2.shape[-2:]))
        l1, l2 = lift_loss(g1, f1, self.loss), lift_loss(g2, f2, self.loss)
        yield l1 + l2, {"loss_x2": l1.detach(), "loss_x4": l2.detach()}


def lift_grids(image_size: int, patch: int) -> Tuple[int, int, int]:
    """The feature grids LiFT trains between (the image, its ``::2`` and ``::4`` subsamplings), for the
    check that the smallest has at least 2 cells: ``image_size / patch`` and its halves."""
    full = image_size / patch
    return math.ceil(full), math.ceil(full / 2), math.ceil(full / 4)
