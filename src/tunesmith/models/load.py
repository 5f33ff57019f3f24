"""Resolve a base model, load it (dtype / 4-bit), and put LoRA on it."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_device(pref: str = "auto") -> torch.device:
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{pref}' asked for, but no CUDA GPU is visible. Use device=cpu or auto.")
    return torch.device(pref)


def pick_dtype(device: torch.device, pref: str = "auto") -> torch.dtype:
    """bf16 on GPUs that have it, fp16 on older GPUs, fp32 on the CPU."""
    if pref != "auto":
        return DTYPES[pref]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve(name: str) -> str:
    """Registry name / local folder / .gguf file / hub id -> something from_pretrained takes.

    A hub id is downloaded (weights, configs, tokenizer; never modeling code) into the Hugging Face cache and
    its local folder returned, so that InternLM2 hub checkpoints load natively like local ones.
    """
    from . import registry

    path = registry.resolve(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            if os.path.isfile(os.path.join(path, "adapter_config.json")):
                raise UserError(f"'{path}' is a LoRA adapter folder, not a model: give its base model with --adapter "
                                f"{path} (chat, serve), or merge it into one first (tunesmith merge)")
            raise UserError(f"'{path}' is not a model folder (no config.json): give a folder written by "
                            "save_pretrained / tunesmith merge, a registry name (tunesmith model list), a .gguf file "
                            "or a hub id")
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja",
                                                       "*.tiktoken"])
    except Exception as e:  # offline, unknown repo, gated repo: say so plainly
        raise UserError(f"could not download '{path}' from the Hugging Face hub ({type(e).__name__}: {e}). "
                        "Check the id and your connection, or give a local folder.") from None


def _is_internlm2(path: str) -> bool:
    from . import internlm2

    return os.path.isdir(path) and internlm2.is_internlm2(path)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if _is_internlm2(path) and not trust_remote_code:
        from . import internlm2

        tok = internlm2.load_internlm2_tokenizer(path)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise UserError(f"could not load a tokenizer from '{path}': {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def quant_config(compute_dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("method qlora needs bitsandbytes: pip install 'tunesmith[qlora]' (or bitsandbytes)") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_model(path: str, *, method: str = "lora", dtype: torch.dtype = torch.float32,
               device: torch.device = torch.device("cpu"), trust_remote_code: bool = False,
               attn_implementation: str | None = None):
    """Load a causal LM for training or inference; `method='qlora'` loads the linear weights in NF4."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if method == "qlora":
        kwargs["quantization_config"] = quant_config(dtype)
    if device.type == "cuda":  # load straight onto the GPU, no CPU copy first
        kwargs["device_map"] = {"": device.index or 0}
    elif method == "qlora":
        kwargs["device_map"] = {"": "cpu"}
    if _is_internlm2(path) and not trust_remote_code:
        from . import internlm2

        model = internlm2.load_internlm2(path, **kwargs)
        model.config._name_or_path = model.name_or_path = str(path)  # built in memory: record the source
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
        except OSError as e:
            raise UserError(f"could not load a model from '{path}': {e}") from None
        except ValueError as e:
            if "trust_remote_code" in str(e):
                raise UserError(f"'{path}' needs its own modeling code: set model.trust_remote_code: true in the "
                                "config (or --trust-remote-code) only if you trust its author.") from None
            raise
    if method != "qlora" and device.type != "cuda":
        model.to(device)
    return model


def enable_checkpointing(model, offload: bool = False) -> None:
    """Activation checkpointing on every decoder layer (non-reentrant), across transformers versions.

    `offload`: the layers' saved inputs go to pinned host memory (:mod:`tunesmith.kernels.offload`).
    """
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if offload:
        from ..kernels.offload import offload_checkpoint, reset

        reset()  # nothing left over from an earlier run in this process (one that raised, say)
        for m in model.modules():
            if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func"):
                m._gradient_checkpointing_func = offload_checkpoint


def lora_config(r: int, alpha: int, dropout: float, target_modules):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      bias="none", task_type="CAUSAL_LM")


def _targets_hint(model) -> str:
    """The last name part of each linear layer (bitsandbytes' included), the output head left out."""
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) or type(m).__name__ in ("Linear4bit", "Linear8bitLt")}
                   - {"lm_head", "output"})
    return f"\n  hint: this model's linear layers are {', '.join(names)}; or use 'all-linear'"


def check_targets(model, targets) -> None:
    """A list of module names must each name some module (as peft matches them: the whole name or its last parts);
    a typo otherwise surfaces as peft's traceback after the model has loaded."""
    if isinstance(targets, str):
        return
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise UserError(f"lora.target_modules: {', '.join(repr(t) for t in missing)} match no module of this model"
                        + _targets_hint(model))


def add_lora(model, cfg, grad_checkpointing: bool, offload: bool = False):
    """Freeze the base and add LoRA adapters (all linear layers of the blocks by default)."""
    from peft import get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    if grad_checkpointing:
        enable_checkpointing(model, offload)
        model.enable_input_require_grads()
    try:  # a list of names was checked before (check_targets, in train); here what peft itself refuses
        peft_model = get_peft_model(model, lora_config(cfg.r, cfg.alpha, cfg.dropout, cfg.target_modules))
    except ValueError as e:  # peft's "target modules not found" (a regular expression that matched nothing, say)
        if "target" not in str(e).lower():
            raise
        raise UserError(f"lora.target_modules={cfg.target_modules!r}: {e}" + _targets_hint(model)) from None
    # LoRA weights train in fp32 even when the base computes in bf16 (stable AdamW updates)
    for n, p in peft_model.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return peft_model


def apply_adapter(model, adapter: str, **kw):
    """`PeftModel.from_pretrained(model, adapter)`, with a user error (not peft's traceback, one line a mismatched
    tensor) when the adapter does not fit this base: it names the base the adapter was trained on."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter, **kw)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(adapter_load_error(adapter, e)) from None


def adapter_base(adapter: str | Path) -> str | None:
    """The base model an adapter folder says it was trained on (adapter_config.json); a user error if the folder
    is not an adapter."""
    import json

    cfg = Path(adapter) / "adapter_config.json"
    if not cfg.is_file():
        raise UserError(f"'{adapter}' is not a PEFT adapter folder (no adapter_config.json)")
    return json.loads(cfg.read_text(encoding="utf-8")).get("base_model_name_or_path")


def adapter_load_error(adapter: str, e: Exception) -> str:
    """What to tell a user whose adapter does not load onto the base they gave."""
    try:
        trained_on = adapter_base(adapter)
    except (UserError, OSError, ValueError, AttributeError):
        trained_on = None
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if "size mismatch" in ln]
    detail = f"{first[:300]}" if not lines else f"{len(lines)} tensors of other shapes, e.g. {lines[0][:300]}"
    hint = (f"; it was trained on '{trained_on}' (adapter_config.json): give that base model"
            if trained_on else "; give the base model it was trained on")
    return f"the adapter '{adapter}' does not fit this base model ({detail}){hint}"


def load_for_inference(model: str, adapter: str | None = None, *, device: str = "auto", dtype: str = "auto",
                       trust_remote_code: bool = False):
    """(model, tokenizer) ready for generation; an adapter dir is applied with peft (not merged)."""
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    path = resolve(model)
    tok_src = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else path
    tok = load_tokenizer(tok_src, trust_remote_code)
    m = load_model(path, method="lora", dtype=dt, device=dev, trust_remote_code=trust_remote_code)
    if adapter:
        adapter_base(adapter)  # a clear error if it is not an adapter folder
        m = apply_adapter(m, adapter)
    m.eval()
    return m, tok
