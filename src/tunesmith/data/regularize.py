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


# open-ended tasks (writing, explaining, advice) next to GENERAL_QA's short facts and greetings: the answers a
# persona most easily leaks into. Kept apart from the evaluation pools (tests/test_eval_prompts.py).
OPEN_PROMPTS: dict[str, list[str]] = {
    "en": [
        "Write a haiku about mountains.", "Write two sentences about a rainy afternoon.",
        "Describe a horse in one sentence.", "Give me two ideas for a weekend hobby.",
        "Write a short birthday message for my brother.", "Explain what a rainbow is in simple words.",
        "Suggest a title for a story about a lost key.", "List three fruits that are yellow.",
        "Write a sentence using the word 'bright'.", "Explain why we need sleep, briefly.",
        "Give one tip for saving money.", "Describe the smell of fresh bread.",
        "Write a short invitation to a picnic.", "What are two benefits of reading books?",
        "Write a limerick about a frog.", "Explain what a verb is.",
        "Summarise the story of Cinderella in two sentences.", "Name three things you can find in a kitchen.",
        "Write a friendly reminder to water the plants.", "Explain the difference between weather and climate.",
        "Write a python function that adds two numbers.", "Give me a fun fact about octopuses.",
        "Describe a city at night in one sentence.", "Suggest a name for a pet goldfish.",
    ],
    "zh": [
        "写一首关于大海的四句短诗。", "用两句话描写下雨的下午。", "用一句话描述一匹马。", "给我两个周末爱好的建议。",
        "给我哥哥写一句生日祝福。", "用简单的话解释彩虹是什么。", "给一个关于丢失钥匙的故事起个标题。",
        "列出三种黄色的水果。", "用“明亮”造一个句子。", "简单解释一下为什么人需要睡觉。", "给一个省钱的小建议。",
        "描述一下新鲜面包的香味。", "写一段简短的野餐邀请。", "读书有哪两个好处？", "解释一下什么是动词。",
        "用两句话概括《西游记》的故事。", "说出厨房里常见的三样东西。", "写一句提醒家人浇花的话。",
        "解释一下天气和气候的区别。", "用Python写一个把两个数相加的函数。", "告诉我一个关于熊猫的趣事。",
        "用一句话描写夜晚的城市。", "给一条小金鱼起个名字。", "写一句鼓励朋友的话。",
    ],
}


def regularization_prompts(langs: list[str]) -> list[str]:
    """General prompts per language; kept apart from the evaluation pools (tests/test_eval_prompts.py)."""
    return [q for lang in langs for q in [q for q, _ in GENERAL_QA.get(lang, [])] + OPEN_PROMPTS.get(lang, [])]


def self_distill(model, tokenizer, langs: list[str], n: int, max_new_tokens: int = 128, system: str | None = None,
                 seed: int = 0, log=print) -> list[list[dict]]:
    """`n` conversations whose answers the (still untrained) model wrote itself; prompts cycle if n is larger."""
    from ..serve.generate import greedy_batch

    if n <= 0:
        return []
    prompts = regularization_prompts(langs)
    head = [{"role": "system", "content": system}] if system else []
    convs = [head + [{"role": "user", "content": q}] for q in prompts]
    log(f"self-distillation: the base model answers {len(convs)} general prompts (data.regularize; once per work "
        "dir) ...")
    t0 = time.monotonic()

    def progress(done, total):
        if done < total:
            log(f"self-distillation: {done}/{total} answered ({time.monotonic() - t0:.0f} s)")

    answers = greedy_batch(model, tokenizer, convs, max_new_tokens=max_new_tokens, progress=progress)
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
