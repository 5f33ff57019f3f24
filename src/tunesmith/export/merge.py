"""Merge a LoRA adapter into its unquantised base and write a plain transformers safetensors folder."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..fsutil import atomic_dir
from ..models import load as mload

MERGE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def merge(base: str, adapter: str | Path, out: str | Path, dtype: str = "bf16", max_shard_size: str = "2GB",
          trust_remote_code: bool = False, layout: str = "llama", log=print) -> Path:
    """Load the base in full precision (also for QLoRA-trained adapters), apply the adapter, fold it in, save."""
    if dtype not in MERGE_DTYPES:
        raise UserError(f"--dtype {dtype}: use one of {', '.join(MERGE_DTYPES)}")
    out = Path(out)
    mload.adapter_base(adapter)  # a clear error before any model is loaded
    path = mload.resolve(base)
    log(f"merging {adapter} into {path} ({dtype})")
    tokenizer = mload.load_tokenizer(str(adapter) if (Path(adapter) / "tokenizer_config.json").is_file() else path,
                                     trust_remote_code)
    # merge in fp32, then cast: LoRA deltas are small and would lose bits if added in bf16
    model = mload.load_model(path, method="lora", dtype=torch.float32, device=torch.device("cpu"),
                             trust_remote_code=trust_remote_code)
    model = mload.apply_adapter(model, str(adapter)).merge_and_unload()
    model.to(MERGE_DTYPES[dtype])
    model.config.use_cache = True
    if layout == "internlm2":
        from ..models import internlm2

        if not internlm2.is_internlm2(path):
            raise UserError("--layout internlm2 needs an InternLM2 base model folder")
        internlm2.save_internlm2_layout(model, model.config, out, path)
        log(f"wrote merged model (InternLM2 layout) to {out}")
        return out
    if layout != "llama":
        raise UserError(f"--layout {layout}: use llama (default) or internlm2")
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
    log(f"wrote merged model to {out}")
    return out
