"""GGUF files -> plain Hugging Face model folders.

transformers can read (and de-quantize) a GGUF file, but the model it returns still carries a
``GgufHfQuantizer`` and a ``quantization_config``; saving that as-is gives a folder that plain
``from_pretrained(folder)`` treats as quantized. :func:`convert_gguf` strips both, stores the
weights in bfloat16 safetensors and writes a tokenizer with its chat template, the chat end token
as eos, a pad token distinct from eos where the vocabulary allows, and a generation config that
stops on the chat end token.

:func:`convert_gguf` writes into the folder it is given; making that atomic is the caller's job
(see ``registry.fetch``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from tunesmith.errors import UserError

Log = Callable[[str], None]

CHUNK = 1 << 20

# Turn-end tokens of common chat formats, most specific first.
CHAT_END_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
PAD_CANDIDATES = ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", "<|pad|>")

PROBE_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


# --------------------------------------------------------------------------- hashing


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(actual: str, expected: str, what: str) -> None:
    """Raise :class:`UserError` if ``actual`` differs from ``expected``; ``what`` names the source."""
    if actual.lower() != expected.lower():
        raise UserError(
            f"sha256 mismatch for {what}:\n"
            f"  expected {expected.lower()}\n"
            f"  actual   {actual.lower()}\n"
            "The downloaded file is not the one tunesmith pinned; it was not used. "
            "If you trust the new file, convert it yourself by passing its .gguf path as the model."
        )


def verify_sha256(path: str | os.PathLike, expected: str, what: str) -> str:
    """Hash ``path`` and compare with ``expected`` (raises :class:`UserError`). Returns the hash."""
    actual = sha256_file(path)
    check_sha256(actual, expected, what)
    return actual


# --------------------------------------------------------------------------- metadata


def read_gguf_metadata(path: str | os.PathLike, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Scalar/string/array metadata of a GGUF file (big token tables are skipped)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if keys is not None and key not in keys:
            continue
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "merges", "token_type", "scores")):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # pragma: no cover - exotic field types
            continue
    return out


def read_gguf_chat_template(path: str | os.PathLike) -> str | None:
    tmpl = read_gguf_metadata(path, keys=("tokenizer.chat_template",)).get("tokenizer.chat_template")
    return tmpl if isinstance(tmpl, str) and tmpl.strip() else None


# --------------------------------------------------------------------------- conversion


def _no_tqdm(iterable=None, *args, **kwargs):
    return iterable


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Silence transformers' tqdm bars (we log our own progress lines)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF loader uses tqdm.auto directly, outside transformers' switch.
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover
        gguf_utils = None
    saved = getattr(gguf_utils, "tqdm", None)
    if saved is not None:
        gguf_utils.tqdm = _no_tqdm
    try:
        yield
    finally:
        if saved is not None:
            gguf_utils.tqdm = saved
        if was:
            hf_logging.enable_progress_bar()


def _token_id(tok, token: str) -> int | None:
    vocab = tok.get_vocab()
    return vocab.get(token)


def _pick_chat_end(tok, template: str, wanted: str | None) -> str:
    vocab = tok.get_vocab()
    if wanted:
        if wanted not in vocab:
            raise UserError(f"chat end token {wanted!r} is not in the GGUF tokenizer's vocabulary")
        return wanted
    for cand in CHAT_END_CANDIDATES:
        if cand in vocab and cand in template:
            return cand
    if tok.eos_token is None:
        raise UserError("the GGUF tokenizer has no eos token and no known chat end token")
    return tok.eos_token


def _probe_logits(model, tok):
    import torch

    enc = tok.apply_chat_template(PROBE_MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0, -1].float()


def convert_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    chat_end_token: str | None = None,
    pad_token: str | None = None,
    tie_embeddings: bool | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """De-quantize ``gguf_path`` into a plain HF folder at ``out_dir`` (bfloat16 safetensors).

    chat_end_token: token that ends an assistant turn (becomes ``eos_token``); auto-detected if None.
    pad_token: pad token to set; None keeps the GGUF's pad unless it equals eos, in which case a
        distinct one (``<|endoftext|>`` etc.) is chosen when the vocabulary has one.
    tie_embeddings: True ties ``lm_head`` and the input embedding (using the ``lm_head`` tensor,
        which llama.cpp usually quantizes more finely) when the GGUF stores them separately.

    Returns facts about the result (for the cache marker and logs). The folder is verified:
    re-loaded with plain transformers, no quantization_config, same next-token logits.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    src_dir, fname = str(gguf_path.parent), gguf_path.name
    info: dict[str, Any] = {}

    log(f"  reading tokenizer from {fname}")
    with _quiet_progress():
        tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    info["chat_template_source"] = "transformers"
    if not template:
        template = read_gguf_chat_template(gguf_path)
        if template:
            tok.chat_template = template
            info["chat_template_source"] = "gguf-metadata"
        else:
            info["chat_template_source"] = None
            log("  warning: the GGUF has no chat template (tokenizer.chat_template); chat formatting will fail")
    template = template or ""

    # eos = the token that ends an assistant turn; keep the GGUF's own eos as an extra stop id.
    orig_eos = tok.eos_token
    end = _pick_chat_end(tok, template, chat_end_token)
    if end != tok.eos_token:
        tok.eos_token = end
    end_id = _token_id(tok, end)

    if pad_token is not None:
        if _token_id(tok, pad_token) is None:
            raise UserError(f"pad token {pad_token!r} is not in the GGUF tokenizer's vocabulary")
        tok.pad_token = pad_token
    elif tok.pad_token is None or tok.pad_token == tok.eos_token:
        for cand in PAD_CANDIDATES:
            if cand != tok.eos_token and _token_id(tok, cand) is not None:
                tok.pad_token = cand
                break
        else:
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
                log("  note: no separate pad token in the vocabulary; pad = eos")
    pad_id = _token_id(tok, tok.pad_token)

    stop_ids: list[int] = []
    for t in (end, orig_eos, "<|endoftext|>"):
        i = _token_id(tok, t) if t else None
        if i is not None and i not in stop_ids:
            stop_ids.append(i)

    log(f"  de-quantizing weights from {fname} (this takes a while on CPU)")
    with _quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
    model.eval()

    # Drop the GGUF quantizer so the folder saves (and loads) as an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model.config, "_model_name_or_path"):
        model.config._model_name_or_path = ""

    in_emb, out_emb = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight is in_emb.weight
    if tie_embeddings and not tied and out_emb is not None and out_emb.weight.shape == in_emb.weight.shape:
        diff = (out_emb.weight - in_emb.weight).abs().max().item()
        log(f"  tying embeddings (lm_head -> embed_tokens; max |diff| between the two GGUF tensors {diff:.4f})")
        with torch.no_grad():
            in_emb.weight.copy_(out_emb.weight)
        model.config.tie_word_embeddings = True
        model.tie_weights()
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        if not tied:  # pragma: no cover - depends on transformers internals
            raise RuntimeError("could not tie embeddings")
    info["tied_embeddings"] = bool(tied)

    model.config.eos_token_id = end_id
    model.config.pad_token_id = pad_id
    if tok.bos_token is not None:
        model.config.bos_token_id = _token_id(tok, tok.bos_token)
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=stop_ids if len(stop_ids) > 1 else end_id,
        pad_token_id=pad_id,
    )
    ctx = getattr(model.config, "max_position_embeddings", None)
    if isinstance(ctx, int) and ctx > 0:
        tok.model_max_length = ctx

    probe = _probe_logits(model, tok)  # float32 reference
    model = model.to(torch.bfloat16)

    log(f"  saving bfloat16 safetensors to {out_dir.name}/")
    out_dir.mkdir(parents=True, exist_ok=True)
    with _quiet_progress():
        model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    del model

    # Verify: plain transformers, no quantization, same logits.
    cfg = AutoConfig.from_pretrained(out_dir)
    if getattr(cfg, "quantization_config", None):
        raise RuntimeError(f"{out_dir}/config.json still has a quantization_config")
    with _quiet_progress():
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir)
        tok2 = AutoTokenizer.from_pretrained(out_dir)
    if not tok2.chat_template and template:
        raise RuntimeError("the saved tokenizer lost its chat template")
    probe2 = _probe_logits(reloaded.eval(), tok2)
    # bfloat16 rounding moves logits a little (and can swap near-tied top tokens); a broken save
    # (untrained lm_head, wrong tying, missing weights) moves them a lot.
    cos = torch.nn.functional.cosine_similarity(probe, probe2, dim=0).item()
    if cos < 0.99 or probe2.argmax().item() not in probe.topk(5).indices.tolist():
        raise RuntimeError(f"the saved model does not reproduce the converted model's logits (cosine {cos:.4f})")
    info["probe_cosine"] = round(cos, 5)
    del reloaded

    info.update(
        architecture=cfg.model_type,
        params=n_params,
        dtype="bfloat16",
        eos_token=tok.eos_token,
        eos_token_id=end_id,
        pad_token=tok.pad_token,
        stop_token_ids=stop_ids,
        context_length=ctx,
    )
    log(
        f"  ok: {cfg.model_type}, {n_params / 1e6:.0f}M params, eos {tok.eos_token!r}, pad {tok.pad_token!r}, "
        f"tied embeddings: {info['tied_embeddings']}"
    )
    return info
