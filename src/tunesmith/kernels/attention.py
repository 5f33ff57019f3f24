"""Attention for packed rows with PyTorch's variable-length flash attention (CUDA, torch >= 2.10).

A packed row holds several samples. Through SDPA it needs a block-diagonal causal mask over the whole row, and
the masked kernel computes every (query, key) block of the row, so a 2048-token row of twenty 100-token
samples pays for 2048² scores where 20·100² are needed; the mask also sends SDPA to its slower masked backend.
Here the rows are cut at their sample boundaries (``cu_seqlens``, built by ``data.packing.collate`` from the
position ids) and ``torch.nn.attention.varlen.varlen_attn`` runs causal flash attention on each sample alone.

How it plugs in: the model's attention implementation is set to ``"tunesmith_varlen"``, registered with
transformers' ``AttentionInterface``. Calls that carry ``cu_seq_lens_q`` (training batches that need a mask)
take the varlen kernel; every other call (full rows, generation with a KV cache, the CPU, anything the kernel
does not cover: dropout, sliding windows, soft-capping, fp32) goes to transformers' own SDPA function with the
mask transformers built, exactly as ``attn_implementation="sdpa"`` would.

Reference: SDPA with the block-diagonal mask (``tests/test_kernels_cuda.py`` compares outputs and gradients;
the CPU tests check the cut points and the plumbing with a per-sample reference standing in for the kernel).
"""

from __future__ import annotations

import inspect

import torch

from . import lean

NAME = "tunesmith_varlen"


class _State:
    op = None  # varlen_attn-like callable (q, k, v, cu, cu, max, max) -> out, or None
    kwargs: dict = {}  # how this torch version asks for causal attention (and the scale, GQA)
    scale_arg = False
    gqa_arg = False
    allow_cpu = False  # tests: let a stand-in op run on the CPU


_state = _State()


def _load() -> bool:
    if _state.op is not None:
        return True
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return False
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:  # torch >= 2.11: causal is the (-1, 0) window
        _state.kwargs = {"window_size": (-1, 0)}
    elif "is_causal" in params:  # torch 2.10
        _state.kwargs = {"is_causal": True}
    else:
        return False
    _state.scale_arg = "scale" in params
    _state.gqa_arg = "enable_gqa" in params  # torch >= 2.12; before, the key/value heads are repeated
    _state.op = varlen_attn
    return True


def available(device: torch.device) -> bool:
    """A CUDA device and a torch with ``varlen_attn``."""
    return device.type == "cuda" and _load()


_VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _sdpa(*args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs = {k: v for k, v in kwargs.items() if k not in _VARLEN_KEYS}
    return sdpa_attention_forward(*args, **kwargs)


def _hf_config(model):
    """The transformers config of `model`, PEFT-wrapped or not (None if it has none)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(hf, "config", None)


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs):
    """transformers attention function: (batch, heads, seq, dim) in, ((batch, seq, heads, dim), None) out."""
    cu = kwargs.get("cu_seq_lens_q")
    b, hq, s, d = query.shape
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", True)
    # plain causal self-attention: what both fast paths below cover
    plain = (causal and dropout == 0.0 and kwargs.get("sliding_window") is None and kwargs.get("softcap") is None
             and kwargs.get("s_aux") is None and key.shape[2] == s and hq % key.shape[1] == 0)
    usable = (
        plain and cu is not None and _state.op is not None and (query.is_cuda or _state.allow_cpu)
        and (query.dtype in (torch.float16, torch.bfloat16) or _state.allow_cpu) and d % 8 == 0 and d <= 256
        and (_state.scale_arg or scaling is None or abs(scaling - d ** -0.5) < 1e-6)
    )
    if not usable:
        stand_in = attention_mask is not None and attention_mask is _NO_MASK.get(query.device)
        if (plain and cu is None and (attention_mask is None or stand_in)
                and lean.keeps_attention_output(module, query, key, value)):
            return lean.kept_attention(query, key, value, scaling), None  # full rows, in a checkpointed layer
        if stand_in:
            attention_mask = None if cu is None else _block_causal(cu, b, s)  # built only where it is used
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    hk = key.shape[1]
    q = query.transpose(1, 2).reshape(b * s, hq, d)
    k = key.transpose(1, 2).reshape(b * s, hk, d)
    v = value.transpose(1, 2).reshape(b * s, hk, d)
    extra = dict(_state.kwargs)
    if hk != hq:
        if _state.gqa_arg:
            extra["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(hq // hk, dim=1), v.repeat_interleave(hq // hk, dim=1)
    if _state.scale_arg and scaling is not None:
        extra["scale"] = scaling
    m = kwargs["max_length_q"]
    out = _state.op(q, k.contiguous(), v.contiguous(), cu, cu, m, m, **extra)
    return out.view(b, s, hq, d), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the fallback (SDPA) gets the mask it expects


def patch_varlen(model) -> bool:
    """Switch `model` (a transformers model, PEFT-wrapped or not) to this attention; False where it cannot be
    (no varlen kernel, a model that does not dispatch through AttentionInterface, or an implementation other
    than SDPA chosen in the config)."""
    if not _load() and not _state.allow_cpu:
        return False
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(hf, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    if not getattr(hf, "_supports_attention_backend", False):
        return False
    _register()
    cfg._attn_implementation = NAME
    return True


def unpatch_varlen(model) -> None:
    """Back to SDPA."""
    cfg = _hf_config(model)
    if cfg is not None and getattr(cfg, "_attn_implementation", None) == NAME:
        cfg._attn_implementation = "sdpa"


# Training batches of a model on this attention pass a stand-in 4-D mask (transformers hands a 4-D mask to the layers
# as it is). Without one, transformers builds a mask each forward pass: for packed rows a block-diagonal one that the
# varlen kernel never reads, and first it asks the device whether the position ids hold several samples
# (`find_packed_sequence_indices`), a sync that stalls the host until all queued work is done. The stand-in is
# replaced in `attention_forward`: by nothing (causal SDPA) for full rows, by the block-diagonal causal mask built
# from `cu_seqlens` where a call falls back to SDPA.
_NO_MASK: dict = {}


def _stand_in(device: torch.device) -> torch.Tensor:
    t = _NO_MASK.get(device)
    if t is None:
        t = _NO_MASK[device] = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
    return t


def _block_causal(cu: torch.Tensor, b: int, s: int) -> torch.Tensor:
    """(b, 1, s, s) bool, True where a query may attend a key: same sample (cut by `cu`, over the flattened batch)
    and not later; made on the device without asking it anything."""
    starts = torch.zeros(b * s, dtype=torch.int32, device=cu.device).index_fill_(0, cu[1:-1].long(), 1)
    seg = starts.cumsum(0).view(b, s)
    causal = torch.ones(s, s, dtype=torch.bool, device=cu.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def _full_attention_only(cfg) -> bool:
    """No sliding-window layers (their masks differ: the stand-in would stand for the wrong one)."""
    types = getattr(cfg, "layer_types", None)
    return getattr(cfg, "sliding_window", None) is None and (not types or set(types) == {"full_attention"})


def decoder_kwargs(model, batch: dict) -> dict:
    """The keyword arguments a training batch passes to the decoder on this attention: its sample boundaries (when
    it has them) and the stand-in mask (see `_NO_MASK`); none for a model on another attention."""
    cfg = _hf_config(model)
    if getattr(cfg, "_attn_implementation", None) != NAME:
        return {}
    out = {"attention_mask": _stand_in(batch["input_ids"].device)} if _full_attention_only(cfg) else {}
    cu = batch.get("cu_seqlens")
    if cu is not None:
        m = int(batch["max_seqlen"])
        out.update({"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": m, "max_length_k": m})
    return out
