"""Lean recompute: a checkpointed layer's recompute skips the products that nothing in the backward pass reads.

tunesmith's checkpoint function (:mod:`.offload`) runs each decoder layer twice: without gradients in the forward
pass, and again from its saved input in the backward pass, whose output is then only the root of that layer's
backward pass — its values are never read. In a layer of the form ``h = x + attn(norm(x)); return h + mlp(norm(h))``
(``_RESIDUAL_MLP_LAYERS``) the MLP's down projection feeds nothing but that output, and its gradients need its
weight, its input and (LoRA) ``x A^T``, never its product. So in the recompute it skips the product: over a quarter
of a layer's recompute matmuls (27-29 % on InternLM2-1.8B, Qwen2.5-0.5B and 7B), and in QLoRA the dequantisation of
its weight. Measured on Qwen2.5-7B LoRA: +8 % tokens/s (bench/RESULTS.md, eighth run).

The attention's projections can skip their products in the recompute too, if the forward pass keeps a little
more (``TUNESMITH_KEEP_ATTENTION``): the outputs of the query, key and value projections, and the residual
``h = x + attn`` that the post-attention norm reads — the one thing the output projection's product reaches in the
recompute. These are kept in host memory beside the layer's input (:func:`.offload.keep`); the recompute takes the
kept values in place of the products (:class:`_Kept`: the kept values, the recomputed tensor's gradient path), and
the four projections skip their products as the down projection does. Per layer it saves the attention's matmuls
(about 7 % of a Qwen2.5-7B layer's), and in QLoRA their dequantisation, for about 2 x tokens x (2 hidden + 2
key/value width) of GPU memory in the backward pass and that much more host-device traffic. Measured on
Qwen2.5-7B (H200, bench/RESULTS.md, eleventh run): LoRA +3 % tokens/s (13,696 against 13,295, 58.7 % MFU), QLoRA
+2 %, for +0.25 / +0.11 GiB. On by default from a hidden size of ``KEEP_MIN_HIDDEN`` (3072: 3B-class models and up;
not yet measured below, where steps are more often bound by the host); ``TUNESMITH_KEEP_ATTENTION=1`` forces it at
any size, ``=0`` turns it off. With it, the attention kernel's output is kept too (see ``KEEP_OUT`` below): the
recompute then runs no attention kernel either (+0.9 % LoRA, +1.2 % QLoRA on Qwen2.5-7B, twelfth run).

Which module does what:
- a LoRA down (or attention) projection (:mod:`.lora`) skips its base product and returns its LoRA term;
- a plain one (full fine-tuning, or LoRA that does not target it; bf16 or NF4) runs :class:`_LeanLinear`, which
  returns a slice of its input and writes the gradients out: input ``g W``, weight ``g^T x`` when trained, bias.

What comes back in place of the product has the right shape and other values, and must be computed from the
module's input: returned as zeros, Inductor's partitioner moved the whole recomputed MLP into the backward graph,
where it held two more tokens x intermediate-size buffers at the peak (+0.58 GiB on 7B LoRA, eighth run).

Reference: the same layers with the full recompute (``tests/test_kernels.py``: loss and every gradient, eager and
compiled; the FLOP count drops by the skipped products). ``TUNESMITH_LEAN_RECOMPUTE=0`` turns it all off.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from . import ORIG, offload, swap_forward

UNUSED = "_tunesmith_output_unused"  # set on modules whose output only feeds the decoder layer's output
KEPT = "kept"  # UNUSED's value on an attention projection: a kept value stands in for its product
HOOK = "_tunesmith_keep_hook"  # the keeping hook's handle (a query/key/value projection, a post-attention norm)
_RESIDUAL_MLP_LAYERS = {"LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer", "MistralDecoderLayer"}
stats = {"unused": 0, "marked": 0, "kept": 0}  # eager module calls that skipped their product; modules marked;
# attention projections among them (tests, bench)
# Keeping the attention's values costs about 2 x tokens x (2 hidden + 2 key/value width) of GPU memory in the
# backward pass (the kept values of the layer being recomputed and of the one prefetched) and saves the four
# attention products a layer: taken where they are large (measured on 7B, hidden 3584); below, steps are more
# often bound by the host than by the GPU's matmuls (bench/RESULTS.md), and the memory is a larger share of a small
# peak.
KEEP_MIN_HIDDEN = 3072
KEEP_BY_DEFAULT = True


def skip(module: nn.Module) -> bool:
    """`module` is marked and its layer is being recomputed: its product is not needed. Counted outside traced code
    only (a counter read inside a compiled layer makes Dynamo guard on it and recompile on every call)."""
    mark = getattr(module, UNUSED, False)
    # an attention projection: only while a kept value waits to stand in for its product
    unused = bool(mark) and offload.replaying() and (mark is not KEPT or offload.has_kept())
    if unused and not torch.compiler.is_compiling():
        stats["unused"] += 1
    return unused


def _plain_linear(m: nn.Module) -> bool:
    """A plain linear layer (trained or frozen) or a bitsandbytes NF4 one: the LoRA function's bases, and trained
    plain layers (full fine-tuning)."""
    from .lora import _plain_base  # (lora imports this module)

    return type(m) is nn.Linear or _plain_base(m)


class _LeanLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, base, cd):
        out_f = base.out_features
        x2 = x.reshape(-1, x.shape[-1]).to(cd)
        ctx.save_for_backward(x2 if weight is not None else None)
        ctx.base, ctx.cd, ctx.x_shape, ctx.x_dtype = base, cd, x.shape, x.dtype
        ctx.w_dtype = None if weight is None else weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        return x2[:, :out_f].clone().view(*x.shape[:-1], out_f)  # made from x: see the module's docstring

    @staticmethod
    def backward(ctx, g):
        from .lora import _dequant

        (x2,) = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1]).to(ctx.cd)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ _dequant(ctx.base, ctx.cd)).view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g2.t() @ x2).to(ctx.w_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g2.sum(0).to(ctx.b_dtype)
        return grad_x, grad_w, grad_b, None, None


def _lean_forward(self, x, *args, **kwargs):
    """Replaces a marked plain down projection's forward: its own, except in a recompute."""
    if args or kwargs or not skip(self):
        return getattr(self, ORIG)(x, *args, **kwargs)
    dev = x.device.type
    w = self.weight
    if torch.is_autocast_enabled(dev):
        cd = torch.get_autocast_dtype(dev)
    elif getattr(w, "quant_state", None) is not None:  # NF4: computes in its compute dtype, or the input's
        cd = getattr(self, "compute_dtype", None) or x.dtype
    else:
        cd = torch.promote_types(x.dtype, w.dtype)
    bias = self.bias if self.bias is not None and self.bias.requires_grad else None
    with torch.autocast(dev, enabled=False):
        return _LeanLinear.apply(x, w if w.requires_grad else None, bias, self, cd)


