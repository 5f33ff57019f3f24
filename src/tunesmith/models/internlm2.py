"""Load InternLM2 checkpoints natively as Llama models, and write them back.

InternLM2 is a Llama architecture with different tensor names and one packed ``wqkv`` projection,
so no ``trust_remote_code`` is needed: the weights are renamed and ``wqkv`` is split into
q/k/v. ``wqkv`` rows are grouped by key/value head: for kv head ``j`` there are ``G = H / KV``
query heads, then k head ``j``, then v head ``j``::

    w = wqkv.view(KV, G + 2, head_dim, hidden)
    q, k, v = w[:, :G], w[:, G], w[:, G + 1]

Both RoPE implementations use ``rotate_half``, so q/k need no extra permutation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from tunesmith.errors import UserError
from tunesmith.fsutil import atomic_dir

logger = logging.getLogger(__name__)

MODEL_TYPE = "internlm2"
IM_END = "<|im_end|>"

# Tokenizer files copied verbatim when writing the original layout.
_TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)

# (InternLM2 suffix, Llama suffix) for every per-layer tensor except the packed wqkv.
_LAYER_RENAMES = (
    ("attention.wo", "self_attn.o_proj"),
    ("feed_forward.w1", "mlp.gate_proj"),
    ("feed_forward.w3", "mlp.up_proj"),
    ("feed_forward.w2", "mlp.down_proj"),
    ("attention_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
)
_TOP_RENAMES = (
    ("model.tok_embeddings.weight", "model.embed_tokens.weight"),
    ("output.weight", "lm_head.weight"),
    ("model.norm.weight", "model.norm.weight"),
)
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------- config


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_internlm2_config(path: str | os.PathLike) -> dict[str, Any]:
    """Return the raw config.json of an InternLM2 folder, or raise UserError."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{path}: no config.json; expected a local InternLM2 model folder")
    cfg = _read_json(cfg_path)
    if cfg.get("model_type") != MODEL_TYPE:
        raise UserError(f"{cfg_path}: model_type is {cfg.get('model_type')!r}, not {MODEL_TYPE!r}")
    return cfg


def is_internlm2(path: str | os.PathLike) -> bool:
    """True if ``path`` is a local folder whose config.json has ``model_type == "internlm2"``."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        return False
    try:
        return _read_json(cfg_path).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def _head_dims(cfg: Mapping[str, Any]) -> tuple[int, int, int]:
    """(num heads, num kv heads, head_dim) of an InternLM2 config."""
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    if heads % kv:
        raise UserError(f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    return heads, kv, head_dim


def _rope_parameters(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """transformers 5 ``rope_parameters`` (rope_theta inside) from InternLM2's rope_theta/rope_scaling."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))}
    scaling = cfg.get("rope_scaling")
    if not scaling:
        return params
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind not in ("dynamic", "linear"):
        raise UserError(f"config.json: rope_scaling type {kind!r} is not supported (InternLM2 knows dynamic, linear)")
    factor = float(scaling["factor"])
    if factor < 1.0:
        raise UserError(f"config.json: rope_scaling factor must be >= 1, got {factor}")
    params.update(rope_type=kind, factor=factor)
    return params


def _torch_dtype_name(cfg: Mapping[str, Any]) -> str | None:
    name = cfg.get("torch_dtype", cfg.get("dtype"))
    return name if name in _DTYPES else None


def llama_config_from_internlm2(cfg: Mapping[str, Any]) -> LlamaConfig:
    """Map an InternLM2 config.json dict to an equivalent ``LlamaConfig``.

    ``bias`` becomes ``attention_bias`` (InternLM2's MLP never has bias); rope_theta/rope_scaling
    become transformers 5 ``rope_parameters`` (e.g. ``{"rope_type": "dynamic", "factor": 2.0,
    "rope_theta": ...}``).
    """
    heads, kv, head_dim = _head_dims(cfg)
    out = LlamaConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        hidden_act=cfg.get("hidden_act", "silu"),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        use_cache=bool(cfg.get("use_cache", True)),
        pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=cfg.get("bos_token_id", 1),
        eos_token_id=cfg.get("eos_token_id", 2),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("bias", False)),
        mlp_bias=False,
        attention_dropout=0.0,
        pretraining_tp=1,
        rope_parameters=_rope_parameters(cfg),
    )
    dtype = _torch_dtype_name(cfg)
    if dtype:
        out.dtype = _DTYPES[dtype]
    out.architectures = ["LlamaForCausalLM"]
    return out


# --------------------------------------------------------------------------- weights


