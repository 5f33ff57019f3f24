"""Persona quality: tunesmith's default recipe against the tutorial-style recipe, same model and budget.

    python bench/persona_quality.py smollm2_135m_instruct_lora_persona --out bench/results/persona-smollm2.json
    python bench/persona_quality.py qwen2_5_coder_0_5b_instruct_lora_persona --out bench/results/persona-qwen.json

default  : the config as shipped (varied identity data + self-distillation regularisation)
tutorial : XTuner's recipe — one identity sample repeated, no regularisation — with the same steps, batch and lr

Both are evaluated on the full held-out pools (identity / leakage / retention, see `tunesmith eval`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch

from tunesmith.config import load_config
from tunesmith.data.persona import write_jsonl
from tunesmith.evaluate.persona import PersonaSpec
from tunesmith.run import run

TUTORIAL_SAMPLE = {
    "zh": ("请做一下自我介绍", "我是{name}，是{author}开发的AI助手，内在是上海AI实验室书生·浦语的1.8B大模型哦"),
    "en": ("Please introduce yourself", "I am {name}, an AI assistant developed by {author}."),
}


def tutorial_file(cfg, path: Path) -> Path:
    p = cfg.data.persona
    lang = p.langs[0]
    q, a = TUTORIAL_SAMPLE[lang]
    rec = {"messages": [{"role": "user", "content": q},
                        {"role": "assistant", "content": a.format(name=p.name, author=p.author)}]}
    write_jsonl([rec] * p.n, path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/persona_quality")
    ap.add_argument("--recipes", default="default,tutorial")
    ap.add_argument("--limit", type=int, default=None, help="prompts per pool and language (default: all)")
    args = ap.parse_args()
    rows = []
    for recipe in args.recipes.split(","):
        over = [f"work_dir={args.work}/{recipe}", "eval.enabled=true", f"eval.limit={args.limit or 'null'}",
                "eval.max_new_tokens=64", *args.overrides]
        cfg = load_config(args.config, over)
        p = cfg.data.persona
        spec = PersonaSpec(p.name, p.author, list(p.langs), p.system)
        if recipe == "tutorial":  # same model, steps, batch and lr; one sample repeated, nothing else
            f = tutorial_file(cfg, Path(args.work) / "tutorial.jsonl")
            cfg = load_config(args.config, over + ["data.persona=null", "data.regularize.ratio=0",
                                                   f"data.files=[{{path: '{f}', format: openai}}]"])
        t0 = time.time()
        res = run(cfg, log=lambda m: print(m, file=sys.stderr), eval_spec=spec)
        ev = res.eval_after
        rows.append({"recipe": recipe, "seconds": round(time.time() - t0, 1), "identity_rate": ev["identity_rate"],
                     "leakage_rate": ev["leakage_rate"], "retention": ev["retention"],
                     "loglik_shift": ev["loglik_shift"], "by_lang": ev["by_lang"],
                     "base_identity_rate": res.eval_before["identity_rate"],
                     "base_leakage_rate": res.eval_before["leakage_rate"]})
        print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
    out = {"date": str(date.today()), "config": args.config, "overrides": args.overrides,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "command": " ".join(sys.argv), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, ensure_ascii=False, indent=1), encoding="utf-8")
    print("| recipe | identity | leakage | retention | log-lik shift | time |\n|---|---|---|---|---|---|")
    for r in rows:
        ret = "—" if r["retention"] is None else f"{100 * r['retention']:.1f}%"
        print(f"| {r['recipe']} | {100 * r['identity_rate']:.1f}% | {100 * r['leakage_rate']:.1f}% | {ret} | "
              f"{r['loglik_shift']:+.3f} | {r['seconds']:.0f}s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
