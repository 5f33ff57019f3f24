"""Fast paths for training, each optional and each with a plain-PyTorch reference it is tested against.

- :mod:`.linear_ce`  output projection + cross-entropy with the gradient made in the forward pass (everywhere);
- :mod:`.lora`       a PEFT LoRA linear layer as one autograd function (bf16/fp32 and NF4 bases; everywhere);
- :mod:`.fused`      RMSNorm, SwiGLU and rotary embedding compiled into single kernels (CUDA);
- :mod:`.attention`  packed rows attend per sample with PyTorch's variable-length flash attention (CUDA);
- :mod:`.offload`    activation checkpointing that keeps layer inputs in pinned host memory (CUDA; not under FSDP);
- :mod:`.lean`       that checkpoint's recompute skips the MLP down projection's unread product;
- :mod:`.compiled`   each checkpointed decoder layer's body compiled by torch.compile (CUDA; not under FSDP);
- :mod:`.nf4`        a Triton NF4 dequantisation kernel for large weights joined to a LoRA factor (compiled layers);
- :mod:`.host_weights` the frozen embedding and output head in pinned host memory between uses (CUDA; not FSDP).

``train.kernels: off`` turns them all off but offloading (the reference path); ``train.offload_activations``,
``train.compile`` and ``train.offload_embeddings`` the offloading, the compiled layers and the host-kept weights.
"""

from __future__ import annotations

import types

import torch

ORIG = "_orig_forward"  # where a patched module keeps its own forward


def swap_forward(m: torch.nn.Module, fn) -> bool:
    """Route `m.forward` through `fn(m, ...)`, keeping the original as `m._orig_forward`; False if already done."""
    if hasattr(m, ORIG):
        return False
    setattr(m, ORIG, m.forward)
    m.forward = types.MethodType(fn, m)
    return True


def restore_forward(m: torch.nn.Module) -> None:
    """Undo `swap_forward` on `m` (nothing if it was not swapped)."""
    if hasattr(m, ORIG):
        m.forward = getattr(m, ORIG)
        delattr(m, ORIG)


def restore_forwards(model: torch.nn.Module) -> None:
    """Undo every `swap_forward` in `model`."""
    for m in model.modules():
        restore_forward(m)


def apply(model, *, device: torch.device, method: str, kernels: str, compile_layers: bool = False) -> list[str]:
    """Patch `model` in place with the fast paths `kernels` ('auto' | 'on' | 'off') allows; returns their names.

    `compile_layers` (see :func:`use_compile`): each decoder layer's body runs through torch.compile
    (:mod:`.compiled`), which traces the plain versions of the fused norms, SwiGLU and RoPE and fuses them itself;
    should compiling fail, the eager layers use the fused kernels.
    """
    from . import compiled

    compiled.disable()
    if kernels == "off":
        return []
    used = ["linear-ce"]
    if method in ("lora", "qlora"):
        from .lora import patch_lora

        if patch_lora(model):
            used.append("lora")
    from .lean import check_attention_output, mark_unused_outputs

    mark_unused_outputs(model)  # acts only inside tunesmith's offloaded checkpoint recompute
    if compile_layers:
        compiled.enable()
        used.append("compiled-layers")
    patched = False
    if device.type == "cuda":
        from .attention import patch_varlen

        patched = patch_varlen(model)
        if patched:
            used.append("varlen-attn")
    # the kept attention output needs tunesmith's attention function (the one that keeps it) and working kernels
    if check_attention_output(model, device, usable=patched):
        used.append("kept-attention-output")
    if device.type == "cuda" or kernels == "on":
        from .fused import patch_fused

        c = patch_fused(model, rope=device.type == "cuda")
        used += [k for k, v in c.items() if v]
    return used


def use_offload(setting, device: torch.device, fsdp: bool, grad_checkpointing: bool) -> bool:
    """Offloaded checkpointing: one device, or one per process in data parallel runs (under FSDP the layers' own
    checkpointing stays)."""
    if not grad_checkpointing or fsdp:
        return False
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


def use_compile(setting, device: torch.device, offload: bool, kernels: str) -> bool:
    """Compiled decoder layers: they hook into tunesmith's checkpoint function, so only where it runs (`offload`)."""
    if kernels == "off" or not offload or setting is False:
        return False
    if setting == "auto":
        from .compiled import available

        return available(device)
    return True
