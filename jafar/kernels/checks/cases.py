"""Seeded correctness cases of the Triton attention kernels, shared by the tests and the benchmark.

Each case builds ``q, k, f`` and an output gradient from a fixed seed (on the CPU, so every
device sees the same numbers), runs the kernels (forward and backward) in the requested dtype
and compares the output and the gradients of ``q``, ``k`` and ``f`` with the reference path
(``jafar.layers.attention.reference_attention``, the official materialising algorithm) evaluated in
float64 on the same inputs rounded to that dtype. The cases are the ones uniform random inputs
would not catch: peaked and very large logits (beyond float16's 65504 before and after
scaling), key and query counts that are not a multiple of any tile size, a single key, heads
that each peak on a different key, feature widths 64, 96 and 1536, head counts and widths that
are not powers of two, and 128x128 keys.

Error of one tensor: ``||x - ref|| / ||ref||``; where the reference is zero or below the smallest
normal number of the tested dtype (the query and key gradients of a single key, or of a
saturated softmax: about 1e-47 in the ``huge_logits`` case), ``||x||`` instead.

:data:`ENCODER_CASES` check the fused encoder kernels (``jafar.kernels.encoders``) the same way:
queries, keys and output of ``JAFAR(encoders="triton")`` against the PyTorch path in float64.

Used by ``tests/test_kernels.py`` (on the CPU through Triton's interpreter, ``TRITON_INTERPRET=1``,
and on CUDA) and by ``tools/benchmark.py --check`` (on the GPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Dict, List, Optional

import torch

from jafar.layers.attention import head_averaged_attention, reference_attention

#: input dtypes of the checks; "tf32" is float32 with TF32 matmuls allowed (CUDA only)
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: largest accepted error per dtype (the project's accuracy targets: < 1e-5 exact float32, about 1e-3 with TF32, < 1e-2 in
#: bf16); the tf32 inputs are TF32 numbers (:func:`round_to_tf32`), the kernels round their
#: intermediate products (probabilities, gradients) as bf16 rounds them, to 10 bits instead of 7
TOLERANCE = {"fp32": 1e-5, "tf32": 1e-2, "bf16": 1e-2, "fp16": 1e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    queries: int
    keys: int
    heads: int
    head_dim: int
    channels: int
    kind: str = "random"  # "random", "huge" or "disagree"
    logit_std: float = 1.0  # "random": standard deviation of the scaled logits
    #: tile sizes for Triton's interpreter, which pays per operation (the GPU uses the defaults)
    interpreter_blocks: Optional[dict] = None
    #: dtypes checked under Triton's interpreter, to keep CI's CPU time in seconds (all on the GPU)
    interpreter_dtypes: tuple = ("fp32", "bf16", "fp16")
    what: str = ""


CASES: List[Case] = [
    Case("plain", 2, 37, 11, 4, 16, 24, what="batch 2, nothing a multiple of a tile"),
    Case("ragged_keys", 1, 70, 77, 4, 32, 40, logit_std=2.0, interpreter_dtypes=("fp32", "bf16"),
         what="keys and queries across two tiles, the last partial"),
    Case("single_key", 1, 45, 1, 4, 16, 20, interpreter_dtypes=("fp32", "fp16"),
         what="one key: output = f, zero q/k gradients"),
    Case("peaked", 1, 33, 70, 2, 32, 48, logit_std=8.0, what="peaked softmax"),
    Case("huge_logits", 1, 21, 33, 4, 16, 32, kind="huge",
         what="|q|, |k| ~ 300: logits ~ 1e5 before and after scaling, beyond float16's 65504"),
    Case("heads_disagree", 1, 20, 17, 4, 16, 16, kind="disagree", interpreter_dtypes=("fp32", "bf16"),
         what="each head peaks on a different key"),
    Case("odd_heads", 1, 29, 19, 3, 8, 24, logit_std=2.0, interpreter_dtypes=("fp32", "bf16"),
         what="3 heads of width 8 (padded inside the kernel)"),
    Case("width_64", 1, 9, 20, 4, 32, 64, logit_std=2.0, interpreter_dtypes=("fp32",), what="feature width 64"),
    Case("width_96", 1, 9, 20, 4, 32, 96, logit_std=2.0, interpreter_dtypes=("fp32", "bf16"),
         what="feature width 96 (not a power of two)"),
    Case("width_1536", 1, 5, 20, 4, 32, 1536, logit_std=2.0, interpreter_dtypes=("fp32",),
         what="feature width 1536 (ViT-g)"),
    Case("channel_tiles", 2, 21, 19, 4, 16, 200, logit_std=3.0, interpreter_blocks=dict(block_c=64),
         what="200 channels in tiles of 64 (128 on the GPU), the last partial: pass 1 once, pass 2 per tile"),
    Case("keys_128x128", 1, 5, 128 * 128, 4, 32, 24, logit_std=4.0, interpreter_dtypes=("fp32",),
         interpreter_blocks=dict(block_m=16, block_n=4096, block_c=32), what="128x128 keys, few queries"),
]


def make_inputs(case: Case, dtype: torch.dtype, device="cpu", seed: int = 0, tf32: bool = False):
    """``q (B, Nq, H*d)``, ``k (B, Nk, H*d)``, ``f (B, Nk, C)``, ``grad_out (B, Nq, C)`` in ``dtype``
    (rounded to TF32 precision first with ``tf32``)."""
    g = torch.Generator().manual_seed(seed)
    b, nq, nk, h, d, c = case.batch, case.queries, case.keys, case.heads, case.head_dim, case.channels
    if case.kind == "huge":
        q = torch.randn(b, nq, h * d, generator=g) * 300
        k = torch.randn(b, nk, h * d, generator=g) * 300
    elif case.kind == "disagree":
        # unit keys per head; query i of head h is a multiple of key (i + h * step) of that head,
        # so each head's softmax peaks (scaled logit gap ~ 6) on a different key
        k = torch.randn(b, nk, h, d, generator=g)
        k = k / k.norm(dim=-1, keepdim=True)
        step = nk // h + 1
        target = (torch.arange(nq)[:, None] + step * torch.arange(h)[None, :]) % nk  # (Nq, H)
        q = 8.0 * math.sqrt(d) * k[:, target, torch.arange(h)[None, :]]  # (B, Nq, H, d)
        q = q + 0.1 * torch.randn(q.shape, generator=g)
        q, k = q.reshape(b, nq, h * d), k.reshape(b, nk, h * d)
    else:
        # q.k has standard deviation sqrt(d), the scale 1/sqrt(d): scaled logits ~ N(0, logit_std^2)
        q = torch.randn(b, nq, h * d, generator=g) * case.logit_std
        k = torch.randn(b, nk, h * d, generator=g)
    f = torch.randn(b, nk, c, generator=g)
    grad_out = torch.randn(b, nq, c, generator=g)
    if tf32:
        q, k, f, grad_out = (round_to_tf32(x) for x in (q, k, f, grad_out))
    return tuple(x.to(dtype).to(device) for x in (q, k, f, grad_out))


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to TF32's 10 mantissa bits (to nearest, ties away from zero, as the
    GPU's conversion does): the inputs of the ``tf32`` checks, so that the reference sees the
    numbers the tensor cores multiply and the errors measure the kernel, not the input rounding."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def head_targets(case: Case, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The key each head's softmax peaks on, ``(B, H, Nq)`` (to show that the heads disagree)."""
    h, d = case.heads, case.head_dim
    qh = q.double().view(q.shape[0], q.shape[1], h, d).transpose(1, 2)
    kh = k.double().view(k.shape[0], k.shape[1], h, d).transpose(1, 2)
    return (qh @ kh.transpose(-1, -2)).argmax(dim=-1)


