"""`tunesmith run CFG`: the whole job — data, train, merge, then answers and persona figures before/after."""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .evaluate import persona as pev
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
    eval_before: dict | None = None
    eval_after: dict | None = None


def run(cfg: Config, resume: str | None = None, log=print, eval_spec: pev.PersonaSpec | None = None) -> RunResult:
    """`eval_spec`: the persona to evaluate against (default: the config's `data.persona`, if any)."""
    work = Path(cfg.work_dir)
    p = cfg.data.persona
    spec = eval_spec or (pev.PersonaSpec(p.name, p.author, list(p.langs), p.system) if p else None)
    do_eval = spec is not None and cfg.eval.enabled
    ev = cfg.eval
    baseline = eval_before = None
    if do_eval:  # the base model's own answers: the "before" figures and the reference for retention
        model, tok = mload.load_for_inference(mload.resolve(cfg.model.name), device=cfg.train.device,
                                              trust_remote_code=cfg.model.trust_remote_code)
        baseline = pev.run_pools(model, tok, spec, ev.max_new_tokens, ev.limit, log)
        eval_before = pev.score(spec, baseline["identity"], baseline["general"], baseline["general"], 0.0)
        del model
        gc.collect()

    res = train(cfg, resume=resume, log=log)
    merged = res.output_dir if cfg.method == "full" else work / "merged"
    if cfg.method != "full":
        on_gpu = mload.pick_device(cfg.train.device).type == "cuda"
        merge(res.base, res.output_dir, merged, dtype="bf16" if on_gpu else "fp32",
              trust_remote_code=cfg.model.trust_remote_code, log=log)

    qs = cfg.train.evaluation_inputs
    after: list[str] = []
    eval_after = None
    if qs or do_eval:
        model, tok = mload.load_for_inference(str(merged), device=cfg.train.device)
        if qs:
            after = sample_chats(model, tok, qs, cfg.train.system, cfg.train.max_new_tokens)
            table = [{"question": q, "before": b, "after": a}
                     for q, b, a in zip(qs, res.samples.get(0, [""] * len(qs)), after)]
            (work / "before_after.json").write_text(json.dumps(table, ensure_ascii=False, indent=1), encoding="utf-8")
        if do_eval:
            eval_after = pev.evaluate(model, tok, spec, baseline, ev.max_new_tokens, ev.limit, log)
            pev.write_report(eval_after, work / "eval")
            (work / "eval" / "before.json").write_text(json.dumps(eval_before, ensure_ascii=False, indent=1),
                                                        encoding="utf-8")
    return RunResult(merged, res.output_dir, res.samples.get(0, []), after, qs, eval_before, eval_after)
