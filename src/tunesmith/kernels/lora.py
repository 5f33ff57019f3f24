"""A LoRA linear layer as one autograd function: ``y = x W^T (+ b) + s · (x A^T) B^T``.

PEFT's LoRA forward casts the input to the adapter's fp32 dtype, runs A and B as separate modules, scales and
adds — a handful of full-activation elementwise kernels per layer and an fp32 copy of the input kept for the
backward pass. Here the frozen base matmul and the low-rank update are three matmuls (the update added with
``addmm_``), only ``x`` and the small ``x A^T`` are saved, and the backward pass is written out:

    dB = s · g^T (x A^T)      dA = s · (g B)^T x      dx = g W + s · (g B) A

LoRA dropout (``lora.dropout > 0``) applies to the adapter's input only, as in PEFT: ``x`` above becomes
``m ⊙ x / (1 - p)`` with a keep mask ``m`` that is a pure function of a key and the element's index
(:func:`keep_mask`), made again in the backward pass instead of kept. The key is a random seed per decoder-layer
call (drawn by tunesmith's checkpoint function, so the recompute uses the same one; drawn here otherwise) mixed
with the module's place in the layer. So the masks do not depend on the order in which random ops run: inside
compiled layers Inductor may order them differently in the forward graph and in the recompute graph (seen on the
CPU), which would pair each output with a different mask in the backward pass.

The base weight may be a plain (frozen) tensor or a bitsandbytes NF4 ``Params4bit``, dequantised in the forward
pass and again in the backward pass (nothing dequantised is kept). Adapters keep fp32 master weights; the
matmuls run in the autocast dtype. Any layer this does not cover (several active adapters, DoRA, merged weights,
another dropout or base layer type) keeps PEFT's own forward. The reference is PEFT itself
(``tests/test_kernels.py``: outputs and every gradient compared).
"""

from __future__ import annotations

import re
import zlib

import torch
import torch.nn as nn

from . import lean, offload, restore_forwards, swap_forward
from .fused import _fn

try:  # the Triton NF4 kernel (CUDA builds of torch ship Triton)
    from . import nf4 as _nf4
except ImportError:
    _nf4 = None
# Where the Triton kernel is used: weights joined to a LoRA factor in compiled layers (Inductor's fused dequantise +
# concatenate ran at a fraction of its plain dequantisation's speed: ~300 us for 7B's gate/up), and only large ones
# (7B's MLP: 68M values). Each call of the op costs more on the CPU than Inductor's own kernels, and the smaller
# models are bound by the CPU: the kernel everywhere made the 1.8B and 0.5B QLoRA rows 12-22 % slower (seventh run).
_NF4_KERNEL_MIN = 1 << 25


def nf4_dequant_torch(packed: torch.Tensor, qs, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' NF4 dequantisation (double-quantised absmax included) written as plain tensor ops.

    Two 4-bit codes a byte, the first in the high nibble; each block of ``qs.blocksize`` values is scaled by its
    absmax, itself stored as 8 bits (``qs.state2``: a 256-entry code, one fp32 scale per ``state2.blocksize``
    absmax values, plus ``qs.offset``). Eagerly this is several kernels; inside a compiled layer Inductor fuses
    it into one, where bitsandbytes' two ops cost ~65 µs of Python each per call (profiled: ~45 ms a step on the
    0.5B QLoRA row). Equal to ``bitsandbytes.functional.dequantize_4bit`` (tests/test_kernels.py).
    """
    absmax = qs.absmax
    if qs.nested:
        s2 = qs.state2
        i = torch.arange(absmax.numel(), device=absmax.device) // s2.blocksize
        absmax = s2.code[absmax.long()] * s2.absmax[i] + qs.offset
    p = packed.reshape(-1)
    idx = torch.stack((p >> 4, p & 15), -1).reshape(-1)
    vals = qs.code[idx.long()].view(-1, qs.blocksize) * absmax.float()[:, None]
    return vals.to(qs.dtype).to(dtype).view(qs.shape)  # via the weight's own dtype, as bitsandbytes returns it


def _dequant(base: nn.Module, dtype: torch.dtype, extra: torch.Tensor | None = None, dim: int = 1) -> torch.Tensor:
    """The base weight in `dtype`; with `extra`, joined to it along `dim` (``[W | extra]`` or ``[W ; extra]``)."""
    w = base.weight
    qs = getattr(w, "quant_state", None)
    if qs is not None:
        data = w.data if hasattr(w, "data") else w
        if (extra is not None and _nf4 is not None  # `extra`: a joined matmul, compiled layers only
                and qs.shape[0] * qs.shape[1] >= _NF4_KERNEL_MIN and _nf4.supported(qs, data, dtype)):
            return _nf4.dequant(data, qs, dtype, extra, dim)  # one Triton kernel, writing into the joined matrix
        # rows a whole number of blocks (every real model's hidden sizes): bitsandbytes' CPU backend lays out
        # blocks that straddle rows differently from its CUDA kernels, and this follows the CUDA layout
        if (torch.compiler.is_compiling() and qs.quant_type == "nf4" and qs.shape[-1] % qs.blocksize == 0
                and data.dtype == torch.uint8):
            w = nf4_dequant_torch(data, qs, dtype)  # fused by Inductor into the layer's graph
        else:
            import bitsandbytes.functional as bnbf

            w = bnbf.dequantize_4bit(data, qs).to(dtype)
    else:
        w = w.to(dtype)
    return w if extra is None else torch.cat((w, extra), dim)


_M32 = 0xFFFFFFFF


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift / multiply rounds) on int64 tensors holding values below 2**32; the
    multipliers are below 2**31, so no product leaves int64."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _M32
    h = h ^ (h >> 15)
    h = (h * 0x2C1B3C6D) & _M32
    return h ^ (h >> 16)


def keep_mask(shape: tuple[int, ...], key: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout's keep mask (True with probability ``1 - p``) as a pure function of ``key`` (a 0-d int64 tensor
    below 2**31) and each element's index: the same on every call, in eager or compiled code, on any device."""
    n = 1
    for d in shape:
        n *= d
    idx = torch.arange(n, device=key.device, dtype=torch.int64)
    k = _mix32((key + (idx >> 32)) & _M32)  # index bits above 32 go into the key: masks of any size
    h = _mix32(_mix32((idx & _M32) ^ k) ^ k)
    return (h < int((1.0 - p) * 2 ** 32)).view(shape)