def error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||``, or ``||x||`` where ``ref`` is below the smallest normal number of
    ``x``'s dtype (and of float32, in which the kernels compute)."""
    tiny = max(torch.finfo(x.dtype).tiny, torch.finfo(torch.float32).tiny)
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(x).all():
        return math.inf
    norm = ref.norm()
    if norm < tiny:  # zero, or not representable: a single key, a saturated softmax
        return x.norm().item()
    return ((x - ref).norm() / norm).item()


def run_case(case: Case, dtype_name: str, device="cpu", blocks: Optional[dict] = None,
             mode: str = "triton") -> Dict[str, float]:
    """Errors of the Triton forward and backward against the float64 reference: keys ``out``,
    ``dq``, ``dk``, ``df``. ``blocks`` overrides the tile sizes (then the kernels are called
    directly, otherwise through ``head_averaged_attention(mode=mode)``: another ``mode`` checks
    another path on the same cases)."""
    from jafar.kernels import attention as kernels

    dtype = DTYPES[dtype_name]
    q, k, f, go = make_inputs(case, dtype, device, tf32=dtype_name == "tf32")
    scale = 1.0 / math.sqrt(case.head_dim)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype_name == "tf32"
    try:
        if blocks:
            out, lse = kernels.head_averaged_attention_fwd(q, k, f, case.heads, scale, return_lse=True, **blocks)
            grads = kernels.head_averaged_attention_bwd(q, k, f, lse, go, case.heads, scale, **blocks)
        else:
            qg, kg, fg = (x.clone().requires_grad_() for x in (q, k, f))
            out = head_averaged_attention(qg, kg, fg, case.heads, scale, mode=mode)
            grads = torch.autograd.grad(out, (qg, kg, fg), go)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    qr, kr, fr = (x.detach().double().cpu().requires_grad_() for x in (q, k, f))
    ref = reference_attention(qr, kr, fr, case.heads, scale)
    ref_grads = torch.autograd.grad(ref, (qr, kr, fr), go.double().cpu())
    result = {"out": error(out, ref)}
    result.update({name: error(g, r) for name, g, r in zip(("dq", "dk", "df"), grads, ref_grads)})
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads), "the kernels keep the input dtype"
    return result


