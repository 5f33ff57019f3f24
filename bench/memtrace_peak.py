"""What is alive at the peak of a CUDA memory trace (a `TS_BENCH_MEMTRACE` pickle from speed.py).

    python3 bench/memtrace_peak.py TRACE.pickle [--top 25] [--after-us T]

Replays the trace's allocation events, finds the moment the most bytes were allocated (counting blocks that
were already live when recording began, from the snapshot's segments), and prints the live blocks at that
moment grouped by where they were allocated (the innermost frame in tunesmith, transformers, peft or
Inductor-generated code), with the allocation that reached the peak. `--after-us` looks only at events after a
time (to skip the model load and the first, compiling, step).
"""

from __future__ import annotations

import argparse
import pickle
from collections import defaultdict

KEEP = ("tunesmith", "transformers", "peft", "torchinductor", "bitsandbytes", "unsloth", "bench/")


def where(frames: list[dict]) -> str:
    for f in frames:
        fn = f.get("filename", "")
        if any(k in fn for k in KEEP):
            short = fn.split("site-packages/")[-1].split("src/")[-1]
            if "torchinductor" in fn:
                short = "inductor:" + fn.rsplit("/", 1)[-1]
            return f"{short}:{f.get('line')} {f.get('name')}"
    return (f"{frames[0].get('filename', '?').rsplit('/', 1)[-1]}:{frames[0].get('line')} {frames[0].get('name')}"
            if frames else "?")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--after-us", type=float, default=0.0)
    a = ap.parse_args()
    snap = pickle.load(open(a.trace, "rb"))
    events = [e for tr in snap["device_traces"] for e in tr]
    live: dict[int, tuple[int, str]] = {}
    seen = set()
    for e in events:
        if e["action"] == "alloc":
            seen.add(e["addr"])
    # blocks live at the end that the trace never saw allocated were live before recording began
    end_live = {b["address"]: b["size"] for s in snap["segments"] for b in s["blocks"]
                if b["state"] == "active_allocated"}
    # replay backwards is awkward; instead start from "pre-existing" = live at end and never allocated in trace,
    # plus everything freed in the trace without an alloc (also pre-existing)
    pre = {addr: size for addr, size in end_live.items() if addr not in seen}
    for e in events:
        if e["action"] in ("free_requested", "free_completed") and e["addr"] not in seen:
            pre.setdefault(e["addr"], e["size"])
    for addr, size in pre.items():
        live[addr] = (size, "(live before recording began)")
    cur = sum(s for s, _ in live.values())
    best, best_i, best_live = -1, -1, None
    allocated_at: set[int] = set()
    for i, e in enumerate(events):
        act = e["action"]
        if act == "alloc":
            live[e["addr"]] = (e["size"], where(e.get("frames", [])))
            cur += e["size"]
            allocated_at.add(e["addr"])
            if cur > best and e.get("time_us", 0) >= a.after_us:
                best, best_i, best_live = cur, i, dict(live)
        elif act == "free_requested":
            if e["addr"] in live:
                cur -= live.pop(e["addr"])[0]
    gib = 2 ** 30
    print(f"{len(events)} events; peak {best / gib:.3f} GiB allocated at event {best_i}")
    if best_live is None:
        return
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, w in best_live.values():
        groups[w][0] += size
        groups[w][1] += 1
    print(f"{'MiB':>9} {'blocks':>7}  allocated at")
    for w, (size, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:a.top]:
        print(f"{size / 2**20:9.1f} {n:7d}  {w}")
    e = events[best_i]
    print("\nthe allocation that reached the peak:", e["size"] / 2**20, "MiB")
    for f in e.get("frames", [])[:14]:
        print(f"   {f.get('filename', '?').split('site-packages/')[-1]}:{f.get('line')} {f.get('name')}")


if __name__ == "__main__":
    main()