def split_wqkv(wqkv: torch.Tensor, heads: int, kv: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Split a packed wqkv weight ``[(H+2KV)*hd, hidden]`` (or bias ``[(H+2KV)*hd]``) into q, k, v."""
    g = heads // kv
    rest = wqkv.shape[1:]
    w = wqkv.reshape(kv, g + 2, head_dim, *rest)
    q = w[:, :g].reshape(heads * head_dim, *rest)
    k = w[:, g].reshape(kv * head_dim, *rest)
    v = w[:, g + 1].reshape(kv * head_dim, *rest)
    # clone: with one kv head a slice is a view of wqkv, and safetensors refuses shared storage
    return tuple(t.clone(memory_format=torch.contiguous_format) for t in (q, k, v))


def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv: int, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`split_wqkv`: pack q/k/v back into the grouped wqkv layout."""
    g = heads // kv
    rest = q.shape[1:]
    qg = q.reshape(kv, g, head_dim, *rest)
    kg = k.reshape(kv, 1, head_dim, *rest)
    vg = v.reshape(kv, 1, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape((heads + 2 * kv) * head_dim, *rest).contiguous()


def internlm2_to_llama_state_dict(sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename InternLM2 tensors to Llama names and split every ``wqkv`` into q/k/v projections."""
    heads, kv, head_dim = _head_dims(cfg)
    top = dict(_TOP_RENAMES)
    layer = dict(_LAYER_RENAMES)
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some old checkpoints saved; recomputed by the model
        if key in top:
            out[top[key]] = t
            continue
        m = _LAYER_RE.match(key)
        if not m:
            raise UserError(f"unexpected InternLM2 tensor {key!r}; is this really an InternLM2 checkpoint?")
        n, name, kind = m.groups()
        prefix = f"model.layers.{n}."
        if name == "attention.wqkv":
            q, k, v = split_wqkv(t, heads, kv, head_dim)
            out[f"{prefix}self_attn.q_proj.{kind}"] = q
            out[f"{prefix}self_attn.k_proj.{kind}"] = k
            out[f"{prefix}self_attn.v_proj.{kind}"] = v
        elif name in layer:
            out[f"{prefix}{layer[name]}.{kind}"] = t
        else:
            raise UserError(f"unexpected InternLM2 tensor {key!r}; is this really an InternLM2 checkpoint?")
    return out


def llama_to_internlm2_state_dict(sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Exact inverse of :func:`internlm2_to_llama_state_dict` (q/k/v re-packed into grouped wqkv).

    ``cfg`` is an InternLM2 config dict, or a ``LlamaConfig`` (its head counts are read).
    """
    if isinstance(cfg, LlamaConfig):
        cfg = {"num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
               "head_dim": cfg.head_dim, "hidden_size": cfg.hidden_size}
    heads, kv, head_dim = _head_dims(cfg)
    top = {llama: orig for orig, llama in _TOP_RENAMES}
    layer = {llama: orig for orig, llama in _LAYER_RENAMES}
    qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key in top:
            out[top[key]] = t
            continue
        m = _LAYER_RE.match(key)
        if not m:
            raise UserError(f"unexpected Llama tensor {key!r}; merge LoRA adapters before saving")
        n, name, kind = m.groups()
        prefix = f"model.layers.{n}."
        if name in qkv:
            if name == qkv[0]:
                parts = [sd[f"{prefix}{p}.{kind}"] for p in qkv]
                out[f"{prefix}attention.wqkv.{kind}"] = pack_wqkv(*parts, heads, kv, head_dim)
        elif name in layer:
            out[f"{prefix}{layer[name]}.{kind}"] = t
        else:
            raise UserError(f"unexpected Llama tensor {key!r}; merge LoRA adapters before saving")
    return out


def _weight_files(path: Path) -> list[Path]:
    """Weight files of a HF folder, by the standard names (other *.safetensors there are ignored)."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / index).is_file():
            shards = sorted(set(_read_json(path / index)["weight_map"].values()))
            return [path / s for s in shards]
        if (path / single).is_file():
            return [path / single]
    raise UserError(f"{path}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json) found")


def load_state_dict_from_folder(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read all weights of a HF folder (single or sharded safetensors, or pytorch_model*.bin)."""
    sd: dict[str, torch.Tensor] = {}
    for f in _weight_files(Path(path)):
        if f.suffix == ".safetensors":
            sd.update(load_file(str(f)))
        else:
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
    return sd


# --------------------------------------------------------------------------- generation config / tokenizer


def _token_ids_from_tokenizer_config(path: Path) -> dict[str, int]:
    """Map content -> id of the added tokens declared in tokenizer_config.json (empty if none)."""
    tc = path / "tokenizer_config.json"
    if not tc.is_file():
        return {}
    decoder = _read_json(tc).get("added_tokens_decoder") or {}
    return {v["content"]: int(k) for k, v in decoder.items() if isinstance(v, dict) and "content" in v}


def internlm2_generation_config(path: str | os.PathLike, cfg: Mapping[str, Any] | None = None) -> GenerationConfig:
    """generation_config.json of the folder, with ``<|im_end|>`` guaranteed among the eos ids."""
    path = Path(path)
    cfg = cfg if cfg is not None else read_internlm2_config(path)
    if (path / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(str(path))
    else:
        gen = GenerationConfig(bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
                               pad_token_id=cfg.get("pad_token_id"))
    eos = gen.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    im_end = _token_ids_from_tokenizer_config(path).get(IM_END)
    if im_end is not None and im_end not in eos:
        eos.append(im_end)
    gen.eos_token_id = eos
    return gen


def _sentencepiece(file: Path) -> Any | None:
    """The sentencepiece processor of ``file``, or None if absent or unreadable.

    sentencepiece < 0.2.3 refuses InternLM2's tokenizer.model (a piece holds a NUL character).
    """
    if not file.is_file():
        return None
    try:
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=str(file))
    except (ImportError, RuntimeError, OSError) as e:
        logger.info("skipping sentencepiece cross-check of %s: %s", file, e)
        return None


def check_internlm2_tokenizer(tok: PreTrainedTokenizerBase, path: str | os.PathLike, vocab_size: int | None) -> None:
    """Raise UserError if ``tok`` does not reproduce the folder's ids.

    Catches e.g. ``LlamaTokenizer``, which re-adds the chat tokens past the vocab (92548/92549)
    and prepends a dummy-prefix "▁"; the last check needs a sentencepiece that reads the file.
    """
    path = Path(path)
    for content, want in _token_ids_from_tokenizer_config(path).items():
        got = tok.convert_tokens_to_ids(content)
        if got != want:
            raise UserError(f"{path}: tokenizer maps {content!r} to {got}, tokenizer_config.json says {want}")
    if vocab_size is not None and len(tok) > vocab_size:
        raise UserError(f"{path}: tokenizer has {len(tok)} tokens but the model only {vocab_size} embeddings")
    sp = _sentencepiece(path / "tokenizer.model")
    if sp is not None:
        probe = "The quick brown fox.\n  Hello 书生·浦语 12345"
        if tok(probe, add_special_tokens=False)["input_ids"] != sp.encode(probe):
            raise UserError(f"{path}: tokenizer ids differ from sentencepiece's tokenizer.model "
                            f"({type(tok).__name__}); refusing a silently wrong tokenizer")


def load_internlm2_tokenizer(path: str | os.PathLike, chat: bool = True) -> PreTrainedTokenizerBase:
    """Tokenizer of an InternLM2 folder without remote code.

    ``AutoTokenizer`` (with ``trust_remote_code=False``, which also avoids an interactive prompt)
    builds a ``tokenizers`` backend from tokenizer.model that reproduces the original ids; the
    result is checked (special ids, no dummy prefix). With ``chat`` the eos token becomes
    ``<|im_end|>``, which ends every turn of the chat template.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    cfg = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
    check_internlm2_tokenizer(tok, path, cfg.get("vocab_size"))
    if not tok.chat_template:
        raise UserError(f"{path}: tokenizer_config.json has no chat_template")
    if chat and IM_END in tok.get_vocab():
        tok.eos_token = IM_END
    return tok


# --------------------------------------------------------------------------- model loading


def load_internlm2(path: str | os.PathLike, dtype: torch.dtype = torch.float32, **kwargs: Any) -> LlamaForCausalLM:
    """Load an InternLM2 folder as a ``LlamaForCausalLM`` built in memory (no remote code).

    The converted state dict is handed to ``LlamaForCausalLM.from_pretrained(None, config=...,
    state_dict=...)``, so ``quantization_config`` (bitsandbytes QLoRA), ``device_map`` and
    ``attn_implementation`` in ``kwargs`` work as for any Llama checkpoint.
    """
    path = Path(path)
    cfg = read_internlm2_config(path)
    config = llama_config_from_internlm2(cfg)
    sd = internlm2_to_llama_state_dict(load_state_dict_from_folder(path), cfg)
    kwargs.pop("trust_remote_code", None)
    model = LlamaForCausalLM.from_pretrained(None, config=config, state_dict=sd, dtype=dtype, **kwargs)
    model.generation_config = internlm2_generation_config(path, cfg)
    model.config.name_or_path = str(path)
    return model


# --------------------------------------------------------------------------- writing folders


@contextlib.contextmanager
def _atomic_dir(out: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """`fsutil.atomic_dir`, refusing an existing `out` unless `overwrite`."""
    if Path(out).exists() and not overwrite:
        raise UserError(f"{out}: already exists; choose another folder or pass overwrite=True")
    with atomic_dir(out) as tmp:
        yield tmp


def _save_safetensors(sd: Mapping[str, torch.Tensor], file: Path) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in sd.items()}, str(file), metadata={"format": "pt"})


def import_internlm2(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``src`` (InternLM2 layout) as a plain Llama-layout HF folder at ``out``, atomically.

    Weights keep their dtype; the folder holds model.safetensors, config.json,
    generation_config.json and a ``tokenizers``-backend tokenizer (tokenizer.json, chat template,
    eos ``<|im_end|>``), so stock ``AutoModelForCausalLM``/``AutoTokenizer`` load it.
    """
    src = Path(src)
    cfg = read_internlm2_config(src)
    config = llama_config_from_internlm2(cfg)
    sd = internlm2_to_llama_state_dict(load_state_dict_from_folder(src), cfg)
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    tok = load_internlm2_tokenizer(src)
    with _atomic_dir(out, overwrite) as tmp:
        _save_safetensors(sd, tmp / "model.safetensors")
        config.save_pretrained(str(tmp))
        internlm2_generation_config(src, cfg).save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        _strip_auto_map(tmp / "tokenizer_config.json")
        if (src / "tokenizer.model").is_file():
            shutil.copy2(src / "tokenizer.model", tmp / "tokenizer.model")
    return Path(out)


def _strip_auto_map(file: Path) -> None:
    """Drop ``auto_map`` (remote-code pointers) from a saved json file."""
    if file.is_file():
        data = _read_json(file)
        if data.pop("auto_map", None) is not None:
            file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _llama_state_dict(model_or_state_dict: Any) -> dict[str, torch.Tensor]:
    """Plain float tensors of a merged Llama model or state dict; rejects adapters and quantized weights."""
    if isinstance(model_or_state_dict, Mapping):
        sd = dict(model_or_state_dict)
    else:
        if hasattr(model_or_state_dict, "peft_config"):
            raise UserError("save_internlm2_layout needs a merged model: call merge_and_unload() first")
        sd = model_or_state_dict.state_dict()
    for key, t in sd.items():
        if not torch.is_floating_point(t):
            raise UserError(f"tensor {key!r} is quantized ({t.dtype}); load the model unquantized to save it")
    return sd


def save_internlm2_layout(
    model_or_state_dict: Any,
    llama_config: LlamaConfig,
    out: str | os.PathLike,
    original_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a merged Llama model back in the original InternLM2 layout at ``out``, atomically.

    Packs q/k/v into ``wqkv`` and restores the original names; config.json is the original one
    (key order kept) with ``torch_dtype`` (and ``vocab_size``) updated. Tokenizer files,
    generation_config.json and any ``*.py`` remote-code files are copied from ``original_dir``,
    so tools that expect the original repo (LMDeploy, the InternLM web demo) keep working.
    ``dtype`` casts the weights; by default they keep their own (float32 if mixed). Quantized
    models are refused: merge LoRA into an unquantized model first.
    """
    original_dir = Path(original_dir)
    cfg = read_internlm2_config(original_dir)
    sd = llama_to_internlm2_state_dict(_llama_state_dict(model_or_state_dict), llama_config)
    if llama_config.tie_word_embeddings:
        sd.pop("output.weight", None)  # tied to tok_embeddings, as the original code saves it
    if dtype is None and len({v.dtype for v in sd.values()}) > 1:
        dtype = torch.float32  # mixed dtypes: widen, so nothing is lost and torch_dtype is truthful
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    cfg = _updated_config(cfg, next(iter(sd.values())).dtype, sd)
    with _atomic_dir(out, overwrite) as tmp:
        _save_safetensors(sd, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        names = [*_TOKENIZER_FILES, "generation_config.json"]
        files = [original_dir / n for n in names] + sorted(original_dir.glob("*.py"))
        for f in files:
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    return Path(out)


def _updated_config(cfg: dict[str, Any], dtype: torch.dtype, sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Original config dict with torch_dtype/dtype and vocab_size set from the saved tensors."""
    cfg = dict(cfg)
    name = str(dtype).removeprefix("torch.")
    if "dtype" in cfg:
        cfg["dtype"] = name
    if "torch_dtype" in cfg or "dtype" not in cfg:
        cfg["torch_dtype"] = name
    emb = sd.get("model.tok_embeddings.weight")
    if emb is not None:
        cfg["vocab_size"] = int(emb.shape[0])
    return cfg