class _Kept(torch.autograd.Function):
    """``kept``'s values with ``h``'s gradient path: the recompute's stand-in input becomes the kept one exactly
    (``h + (kept - h).detach()`` would round), and the gradient reaches ``h`` unchanged."""

    @staticmethod
    def forward(ctx, h, kept):
        return kept.view_as(kept)  # no copy: nothing writes to these values in place

    @staticmethod
    def backward(ctx, g):
        return g, None


def _keep_or_take(t: torch.Tensor) -> torch.Tensor | None:
    """Inside checkpointed layer calls only: in the forward pass, keep `t` (None back: `t` stays as it is); in the
    recompute, the kept value in its place, with `t`'s gradient path (:class:`_Kept`), if one waits."""
    if not offload._state.in_layer:
        return None
    if not offload.replaying():
        offload.keep(t)
        return None
    return _Kept.apply(t, offload.kept(t)) if offload.has_kept() else None


def _keep_hook(norm: nn.Module, args):
    """Forward pre-hook of a post-attention norm: its input (the residual stream after attention) kept, then fed
    back in the recompute (:func:`_keep_or_take`). The attention output projection, whose product is only ever read
    through that input, then skips it (:func:`skip`)."""
    h = _keep_or_take(args[0]) if args else None
    return None if h is None else (h, *args[1:])


