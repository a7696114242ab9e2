"""MaskCLIP dense features from an open_clip ViT (``task=ovseg``; Zhou, Loy and Dai, "Extract Free
Dense Labels from CLIP", ECCV 2022).

CLIP's image embedding is the class token after the last block, ``ln_post`` and ``proj``; its
patch tokens there are not aligned with the text embeddings. MaskCLIP's trick, on the last
block only: drop the query-key attention and keep its *value* path, i.e. for every token
``out_proj(v_proj(ln_1(x)))`` with ``x`` the tokens entering the last block (no residual, no
MLP), then CLIP's ``ln_post`` and ``proj``: a ``(B, D, h, w)`` map in the text embedding space
(D = 512 for ViT-B/16). Facts taken from the public MaskCLIP re-implementation in github
mhamilton723/FeatUp (``featup/featurizers/maskclip/model.py``: ``ResidualAttentionBlock.forward_v``,
``VisionTransformer.forward(patch_output=True)``), written here for open_clip's modules.

Text: each class name is put in every prompt template, encoded by CLIP's text tower,
L2-normalised, averaged over the templates and normalised again (CLIP's prompt ensembling, which
MaskCLIP uses).

:class:`MaskCLIPBackbone` is a :class:`jafar.backbones.Backbone` (``(B, D, h, w)`` features, CLIP's
mean/std), so every upsampler, and JAFAR's pretraining (``backbone=maskclip_vitb16``), takes it
as it takes any encoder. ``open_clip_torch`` is needed (``pip install open_clip_torch``).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone

_INSTALL = "pip install open_clip_torch"


def _open_clip():
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - the extra is installed by scripts/setup.sh
        raise ImportError(f"MaskCLIP needs open_clip: `{_INSTALL}` (or the project's eval extra).") from exc
    return open_clip


def _create_clip(name: str, pretrained: Optional[str], weights: Optional[str], model_cfg: Optional[dict]) -> nn.Module:
    open_clip = _open_clip()
    if model_cfg is not None:  # an explicit architecture (tests, smoke runs): random weights
        return open_clip.CLIP(**model_cfg)
    if weights is not None:
        return open_clip.create_model(name, pretrained=str(weights))
    if not pretrained:
        return open_clip.create_model(name, pretrained=None)
    try:  # open_clip downloads through huggingface_hub: HF_HUB_OFFLINE=1 makes it fail at once
        return open_clip.create_model(name, pretrained=pretrained)
    except Exception as exc:
        raise RuntimeError(
            f"CLIP weights {name!r} / {pretrained!r} could not be downloaded or loaded (offline? {type(exc).__name__}): "
            f"download them with open_clip on a machine with internet and pass backbone.weights=/path/to/file, or "
            f"backbone.pretrained=null for random weights (a smoke test only).") from exc


class MaskCLIPBackbone(Backbone):
    """An open_clip ViT as a frozen dense encoder through MaskCLIP's value path.

    ``forward(images)`` -> ``(B, D, H / p, W / p)`` (D: CLIP's embedding width); images of any
    size that is a multiple of the patch size (the position embedding is resampled bicubically
    when the grid differs from CLIP's). :meth:`text_embeddings` gives the class embeddings.
    """

    def __init__(self, clip: nn.Module, name: str, tokenizer, pretrained: bool):
        visual = clip.visual
        for attr in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj"):
            if not hasattr(visual, attr):
                raise ValueError(f"MaskCLIP needs an open_clip VisionTransformer; {type(visual).__name__} has no {attr!r}.")
        if getattr(visual, "attn_pool", None) is not None or visual.proj is None:
            raise ValueError("MaskCLIP needs a class-token CLIP ViT with a final projection (no attentional pooling).")
        patch = visual.conv1.kernel_size[0]
        width = visual.class_embedding.shape[-1]
        dim = int(visual.proj.shape[1])
        pc = getattr(visual, "preprocess_cfg", None) or {}
        mean = pc.get("mean") or getattr(visual, "image_mean", None) or _open_clip().OPENAI_DATASET_MEAN
        std = pc.get("std") or getattr(visual, "image_std", None) or _open_clip().OPENAI_DATASET_STD
        super().__init__(name, dim, patch, mean, std)
        self.clip = clip
        self.width = int(width)
        self.pretrained = bool(pretrained)
        self.tokenizer = tokenizer  # open_clip's tokenizer (a plain object)
        self._freeze()

    # ------------------------------------------------------------------ image
    def feature_size(self, height: int, width: int) -> Tuple[int, int]:
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"Image size {height}x{width} is not a multiple of the patch size {p} of {self.name}.")
        return height // p, width // p

    def _position_embedding(self, h: int, w: int) -> torch.Tensor:
        pos = self.clip.visual.positional_embedding
        cls, grid = pos[:1], pos[1:]
        n = int(round(math.sqrt(grid.shape[0])))
        if (h, w) != (n, n):
            grid = grid.reshape(1, n, n, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False)
            grid = grid.permute(0, 2, 3, 1).reshape(h * w, -1).to(pos.dtype)
        return torch.cat([cls, grid], dim=0)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.clip.visual
        x = visual.conv1(images)
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(b, 1, c)
        x = torch.cat([cls, x], dim=1) + self._position_embedding(h, w).to(x.dtype)
        x = visual.ln_pre(x)
        blocks = visual.transformer.resblocks
        batch_first = getattr(visual.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for blk in blocks[:-1]:
            x = blk(x)
        if not batch_first:
            x = x.transpose(0, 1)
        last = blocks[-1]
        attn = last.attn
        d = attn.embed_dim
        # MaskCLIP: the value embedding and the output projection of the last attention, no residual
        v = F.linear(last.ln_1(x), attn.in_proj_weight[2 * d:], attn.in_proj_bias[2 * d:])
        v = last.ls_1(attn.out_proj(v))
        v = visual.ln_post(v) @ visual.proj
        return v[:, 1:].transpose(1, 2).reshape(b, -1, h, w)

    # ------------------------------------------------------------------ text
    def text_embeddings(self, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """``(K, D)`` L2-normalised class embeddings: each name in every template, encoded,
        normalised, averaged over the templates, normalised again."""
        if not templates or any("{}" not in t for t in templates):
            raise ValueError(f"prompt templates must each hold '{{}}' for the class name, got {list(templates)}.")
        device = next(self.clip.parameters()).device
        out = []
        with torch.no_grad():
            for name in class_names:
                tokens = self.tokenizer([t.format(name) for t in templates]).to(device)
                emb = F.normalize(self.clip.encode_text(tokens).float(), dim=-1)
                out.append(F.normalize(emb.mean(0), dim=-1))
        return torch.stack(out)


def build_maskclip(name: str = "ViT-B-16", pretrained: Optional[str] = "openai", weights: Optional[str] = None,
                   model_cfg: Optional[Dict] = None) -> MaskCLIPBackbone:
    """A :class:`MaskCLIPBackbone` from open_clip: ``name`` an open_clip model (``ViT-B-16``),
    ``pretrained`` its weights tag (``openai``; downloaded when online; ``None``: random
    weights), ``weights`` a local checkpoint file instead, ``model_cfg`` an explicit
    ``open_clip.CLIP`` configuration (random weights; for tests)."""
    open_clip = _open_clip()
    if model_cfg is not None:
        from omegaconf import OmegaConf

        model_cfg = OmegaConf.to_container(model_cfg, resolve=True) if OmegaConf.is_config(model_cfg) else dict(model_cfg)
    clip = _create_clip(name, pretrained, weights, model_cfg).eval()
    tokenizer = open_clip.get_tokenizer(name if model_cfg is None else "ViT-B-16")
    is_pretrained = model_cfg is None and (weights is not None or bool(pretrained))
    tag = "custom" if model_cfg is not None else (("file" if weights is not None else pretrained) or "random")
    return MaskCLIPBackbone(clip, f"maskclip_{name}.{tag}", tokenizer, pretrained=is_pretrained)
