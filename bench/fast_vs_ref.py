"""Fast path against reference path: the same 50 training steps, same data and seed, loss curves side by side.

    python bench/fast_vs_ref.py --tok .gpu/tok/qwen --out results.json [--shape qwen2.5-0.5b] [--steps 50]

Builds a random-weight model of a real shape (bench/speed.py's SHAPES) carrying a real tokenizer, generates
persona data with tunesmith's generator, and runs the real `tunesmith.train.loop.train()` twice per method:
`train.kernels: on` + `offload_activations: auto` (the fast path) and `train.kernels: off` +
`offload_activations: false` (the reference path: PEFT's LoRA layers, Hugging Face's RMSNorm/MLP,
checkpointed loss chunks, plain checkpointing). Prints and saves each step's loss, the largest relative
difference, and each path's tokens/s and peak memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402

from tunesmith.config import Config  # noqa: E402
from tunesmith.train import loop  # noqa: E402


def one(folder: str, method: str, fast: bool, steps: int, work: Path, seq: int, batch: int,
        offload="auto", profile: int = 0) -> dict:
    cfg = Config.model_validate({
        "model": {"name": folder},
        "method": method,
        "lora": {"r": 64, "alpha": 16, "dropout": 0.0},
        "data": {"persona": {"name": "Tuney", "author": "Ada Lab", "langs": ["zh", "en"], "n": 2000},
                 "max_length": seq, "pack": True},
        "train": {"max_steps": steps, "batch_size": batch, "grad_accum": 1, "lr": 1e-3, "warmup_ratio": 0.1,
                  "grad_checkpointing": True, "seed": 0, "save_steps": 0, "sample_steps": 0, "evaluation_inputs": [],
                  "kernels": "on" if fast else "off", "offload_activations": offload if fast else False},
        "eval": {"enabled": False},
        "work_dir": str(work),
    })
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    lines: list[str] = []
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CUDA]) as p:
            res = loop.train(cfg, log=lambda *a: lines.append(" ".join(map(str, a))))
        kernel_table(p, profile)
    else:
        res = loop.train(cfg, log=lambda *a: lines.append(" ".join(map(str, a))))
    recs = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines() if x.strip()]
    warm = min(5, steps - 1)
    secs = recs[-1]["time"] - recs[warm - 1]["time"]
    toks = sum(r["tokens"] for r in recs[warm:])
    return {"losses": res.losses, "tok_s": toks / secs, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "log": [x for x in lines if x.startswith(("fast paths", "model:", "batch:"))]}


def kernel_table(p, top: int) -> None:
    """GPU time by kernel over the profiled run, and the share spent in matrix multiplies."""
    rows = [(e.key, e.self_device_time_total, e.count) for e in p.key_averages() if e.self_device_time_total > 0]
    total = sum(t for _, t, _ in rows) or 1
    gemm = sum(t for k, t, _ in rows if any(w in k.lower() for w in ("gemm", "nvjet", "cutlass", "sm90_xmma")))
    attn = sum(t for k, t, _ in rows if any(w in k.lower() for w in ("flash", "fmha", "attention", "sdpa")))
    print(f"  GPU kernel time {total / 1e6:.2f}s: matmul {100 * gemm / total:.1f} %, attention "
          f"{100 * attn / total:.1f} %, other {100 * (total - gemm - attn) / total:.1f} %")
    for k, t, c in sorted(rows, key=lambda r: -r[1])[:top]:
        print(f"  {100 * t / total:5.1f} % {c:>7} x  {k[:110]}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--methods", default="lora,qlora")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tok", required=True)
    ap.add_argument("--scratch", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", default="fast,reference",
                    help="fast, reference, fast-no-offload (each trains; the first two are compared)")
    ap.add_argument("--profile", type=int, default=0, help="print the N most expensive GPU kernels of each run")
    a = ap.parse_args()
    scratch = Path(a.scratch or tempfile.mkdtemp(prefix="fvr-"))
    folder = scratch / f"m-{a.shape}"
    speed.build_folder(a.shape, folder, "cuda", a.tok, 0)
    out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "gpu": torch.cuda.get_device_name(0),
           "versions": speed._versions("tunesmith"), "command": " ".join(sys.argv), "shape": a.shape,
           "seq": a.seq, "batch": a.batch, "steps": a.steps, "runs": []}
    for method in a.methods.split(","):
        r = {"method": method}
        for name in a.variants.split(","):
            t0 = time.perf_counter()
            print(f"\n-- {method} {name}", flush=True)
            r[name] = one(str(folder), method, name != "reference", a.steps, scratch / f"{method}-{name}", a.seq,
                          a.batch, offload=False if name == "fast-no-offload" else "auto", profile=a.profile)
            r[name]["wall_s"] = time.perf_counter() - t0
            print(f"   {r[name]['tok_s']:,.0f} tok/s, peak {r[name]['peak_gib']:.2f} GiB", flush=True)
        if not {"fast", "reference"} <= r.keys():
            out["runs"].append(r)
            continue
        lf, lr = r["fast"]["losses"], r["reference"]["losses"]
        r["max_rel_diff"] = max(abs(x - y) / abs(y) for x, y in zip(lf, lr))
        r["final_rel_diff"] = abs(lf[-1] - lr[-1]) / abs(lr[-1])
        out["runs"].append(r)
        print(f"\n== {a.shape} {method}: {a.steps} steps, {a.batch}x{a.seq}")
        for x in r["fast"]["log"]:
            print("   fast:", x)
        print(f"{'step':>5} {'fast':>10} {'reference':>10} {'rel diff':>9}")
        for i, (x, y) in enumerate(zip(lf, lr), 1):
            if i <= 3 or i % 5 == 0:
                print(f"{i:>5} {x:>10.4f} {y:>10.4f} {abs(x - y) / abs(y):>9.2e}")
        print(f"max rel diff {r['max_rel_diff']:.2e} (target < 1e-2); fast {r['fast']['tok_s']:,.0f} tok/s "
              f"{r['fast']['peak_gib']:.2f} GiB | reference {r['reference']['tok_s']:,.0f} tok/s "
              f"{r['reference']['peak_gib']:.2f} GiB", flush=True)
        Path(a.out).write_text(json.dumps(out, indent=1))
    Path(a.out).write_text(json.dumps(out, indent=1))
    return 0 if all(r.get("max_rel_diff", 0) < 1e-2 for r in out["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
