"""Python garbage-collection pauses during a training run (CPU plumbing; the effect on a GPU step is the host stall).

Trains a tiny random Llama (the tests' `make_tiny_llama`) with offloaded, compiled layers for --steps steps, with
`gc.callbacks` recording every full (generation-2) collection: its duration and the step it fell in; then the step
times from the run's metrics.jsonl. Run it twice to compare the loop's `gc.freeze` after the first step with the
collector left alone:

    TUNESMITH_GC_FREEZE=1 .venv/bin/python bench/gc_pauses.py --steps 80
    TUNESMITH_GC_FREEZE=0 .venv/bin/python bench/gc_pauses.py --steps 80

--tokenizer: a folder with a tokenizer (default: the registry's Qwen2.5-Coder-0.5B, `tunesmith model fetch`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--tokenizer", default=str(Path.home() / ".cache/tunesmith/models/qwen2.5-coder-0.5b-instruct"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_tiny_llama
    from test_train import make_cfg, quiet

    from tunesmith.train.loop import train

    tmp = Path(tempfile.mkdtemp())
    model = make_tiny_llama(tmp / "model", Path(a.tokenizer))
    full, start = [], {}

    def on_gc(phase, info):
        if info["generation"] != 2:
            return
        if phase == "start":
            start["t"] = time.perf_counter()
        else:
            full.append((time.perf_counter() - start["t"], time.time()))

    gc.callbacks.append(on_gc)
    cfg = make_cfg(model, tmp / "run", max_steps=a.steps, kernels="on", grad_checkpointing=True,
                   offload_activations=True, compile=True, save_steps=0)
    cfg.lora.dropout = 0.0
    train(cfg, log=quiet)
    ends = [json.loads(x)["time"] for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [b - e for e, b in zip(ends[1:], ends[2:])]  # from the end of step 2 on (step 1 compiles)
    in_step = [(round(1e3 * d), sum(1 for e in ends if e < at) + 1) for d, at in full]
    print(json.dumps({"TUNESMITH_GC_FREEZE": os.environ.get("TUNESMITH_GC_FREEZE"),
                      "full_collections_ms_and_step": in_step,
                      "step_ms_median": round(1e3 * sorted(steps)[len(steps) // 2]),
                      "step_ms_max": round(1e3 * max(steps)), "steps_3_on_s": round(sum(steps), 2)}))


if __name__ == "__main__":
    main()
