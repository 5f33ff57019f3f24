"""NF4 dequantisation as one hand-written Triton kernel (CUDA) that can write into a joined matrix.

Every QLoRA matmul first turns its 4-bit weight back into bf16, three times per weight and step: the forward
pass, the recompute and the backward pass. Where the compiled layers join a weight with a LoRA factor into one
matmul (``[W | B]`` for gate/up forward, ``[W ; A]`` for the down projection's input gradient; see
:class:`.lora._LoraLinear`), Inductor fused the dequantisation into the concatenation. That kernel was slow.
A profile of the 7B QLoRA row (bench/RESULTS.md, seventh run) showed ~300 us per call for the gate/up weights,
where Inductor's plain dequantisation of the same weight takes ~75 us. In all, tunesmith spent ~46 ms a step
dequantising, against ~28 ms for Unsloth.

This kernel writes rows with any stride, so the joined matrix comes straight from it and only the narrow LoRA
factor is copied. Each program reads a run of packed bytes of one weight row once. It looks both nibbles up in
the 16-entry code and scales them by their block's absmax (itself 8-bit when double-quantised). Then it stores
the pair side by side.

It is registered with ``torch.library.triton_op``. Calling it costs more on the CPU than Inductor's own fused
kernels, so :func:`.lora._dequant` uses it only for large joined weights (see ``_NF4_KERNEL_MIN`` there). The
reference is bitsandbytes' ``dequantize_4bit`` (``tests/test_kernels_cuda.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

_BLOCK = 512  # packed bytes per program: 1,024 output values


@triton.jit
def _nf4_dequant_kernel(q_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr,
                        row_bytes, out_stride,
                        NESTED: tl.constexpr, QB: tl.constexpr, BS2: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # byte within the row
    ok = c < row_bytes
    byte = tl.load(q_ptr + r * row_bytes + c, mask=ok, other=0).to(tl.int32)
    blk = r * (row_bytes // QB) + c // QB  # rows hold whole quantisation blocks (QB bytes each)
    if NESTED:
        a8 = tl.load(absmax_ptr + blk, mask=ok, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + a8) * tl.load(absmax2_ptr + blk // BS2, mask=ok, other=0.0) + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=ok, other=0.0)
    hi = tl.load(code_ptr + (byte >> 4)) * scale  # the first value of a pair is in the high nibble
    lo = tl.load(code_ptr + (byte & 15)) * scale
    v = tl.reshape(tl.join(hi, lo), (2 * BLOCK,)).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    j = 2 * tl.program_id(1) * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + r * out_stride + j, v, mask=j < 2 * row_bytes)


@triton_op("tunesmith::nf4_dequant", mutates_args=())
def nf4_dequant(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, code2: torch.Tensor | None,
                absmax2: torch.Tensor | None, offset: torch.Tensor | None, rows: int, cols: int, blocksize: int,
                blocksize2: int, dtype: torch.dtype, extra: torch.Tensor | None, extra_dim: int) -> torch.Tensor:
    """The (rows x cols) weight; with `extra`, joined to it along `extra_dim` (1: more columns, 0: more rows)."""
    if extra is None:
        out = torch.empty(rows, cols, device=q.device, dtype=dtype)
    elif extra_dim == 1:
        out = torch.empty(rows, cols + extra.shape[1], device=q.device, dtype=dtype)
        out[:, cols:] = extra
    else:
        out = torch.empty(rows + extra.shape[0], cols, device=q.device, dtype=dtype)
        out[rows:] = extra
    nested = code2 is not None
    row_bytes = cols // 2
    grid = (rows, triton.cdiv(row_bytes, _BLOCK))
    wrap_triton(_nf4_dequant_kernel)[grid](
        q, absmax, code, code2 if nested else code, absmax2 if nested else absmax, offset if nested else code, out,
        row_bytes, out.stride(0), NESTED=nested, QB=blocksize // 2, BS2=blocksize2 if nested else 1, BLOCK=_BLOCK,
        num_warps=4)
    return out


def supported(qs, data: torch.Tensor, dtype: torch.dtype) -> bool:
    """What the kernel covers: NF4 on CUDA, rows of whole blocks, dequantised straight to the weight's dtype."""
    return (data.is_cuda and qs.quant_type == "nf4" and data.dtype == torch.uint8 and len(qs.shape) == 2
            and qs.shape[-1] % qs.blocksize == 0 and qs.blocksize % 2 == 0 and qs.dtype == dtype)


def dequant(data: torch.Tensor, qs, dtype: torch.dtype, extra: torch.Tensor | None = None,
            extra_dim: int = 1) -> torch.Tensor:
    """bitsandbytes' ``dequantize_4bit(data, qs)`` (optionally joined with `extra`); see :func:`supported`."""
    rows, cols = qs.shape
    if qs.nested:
        s2 = qs.state2
        off = torch.as_tensor(qs.offset, dtype=torch.float32, device=data.device).reshape(1)
        return nf4_dequant(data, qs.absmax, qs.code, s2.code, s2.absmax, off, rows, cols,
                           qs.blocksize, s2.blocksize, dtype, extra, extra_dim)
    return nf4_dequant(data, qs.absmax, qs.code, None, None, None, rows, cols, qs.blocksize, 1, dtype, extra,
                       extra_dim)