def _keep(shape: tuple[int, ...], key: torch.Tensor, p: float) -> torch.Tensor:
    """:func:`keep_mask`, compiled into one kernel on CUDA outside compiled layers: eagerly it would hold several
    int64 temporaries the size of the input (inside compiled layers Inductor fuses it with the layer)."""
    return _fn("keep_mask", keep_mask, key.device)(shape, key, p)


def dropout_key(device: torch.device, salt: int) -> torch.Tensor:
    """The key of one module call: the decoder layer's seed when tunesmith's checkpoint function set one (it
    sets the same one again for the recompute), else a fresh draw from the device's generator (replayed by
    torch's own checkpointing); mixed with `salt`, the module's place in the layer."""
    seed = offload.layer_seed(device)
    if seed is None:
        seed = torch.randint(0, 2 ** 31, (), device=device, dtype=torch.int64)
    return _mix32(seed ^ salt) & 0x7FFFFFFF


# Inside compiled layers, where a LoRA term is as wide as the product it is added to, both run as one matmul over
# the joined inner dimension: x W^T + (s xA^T) B^T = [x | s xA^T] [W | B]^T in the forward pass of a layer whose
# output is wider than its input (gate/up), g W + (s gB) A = [g | s gB] [W ; A] for the input gradient of one whose
# input is wider (down, k/v). Traced, the in-place addmm_ of the eager path becomes a copy, and the plain sum holds
# two outputs at once: the down projection's input gradient (tokens x intermediate size) was two such buffers at
# the backward pass's peak (bench/RESULTS.md, sixth run). Joined, the temporaries are the narrow joined inputs,
# and the sum accumulates in fp32 inside the one GEMM.


SALT = "_tunesmith_dropout_salt"


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, bias, base, scaling, cd, p, key, unused=False):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(cd)
        ac, bc = a.to(cd), b.to(cd)
        out_f, in_f = base.out_features, base.in_features
        joined = torch.compiler.is_compiling() and out_f > in_f  # output wider than input (gate/up): see above
        w = None if joined or unused else _dequant(base, cd)
        mask = None
        if p > 0.0:  # LoRA dropout on the adapter's input only (the base sees x as is), as PEFT does
            mask = _keep(tuple(x2.shape), key, p)
            xd = x2 * mask * (1.0 / (1.0 - p))
        else:
            xd = x2
        xa = xd @ ac.t()
        if unused:  # a recompute that never reads this output (kernels/lean.py): no base product; the LoRA term,
            y = xa @ bc.t()  # made from x, stands in for it
        elif not torch.compiler.is_compiling():
            y = x2 @ w.t()
            w = None  # a dequantised NF4 weight: free it before the adapter's matmuls
            if bias is not None:
                y += bias.to(cd)
            y.addmm_(xa, bc.t(), alpha=scaling)
        else:
            if joined:  # one GEMM over [x | s xA^T] and [W | B], dequantised straight into the joined matrix
                y = torch.cat((x2, xa * scaling), 1) @ _dequant(base, cd, bc, 1).t()
            else:  # a plain add fuses with the bias into one kernel
                y = x2 @ w.t() + (xa @ bc.t()) * scaling
            if bias is not None:
                y = y + bias.to(cd)
        w = None
        ctx.save_for_backward(xd, xa, ac, bc, key if mask is not None else None)  # the mask is made again
        ctx.base, ctx.scaling, ctx.cd, ctx.p = base, scaling, cd, p
        ctx.x_dtype, ctx.a_dtype, ctx.b_dtype = x.dtype, a.dtype, b.dtype
        ctx.x_shape, ctx.w_shape = shape, (out_f, in_f)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        xd, xa, ac, bc, key = ctx.saved_tensors
        mask = None if key is None else _keep(tuple(xd.shape), key, ctx.p)
        s = ctx.scaling
        g2 = g.reshape(-1, g.shape[-1]).to(ctx.cd)
        gb = g2 @ bc  # n x r
        grad_a = grad_b = grad_x = None
        if ctx.needs_input_grad[2]:
            grad_b = (g2.t() @ xa).mul_(s).to(ctx.b_dtype)
        if ctx.needs_input_grad[1]:
            grad_a = (gb.t() @ xd).mul_(s).to(ctx.a_dtype)
        if ctx.needs_input_grad[0]:
            out_f, in_f = ctx.w_shape
            if mask is None and torch.compiler.is_compiling() and in_f > out_f:  # see forward
                grad_x = torch.cat((g2, gb * s), 1) @ _dequant(ctx.base, ctx.cd, ac, 0)
            elif mask is None and torch.compiler.is_compiling():
                grad_x = g2 @ _dequant(ctx.base, ctx.cd) + (gb @ ac) * s
            else:
                w = _dequant(ctx.base, ctx.cd)
                grad_x = g2 @ w
                if mask is None:
                    grad_x.addmm_(gb, ac, alpha=s)
                else:
                    grad_x += (gb @ ac).mul_(mask).mul_(s / (1.0 - ctx.p))
                del w
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, grad_a, grad_b, None, None, None, None, None, None, None


