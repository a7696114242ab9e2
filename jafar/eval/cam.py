"""Grad-CAM faithfulness of upsampled features (``task=cam``, the paper's Table 2 and appendix A.1).

A frozen classifier is split at a spatial feature map ``A`` (``(B, C, h, w)``): the part before
gives ``A``, the part after (the *head*) maps ``A`` to the class logits. For each image the
Grad-CAM of the target class ``c`` (Selvaraju et al., ICCV 2017) is computed from the features
*upsampled* to the image size by the row's upsampler ``U``::

    alpha_k = mean_ij d y_c / d A_kij                       (the gradient at the feature grid)
    L       = ReLU(sum_k alpha_k U(image, A)_k)              (H x W)

so the bilinear row is the usual Grad-CAM (bilinear interpolation commutes with the channel sum),
and an image-guided upsampler sharpens it. The re-encoding rows (Large Image, Strided) replace
``U(image, A)`` by the same layer ``A`` of the classifier run again on the enlarged image, or at
the reduced patch stride, resized bilinearly (:class:`CamReencode`); ``alpha`` stays the
gradient at the original grid.

Task-dependent rows (``upsamplers.<row>.train_with_probe``: CARAFE, SAPA, DySample, ReSFU) are
trained before they are scored, as the paper trains them with each task; the paper does not say how
for Table 2, so the protocol is ours (``task.upsampler_training``): ``pooled_classifier``
(:func:`pooled_classifier_loss`) on the data set's training images.

Images scored: the paper scores 2,000 images drawn at random *among the correctly classified*
ImageNet validation images. Here every validation image is classified first (top-1 = label),
then ``task.images`` of the correct ones are drawn with ``task.sample_seed``
(:func:`draw_correct`); ``c`` is their label.

Classifiers (:func:`build_cam_classifier`):

* torchvision's ImageNet MobileNetV2 (the offline demo): ``A`` is the backbone's feature map
  (stride 16: ``features[:14]``, 96 channels; stride 32: ``features[:19]``), the head is the rest
  of the network (``features[14:]``, global average pooling, the ImageNet linear classifier), so
  ``head(A)`` reproduces the full network's logits;
* a timm ViT built with its classification head (the paper's supervised ViT-B/16,
  ``vit_base_patch16_224.augreg2_in21k_ft_in1k``: 14 x 14 patches at 224): its class token alone
  reaches the head, so the patch tokens after the last block carry no gradient. ``A`` is the
  patch tokens entering the last block's attention (the output of ``blocks[-1].norm1``), the
  usual Grad-CAM target layer of a ViT (jacobgil/pytorch-grad-cam's ViT tutorial), and the head
  is that block, the final norm and the classifier. The official JAFAR code (github
  PaulCouairon/JAFAR @ 94d4d54) has no CAM evaluation; which layer the paper upsamples is not
  given there, and this one is our reading, said in docs/eval_2d.md.

Metrics (per image, then averaged; ``Y`` is the softmax probability of ``c`` on the image ``x``,
``O`` on the explanation image ``E``), two definitions (``task.definition``):

``paper`` (default): appendix A.1 of the paper (arXiv 2506.11136, equations 4-10):

* the explanation image keeps the pixels where the CAM is positive: ``E = x * 1[L > 0]``;
* Average Drop ``max(0, Y - O) / Y`` (Chattopadhay et al., Grad-CAM++, WACV 2018);
* Average Increase ``1[O > Y]`` (ibid., "increase in confidence");
* Average Gain ``max(0, O - Y) / (1 - Y)`` (Zhang et al., Opti-CAM, 2024);
* Coherency: the Pearson correlation of ``L(x)`` and ``L(E)`` (the CAM of the explanation image
  for the same class and row), as ``(r + 1) / 2``; 0 where it is undefined (a constant map);
* Complexity: the l0 norm of the CAM as a fraction of the pixels, ``#{L > 0} / (H W)``;
* ADCC: the harmonic mean of Coherency, 1 - Complexity and 1 - Average Drop,
  ``3 / (1/Coherency + 1/(1 - Complexity) + 1/(1 - AverageDrop))`` (0 when one of the three is
  0), of the *column means*, as the paper's Table 2 computes it: for its ten rows the formula on
  the printed A.D, Coh. and Cplx. gives the printed ADCC to 0.1 (JAFAR: 91.4, 44.1, 17.4 ->
  73.3; ``tests/test_eval_cam.py``). The mean of the per-image ADCC stays in ``results.json``
  as ``adcc_mean_per_image``.

``adcc_reference``: the reference code of ADCC (Poppi et al., "Revisiting the evaluation of class
activation mapping for explainability", CVPR-W 2021; github aimagelab/ADCC @ e52dadf): the
image multiplied by the min-max scaled saliency map, ``E = x * L`` (``main.py``:
``explanation_map = image * saliency_map``), Complexity the mean of ``|L|`` (``metrics/
complexity.py``: its L1 norm over ``H W``); A.D, Coherency and ADCC as above (``metrics/
average_drop.py``, ``coherency.py``, ``adcc.py``).

The CAM is scaled to [0, 1] for the pictures and the soft mask: by its maximum under ``paper``
(so ``L > 0`` is the Grad-CAM's own support), min-max under ``adcc_reference`` (torchcam's
normalisation, which the reference code uses); Coherency does not depend on the scaling. The mask
multiplies the *normalised* image (``mask_space: normalized``, as the reference code, whose
``image`` is the normalised tensor: ``image_utils.py`` ``apply_transform``); ``mask_space: pixels``
multiplies the image in [0, 1] instead.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..frozen import FrozenChildren

log = logging.getLogger(__name__)

#: the per-image metrics, in the order of the paper's table
CAM_METRICS = ("average_drop", "average_increase", "average_gain", "coherency", "complexity", "adcc")
#: ``task.definition``: the paper's appendix A.1 (binary mask, l0 complexity) or the ADCC reference code
DEFINITIONS = ("paper", "adcc_reference")


def _check_definition(definition: str) -> None:
    if definition not in DEFINITIONS:
        raise ValueError(f"task.definition must be 'paper' (appendix A.1: binary mask, l0 complexity) or "
                         f"'adcc_reference' (aimagelab/ADCC: soft mask, L1 complexity), got {definition!r}.")


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def average_drop(y: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """``max(0, y - o) / y`` per image: ``y`` the class probability on the image, ``o`` on the
    explanation map."""
    return (y - o).clamp_min(0) / y


def average_increase(y: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """``1`` where the explanation map is more confident than the image (``o > y``), else 0."""
    return (o > y).to(y.dtype)


def average_gain(y: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """``max(0, o - y) / (1 - y)`` per image (0 when ``y == 1``: no gain is possible)."""
    gain = (o - y).clamp_min(0)
    return torch.where(y < 1, gain / (1 - y).clamp_min(1e-12), torch.zeros_like(gain))


def coherency(cam: torch.Tensor, cam_of_explanation: torch.Tensor) -> torch.Tensor:
    """``(pearson(cam, cam_of_explanation) + 1) / 2`` per image (``(B, H, W)`` maps); 0 where the
    correlation is undefined (a constant map)."""
    a = cam.flatten(1).double()
    b = cam_of_explanation.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    den = a.norm(dim=1) * b.norm(dim=1)
    r = (a * b).sum(1) / den.clamp_min(1e-300)
    out = (r.clamp(-1, 1) + 1) / 2
    return torch.where(den > 0, out, torch.zeros_like(out)).to(cam.dtype)


def complexity(cam: torch.Tensor, definition: str = "paper") -> torch.Tensor:
    """Per image (``(B, H, W)`` maps in [0, 1]): the fraction of pixels where ``cam > 0`` (its l0
    norm over ``H W``, ``paper``), or the mean of ``|cam|`` (its L1 norm over ``H W``,
    ``adcc_reference``)."""
    _check_definition(definition)
    if definition == "paper":
        return (cam > 0).to(cam.dtype).flatten(1).mean(1)
    return cam.abs().flatten(1).mean(1)


def adcc(average_drop_: torch.Tensor, coherency_: torch.Tensor, complexity_: torch.Tensor) -> torch.Tensor:
    """``3 / (1/coherency + 1/(1 - complexity) + 1/(1 - average_drop))`` (all as fractions);
    0 where one of the three terms is 0 (the harmonic mean's limit)."""
    terms = torch.stack([coherency_, 1 - complexity_, 1 - average_drop_]).double()
    ok = (terms > 0).all(0)
    value = 3 / (1 / terms.clamp_min(1e-300)).sum(0)
    return torch.where(ok, value, torch.zeros_like(value)).to(average_drop_.dtype)


def cam_metrics(y: torch.Tensor, o: torch.Tensor, cam: torch.Tensor, cam_of_explanation: torch.Tensor,
                definition: str = "paper") -> Dict[str, torch.Tensor]:
    """Every per-image metric of :data:`CAM_METRICS` (fractions, ``(B,)`` each)."""
    drop = average_drop(y, o)
    coh = coherency(cam, cam_of_explanation)
    com = complexity(cam, definition)
    return {"average_drop": drop, "average_increase": average_increase(y, o), "average_gain": average_gain(y, o),
            "coherency": coh, "complexity": com, "adcc": adcc(drop, coh, com)}


class CamMeter:
    """Sums of the per-image metrics; :meth:`compute` gives their means (fractions), ``adcc`` as
    the ADCC of the averaged Coherency, Complexity and Average Drop (the paper's Table 2), and
    ``adcc_mean_per_image``, the mean of the per-image ADCC."""

    def __init__(self):
        self.sums = {k: 0.0 for k in CAM_METRICS}
        self.images = 0

    def update(self, metrics: Dict[str, torch.Tensor]) -> None:
        n = int(next(iter(metrics.values())).numel())
        for k in CAM_METRICS:
            self.sums[k] += float(metrics[k].double().sum())
        self.images += n

    def compute(self) -> Dict[str, float]:
        if self.images == 0:
            return {**{k: float("nan") for k in CAM_METRICS}, "adcc_mean_per_image": float("nan"), "images": 0}
        out = {k: v / self.images for k, v in self.sums.items()}
        means = {k: torch.tensor(out[k], dtype=torch.float64) for k in ("average_drop", "coherency", "complexity")}
        out["adcc_mean_per_image"] = out["adcc"]
        out["adcc"] = float(adcc(means["average_drop"], means["coherency"], means["complexity"]))
        out["images"] = self.images
        return out


# ---------------------------------------------------------------------------------------------
# classifiers split at a feature map
# ---------------------------------------------------------------------------------------------


class CamClassifier(FrozenChildren):
    """A frozen classifier split at the Grad-CAM target layer: :meth:`split` maps a normalised
    image to ``(A, state)`` (``A``: ``(B, C, h, w)``), :meth:`head` maps ``(A, state)`` to the
    logits. ``target`` describes the layer (one line, for the table)."""

    target: str = ""

    def split(self, image: torch.Tensor) -> Tuple[torch.Tensor, tuple]:
        raise NotImplementedError

    def head(self, features: torch.Tensor, state: tuple) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.head(*self.split(image))

    def train(self, mode: bool = True):
        return super().train(False)


class MobileNetV2Classifier(CamClassifier):
    """torchvision's MobileNetV2 split after the backbone's blocks (``features[:n]``); the head is
    ``features[n:]``, global average pooling and the linear classifier (torchvision's forward)."""

    def __init__(self, backbone, pretrained: bool = True, weights=None):
        super().__init__()
        from ..backbones import _MOBILENET_CUTS, load_mobilenet_v2

        n_blocks, _ = _MOBILENET_CUTS[int(backbone.patch_size)]
        net = load_mobilenet_v2(pretrained=pretrained, weights=weights)
        self.add_frozen("backbone", backbone)  # shared with the run: moves with .to(), not in the state dict
        self.tail = net.features[n_blocks:]
        self.classifier = net.classifier
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        self.target = f"MobileNetV2 features[:{n_blocks}] (stride {backbone.patch_size}, {backbone.embed_dim} channels)"

    def split(self, image):
        return self.backbone(image), ()

    def head(self, features, state):
        x = self.tail(features)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


class TimmViTClassifier(CamClassifier):
    """A timm ``VisionTransformer`` with its head, split at the output of ``blocks[-1].norm1``
    (the patch tokens entering the last attention); the head is the rest of that block (its
    residual branches), the final norm and ``forward_head``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        last = model.blocks[-1] if hasattr(model, "blocks") and len(model.blocks) else None
        if last is None or not all(hasattr(last, a) for a in ("norm1", "attn", "ls1", "norm2", "mlp", "ls2")):
            raise ValueError(f"task=cam needs a timm VisionTransformer (pre-norm blocks); {type(model).__name__} "
                             f"is not one.")
        if int(getattr(model, "num_classes", 0) or 0) < 1:
            raise ValueError("task=cam needs the classifier's head: build the backbone with it "
                             "(backbone.num_classes=1000 for an ImageNet classifier).")
        self.model = model
        self.npt = int(model.num_prefix_tokens)
        self.target = f"{type(model).__name__}: blocks[-1].norm1 output (patch tokens entering the last attention)"

    def split(self, image, stride: Optional[int] = None):
        """``stride``: the patch embedding run at that stride (the Strided row), restored after."""
        m = self.model
        proj = m.patch_embed.proj
        old = proj.stride
        try:
            if stride is not None:
                proj.stride = (int(stride), int(stride))
            with torch.no_grad():
                x = m.patch_embed(image)
        finally:
            proj.stride = old
        if x.ndim == 4:  # dynamic_img_size: (B, h, w, C)
            h, w = x.shape[1], x.shape[2]
        else:
            h, w = image.shape[-2] // m.patch_embed.patch_size[0], image.shape[-1] // m.patch_embed.patch_size[1]
        with torch.no_grad():
            x = m._pos_embed(x)
            x = m.patch_drop(x)
            x = m.norm_pre(x)
            for blk in m.blocks[:-1]:
                x = blk(x)
            t = m.blocks[-1].norm1(x)
        b, _, c = t.shape
        patches = t[:, self.npt:].transpose(1, 2).reshape(b, c, h, w)
        return patches, (x, t[:, :self.npt])

    def head(self, features, state):
        x, prefix = state
        m, blk = self.model, self.model.blocks[-1]
        t = torch.cat([prefix, features.flatten(2).transpose(1, 2)], dim=1)
        x = x + blk.ls1(blk.attn(t))
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        return m.forward_head(m.norm(x))


def build_cam_classifier(backbone, backbone_cfg=None) -> CamClassifier:
    """The classifier behind ``backbone`` (a MobileNetV2 backbone: the same ImageNet weights with
    their head; a timm ViT backbone built with ``num_classes``: its own head)."""
    from ..backbones import MobileNetV2Backbone, TimmViTBackbone

    cfg = dict(backbone_cfg or {})
    if isinstance(backbone, MobileNetV2Backbone):
        return MobileNetV2Classifier(backbone, pretrained=bool(cfg.get("pretrained", True)), weights=cfg.get("weights"))
    if isinstance(backbone, TimmViTBackbone):
        return TimmViTClassifier(backbone.model)
    raise ValueError(f"task=cam needs a classifier: the MobileNetV2 backbones or a timm ViT with its head; "
                     f"{getattr(backbone, 'name', type(backbone).__name__)} is neither.")


# ---------------------------------------------------------------------------------------------
# Grad-CAM from upsampled features
# ---------------------------------------------------------------------------------------------


def _max_scaled(cam: torch.Tensor) -> torch.Tensor:
    """Each non-negative ``(H, W)`` map divided by its maximum (its support ``cam > 0`` kept); an
    all-zero map stays 0."""
    hi = cam.flatten(1).max(1).values
    return torch.where((hi > 0)[:, None, None], cam / hi.clamp_min(1e-30)[:, None, None], torch.zeros_like(cam))


#: how a Grad-CAM is brought to [0, 1]: by its maximum (``paper``) or min-max (``adcc_reference``)
_SCALINGS = {"max": _max_scaled}


def _unit_range(cam: torch.Tensor) -> torch.Tensor:
    """Each ``(H, W)`` map scaled to [0, 1] (min-max); a constant map becomes 0."""
    flat = cam.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    span = (hi - lo).clamp_min(1e-12)
    out = (cam - lo[:, None, None]) / span[:, None, None]
    return torch.where((hi > lo)[:, None, None], out, torch.zeros_like(out))


def grad_cam(classifier: CamClassifier, upsampler: nn.Module, image: torch.Tensor, classes: torch.Tensor,
             size: Sequence[int], return_low_res: bool = False, scaling: str = "min_max"):
    """Grad-CAMs ``(B, H, W)`` in [0, 1] of ``classes`` for the normalised ``image``, from the
    classifier's target features upsampled by ``upsampler`` to ``size``; ``scaling``: ``min_max``
    or ``max`` (divided by the maximum: ``L > 0`` stays the Grad-CAM's support).

    ``return_low_res``: also the Grad-CAM at the feature grid (``(B, h, w)``, min-max, [0, 1])."""
    if scaling not in ("min_max", "max"):
        raise ValueError(f"scaling must be 'min_max' or 'max', got {scaling!r}.")
    scale = _SCALINGS.get(scaling, _unit_range)
    features, state = classifier.split(image)
    with torch.enable_grad():
        leaf = features.detach().float().requires_grad_(True)
        logits = classifier.head(leaf, state)
        score = logits.gather(1, classes.view(-1, 1).to(logits.device)).sum()
        (grads,) = torch.autograd.grad(score, leaf)
    alpha = grads.mean(dim=(2, 3))
    with torch.no_grad():
        hr = upsampler(image, features.detach(), tuple(size)).float()
        if tuple(hr.shape[-2:]) != tuple(size):  # an upsampler that overshoots
            hr = F.interpolate(hr, size=tuple(size), mode="bilinear", align_corners=False)
        cam = scale(F.relu(torch.einsum("bc,bchw->bhw", alpha, hr)))
        if not return_low_res:
            return cam
        low = _unit_range(F.relu(torch.einsum("bc,bchw->bhw", alpha, features.float())))
    return cam, low


def pooled_classifier_loss(classifier: CamClassifier, upsampler: nn.Module, image: torch.Tensor,
                           label: torch.Tensor) -> torch.Tensor:
    """The loss that trains a task-dependent row for ``task=cam`` (``pooled_classifier``, ours: the
    paper trains CARAFE, SAPA, DySample and ReSFU for Table 2 but says not how): the classifier's
    target features ``A`` upsampled to the image size, average-pooled back to ``A``'s grid, through
    the frozen head, cross-entropy with the ImageNet label. The upsampler learns an output whose
    patch averages keep what the classifier reads, the only signal the frozen classifier gives at
    the resolution it was trained at."""
    features, state = classifier.split(image)
    hr = upsampler(image, features.detach(), tuple(image.shape[-2:])).float()
    pooled = F.adaptive_avg_pool2d(hr, tuple(features.shape[-2:]))
    return F.cross_entropy(classifier.head(pooled, state), label)


def explanation_map(normalized: torch.Tensor, image01: torch.Tensor, cam: torch.Tensor, normalize,
                    mask_space: str = "normalized", definition: str = "paper") -> torch.Tensor:
    """The image masked by its CAM, as the classifier's (normalised) input. The mask: ``1[cam > 0]``
    (``definition="paper"``, appendix A.1) or ``cam`` itself (``"adcc_reference"``); applied as
    ``normalized * mask`` (``mask_space="normalized"``, the reference ADCC code) or
    ``normalize(image01 * mask)`` (``"pixels"``)."""
    _check_definition(definition)
    mask = (cam > 0).to(normalized.dtype) if definition == "paper" else cam
    if mask_space == "normalized":
        return normalized * mask[:, None]
    if mask_space == "pixels":
        return normalize(image01 * mask[:, None])
    raise ValueError(f"task.mask_space must be 'normalized' or 'pixels', got {mask_space!r}.")


class CamReencode(nn.Module):
    """The Large Image and Strided rows for a classifier whose Grad-CAM layer is not the backbone's
    output (a ViT: the input of its last block): that layer of the classifier run again on the
    image enlarged as the row says (:class:`jafar.upsamplers.LargeImage`, ``input_size``) or at the
    row's patch stride (:class:`jafar.upsamplers.Strided`), then resized bilinearly to the output
    size. The features given are ignored, as by the rows themselves."""

    def __init__(self, classifier: "TimmViTClassifier", row: nn.Module):
        super().__init__()
        from ..upsamplers.reencode import LargeImage, Strided

        if not isinstance(row, (LargeImage, Strided)):
            raise TypeError(f"CamReencode wraps the large_image and strided rows, got {type(row).__name__}.")
        self.classifier, self.row = classifier, row

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size) -> torch.Tensor:
        from ..upsamplers.reencode import LargeImage

        if isinstance(self.row, LargeImage):
            big = F.interpolate(image, size=self.row.input_size(*image.shape[-2:]), mode="bilinear", align_corners=False)
            feats, _ = self.classifier.split(big)
        else:
            feats, _ = self.classifier.split(image, stride=self.row.stride)
        return F.interpolate(feats, size=tuple(output_size), mode="bilinear", align_corners=False)

    def describe(self) -> str:
        return self.row.describe().replace("the encoder", "the classifier up to its Grad-CAM layer")


def cam_row(classifier: CamClassifier, upsampler: nn.Module) -> nn.Module:
    """The row's upsampler as the Grad-CAM sees it: a re-encoding row (Large Image, Strided) with a
    ViT classifier reads the Grad-CAM layer (:class:`CamReencode`); every other row as it is (with
    MobileNetV2 the backbone's output *is* the Grad-CAM layer)."""
    from ..upsamplers.reencode import LargeImage, Strided

    if isinstance(classifier, TimmViTClassifier) and isinstance(upsampler, (LargeImage, Strided)):
        return CamReencode(classifier, upsampler)
    return upsampler


def draw_correct(correct: Sequence[int], images: Optional[int], seed: int) -> List[int]:
    """``images`` of the correctly classified indices ``correct``, drawn without replacement with
    ``seed`` and returned sorted (all of them when ``images`` is None or not smaller)."""
    correct = list(correct)
    if images is None or int(images) >= len(correct):
        return sorted(correct)
    gen = torch.Generator().manual_seed(int(seed))
    pick = torch.randperm(len(correct), generator=gen)[:int(images)].tolist()
    return sorted(correct[i] for i in pick)


def score_explanations(classifier: CamClassifier, x: torch.Tensor, image01: torch.Tensor, label: torch.Tensor,
                       cam: torch.Tensor, cam_of, normalize, definition: str = "paper",
                       mask_space: str = "normalized") -> Dict[str, torch.Tensor]:
    """The metrics of :data:`CAM_METRICS` for images ``x`` (normalised) whose CAMs of ``label`` are
    ``cam`` (``(B, H, W)``, [0, 1]): ``Y`` and ``O`` the softmax probabilities of the label on ``x``
    and on its explanation image ``E``; ``cam_of(E)`` gives the CAMs of ``E`` (Coherency)."""
    y = classifier.logits(x).double().softmax(1).gather(1, label[:, None])[:, 0]
    e = explanation_map(x, image01, cam, normalize, mask_space, definition)
    o = classifier.logits(e).double().softmax(1).gather(1, label[:, None])[:, 0]
    return cam_metrics(y, o, cam, cam_of(e), definition)


# ---------------------------------------------------------------------------------------------
# the task
# ---------------------------------------------------------------------------------------------