def module_case(device="cpu", dtype_name: str = "fp32", mode: str = "triton") -> Dict[str, float]:
    """A random JAFAR (4 heads of width 8, 48 channels, batch 2, 13x11 output from a 20x26 image and
    4x5 features): output and gradients of the image and the features with ``attention=mode``
    (float32, or bf16/fp16 autocast) against the module in float64 with ``attention="reference"``."""
    from jafar.upsamplers.jafar import JAFAR

    torch.manual_seed(0)
    model = JAFAR(v_dim=48, qk_dim=32, num_heads=4)
    with torch.no_grad():  # move every parameter off its initial value so that each matters
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    image, feats = torch.randn(2, 3, 20, 26, generator=g), torch.randn(2, 48, 4, 5, generator=g)
    weight = torch.randn(2, 48, 13, 11, generator=g)

    def run(m, dtype, attention, dev, amp=None):
        m = m.to(dev, dtype)
        m.attention = attention
        img = image.to(dev, dtype).clone().requires_grad_()
        ft = feats.to(dev, dtype).clone().requires_grad_()
        with torch.autocast(torch.device(dev).type, dtype=amp, enabled=amp is not None):
            out = m(img, ft, (13, 11))
        (out.to(dtype) * weight.to(dev, dtype)).sum().backward()
        return out.detach(), img.grad, ft.grad

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = dtype_name == "tf32"
    try:
        amp = None if dtype_name in ("fp32", "tf32") else DTYPES[dtype_name]
        ours = run(model, torch.float32, mode, device, amp)
        ref = run(model, torch.float64, "reference", "cpu")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    return {name: error(a, r) for name, a, r in zip(("out", "d_image", "d_features"), ours, ref)}


@dataclasses.dataclass(frozen=True)
class EncoderCase:
    """A random JAFAR whose encoders run as fused Triton kernels (``encoders="triton"``)."""

    name: str
    batch: int
    image: tuple
    output: tuple
    features: tuple
    qk_dim: int
    v_dim: int
    kernel_size: int = 1
    image_offset: float = 0.0  # added to the image: GroupNorm inputs whose mean dwarfs their spread
    image_std: float = 1.0
    what: str = ""


ENCODER_CASES: List[EncoderCase] = [
    EncoderCase("enc_plain", 2, (19, 21), (19, 21), (2, 3), 128, 24,
                what="the real width (128), batch 2, 399 pixels: 4 tiles, the last partial; output = image"),
    EncoderCase("enc_pooled", 1, (30, 26), (17, 13), (3, 2), 48, 40, kernel_size=3,
                what="width 48 (groups of 6, padded tiles), a 3x3 first conv (cuDNN), pooled queries"),
    EncoderCase("enc_offset", 1, (24, 24), (24, 24), (2, 2), 32, 16, image_offset=30.0, image_std=0.05,
                what="image 30 +- 0.05: GroupNorm statistics of values whose mean is ~600x their spread"),
]


