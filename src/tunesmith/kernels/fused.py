"""Fused RMSNorm, SwiGLU and rotary embedding for Llama-family blocks (Llama, Qwen2/3, Mistral, InternLM2).

The Hugging Face modules run these as chains of elementwise kernels (RMSNorm: upcast, square, mean, rsqrt,
multiply, downcast, scale — each reading and writing the whole activation), and autograd keeps several of
the intermediates. Here each is one function with the same arithmetic, compiled by ``torch.compile`` (Inductor
generates one forward and one backward Triton kernel per function) on CUDA; on the CPU the same function runs
eagerly, so it is its own reference. ``tests/test_kernels.py`` compares the patched modules with the original
ones (outputs and gradients), and the GPU test does so for the compiled kernels.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import restore_forwards, swap_forward


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


_compiled: dict[str, object] = {}


def _can_compile() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _fn(name: str, ref, device: torch.device):
    """`ref` compiled for CUDA (once per function), or `ref` itself: on the CPU, without Triton, when
    compiling fails (a warning says so and training goes on eagerly), or inside a graph torch.compile is
    tracing (the compiled decoder layers of :mod:`.compiled`, which fuse it with their own code)."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return ref
    if name not in _compiled:
        if not _can_compile():
            _compiled[name] = ref
        else:
            compiled = torch.compile(ref, dynamic=True, fullgraph=True)

            def guarded(*args, _c=compiled, _name=name):
                try:
                    return _c(*args)
                except Exception as e:  # an old GPU, a broken compiler toolchain: keep training, eagerly
                    import warnings

                    warnings.warn(f"tunesmith: torch.compile of {_name} failed ({type(e).__name__}: {e}); "
                                  "using the eager version")
                    _compiled[_name] = ref
                    return ref(*args)

            _compiled[name] = guarded
    return _compiled[name]


def rope_ref(q, k, cos, sin, unsqueeze_dim=1):
    """Rotary embedding as transformers' Llama/Qwen2 `apply_rotary_pos_emb` computes it."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def rot(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def _rope(q, k, cos, sin, unsqueeze_dim=1):
    return _fn("rope", rope_ref, q.device)(q, k, cos, sin, unsqueeze_dim)


def _norm_forward(self, hidden_states):
    return _fn("rms_norm", rms_norm_ref, hidden_states.device)(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    act = _fn("silu_mul", silu_mul_ref, x.device)
    return self.down_proj(act(self.gate_proj(x), self.up_proj(x)))


# Families whose RMSNorm computes exactly `rms_norm_ref` and whose MLP is down(silu(gate(x)) * up(x)); others
# (Gemma's 1 + weight, OLMo's cast order, fused gate_up projections, …) keep their own modules.
NORM_CLASSES = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm", "Qwen2MoeRMSNorm",
                "Qwen3MoeRMSNorm", "InternLM2RMSNorm"}
MLP_CLASSES = {"LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP"}


def _is_rmsnorm(m: nn.Module) -> bool:
    return (type(m).__name__ in NORM_CLASSES and isinstance(getattr(m, "weight", None), torch.Tensor)
            and isinstance(getattr(m, "variance_epsilon", None), float))


def _is_swiglu_mlp(m: nn.Module) -> bool:
    return (type(m).__name__ in MLP_CLASSES
            and all(isinstance(getattr(m, k, None), nn.Module) for k in ("gate_proj", "up_proj", "down_proj"))
            and (isinstance(getattr(m, "act_fn", None), nn.SiLU)
                 or type(getattr(m, "act_fn", None)).__name__ == "SiLUActivation"))  # transformers' own SiLU


_ROPE_MODULES = ("transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2",
                 "transformers.models.mistral.modeling_mistral", "transformers.models.qwen3.modeling_qwen3")
_rope_patched: dict[str, object] = {}


def _patch_rope(model: nn.Module) -> int:
    """Swap the module-level `apply_rotary_pos_emb` of the model families whose formula is `rope_ref`'s."""
    import sys

    names = {type(m).__module__ for m in model.modules()} & set(_ROPE_MODULES)
    for name in names:
        mod = sys.modules[name]
        if name not in _rope_patched and hasattr(mod, "apply_rotary_pos_emb"):
            _rope_patched[name] = mod.apply_rotary_pos_emb
            mod.apply_rotary_pos_emb = _rope
    return len(names)


def unpatch_rope() -> None:
    import sys

    for name, fn in _rope_patched.items():
        sys.modules[name].apply_rotary_pos_emb = fn
    _rope_patched.clear()


def patch_fused(model: nn.Module, rope: bool = False) -> dict[str, int]:
    """Route RMSNorm and SiLU-gated MLP modules of `model` through the fused functions; returns counts.

    `rope`: also the rotary embedding of Llama/Qwen2/Mistral/Qwen3 (a process-wide swap of the function in
    their transformers module, same arithmetic; `unpatch_rope()` undoes it).
    """
    counts = {"rms_norm": 0, "swiglu": 0, "rope": _patch_rope(model) if rope else 0}
    for m in model.modules():
        if _is_rmsnorm(m):
            counts["rms_norm"] += swap_forward(m, _norm_forward)
        elif _is_swiglu_mlp(m):
            counts["swiglu"] += swap_forward(m, _mlp_forward)
    return counts


def unpatch_fused(model: nn.Module) -> None:
    restore_forwards(model)
