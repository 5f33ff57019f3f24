"""`tunesmith run CFG`: the whole job — data, train, merge, and a before/after table of answers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .export.merge import merge
from .models import load as mload
from .train.loop import sample_chats, train


@dataclass
class RunResult:
    merged_dir: Path
    adapter_dir: Path
    before: list[str]
    after: list[str]
    questions: list[str]


def run(cfg: Config, resume: str | None = None, log=print) -> RunResult:
    res = train(cfg, resume=resume, log=log)
    work = Path(cfg.work_dir)
    merged = work / "merged"
    if cfg.method == "full":
        merged = res.output_dir
    else:
        merge(res.base, res.output_dir, merged, dtype="bf16" if mload.pick_device(cfg.train.device).type == "cuda"
              else "fp32", trust_remote_code=cfg.model.trust_remote_code, log=log)
    qs = cfg.train.evaluation_inputs
    before = res.samples.get(0, [])
    after: list[str] = []
    if qs:
        model, tok = mload.load_for_inference(str(merged), device=cfg.train.device)
        after = sample_chats(model, tok, qs, cfg.train.system, cfg.train.max_new_tokens)
        table = [{"question": q, "before": b, "after": a} for q, b, a in zip(qs, before or [""] * len(qs), after)]
        (work / "before_after.json").write_text(json.dumps(table, ensure_ascii=False, indent=1), encoding="utf-8")
    return RunResult(merged, res.output_dir, before, after, qs)