def encoder_case(case: EncoderCase, device="cpu", dtype_name: str = "fp32") -> Dict[str, float]:
    """Errors of ``JAFAR(encoders="triton")`` (float32, TF32, or under bf16/fp16 autocast)
    against the PyTorch path in float64: at inference the queries, keys and output; in training
    (a weighted sum of the output, backward) the output and the gradients of the image, the
    features and every parameter (``d_params``: the largest); and (keys ``torch:...``) those of the
    PyTorch path in the same precision, for comparison."""
    from jafar.upsamplers.jafar import JAFAR

    torch.manual_seed(0)
    model = JAFAR(v_dim=case.v_dim, qk_dim=case.qk_dim, kernel_size=case.kernel_size, attention="chunked").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    image = case.image_offset + case.image_std * torch.randn(case.batch, 3, *case.image, generator=g)
    feats = torch.randn(case.batch, case.v_dim, *case.features, generator=g)
    weight = torch.randn(case.batch, case.v_dim, *case.output, generator=g)

    def infer(m, dtype, dev, encoders, amp=None):
        m = m.to(dev, dtype)
        m.encoders = encoders
        img, ft = image.to(dev, dtype), feats.to(dev, dtype)
        with torch.no_grad(), torch.autocast(torch.device(dev).type, dtype=amp, enabled=amp is not None):
            if encoders == "triton":
                q, k = m.encode_fused(img, ft, case.output)
            else:
                q, k = m.encode(img, ft, case.output)
            return q, k, m(img, ft, case.output)

    def train(m, dtype, dev, encoders, amp=None):
        m = m.to(dev, dtype)
        m.encoders = encoders
        m.zero_grad(set_to_none=True)
        img, ft = (t.to(dev, dtype).clone().requires_grad_() for t in (image, feats))
        with torch.autocast(torch.device(dev).type, dtype=amp, enabled=amp is not None):
            out = m(img, ft, case.output)
        (out.to(dtype) * weight.to(dev, dtype)).sum().backward()
        params = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
        m.zero_grad(set_to_none=True)
        return out.detach(), img.grad, ft.grad, params

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = dtype_name == "tf32"
    try:
        amp = None if dtype_name in ("fp32", "tf32") else DTYPES[dtype_name]
        runs = {name: (infer(model, torch.float32, device, name, amp), train(model, torch.float32, device, name, amp))
                for name in ("triton", "torch")}
        ref = infer(model, torch.float64, "cpu", "torch"), train(model, torch.float64, "cpu", "torch")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    result = {}
    for name, prefix in (("triton", ""), ("torch", "torch:")):
        (q, k, out), (tout, d_img, d_ft, params) = runs[name]
        (rq, rk, rout), (rtout, rd_img, rd_ft, rparams) = ref
        assert set(params) == set(rparams), "the same parameters get gradients"
        result.update({f"{prefix}queries": error(q, rq), f"{prefix}keys": error(k, rk), f"{prefix}out": error(out, rout),
                       f"{prefix}train_out": error(tout, rtout), f"{prefix}d_image": error(d_img, rd_img),
                       f"{prefix}d_features": error(d_ft, rd_ft),
                       f"{prefix}d_params": max(error(params[n], rparams[n]) for n in rparams)})
    return result


#: the Triton GroupNorm (``GroupNorm(impl="triton")``): (name, shape, groups, input offset, affine)
GN_CASES = [
    ("gn_plain", (2, 16, 7, 9), 8, 0.0, True, "batch 2, 63 pixels (one partial tile), affine"),
    ("gn_offset", (1, 48, 23, 31), 8, 30.0, True, "input 30 +- 0.5 over 713 pixels (3 tiles), groups of 6"),
    ("gn_no_affine", (2, 12, 5, 5), 3, 1.0, False, "3 groups of 4 channels, no affine (the queries' norm)"),
]


def group_norm_case(case, device="cpu", dtype_name: str = "fp32") -> Dict[str, float]:
    """Errors of the Triton GroupNorm's output and gradients (input, weight, bias) against
    ``nn.GroupNorm`` in float64 on the same rounded input, and (``torch:...``) those of
    ``nn.GroupNorm`` itself in that dtype (weights in float32, as under autocast)."""
    from jafar.layers.norm import GroupNorm

    name, shape, groups, offset, affine, _ = case
    torch.manual_seed(0)
    ref = torch.nn.GroupNorm(groups, shape[1], affine=affine)
    if affine:
        with torch.no_grad():
            ref.weight.normal_()
            ref.bias.normal_()
    g = torch.Generator().manual_seed(1)
    dtype = DTYPES[dtype_name]
    x = (torch.randn(shape, generator=g) * 0.5 + offset).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)

    def run(module, dev, dt):
        module = module.to(dev)
        xi = x.to(dev, dt).clone().requires_grad_()
        y = module(xi)
        y.backward(dy.to(dev, dt))
        out = [y, xi.grad] + ([module.weight.grad, module.bias.grad] if affine else [])
        module.zero_grad(set_to_none=True)
        return out

    ours = GroupNorm(groups, shape[1], affine=affine, impl="triton")
    ours.load_state_dict(ref.state_dict())
    mine = run(ours, device, dtype)
    native = torch.nn.GroupNorm(groups, shape[1], affine=affine)
    native.load_state_dict(ref.state_dict())
    theirs = run(native.to(dtype) if dtype_name in ("fp32", "tf32") else native, device, dtype) \
        if dtype_name in ("fp32", "tf32") else None
    if theirs is None:  # nn.GroupNorm with float32 weights on a half-precision input: as under autocast
        with torch.autocast(torch.device(device).type, dtype=dtype):
            theirs = run(native, device, dtype)
    exact = run(ref.double(), "cpu", torch.float64)
    names = ["y", "dx"] + (["dweight", "dbias"] if affine else [])
    result = {n: error(a, r) for n, a, r in zip(names, mine, exact)}
    result.update({f"torch:{n}": error(a, r) for n, a, r in zip(names, theirs, exact)})
    return result


