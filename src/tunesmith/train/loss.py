"""Causal-LM loss computed only at trained positions, in chunks, so full-vocabulary logits are never held."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.template import IGNORE
from ..kernels.attention import decoder_kwargs


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def _chunk_kl(hidden: torch.Tensor, base_hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Forward KL(base || model), summed over positions, over the full vocabulary."""
    with torch.no_grad():
        base_logp = F.log_softmax(F.linear(base_hidden, weight).float(), dim=-1)
    logp = F.log_softmax(F.linear(hidden, weight).float(), dim=-1)
    return F.kl_div(logp, base_logp, reduction="sum", log_target=True)


def _default_chunk(vocab: int) -> int:  # about 256M fp32 logits per chunk at most (1 GiB), whatever the vocabulary
    return max(256, (1 << 28) // vocab)


def base_hidden_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last hidden states of the model with its LoRA adapter switched off (the frozen base), without gradient."""
    if not hasattr(model, "disable_adapter"):
        raise ValueError("KL regularisation needs the base model: it works with method lora or qlora, not full")
    with torch.no_grad(), model.disable_adapter():
        out = model.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                                  **decoder_kwargs(model, batch))
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def trained_positions(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Where the loss is taken, as rows of the flattened hidden states (position p of row b is row b*width + p; the
    token at p+1 is its target): `loss_index` and `loss_targets` for cross-entropy, and `kl_index` for the
    self-distillation samples of `kl_mask` (when the batch has one).

    Computed wherever `batch` lives. The training loop computes them on the host before sending the batch, so the
    loss never asks the device which positions are trained (selecting by a boolean mask there waits for the whole
    forward pass, and leaves the device idle while the host catches up)."""
    labels = batch["labels"]
    width = labels.shape[1]
    keep = labels[:, 1:] != IGNORE
    kl_keep = None
    if batch.get("kl_mask") is not None:
        kl_keep = keep & batch["kl_mask"][:, 1:]
        keep = keep & ~kl_keep

    def rows(mask: torch.Tensor) -> torch.Tensor:
        b, p = mask.nonzero(as_tuple=True)
        return b * width + p

    out = {"loss_index": rows(keep), "loss_targets": labels[:, 1:][keep]}
    if kl_keep is not None:
        out["kl_index"] = rows(kl_keep)
    return out


def causal_lm_loss_sum(model, batch: dict[str, torch.Tensor], chunk: int | None = None,
                       fused: bool = False) -> tuple[torch.Tensor, int]:
    """Sum of next-token losses over trained tokens, and their count.

    The decoder runs once; the output projection runs per chunk of trained positions under activation
    checkpointing, so memory grows with the number of trained tokens times `chunk`, not with the vocabulary
    times the sequence.

    Trained tokens of samples flagged in `batch["kl_mask"]` (self-distillation samples with
    `data.regularize.kl`) are trained towards the base model's own next-token distribution instead: forward
    KL(base || model) over the whole vocabulary, the base being the same model with its adapter switched off
    (one extra forward pass without gradient, only for batches that hold such samples). At the start of LoRA
    training (B = 0) this term is exactly zero; it grows only where training moves the model away from the
    base on ordinary prompts.
    """
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    out = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                  **decoder_kwargs(model, batch))  # sample boundaries, when attention is variable-length
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    pos = batch if "loss_index" in batch else trained_positions(batch)  # the loop sends them with the batch
    flat = hidden.reshape(-1, hidden.shape[-1])
    h = flat.index_select(0, pos["loss_index"])
    t = pos["loss_targets"]
    kl_index = pos.get("kl_index")
    n = t.numel()  # sizes, not values: no wait for the device
    n_kl = 0 if kl_index is None else kl_index.numel()
    from ..kernels import host_weights

    hostw = host_weights.of(model)
    if n + n_kl == 0:
        return hidden.sum() * 0.0, 0  # the head was not needed: the loop releases it after the backward pass
    asked = chunk  # None: each path's own default (the fused one keeps chunks small: see linear_ce.default_chunk)
    if chunk is None:
        chunk = _default_chunk(head.weight.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)
    if n and fused:
        from ..kernels.linear_ce import linear_cross_entropy

        cfg = getattr(model, "config", None)
        inter = getattr(cfg, "intermediate_size", None) or 4 * hidden.shape[-1]
        weight = head.weight if hostw is None else hostw.head_weight()  # host-kept: copied in behind the layers
        total = total + linear_cross_entropy(h, weight, t, asked,
                                             layer_bytes=2 * hidden.shape[0] * hidden.shape[1] * inter * 2)
        del weight
        if hostw is not None and not n_kl:
            hostw.release_head()  # its gradients are made: the backward pass runs without the head on the GPU
    elif n:
        if hostw is not None:
            hostw.head_weight()  # kept until the backward pass is done (the loop releases it)
        for i in range(0, n, chunk):
            hi, ti = h[i:i + chunk], t[i:i + chunk]
            if torch.is_grad_enabled():
                total = total + checkpoint(_chunk_loss, hi, head.weight, ti, use_reentrant=False)
            else:
                total = total + _chunk_loss(hi, head.weight, ti)
    if n_kl:
        if hostw is not None:
            hostw.head_weight()
        hk = flat.index_select(0, kl_index)
        base = base_hidden_states(model, batch)
        bk = base.reshape(-1, base.shape[-1]).index_select(0, kl_index).to(hk.dtype)
        from ..kernels.linear_ce import default_chunk

        kc = asked or default_chunk(head.weight.shape[0])  # two fp32 logit blocks a chunk: keep them small
        for i in range(0, n_kl, kc):
            hi, bi = hk[i:i + kc], bk[i:i + kc]
            if torch.is_grad_enabled():
                total = total + checkpoint(_chunk_kl, hi, bi, head.weight, use_reentrant=False)
            else:
                total = total + _chunk_kl(hi, bi, head.weight)
    return total, n + n_kl


def reference_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Plain full-logits version of `causal_lm_loss_sum` (cross-entropy only, no `kl_mask`), for tests."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    targets = batch["labels"][:, 1:]
    lg = logits[:, :-1].float()
    loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


def reference_kl_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Plain full-logits KL(base || model) over the trained tokens in `kl_mask`, for tests."""
    ids, pos = batch["input_ids"], batch["position_ids"]
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits[:, :-1].float()
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids, position_ids=pos, use_cache=False).logits[:, :-1].float()
    sel = (batch["labels"][:, 1:] != IGNORE) & batch["kl_mask"][:, 1:]
    p = F.log_softmax(base[sel], -1)
    q = F.log_softmax(logits[sel], -1)
    return (p.exp() * (p - q)).sum()