def _keep_output_hook(proj: nn.Module, args, out):
    """Forward hook of a query/key/value projection: its output kept, then read back in the recompute in place of
    the product it skipped (:func:`_keep_or_take`)."""
    return _keep_or_take(out) if isinstance(out, torch.Tensor) else None


def _mark(proj: nn.Module, value) -> bool:
    """Mark `proj` (a LoRA layer, or a plain one no wider out than in) as skipping its product in the recompute:
    `value` True (its output is never read there) or KEPT (a kept value stands in for it)."""
    if hasattr(proj, ORIG):
        pass  # a LoRA layer routed through the LoRA function
    elif not (_plain_linear(proj) and proj.in_features >= proj.out_features and swap_forward(proj, _lean_forward)):
        return False
    setattr(proj, UNUSED, value)
    if value is KEPT:
        stats["kept"] += 1
    return True


def _keep_attention(layer: nn.Module) -> int:
    """Where on (see the module): mark `layer`'s attention projections, hook them (query/key/value: their outputs
    are kept) and the post-attention norm (its input is kept, for the output projection). Returns how many."""
    attn = getattr(layer, "self_attn", None)
    norm = getattr(layer, "post_attention_layernorm", None)
    o = getattr(attn, "o_proj", None)
    if o is None or not isinstance(norm, nn.Module) or getattr(o, UNUSED, False):
        return 0
    env = os.environ.get("TUNESMITH_KEEP_ATTENTION")
    if env != "1" and (env == "0" or not KEEP_BY_DEFAULT or getattr(o, "in_features", 0) < KEEP_MIN_HIDDEN):
        return 0
    n = 0
    for name in ("q_proj", "k_proj", "v_proj"):
        proj = getattr(attn, name, None)
        if isinstance(proj, nn.Module) and _mark(proj, KEPT):
            setattr(proj, HOOK, proj.register_forward_hook(_keep_output_hook))
            n += 1
    if _mark(o, KEPT):
        setattr(norm, HOOK, norm.register_forward_pre_hook(_keep_hook))
        n += 1
    if n == 4 and _keep_output_wanted():  # the kernel output too (see KEEP_OUT): checked on the device later
        setattr(attn, KEEP_OUT, True)
    return n


# --- The attention itself skipped in the recompute (``TUNESMITH_KEEP_ATTENTION_OUTPUT``) ----------------------------
# With the projections' values kept, what the recompute still runs of the attention half is the attention kernel's
# forward pass (~0.3 ms a Qwen2.5-7B layer on an H200), whose output only feeds the output projection's LoRA term and
# the attention's own backward pass. Keeping that output and its log-sum-exp too (tokens x hidden x 2 bytes and
# tokens x heads x 4 a layer, in host memory beside the rest) lets the recompute put an autograd node in its place
# (:class:`_KeptAttention`) whose backward pass is the attention kernel's own. Full rows only (packed rows keep the
# variable-length kernel's recompute); causal, no dropout. The kernels: cuDNN's attention on CUDA (what PyTorch's SDPA
# picks on Hopper), PyTorch's CPU flash attention on the CPU (tests). Called directly, so SDPA's own checks are
# repeated here: no cuDNN where it is turned off or deterministic algorithms are asked for, and with a cuDNN up to 9.15
# only for query lengths that are multiples of 128 (shorter tails read out of bounds there); a probe at set-up
# compares the pair's output and gradients with SDPA's for each head layout, inputs laid out as in training.
KEEP_OUT = "_tunesmith_keep_attention_output"  # set on an attention module whose kernel output is kept
KEEP_OUTPUT_BY_DEFAULT = True  # with the projections' values (bench/RESULTS.md, twelfth run); the variable: 1 on, 0 off


