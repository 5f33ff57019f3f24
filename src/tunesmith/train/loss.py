"""Causal-LM loss computed only at trained positions, in chunks, so full-vocabulary logits are never held."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.template import IGNORE


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def causal_lm_loss_sum(model, batch: dict[str, torch.Tensor], chunk: int | None = None,
                       fused: bool = False) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over trained tokens, and their count.

    The decoder runs once; the output projection runs per chunk of trained positions under activation
    checkpointing, so memory grows with the number of trained tokens times `chunk`, not with the vocabulary
    times the sequence.
    """
    labels = batch["labels"]
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    out = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    h = hidden[:, :-1][keep]
    t = targets[keep]
    n = int(t.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0
    if fused:
        from ..kernels.linear_ce import linear_cross_entropy

        return linear_cross_entropy(h, head.weight, t, chunk), n
    if chunk is None:  # about 256M fp32 logits per chunk at most (1 GiB), whatever the vocabulary
        chunk = max(256, (1 << 28) // head.weight.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk):
        hi, ti = h[i:i + chunk], t[i:i + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, hi, head.weight, ti, use_reentrant=False)
        else:
            total = total + _chunk_loss(hi, head.weight, ti)
    return total, n


def reference_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Plain full-logits version of `causal_lm_loss_sum`, for tests."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    targets = batch["labels"][:, 1:]
    lg = logits[:, :-1].float()
    loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())
