"""Lean recompute: a checkpointed layer's recompute skips the products that nothing in the backward pass reads.

tunesmith's checkpoint function (:mod:`.offload`) runs each decoder layer twice: without gradients in the forward
pass, and again from its saved input in the backward pass, whose output is then only the root of that layer's
backward pass — its values are never read. In a layer of the form ``h = x + attn(norm(x)); return h + mlp(norm(h))``
(``_RESIDUAL_MLP_LAYERS``) the MLP's down projection feeds nothing but that output, and its gradients need its
weight, its input and (LoRA) ``x A^T``, never its product. So in the recompute it skips the product: over a quarter
of a layer's recompute matmuls (27-29 % on InternLM2-1.8B, Qwen2.5-0.5B and 7B), and in QLoRA the dequantisation of
its weight. Measured on Qwen2.5-7B LoRA: +8 % tokens/s (bench/RESULTS.md, eighth run).

Which module does what:
- a LoRA down projection (:mod:`.lora`) skips its base product and returns its LoRA term;
- a plain one (full fine-tuning, or LoRA that does not target it; bf16 or NF4) runs :class:`_LeanLinear`, which
  returns a slice of its input and writes the gradients out: input ``g W``, weight ``g^T x`` when trained, bias.

What comes back in place of the product has the right shape and other values, and must be computed from the
module's input: returned as zeros, Inductor's partitioner moved the whole recomputed MLP into the backward graph,
where it held two more tokens x intermediate-size buffers at the peak (+0.58 GiB on 7B LoRA, eighth run).

Reference: the same layers with the full recompute (``tests/test_kernels.py``: loss and every gradient, eager and
compiled; the FLOP count drops by the skipped products). ``TUNESMITH_LEAN_RECOMPUTE=0`` turns it off.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from . import ORIG, offload, swap_forward

UNUSED = "_tunesmith_output_unused"  # set on modules whose output only feeds the decoder layer's output
_RESIDUAL_MLP_LAYERS = {"LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer", "MistralDecoderLayer"}
stats = {"unused": 0, "marked": 0}  # eager module calls that skipped their product; modules marked (tests, bench)


def skip(module: nn.Module) -> bool:
    """`module` is marked and its layer is being recomputed: its product is not needed. Counted outside traced code
    only (a counter read inside a compiled layer makes Dynamo guard on it and recompile on every call)."""
    unused = getattr(module, UNUSED, False) and offload.replaying()
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


def mark_unused_outputs(model: nn.Module) -> int:
    """Mark the MLP down projections of `model`'s decoder layers of a known residual form: LoRA ones patched by
    :func:`.lora.patch_lora` (call this after it), plain or NF4 ones (their forward is routed through
    `_lean_forward`). Returns how many were marked."""
    if os.environ.get("TUNESMITH_LEAN_RECOMPUTE") == "0":
        return 0
    n = 0
    for layer in model.modules():
        if type(layer).__name__ not in _RESIDUAL_MLP_LAYERS:
            continue
        down = getattr(getattr(layer, "mlp", None), "down_proj", None)
        if down is None or getattr(down, UNUSED, False):
            continue
        if hasattr(down, ORIG):  # a LoRA layer routed through the LoRA function
            setattr(down, UNUSED, True)
            n += 1
        elif _plain_linear(down) and down.in_features >= down.out_features and swap_forward(down, _lean_forward):
            setattr(down, UNUSED, True)
            n += 1
    stats["marked"] += n
    return n
