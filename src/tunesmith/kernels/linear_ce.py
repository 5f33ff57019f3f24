"""Output projection + cross-entropy in one pass, with the gradient computed in the forward pass.

For trained positions ``h`` (n × d), head weight ``W`` (V × d) and targets ``t`` this returns
``sum_i CE(h_i W^T, t_i)``. Rows are taken ``chunk`` at a time: the chunk's logits are made, turned into
the loss and into ``dL/dlogits = softmax - onehot`` on the spot, and multiplied back into ``dL/dh`` (and
``dL/dW`` when the head trains) before the next chunk. Full-vocabulary logits never exist for more than one
chunk, nothing is kept for the backward pass but the two gradients, and the head matmul runs twice per chunk
instead of three times (forward, recompute, backward) as with checkpointed chunks.

The reference is ``F.cross_entropy(F.linear(h, W).float(), t, reduction="sum")``
(``tests/test_kernels.py`` compares both, values and gradients).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def _softmax_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed cross-entropy and ``softmax - onehot`` (in the logits' dtype), fp32 inside."""
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1)
    loss = (lse - lf.gather(1, targets[:, None]).squeeze(1)).sum()
    hit = torch.arange(lf.shape[1], device=lf.device)[None, :] == targets[:, None]
    g = torch.exp(lf - lse[:, None]) - hit.to(lf.dtype)
    return loss, g.to(logits.dtype)


_compiled_grad = None


def _chunk_grad_fn():
    """With compiled decoder layers on (CUDA), the chunk's softmax/gradient as one compiled function: Inductor
    reads the logits twice and writes the gradient once, where the eager version below makes an fp32 copy and
    passes over it five times (profiled: ~14 ms a step on the 1.8B rows, and many launches)."""
    global _compiled_grad
    from . import compiled

    if not compiled.active():
        return None
    if _compiled_grad is None:
        _compiled_grad = torch.compile(_softmax_grad, dynamic=True)
    return _compiled_grad


def default_chunk(vocab: int, layer_bytes: int = 0) -> int:
    """Rows per chunk: about 32M fp32 logits (128 MiB) whatever the vocabulary, at least 128 rows.

    With the compiled chunk function (bf16 logits in, bf16 gradient out: 4 bytes a logit in all), chunks may
    grow to ``layer_bytes``, the size of two of a decoder layer's widest activations (tokens x intermediate
    size, bf16): the backward pass through a layer holds more than that at once anyway, while the logits are
    gone by then, so bigger chunks do not raise the step's peak; they make the output projection's matmuls
    bigger (measured: bench/RESULTS.md, sixth run). ``TUNESMITH_CE_CHUNK_MIB`` sets the size outright (A/B runs).
    """
    mib = os.environ.get("TUNESMITH_CE_CHUNK_MIB")
    budget = float(mib) * (1 << 20) if mib else max(128 << 20, min(layer_bytes, 1 << 30))
    return max(128, int(budget) // (4 * max(1, vocab)))


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk, compute_dtype):
        n = h.shape[0]
        hc = h.to(compute_dtype)
        wc = weight.to(compute_dtype)
        need_w = weight.requires_grad
        grad_h = torch.empty_like(hc) if h.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        fused = _chunk_grad_fn()
        for i in range(0, n, chunk):
            hi, ti = hc[i:i + chunk], targets[i:i + chunk]
            if fused is not None:
                loss_i, g = fused(hi @ wc.t(), ti)
                total += loss_i
            else:
                logits = (hi @ wc.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, ti[:, None]).squeeze(1)).sum()
                # softmax - onehot, in place on the logits buffer
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(g.shape[0], device=g.device), ti] -= 1.0
                g = g.to(compute_dtype)
            if grad_h is not None:
                torch.matmul(g, wc, out=grad_h[i:i + chunk])
            if grad_w is not None:
                grad_w += g.t() @ hi
        ctx.save_for_backward(grad_h, grad_w)
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_out).to(ctx.h_dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None, layer_bytes: int = 0) -> torch.Tensor:
    """Sum of cross-entropy of ``h @ weight.T`` against ``targets`` (no ignored positions: select them first).

    Under autocast the matmuls run in the autocast dtype, as ``F.linear`` would; the softmax is fp32.
    `layer_bytes`: see :func:`default_chunk` (used only with the compiled chunk function).
    """
    if chunk is None:
        chunk = default_chunk(weight.shape[0], layer_bytes if _chunk_grad_fn() is not None else 0)
    if torch.is_autocast_enabled(h.device.type):
        compute_dtype = torch.get_autocast_dtype(h.device.type)
    else:
        compute_dtype = torch.promote_types(h.dtype, weight.dtype)
    if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):  # the value only
        wc = weight.to(compute_dtype)
        return sum(F.cross_entropy((h[i:i + chunk].to(compute_dtype) @ wc.t()).float(), targets[i:i + chunk],
                                   reduction="sum") for i in range(0, h.shape[0], chunk))
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCE.apply(h, weight, targets, chunk, compute_dtype)
