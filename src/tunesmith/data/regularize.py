"""Self-distillation data: general prompts answered by the base model itself before training.

Mixed in with the identity data, these samples anchor the model's ordinary behaviour, so it learns who it
is without answering every question with its name (the tutorial's over-fitting). No external dataset needed.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from .persona import GENERAL_QA


def regularization_prompts(langs: list[str]) -> list[str]:
    """General prompts per language; kept apart from the evaluation pools (tests/test_eval_prompts.py)."""
    return [q for lang in langs for q, _ in GENERAL_QA.get(lang, [])]


def self_distill(model, tokenizer, langs: list[str], n: int, max_new_tokens: int = 128, system: str | None = None,
                 seed: int = 0, log=print) -> list[list[dict]]:
    """`n` conversations whose answers the (still untrained) model wrote itself; prompts cycle if n is larger."""
    from ..serve.generate import greedy_batch

    if n <= 0:
        return []
    prompts = regularization_prompts(langs)
    head = [{"role": "system", "content": system}] if system else []
    convs = [head + [{"role": "user", "content": q}] for q in prompts]
    log(f"self-distillation: the base model answers {len(convs)} general prompts ...")
    answers = greedy_batch(model, tokenizer, convs, max_new_tokens=max_new_tokens)
    usable = [c + [{"role": "assistant", "content": a}] for c, a in zip(convs, answers) if a.strip()]
    if len(usable) < len(convs):
        log(f"self-distillation: {len(convs) - len(usable)} empty answers left out")
    if not usable:
        return []
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        batch = usable[:]
        rng.shuffle(batch)
        out += batch[: n - len(out)]
    return out


def cached_self_distill(cache: Path, model, tokenizer, reg_cfg, langs: list[str], n: int, system: str | None,
                        seed: int, is_main: bool = True, log=print, timeout_s: float = 6 * 3600) -> list[list[dict]]:
    """`self_distill` once per work dir: written to `cache` (JSONL) so a resume, or other ranks, reuse it.

    Ranks other than the main one wait for the file rather than for a collective with a timeout.
    """
    if n <= 0:
        return []
    if not cache.is_file():
        if is_main:
            convs = self_distill(model, tokenizer, langs, n, reg_cfg.max_new_tokens, system, seed, log)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in convs),
                           encoding="utf-8")
            os.replace(tmp, cache)
        else:
            t0 = time.time()
            while not cache.is_file():
                if time.time() - t0 > timeout_s:
                    raise TimeoutError(f"waited {timeout_s:.0f}s for {cache} from the main rank")
                time.sleep(1.0)
    return [json.loads(line)["messages"] for line in cache.read_text(encoding="utf-8").splitlines() if line.strip()]