def _keep_output_wanted() -> bool:
    env = os.environ.get("TUNESMITH_KEEP_ATTENTION_OUTPUT")
    return env == "1" or (env != "0" and KEEP_OUTPUT_BY_DEFAULT)


class _KeepOutState:
    cudnn_any_length = False  # cuDNN newer than 9.15: any query length (older ones read out of bounds unless % 128)


_keep_out = _KeepOutState()


def _repeat_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    from transformers.integrations.sdpa_attention import repeat_kv

    return repeat_kv(t, heads // t.shape[1])


def _attn_fwd(q, k, v, scale):
    """Causal attention over (batch, heads, seq, dim) tensors: (output, log-sum-exp)."""
    if q.is_cuda:
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)
        return r[0], r[1]
    h = q.shape[1]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, _repeat_kv(k, h), _repeat_kv(v, h), 0.0, True,
                                                                      scale=scale)


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`t` in `ref`'s memory layout (a copy only where they differ). cuDNN caches its backward graph by the query,
    key and value's sizes and strides alone, so the output and its gradient must come laid out as the query, as in
    PyTorch's own cuDNN attention."""
    return t if t.stride() == ref.stride() else torch.empty_like(ref).copy_(t)


def _attn_bwd(g, q, k, v, out, lse, scale):
    """The gradients of :func:`_attn_fwd`'s inputs from its output's gradient `g`."""
    if q.is_cuda:
        z = torch.empty((), dtype=torch.int64, device=q.device)  # dropout's RNG state: unused without dropout
        s = q.shape[2]
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            _like(g, q), q, k, v, _like(out, q), lse, z, z, None, None, None, s, s, 0.0, True, scale=scale)
    h, hk = q.shape[1], k.shape[1]
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        g, q, _repeat_kv(k, h), _repeat_kv(v, h), out, lse, 0.0, True, scale=scale)
    if hk != h:  # the repeated heads' gradients summed back into their key/value head
        dk, dv = (t.view(t.shape[0], hk, h // hk, *t.shape[2:]).sum(2) for t in (dk, dv))
    return dq, dk, dv


class _KeptAttention(torch.autograd.Function):
    """The kept attention output (batch, seq, heads, dim) in place of the recomputed one; its backward pass is the
    kernel's, from the recomputed query/key/value and the kept output and log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, out, lse, scale):
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _attn_bwd(g.transpose(1, 2), q, k, v, out.transpose(1, 2), lse, ctx.scale)
        return dq, dk, dv, None, None, None


def keeps_attention_output(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Called by tunesmith's attention function (:mod:`.attention`) for a plain causal full-row call (no sample
    boundaries, no mask, no dropout): whether this call runs :func:`kept_attention`."""
    if not (getattr(module, KEEP_OUT, False) and offload._state.in_layer and query.dtype == key.dtype == value.dtype):
        return False
    if query.device.type == "cpu":
        return True
    s = query.shape[2]
    return (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and s > 1
            and (s % 128 == 0 or _keep_out.cudnn_any_length))


def kept_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale) -> torch.Tensor:
    """Causal attention of a checkpointed layer call, (batch, seq, heads, dim) out: in the forward pass computed and
    its output and log-sum-exp kept; in the recompute taken from what was kept (:class:`_KeptAttention`)."""
    if not offload.replaying():
        out, lse = _attn_fwd(query, key, value, scale)
        out = out.transpose(1, 2)
        offload.keep(out)
        offload.keep(lse)
        return out
    b, h, s, d = query.shape
    out = offload.take((b, s, h, d), query.dtype)
    lse = offload.take(None, torch.float32)
    return _KeptAttention.apply(query, key, value, out, lse, scale)


def _attention_ops_work(device: torch.device, heads: int, kv_heads: int, dim: int) -> bool:
    """The kernels above run here for these head counts and give SDPA's output and gradients (fp32 autograd as the
    reference), with inputs laid out as in training: (batch, seq, heads, dim) memory seen as (batch, heads, seq, dim),
    value apart from key."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    s = 256 if device.type == "cuda" and not _keep_out.cudnn_any_length else 200
    try:
        g = torch.Generator(device=device).manual_seed(0)

        def make(h):
            return torch.randn(2, s, h, dim, device=device, dtype=dtype, generator=g).transpose(1, 2)

        q, k, v, go = make(heads), make(kv_heads), make(kv_heads), make(heads)
        ref_in = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
        ref = torch.nn.functional.scaled_dot_product_attention(
            ref_in[0], _repeat_kv(ref_in[1], heads), _repeat_kv(ref_in[2], heads), is_causal=True)
        ref.backward(go.float())
        out, lse = _attn_fwd(q, k, v, None)
        kept = out.transpose(1, 2).contiguous()  # as kept: (batch, seq, heads, dim)
        got = _attn_bwd(go, q, k, v, kept.transpose(1, 2), lse, None)
        tol = 2e-2 if dtype != torch.float32 else 1e-4  # relative to the reference's norm (bf16 gives ~4e-3)

        def close(a, b):
            return a.shape == b.shape and float((a.float() - b).norm()) <= tol * float(b.norm())

        return close(out, ref.detach()) and all(close(a, b.grad) for a, b in zip(got, ref_in))
    except Exception:  # noqa: BLE001 — no such kernel here: the attention is recomputed as before
        return False


def check_attention_output(model: nn.Module, device: torch.device, usable: bool = True) -> int:
    """Keep the attention output only where the kernels work on `device` (one probe per head layout) and tunesmith's
    attention function runs (`usable`); unmark the rest. Returns how many attention modules keep it."""
    if device.type == "cuda":
        cudnn = torch.backends.cudnn.version() or 0
        _keep_out.cudnn_any_length = cudnn > 91500
        # as SDPA would: cuDNN attention turned off, or deterministic algorithms asked for, means no cuDNN here
        usable = usable and torch.backends.cuda.cudnn_sdp_enabled() and not torch.are_deterministic_algorithms_enabled()
    works: dict = {}
    n = 0
    for m in model.modules():
        if not getattr(m, KEEP_OUT, False):
            continue
        cfg = getattr(m, "config", None)
        heads = getattr(cfg, "num_attention_heads", 0)
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        q_out = getattr(getattr(m, "q_proj", None), "out_features", 0)
        dim = getattr(m, "head_dim", None) or (q_out // heads if heads else 0)
        key = (heads, kv, dim)
        if usable and key not in works:
            works[key] = bool(heads and dim) and _attention_ops_work(device, heads, kv, dim)
        if works.get(key):
            n += 1
        else:
            delattr(m, KEEP_OUT)
    return n


def mark_unused_outputs(model: nn.Module) -> int:
    """Mark the MLP down projections of `model`'s decoder layers of a known residual form: LoRA ones patched by
    :func:`.lora.patch_lora` (call this after it), plain or NF4 ones (their forward is routed through
    `_lean_forward`); and, where on, the attention projections (:func:`_keep_attention`). Returns how many were
    marked."""
    if os.environ.get("TUNESMITH_LEAN_RECOMPUTE") == "0":
        return 0
    n = 0
    for layer in model.modules():
        if type(layer).__name__ not in _RESIDUAL_MLP_LAYERS:
            continue
        down = getattr(getattr(layer, "mlp", None), "down_proj", None)
        if down is not None and not getattr(down, UNUSED, False) and _mark(down, True):
            n += 1
        n += _keep_attention(layer)
    stats["marked"] += n
    return n
