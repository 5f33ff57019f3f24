"""Each decoder layer's body compiled by ``torch.compile`` (Inductor), one graph shared by all layers.

Profiling the single-GPU runs (bench/RESULTS.md) showed the step bound by the CPU, not the GPU: a 24-layer
0.5B–1.8B model issues 20,000+ small PyTorch operations a step (LoRA's casts and matmuls, NF4 dequantisation
calls, norms, rotary embedding, residual adds), each a Python call and a kernel launch, and the GPU waits on
them. Compiling the whole layer turns that into one graph per pass (forward, recompute, backward): Inductor
fuses the elementwise work into a few Triton kernels (NF4 dequantisation included: :func:`.lora.nf4_dequant_torch`),
and the matmuls and attention run as the same library kernels as before, called from generated code.

Batches with an attention mask (packed rows, padding) compile too: one more graph per grad mode. A first
build gated them to eager mode after a 50-step packed run on an H200 came out 2.3x slower compiled; the
recompile log later showed why — Inductor specialises on the mask's width being a multiple of 8, so the first
batch of another alignment compiled the layer again (~15 s, most of that short run). Packed batches are now
padded to one of a few widths, all multiples of 8 (`data.packing.padded_width`).

How it plugs in: the layers already run through tunesmith's checkpoint function (:mod:`.offload`), which calls
each layer's body twice (forward without gradients, then the recompute in the backward pass). That call goes
through `_guarded` here (set as `offload._state.call`), so the checkpoint's RNG/autocast replay and host offload
stay outside the compiled graph and the graph holds exactly one layer. The LoRA function (:mod:`.lora`) is traced
into it, backward pass included. Its dropout masks are a hash of the layer call's seed (set by the checkpoint
function for the forward pass and the recompute alike), so they match whatever order Inductor runs random ops
in; other random ops in the layer follow eager PyTorch's generator (``fallback_random``), replayed by the
checkpoint.

Reference: the same layers run eagerly (``tests/test_kernels.py`` compares losses and every gradient). If
compiling or running the graph fails (no working Triton toolchain, an unsupported layer), training warns once
and goes on eagerly.
"""

from __future__ import annotations

import os
import warnings

import torch

from . import offload

_compiled = None


def _body(run, *args):
    return run(*args)


stats = {"compiled": 0}  # layer calls through the compiled body (tests read it)


def _guarded(run, *args):
    stats["compiled"] += 1
    kept = list(offload._state.kept)  # a failure after a graph break leaves the kept values half taken or added
    try:
        # No common-subexpression elimination across the joint graph: the LoRA function dequantises an NF4 weight
        # in its forward pass and again in its backward pass; merged, the partitioner kept every dequantised
        # weight of the layer from the recompute to the backward pass (a layer's worth of bf16 weights more at
        # the peak) instead of dequantising again, which costs one fused kernel per weight.
        # TUNESMITH_COMPILE_CSE=1 merges them again, for A/B runs (sixth run, bench/RESULTS.md: merged is
        # 1.5-5 % faster and 0.09-0.31 GiB heavier on the QLoRA rows).
        with torch._functorch.config.patch(cse=os.environ.get("TUNESMITH_COMPILE_CSE") == "1"):
            return _compiled(run, *args)
    except offload.KeptValueError:
        raise
    except Exception as e:  # noqa: BLE001 — a compiler failure must not end the run
        disable(f"{type(e).__name__}: {str(e)[:300]}")
        offload._state.kept[:] = kept  # as they were before the call, for the eager one
        return run(*args)


def enable() -> None:
    """Route every checkpointed layer call through the compiled body (process-wide)."""
    global _compiled
    import torch._dynamo.config as dcfg
    import torch._inductor.config as icfg

    icfg.fallback_random = True  # random ops in the graph draw from PyTorch's generator: replayable
    # one graph per (grad mode, with/without mask); every layer reuses it — leave room for a few variants
    dcfg.recompile_limit = max(getattr(dcfg, "recompile_limit", 8), 32)
    if _compiled is None:
        # TUNESMITH_COMPILE_MODE (for A/B runs, not measured yet): a torch.compile mode, e.g. "reduce-overhead"
        # (CUDA graphs: the small models' steps are bound by the host's launches, bench/RESULTS.md tenth run)
        mode = os.environ.get("TUNESMITH_COMPILE_MODE") or None
        _compiled = torch.compile(_body, dynamic=mode is None, mode=mode)
    offload._state.call = _guarded


def disable(reason: str | None = None) -> None:
    if reason is not None and offload._state.call is not None:
        warnings.warn(f"tunesmith: compiled decoder layers turned off ({reason}); training goes on eagerly")
    offload._state.call = None


def active() -> bool:
    return offload._state.call is _guarded


def available(device: torch.device) -> bool:
    """A CUDA device with Triton (Inductor's GPU code generator); on the CPU only when asked for."""
    import importlib.util

    return device.type == "cuda" and importlib.util.find_spec("triton") is not None