def lora_linear(x, a, b, bias, base, scaling, dropout: float = 0.0, salt: int = 0, unused: bool = False):
    """``x W^T (+ bias) + scaling · (dropout(x) A^T) B^T`` with the backward pass written out (see the module).

    `salt`: the module's place in its decoder layer (:func:`patch_lora`), which keeps the dropout masks of the
    layer's modules apart. `unused`: the caller never reads the output's values (a recompute whose output is only
    the root of the backward pass): a tensor of the right shape but other values comes back (the LoRA term alone,
    without the base product), the gradients are as usual."""
    dev = x.device.type
    # without autocast (generating mid-run, on a bf16 model whose adapters PEFT keeps in fp32) the layer computes in,
    # and returns, its input's dtype, as the layers after it expect; the adapter's weights are cast, as autocast does
    cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    key = dropout_key(x.device, salt) if dropout > 0.0 else None
    with torch.autocast(dev, enabled=False):
        return _LoraLinear.apply(x, a, b, bias, base, scaling, cd, float(dropout), key, unused)


def _plain_base(base: nn.Module) -> bool:
    if type(base) is nn.Linear:
        return not base.weight.requires_grad
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(base, bnb.nn.Linear4bit) and getattr(base.weight, "quant_state", None) is not None


def _fast_forward(self, x, *args, **kwargs):
    """Replaces a PEFT ``lora.Linear.forward``; falls back to PEFT's whenever the layer is not the simple case."""
    active = self.active_adapters
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1
            or active[0] not in self.lora_A):
        return self._orig_forward(x, *args, **kwargs)
    name = active[0]
    drop = self.lora_dropout[name]
    if isinstance(drop, nn.Identity):
        p = 0.0
    elif type(drop) is nn.Dropout:
        p = drop.p if drop.training else 0.0
    else:
        return self._orig_forward(x, *args, **kwargs)
    if self.use_dora.get(name, False) or p >= 1.0:
        return self._orig_forward(x, *args, **kwargs)
    base = self.base_layer
    if getattr(getattr(base.weight, "quant_state", None), "packing_format_for_cpu", False):
        return self._orig_forward(x, *args, **kwargs)  # bitsandbytes' CPU inference layout: its own kernel
    return lora_linear(x, self.lora_A[name].weight, self.lora_B[name].weight, base.bias, base, self.scaling[name], p,
                       getattr(self, SALT, 0), lean.skip(self))


def patch_lora(model: nn.Module) -> int:
    """Route every simple PEFT LoRA linear layer of `model` through :func:`lora_linear`; returns how many."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return 0
    kinds: tuple = (LoraLinear,)
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit  # present when bitsandbytes is

        kinds += (LoraLinear4bit,)
    except ImportError:
        pass
    n = 0
    for name, m in model.named_modules():
        if type(m) in kinds and _plain_base(m.base_layer):
            # the same in every layer (one compiled graph serves them all); apart between a layer's modules
            where = re.split(r"\.\d+\.", name)[-1]
            setattr(m, SALT, zlib.crc32(where.encode()) & 0x7FFFFFFF)
            n += swap_forward(m, _fast_forward)
    return n


def unpatch_lora(model: nn.Module) -> None:
    restore_forwards(model)