def run_all(device="cpu", dtypes=("fp32", "bf16", "fp16"), cases: Optional[List[str]] = None,
            module: bool = True, interpreter: bool = False, encoders: bool = False) -> dict:
    """The cases (all, or those named) in ``dtypes`` (under the interpreter, each case's
    ``interpreter_dtypes`` among them), the module case and, with ``encoders``, the fused-encoder
    cases: ``{"case/dtype": {tensor: error}}``."""
    results = {}
    if encoders:
        for case in ENCODER_CASES:
            for dt in dtypes:
                if interpreter and dt == "fp16":  # fp16 on the GPU only (the interpreter's CPU time)
                    continue
                results[f"{case.name}/{dt}"] = encoder_case(case, device, dt)
        for case in GN_CASES:
            for dt in dtypes:
                results[f"{case[0]}/{dt}"] = group_norm_case(case, device, dt)
    for case in CASES:
        if cases is not None and case.name not in cases:
            continue
        for dt in dtypes:
            if interpreter and dt not in case.interpreter_dtypes:
                continue
            results[f"{case.name}/{dt}"] = run_case(case, dt, device, case.interpreter_blocks if interpreter else None)
    if module:
        for dt in dtypes:
            results[f"module/{dt}"] = module_case(device, dt)
    return results


def tolerance(key: str) -> float:
    """Tolerance of a result key ``"case/dtype"``: the module case runs the encoders in the autocast
    dtype too, as ``tests/test_model.py`` does (3e-2 there; 5e-2 for the gradients through them);
    so do the fused-encoder cases (the PyTorch path's own bf16 errors there: about 1e-2 for the
    output, up to 4e-2 for the parameters' gradients)."""
    name, dt = key.split("/")
    if name.startswith("enc_") and dt in ("bf16", "fp16"):
        return 5e-2
    if name.startswith("gn_"):
        return TOLERANCE[dt] if dt != "tf32" else 1e-5
    if name == "module" and dt in ("bf16", "fp16"):
        return 5e-2
    return TOLERANCE[dt]


def failures(results: dict) -> List[str]:
    """What exceeds its tolerance (the ``torch:`` entries, the PyTorch path's own errors, are not
    checked), and any fused-encoder result more than 1.5x less accurate than the PyTorch path in
    the same precision."""
    out = [f"{key} {t}: {e:.2e} > {tolerance(key):.0e}" for key, errs in results.items() for t, e in errs.items()
           if not t.startswith("torch:") and not e < tolerance(key)]
    out += [f"{key} {t}: {e:.2e} > 1.5 x the PyTorch path's {errs['torch:' + t]:.2e}"
            for key, errs in results.items() for t, e in errs.items()
            if f"torch:{t}" in errs and not e <= 1.5 * errs[f"torch:{t}"] + 1e-6]
    return out


def main(argv=None) -> None:
    """``python -m jafar.kernels.checks.cases [--device D] [--dtypes ...] [--cases ...] [--no-module]``: the
    errors as JSON on the last line (under ``TRITON_INTERPRET=1``: the interpreter's tile sizes)."""
    import argparse

    from . import interpreter

    interpreter.apply()

    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "fp16"], choices=list(DTYPES))
    p.add_argument("--cases", nargs="*", default=None, help="case names (none: only the module case)")
    p.add_argument("--no-module", action="store_true")
    p.add_argument("--encoders", action="store_true",
                   help="also the fused-encoder and Triton GroupNorm cases (ENCODER_CASES, GN_CASES)")
    args = p.parse_args(argv)
    print(json.dumps(run_all(args.device, args.dtypes, args.cases, not args.no_module, interpreter.interpreting(),
                             args.encoders)))


if __name__ == "__main__":
    main()
