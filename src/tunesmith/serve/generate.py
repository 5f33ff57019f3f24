"""Token-by-token generation with the model's own chat template, shared by chat, training samples, eval and serve.

A plain decoding loop over a KV cache: it stops at the template's end tokens (no runaway generation), at
user stop strings, at max_new_tokens, or when the caller stops iterating (a client that went away).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import torch

from ..data.template import end_token_ids, prompt_ids


@dataclass
class GenParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Finish:
    reason: str = "length"  # "stop" or "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0


def model_end_ids(model, tokenizer) -> set[int]:
    gen_cfg = getattr(model, "generation_config", None)
    return end_token_ids(tokenizer, gen_cfg)


@lru_cache(maxsize=None)
def _cache_kw(model_cls: type) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); use whichever this model's forward takes."""
    params = inspect.signature(model_cls.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def _base_class(model) -> type:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(inner)


def _device(model) -> torch.device:
    """Where the model computes: its first parameter outside host memory (an embedding kept in host memory during
    training comes first: kernels/host_weights.py), else the host."""
    for p in model.parameters():
        if p.device.type not in ("cpu", "meta"):
            return p.device
    return torch.device("cpu")


def _sample(logits: torch.Tensor, p: GenParams, gen: torch.Generator | None) -> int:
    if p.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < p.top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


@torch.inference_mode()
def stream_ids(model, input_ids: list[int], params: GenParams, end_ids: set[int]) -> Iterator[int]:
    """Yield generated token ids until an end token (not yielded) or max_new_tokens."""
    from transformers import DynamicCache

    dev = _device(model)
    gen = None
    if params.seed is not None and params.temperature > 0:
        gen = torch.Generator(device="cpu").manual_seed(params.seed)
    cache = DynamicCache()
    kw = _cache_kw(_base_class(model))
    x = torch.tensor([input_ids], device=dev)
    pos = 0
    for _ in range(params.max_new_tokens):
        position_ids = torch.arange(pos, pos + x.shape[1], device=dev).unsqueeze(0)
        out = model(input_ids=x, position_ids=position_ids, use_cache=True, **{kw: cache})
        pos += x.shape[1]
        nxt = _sample(out.logits[0, -1].float().cpu(), params, gen)
        if nxt in end_ids:
            return
        yield nxt
        x = torch.tensor([[nxt]], device=dev)


def stream_chat(model, tokenizer, messages: list[dict], params: GenParams, finish: Finish | None = None,
                end_ids: set[int] | None = None) -> Iterator[str]:
    """Yield text pieces of the assistant's reply to `messages`; fills `finish` with the stop reason and counts."""
    end_ids = model_end_ids(model, tokenizer) if end_ids is None else end_ids
    ids = prompt_ids(tokenizer, messages)
    finish = finish if finish is not None else Finish()
    finish.prompt_tokens, finish.reason = len(ids), "length"
    out: list[int] = []
    emitted = ""
    for tok in stream_ids(model, ids, params, end_ids):
        out.append(tok)
        finish.completion_tokens = len(out)
        text = tokenizer.decode(out, skip_special_tokens=True)
        if params.stop:
            cut = min((text.find(s) for s in params.stop if s and s in text), default=-1)
            if cut >= 0:
                if cut > len(emitted):
                    yield text[len(emitted):cut]
                finish.reason = "stop"
                return
        if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for the next token
            continue
        # hold back a tail that could still become a stop string
        hold = max((len(s) - 1 for s in params.stop), default=0)
        safe = len(text) - hold if hold else len(text)
        if safe > len(emitted):
            yield text[len(emitted):safe]
            emitted = text[:safe]
    text = tokenizer.decode(out, skip_special_tokens=True)
    if len(text) > len(emitted):
        yield text[len(emitted):]
    finish.reason = "stop" if len(out) < params.max_new_tokens else "length"


def chat_once(model, tokenizer, messages: list[dict], params: GenParams | None = None) -> str:
    return "".join(stream_chat(model, tokenizer, messages, params or GenParams()))


@torch.inference_mode()
def greedy_batch(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 128,
                 batch_size: int = 16, progress=None) -> list[str]:
    """Greedy answers to many conversations at once (left-padded batches through `generate`), in order.

    Used where throughput matters more than streaming: self-distillation data and evaluation. `progress(done,
    total)` is called after each batch.
    """
    end_ids = sorted(model_end_ids(model, tokenizer))
    dev = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[0]
    encoded = [prompt_ids(tokenizer, c) for c in conversations]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths together: less padding
    answers: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]):] = 1
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=end_ids, pad_token_id=pad, use_cache=True)
        for r, i in enumerate(idx):
            gen = out[r, width:].tolist()
            cut = next((k for k, t in enumerate(gen) if t in end_ids), len(gen))
            answers[i] = tokenizer.decode(gen[:cut], skip_special_tokens=True).strip()
        if progress is not None:
            progress(min(s + batch_size, len(order)), len(order))
    if was_training:
        model.train()
    return answers
