"""Training speed and memory, side by side: tunesmith vs plain Hugging Face (transformers + peft + bitsandbytes)
vs Unsloth, on random-weight models of real shapes, in one run.

    python bench/speed.py --device cuda --out DIR            # the GPU run (bench/gpu_run.sh wraps it)
    python bench/speed.py --tiny --device cpu --out /tmp/b   # tiny shapes on the CPU: checks the plumbing

How it works
- A builder process writes one model folder per shape (random init of the real config, bf16, seed fixed) with
  a tokenizer in it (Unsloth insists on one): Qwen2.5's, carried in `--tok`, where it fits the vocabulary,
  else a throwaway byte-level tokenizer made on the spot. Every stack loads the same folder.
- One worker process per stack (Unsloth patches transformers on import), started once and fed rows over a
  pipe; the parent (standard library only) times out, restarts or skips a worker that hangs, crashes or
  overruns `--budget-s`, records the error text, and goes on with the others.
- The same token stream for every stack. `full`: rows of `seq` random tokens, all trained. `varlen`: a seeded
  mix of persona-like short chats and Alpaca-like lengths (30..1500 tokens, the first 20-60 % of each sample
  a prompt without loss); HF and Unsloth take B samples a step padded to the longest, tunesmith packs them
  into B rows of `seq`. Tokens/s counts real (non-pad) tokens only.
- tunesmith: the real `tunesmith.train.loop.train()` from a Config written here; its data step (`prepare`)
  is swapped for the pre-tokenised rows (the loop's only data entry point), rows placed so that the loop's
  seeded row order is the stream order. Timing comes from its metrics.jsonl (wall time between steps).
- HF: AutoModelForCausalLM (SDPA) [+ NF4 double-quant + prepare_model_for_kbit_training] + peft LoRA,
  non-reentrant gradient checkpointing, bf16 autocast, model(input_ids, attention_mask, labels).loss.
- Unsloth: FastLanguageModel.from_pretrained + get_peft_model(use_gradient_checkpointing="unsloth"), same
  plain loop as HF (no trl).
- All: r=64, alpha=16, dropout 0, all linear layers of the blocks, fused torch AdamW lr 2e-4, clip 1.0,
  `--warmup` untimed steps then `--steps` timed ones. MFU = 6*N*tokens/s / card's dense bf16 peak (N = weights
  in matrix multiplies, lm_head included; 6 = forward + input-gradient backward + checkpoint recompute).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
STACKS = ("tunesmith", "hf", "unsloth")
WORKLOADS = ("full", "varlen")
IGNORE = -100

# ----------------------------------------------------------------------------- shapes and rows

# arch llama: LlamaConfig; arch qwen2: Qwen2Config. InternLM2-1.8B's sizes as Llama (tunesmith loads InternLM2 as Llama).
SHAPES: dict[str, dict] = {
    "internlm2-1.8b": dict(arch="llama", hidden=2048, layers=24, heads=16, kv=8, inter=8192, vocab=92544,
                           tie=False, rope_theta=1e6, max_pos=32768, eps=1e-5),
    "qwen2.5-7b": dict(arch="qwen2", hidden=3584, layers=28, heads=28, kv=4, inter=18944, vocab=152064,
                       tie=False, rope_theta=1e6, max_pos=32768, eps=1e-6),
    "qwen2.5-0.5b": dict(arch="qwen2", hidden=896, layers=24, heads=14, kv=2, inter=4864, vocab=151936,
                         tie=True, rope_theta=1e6, max_pos=32768, eps=1e-6),
    # tiny shapes for --tiny (CPU plumbing check)
    "tiny-llama": dict(arch="llama", hidden=64, layers=2, heads=4, kv=2, inter=192, vocab=1024,
                       tie=False, rope_theta=1e4, max_pos=2048, eps=1e-5),
    "tiny-qwen2": dict(arch="qwen2", hidden=64, layers=2, heads=4, kv=2, inter=192, vocab=151936,
                       tie=True, rope_theta=1e6, max_pos=2048, eps=1e-6),
}
# shape:method:SEQxBATCH, as in the table
ROWS = ["internlm2-1.8b:qlora:2048x4", "internlm2-1.8b:lora:2048x4", "qwen2.5-7b:qlora:2048x2",
        "qwen2.5-7b:lora:2048x4", "qwen2.5-0.5b:qlora:1024x4"]
TINY_ROWS = ["tiny-llama:lora:128x2", "tiny-llama:qlora:128x2", "tiny-qwen2:lora:96x2"]
DEFAULT_SEQ_BATCH = {r.rsplit(":", 1)[0]: r.rsplit(":", 1)[1] for r in ROWS + TINY_ROWS}


def parse_row(spec: str) -> dict:
    parts = spec.split(":")
    if len(parts) == 2:
        key = spec
        if key not in DEFAULT_SEQ_BATCH:
            raise SystemExit(f"row '{spec}': give it as shape:method:SEQxBATCH")
        parts.append(DEFAULT_SEQ_BATCH[key])
    shape, method, sb = parts
    if shape not in SHAPES or method not in ("lora", "qlora"):
        raise SystemExit(f"row '{spec}': shapes {sorted(SHAPES)}, methods lora/qlora")
    seq, batch = (int(x) for x in sb.lower().split("x"))
    return {"shape": shape, "method": method, "seq": seq, "batch": batch}


def timed_steps(row: dict, steps: int, min_tokens: int) -> int:
    """Timed steps for one row: `steps`, or more where the row's steps are too small to time `min_tokens` tokens.
    The same for every stack of the row, so their losses stay comparable step for step."""
    per_step = row["seq"] * row["batch"]
    return max(steps, -(-min_tokens // per_step)) if min_tokens > 0 else steps


def attn_params(s: dict) -> int:
    """One block's attention projection weights (query, key, value, output)."""
    return s["hidden"] * (s["hidden"] // s["heads"]) * (2 * s["heads"] + 2 * s["kv"])


def matmul_params(s: dict) -> int:
    """Weights that take part in matrix multiplies: the blocks' linear layers and lm_head (not the embedding)."""
    mlp = 3 * s["hidden"] * s["inter"]
    return s["layers"] * (attn_params(s) + mlp) + s["vocab"] * s["hidden"]


def env_switches(environ=None) -> dict:
    """The switches set in the environment for this run (TUNESMITH_*, TS_BENCH_*, the CUDA allocator's): they change
    what is measured and are not in the command line, so the JSON and the table record them."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in sorted(environ.items())
            if k.startswith(("TUNESMITH_", "TS_BENCH_")) or k == "PYTORCH_CUDA_ALLOC_CONF"}


def peak_bf16_flops(gpu: str | None) -> float | None:
    """Dense bf16 peak of the card, from its name (H100 SXM and H200: 989 TFLOP/s)."""
    n = (gpu or "").upper()
    if "H100" in n:
        return 756e12 if "PCIE" in n else 835e12 if "NVL" in n else 989e12
    if "H200" in n or "GH200" in n:
        return 989e12
    if "A100" in n:
        return 312e12
    return None


# ----------------------------------------------------------------------------- the token streams (every process)


def full_rows(vocab: int, seq: int, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    import numpy as np

    ids = np.random.default_rng(seed + 1).integers(0, vocab, size=(n, seq))
    return [(r.tolist(), r.tolist()) for r in ids]


def varlen_samples(vocab: int, max_len: int, seed: int, min_count: int, min_tokens: int = 0
                   ) -> list[tuple[list[int], list[int]]]:
    """A seeded stream (same prefix whatever its length): half persona-like short chats (~70 tokens), half
    Alpaca-like (median ~250, long tail), 30..min(1500, max_len) tokens; the first 20-60 % is a prompt (no loss)."""
    import numpy as np

    rng = np.random.default_rng(seed + 2)
    out, total = [], 0
    cap = min(1500, max_len)
    while len(out) < min_count or total < min_tokens:
        n = rng.lognormal(np.log(70), 0.35) if rng.random() < 0.5 else rng.lognormal(np.log(250), 0.8)
        n = int(min(cap, max(30, n)))
        ids = rng.integers(0, vocab, size=n).tolist()
        p = int(n * rng.uniform(0.2, 0.6))
        out.append((ids, [IGNORE] * p + ids[p:]))
        total += n
    return out


def padded_batches(samples, batch: int, n_steps: int, pad_id: int = 0):
    """HF / Unsloth batches: B consecutive samples right-padded to the longest; (tensors, real tokens)."""
    import torch

    out = []
    for s in range(n_steps):
        chunk = samples[s * batch:(s + 1) * batch]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        lab = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (x, y) in enumerate(chunk):
            ids[i, :len(x)] = torch.tensor(x)
            lab[i, :len(y)] = torch.tensor(y)
            mask[i, :len(x)] = 1
        out.append(({"input_ids": ids, "attention_mask": mask, "labels": lab}, int(mask.sum())))
    return out


def stream_batches(workload: str, shape: dict, seq: int, batch: int, n_steps: int, seed: int):
    if workload == "full":
        samples = full_rows(shape["vocab"], seq, n_steps * batch, seed)
    else:
        samples = varlen_samples(shape["vocab"], seq, seed, n_steps * batch)
    return padded_batches(samples, batch, n_steps)


# ----------------------------------------------------------------------------- model folders (builder process)


def byte_tokenizer():
    """A throwaway byte-level tokenizer (256 bytes + 4 specials): fits any vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    return tok


def save_tokenizer(folder: Path, vocab: int, tok_dir: str | None) -> str:
    """Qwen2.5's tokenizer (tokenizer.json may come gzipped) where it fits the vocabulary, else a byte-level one."""
    import gzip

    from transformers import AutoTokenizer

    src = Path(tok_dir) if tok_dir else None
    if src and src.is_dir() and ((src / "tokenizer.json").is_file() or (src / "tokenizer.json.gz").is_file()):
        tmp = Path(tempfile.mkdtemp(prefix="tok-"))
        for f in src.iterdir():
            if f.name == "tokenizer.json.gz":
                with gzip.open(f, "rb") as g, open(tmp / "tokenizer.json", "wb") as o:
                    shutil.copyfileobj(g, o)
            elif f.is_file():
                shutil.copy(f, tmp / f.name)
        tok = AutoTokenizer.from_pretrained(str(tmp))
        if len(tok) <= vocab:
            for f in tmp.iterdir():
                shutil.copy(f, folder / f.name)
            shutil.rmtree(tmp)
            return f"{src.name} ({len(tok)} tokens)"
        shutil.rmtree(tmp)
    byte_tokenizer().save_pretrained(str(folder))
    return "byte-level (260 tokens)"


def build_folder(name: str, folder: Path, device: str, tok_dir: str | None, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    s = SHAPES[name]
    marker = folder / "bench_shape.json"
    want = {"shape": name, **s, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        print(f"[build] {name}: reusing {folder}", flush=True)
        return
    t0 = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    common = dict(hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=s["layers"],
                  num_attention_heads=s["heads"], num_key_value_heads=s["kv"], vocab_size=s["vocab"],
                  max_position_embeddings=s["max_pos"], rms_norm_eps=s["eps"], rope_theta=s["rope_theta"],
                  tie_word_embeddings=s["tie"], hidden_act="silu", initializer_range=0.02)
    cfg = LlamaConfig(**common, attention_bias=False, mlp_bias=False) if s["arch"] == "llama" else Qwen2Config(**common)
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 0, 1, 2
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    t1 = time.perf_counter()
    model.save_pretrained(str(folder))
    tok = save_tokenizer(folder, s["vocab"], tok_dir)
    n = sum(p.numel() for p in model.parameters())
    del model
    marker.write_text(json.dumps(want))
    print(f"[build] {name}: {n / 1e9:.2f}B params, init {t1 - t0:.1f}s, save {time.perf_counter() - t1:.1f}s, "
          f"tokenizer {tok} -> {folder}", flush=True)


def builder_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True)
    ap.add_argument("--device", required=True)
    ap.add_argument("--tok")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("shapes", nargs="+")
    a = ap.parse_args(argv)
    for name in a.shapes:
        build_folder(name, Path(a.models) / f"m-{name.replace('.', '_')}", a.device, a.tok, a.seed)
        if a.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- workers (one process a stack)


def _tb() -> str:
    """The exception in one line, then the traceback's tail."""
    e = sys.exc_info()[1]
    head = (f"{type(e).__name__}: {e}".strip().splitlines() or ["?"])[0][:500]
    return f"{head}\n{traceback.format_exc()[-3000:]}"


class Emitter:
    def __init__(self, fd: int):
        self.f = os.fdopen(fd, "w", buffering=1)

    def __call__(self, **obj) -> None:
        self.f.write(json.dumps(obj) + "\n")
        self.f.flush()


def _mem_reset(device) -> tuple[int, int]:
    """Free what can be freed, restart the peak counters; returns (allocated, reserved) bytes now."""
    import gc

    import torch

    gc.collect()
    if device.type != "cuda":
        return 0, 0
    # cuBLAS keeps a workspace per thread that runs matmuls (the forward's, and autograd's backward thread): made
    # before the count starts, for every stack and every row alike, not by whichever row happens to run first
    a = torch.ones(64, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    torch.nn.functional.linear(a, a, a[0]).float().sum().backward()
    del a
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)


def _mem_peak(device, base: tuple[int, int]) -> tuple[float | None, float | None]:
    """Peak allocated / reserved GiB above `base` (what the row found in use: anything an earlier row left)."""
    import torch

    if device.type != "cuda":
        return None, None
    g = 1024 ** 3
    return ((torch.cuda.max_memory_allocated(device) - base[0]) / g,
            (torch.cuda.max_memory_reserved(device) - base[1]) / g)


def _versions(stack: str) -> dict:
    import importlib.metadata as md

    names = ["torch", "transformers", "peft", "bitsandbytes", "accelerate"]
    names += ["unsloth", "unsloth_zoo", "trl"] if stack == "unsloth" else []
    out = {}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = None
    if stack == "tunesmith":
        import tunesmith

        out["tunesmith"] = tunesmith.__version__
        try:
            head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True, timeout=10, check=False).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10, check=False).stdout.strip()
            out["tunesmith_git"] = (head + ("+dirty" if dirty else "")) or None
        except Exception:  # no git where it runs
            out["tunesmith_git"] = None
    return out


def _profiler():
    """With TS_BENCH_PROFILE=DIR: a torch profiler (CPU + CUDA) over the timed steps, else None."""
    if not os.environ.get("TS_BENCH_PROFILE"):
        return None
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True, with_flops=True)


_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")  # the ops that launch the kernels


def _matmul_table(prof, steps: int, top: int = 15) -> str:
    """Matrix multiplies grouped by input shapes: calls and GPU ms a step, and the TFLOP/s each shape reached (its
    FLOPs over its kernels' time), to compare with what cuBLAS gives on that shape alone."""
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key not in _MATMULS or not e.flops or not e.device_time_total:
            continue
        rows.append((e.device_time_total / 1e3 / steps, e.key, e.input_shapes, e.count / steps,
                     e.flops / (e.device_time_total * 1e-6) / 1e12))
    rows.sort(key=lambda r: -r[0])
    total = sum(r[0] for r in rows)
    lines = [f"matmuls by shape (GPU ms/step; all shapes {total:.1f} ms):"]
    for ms, key, shapes, calls, tflops in rows[:top]:
        lines.append(f"  {ms:7.1f} ms  {calls:5.0f} calls  {tflops:6.0f} TFLOP/s  {key} {shapes}")
    return "\n".join(lines) + "\n"


def _timeline(events: list[dict], steps: int, top: int = 12) -> str:
    """From a Chrome trace's events: the wall time no compute kernel ran (on any stream; copies and memsets are
    not compute) a step, and the idle gaps longer than 20 µs grouped by the kernels either side of them (which
    step of the layer waits), longest total first. Profiler annotations (``gpu_user_annotation``) are skipped:
    they span other events and would count their time twice."""
    ks = sorted((e["ts"], e["ts"] + e.get("dur", 0), e.get("name", "?")) for e in events
                if e.get("ph") == "X" and e.get("cat") == "kernel")
    if not ks:
        return "timeline: no kernel events\n"
    busy = idle = 0.0
    gaps: dict[tuple[str, str], list[float]] = {}
    end, prev = ks[0][0], ks[0][2]
    for t0, t1, name in ks:
        if t0 > end:
            idle += t0 - end
            if t0 - end > 20:
                g = gaps.setdefault((prev[:48], name[:48]), [0.0, 0])
                g[0] += t0 - end
                g[1] += 1
        busy += max(0.0, t1 - max(t0, end))
        if t1 > end:
            end, prev = t1, name
    span = max(end - ks[0][0], 1e-9)
    lines = [f"timeline: compute kernels busy {busy / 1e3 / steps:.1f} ms/step, idle {idle / 1e3 / steps:.1f} "
             f"ms/step ({100 * idle / span:.1f} % of the traced span); gaps over 20 us by the kernels around them:"]
    for (a, b), (us, n) in sorted(gaps.items(), key=lambda x: -x[1][0])[:top]:
        lines.append(f"  {us / 1e3 / steps:6.2f} ms/step  {n / steps:6.1f} gaps/step  after {a}  before {b}")
    return "\n".join(lines) + "\n"


def _kernel_kind(name: str) -> str:
    """A GPU kernel's kind, by its name, for the profile's per-kind totals."""
    n = name.lower()
    if "memcpy" in n or "memset" in n:
        return "copies"
    if any(k in n for k in ("flash", "fmha", "attention", "attn", "cudnn")):
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma", "splitk", "sm90_", "matmul")):
        return "gemm"
    if "triton" in n or n.startswith("_"):
        return "triton"
    if "nccl" in n:
        return "nccl"
    return "other"


def _save_profile(prof, name: str, seconds: float, steps: int) -> None:
    """Kernel time, launches and the top ops (by GPU and by CPU time) per step, to TS_BENCH_PROFILE/name.txt."""
    if prof is None:
        return
    ev = prof.key_averages()
    # kernels and copies only (CPU-side ops list the same device time again: Inductor's Triton launches even
    # appear under the kernel's own name)
    kern = [e for e in ev if e.self_device_time_total > 0 and str(e.device_type).endswith("CUDA")
            and not e.key.startswith(("## ", "Torch-Compiled Region"))]  # annotations: they span kernels
    dev = sum(e.self_device_time_total for e in kern) / 1e3  # ms, all steps
    launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                      "cuLaunchKernelEx"))
    ops = sum(e.count for e in ev if e.key.startswith("aten::"))
    cats: dict[str, float] = {}
    for e in kern:
        kind = _kernel_kind(e.key)
        cats[kind] = cats.get(kind, 0.0) + e.self_device_time_total / 1e3 / steps
    wall = seconds / steps * 1e3
    busy = sum(v for k, v in cats.items() if k != "copies")  # one compute stream: its kernels do not overlap
    head = (f"{name}: wall {wall:.1f} ms/step, GPU kernel and copy time {dev / steps:.1f} ms/step "
            f"({100 * dev / 1e3 / seconds:.0f} % of wall; copies overlap), {launches / steps:.0f} kernel "
            f"launches/step, {ops / steps:.0f} aten ops/step\n"
            f"GPU compute kernels {busy:.1f} ms/step = {100 * busy / wall:.0f} % of wall: for the other "
            f"{wall - busy:.1f} ms the GPU waited (for the host, or for a copy), under the profiler's own overhead\n"
            "GPU ms/step by kind: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(cats.items(), key=lambda x: -x[1]))
            + "\n")
    try:
        head += _matmul_table(prof, steps)
    except Exception as e:  # noqa: BLE001 — a diagnosis: never lose the rest of the profile over it
        head += f"matmuls by shape: not available ({type(e).__name__}: {e})\n"
    if hasattr(prof, "export_chrome_trace"):
        try:
            with tempfile.TemporaryDirectory() as tmp:
                prof.export_chrome_trace(f"{tmp}/trace.json")
                head += _timeline(json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"], steps)
        except Exception as e:  # noqa: BLE001 — as above
            head += f"timeline: not available ({type(e).__name__}: {e})\n"
    body = (ev.table(sort_by="self_device_time_total", row_limit=35) + "\n"
            + ev.table(sort_by="self_cpu_time_total", row_limit=35))
    d = Path(os.environ["TS_BENCH_PROFILE"])
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.txt").write_text(head + body)
    print(head, flush=True)


def run_tunesmith(cmd: dict, emit, device) -> None:
    """The real tunesmith.train.loop.train(), fed pre-tokenised rows; one fresh train() per workload."""
    from unittest import mock

    import torch

    from tunesmith.config import Config
    from tunesmith.data.build import Prepared
    from tunesmith.data.packing import FitReport, Row, pack
    from tunesmith.data.template import Rendered
    from tunesmith.train import loop

    shape, seq, batch = SHAPES[cmd["shape"]], cmd["seq"], cmd["batch"]
    warm, steps, seed = cmd["warmup"], cmd["steps"], cmd["seed"]
    n_steps = warm + steps
    need = n_steps * batch
    for wl in cmd["workloads"]:
        t_start = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix=f"ts-{wl}-", dir=cmd["scratch"]))
        try:
            if wl == "full":
                samples = [Rendered(i, l) for i, l in full_rows(shape["vocab"], seq, need, seed)]
                rows = []
                for s in samples:
                    r = Row()
                    r.add(s)
                    rows.append(r)
            else:  # the same stream as HF/Unsloth, enough of it to fill `need` packed rows
                tokens = int(1.25 * need * seq)
                while True:
                    samples = [Rendered(i, l) for i, l in varlen_samples(shape["vocab"], seq, seed, need, tokens)]
                    rows = pack(samples, seq, seed)
                    if len(rows) >= need:
                        break
                    tokens *= 2
            # place rows so that the loop's seeded shuffle (row_stream) yields them in stream order
            perm = loop.row_stream(len(rows), seed, 0, len(rows))
            placed: list = [None] * len(rows)
            for j, r in enumerate(rows):
                placed[perm[j]] = r
            prepared = Prepared(placed, samples, FitReport(kept=len(samples)), len(samples))
            data = work / "data.jsonl"
            data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "hello"}]}) + "\n")
            sampling = bool(os.environ.get("TS_BENCH_SAMPLE")) and device.type == "cuda"
            cfg = Config.model_validate({
                "model": {"name": cmd["folder"], "dtype": "auto"},
                "method": cmd["method"],
                "lora": {"r": cmd["r"], "alpha": cmd["alpha"], "dropout": 0.0, "target_modules": "all-linear"},
                "data": {"files": [{"path": str(data)}], "max_length": seq, "pack": True},
                "train": {"max_steps": n_steps, "batch_size": batch, "grad_accum": 1, "lr": cmd["lr"],
                          "warmup_ratio": 0.0, "max_grad_norm": 1.0, "grad_checkpointing": True, "seed": seed,
                          "offload_activations": {"1": True, "0": False}.get(os.environ.get("TS_BENCH_OFFLOAD", ""), "auto"),
                          "compile": {"1": True, "0": False}.get(os.environ.get("TS_BENCH_COMPILE", ""), "auto"),
                          "offload_embeddings": {"1": True, "0": False}.get(os.environ.get("TS_BENCH_HOSTEMB", ""),
                                                                           "auto"),
                          "save_steps": 0, "sample_steps": warm if sampling else 0, "save_total_limit": 1,
                          "evaluation_inputs": ["Who are you?"] if sampling else [], "max_new_tokens": 16,
                          "device": cmd["device"]},
                "eval": {"enabled": False},
                "work_dir": str(work / "run"),
            })
            base = _mem_reset(device)
            prof = _profiler()
            orig_step = loop.RunLogger.step

            step_peaks: list[float] = []  # GiB allocated at most during each step (where each step's peak lies)
            trace = os.environ.get("TS_BENCH_MEMTRACE") if device.type == "cuda" else None
            if trace:
                torch.cuda.memory._record_memory_history(max_entries=400000, stacks="python")

            def step_hook(self, step, *a, _orig=orig_step, **k):
                _orig(self, step, *a, **k)
                if device.type == "cuda" and os.environ.get("TS_BENCH_STEPPEAKS"):  # diagnosis only: resets the peak
                    step_peaks.append(round((torch.cuda.max_memory_allocated(device) - base[0]) / 2**30, 3))
                    torch.cuda.reset_peak_memory_stats(device)
                if trace and step == 3:  # model load, the first two steps (compiling included) and a steady one
                    torch.cuda.memory._dump_snapshot(f"{trace}-{cmd['shape']}-{cmd['method']}-{wl}.pickle")
                    torch.cuda.memory._record_memory_history(enabled=None)
                if prof is not None and step == warm:
                    prof.start()
                elif prof is not None and step == n_steps:
                    torch.cuda.synchronize(device) if device.type == "cuda" else None
                    prof.stop()

            sample_peaks: list[tuple[float, float]] = []  # (peak before, peak while sampling), GiB

            def sample_hook(*a, _orig=loop.sample_chats, **k):  # diagnosis only: resets the peak
                before = (torch.cuda.max_memory_allocated(device) - base[0]) / 2**30  # above base, as _mem_peak
                torch.cuda.reset_peak_memory_stats(device)
                out = _orig(*a, **k)
                after = (torch.cuda.max_memory_allocated(device) - base[0]) / 2**30
                sample_peaks.append((round(before, 3), round(after, 3)))
                torch.cuda.reset_peak_memory_stats(device)
                return out

            with mock.patch.object(loop, "prepare", lambda *a, _p=prepared, **k: _p), \
                    mock.patch.object(loop.RunLogger, "step", step_hook), \
                    mock.patch.object(loop, "sample_chats", sample_hook if sampling else loop.sample_chats):
                res = loop.train(cfg, log=lambda *a: print("[tunesmith]", *a, flush=True))
            alloc, reserved = _mem_peak(device, base)
            if sample_peaks:  # the training peak is the largest "before"; mid-run samples are all but the first and last
                alloc = max(alloc or 0.0, *(b for b, _ in sample_peaks))
                print(f"[tunesmith] peak GiB before / while sampling: {sample_peaks}", flush=True)
            if step_peaks:
                alloc = max(alloc or 0.0, *step_peaks)  # the per-step resets above hide earlier peaks from _mem_peak
                print(f"[tunesmith] peak GiB by step: {step_peaks}", flush=True)
            recs = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
            if len(recs) != n_steps:
                raise RuntimeError(f"metrics.jsonl has {len(recs)} steps, expected {n_steps}")
            seconds = recs[-1]["time"] - recs[warm - 1]["time"]
            tokens = sum(len(r.input_ids) for r in rows[warm * batch:n_steps * batch])
            _save_profile(prof, f"{cmd['shape']}-{cmd['method']}-{wl}-tunesmith", seconds, steps)
            from tunesmith.kernels import lean as _lean

            emit(op="result", workload=wl, tok_s=tokens / seconds, tokens=tokens, seconds=seconds,
                 lean_recompute=_lean.stats["marked"] > 0, kept_attention=_lean.stats["kept"] > 0,
                 sample_peak_gib=max((w for _, w in sample_peaks[1:-1]), default=None),
                 peak_gib=alloc, peak_reserved_gib=reserved, loss_first=res.losses[0], loss_last=res.losses[-1],
                 losses=res.losses, wall_s=time.perf_counter() - t_start,
                 step_s=[round(b["time"] - a["time"], 4) for a, b in zip(recs[warm - 1:], recs[warm:])],
                 note=f"{len(rows)} packed rows, {sum(len(r.lengths) for r in rows[:need])} samples trained"
                 if wl == "varlen" else None)
        except Exception:
            emit(op="result", workload=wl, error=_tb())
        finally:
            shutil.rmtree(work, ignore_errors=True)
            _mem_reset(device)


def _load_hf(cmd: dict, device, dtype):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw: dict = {"dtype": dtype, "attn_implementation": "sdpa"}
    kw["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    if cmd["method"] == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(cmd["folder"], **kw)
    model.config.use_cache = False
    gc_kw = {"use_reentrant": False}
    if cmd["method"] == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs=gc_kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kw)
        model.enable_input_require_grads()
    torch.manual_seed(cmd["seed"])
    lc = LoraConfig(r=cmd["r"], lora_alpha=cmd["alpha"], lora_dropout=0.0, target_modules="all-linear",
                    bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lc)


def _load_unsloth(cmd: dict, device, dtype):
    import torch
    from unsloth import FastLanguageModel

    q = cmd["method"] == "qlora"
    model, _tok = FastLanguageModel.from_pretrained(
        cmd["folder"], max_seq_length=cmd["seq"], dtype=dtype, load_in_4bit=q, load_in_16bit=not q,
        full_finetuning=False, use_exact_model_name=True)
    torch.manual_seed(cmd["seed"])
    model = FastLanguageModel.get_peft_model(
        model, r=cmd["r"], lora_alpha=cmd["alpha"], lora_dropout=0.0, bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth", random_state=cmd["seed"], max_seq_length=cmd["seq"])
    FastLanguageModel.for_training(model)
    return model


def run_plain(cmd: dict, emit, device, stack: str) -> None:
    """HF and Unsloth: load once, then per workload a fresh adapter (initial LoRA weights restored) and
    optimizer, and the plain loop: forward with labels, backward, clip, AdamW step."""
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = _mem_reset(device)
    t_load = time.perf_counter()
    try:
        model = (_load_unsloth if stack == "unsloth" else _load_hf)(cmd, device, dtype)
    except Exception:
        err = _tb()
        for wl in cmd["workloads"]:
            emit(op="result", workload=wl, error=err)
        return
    load_s = time.perf_counter() - t_load
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    init = [p.detach().to("cpu", copy=True) for p in params]  # on the host: not charged to the peak
    shape, warm, n_steps = SHAPES[cmd["shape"]], cmd["warmup"], cmd["warmup"] + cmd["steps"]
    for k, wl in enumerate(cmd["workloads"]):
        t_start = time.perf_counter()
        opt = None
        try:
            with torch.no_grad():
                for p, p0 in zip(params, init):
                    p.copy_(p0)
            torch.manual_seed(cmd["seed"])
            batches = stream_batches(wl, shape, cmd["seq"], cmd["batch"], n_steps, cmd["seed"])
            if k:
                _mem_reset(device)
            opt = torch.optim.AdamW(params, lr=cmd["lr"], weight_decay=0.0, fused=device.type == "cuda")
            losses, t0 = [], time.perf_counter()
            prof = _profiler()
            for i, (b, _) in enumerate(batches):
                if i == warm:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    t0 = time.perf_counter()
                    if prof is not None:
                        prof.start()
                b = {key: v.to(device, non_blocking=True) for key, v in b.items()}
                with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                    loss = model(**b).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            if prof is not None:
                prof.stop()
            _save_profile(prof, f"{cmd['shape']}-{cmd['method']}-{wl}-{stack}", seconds, n_steps - warm)
            tokens = sum(n for _, n in batches[warm:])
            alloc, reserved = _mem_peak(device, base)
            emit(op="result", workload=wl, tok_s=tokens / seconds, tokens=tokens, seconds=seconds,
                 peak_gib=alloc, peak_reserved_gib=reserved, loss_first=losses[0], loss_last=losses[-1],
                 losses=losses, wall_s=time.perf_counter() - t_start + (load_s if k == 0 else 0.0),
                 note=f"load {load_s:.1f}s" if k == 0 else None)
        except Exception:
            emit(op="result", workload=wl, error=_tb())
        finally:
            del opt
            for p in params:
                p.grad = None
            _mem_reset(device)
    del model, params, init
    _mem_reset(device)


def worker_main(stack: str, fd: int, device_name: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    emit = Emitter(fd)
    try:
        if stack == "unsloth":
            import unsloth  # noqa: F401  (before transformers, as Unsloth requires)
        if stack == "tunesmith":  # the CUDA allocator default the tunesmith command line sets, before torch loads
            from tunesmith import set_allocator_default

            set_allocator_default()
        import torch

        if stack == "tunesmith":
            import tunesmith.train.loop  # noqa: F401
        else:
            import peft  # noqa: F401
            import transformers  # noqa: F401
        device = torch.device(device_name)
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        if device.type == "cuda":
            torch.zeros(1, device=device)
        emit(op="ready", versions=_versions(stack), gpu=gpu)
    except Exception:
        emit(op="ready", error=_tb())
        return
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") == "quit":
            break
        print(f"[{stack}] row {cmd['shape']} {cmd['method']} {cmd['seq']}x{cmd['batch']} {cmd['workloads']}",
              flush=True)
        if stack == "tunesmith":
            run_tunesmith(cmd, emit, device)
        else:
            run_plain(cmd, emit, device, stack)
        emit(op="row_done")


# ----------------------------------------------------------------------------- the parent (standard library only)


class Worker:
    """A stack's process: commands on stdin, JSON replies on a pipe, its own output in a log file."""

    def __init__(self, stack: str, args, env: dict, cwd: str, log_path: Path):
        self.stack = stack
        r, w = os.pipe()
        self.log_path = log_path
        self.log = open(log_path, "a", buffering=1)
        self.proc = subprocess.Popen([sys.executable, str(HERE), "_worker", stack, str(w), args.device],
                                     stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, cwd=cwd, pass_fds=(w,), text=True)
        os.close(w)
        self.q: queue.Queue = queue.Queue()
        reader = os.fdopen(r, "r")

        def pump():
            for line in reader:
                try:
                    self.q.put(json.loads(line))
                except json.JSONDecodeError:
                    pass
            self.q.put(None)  # the process closed its end: it exited

        threading.Thread(target=pump, daemon=True).start()

    def get(self, timeout: float):
        try:
            return self.q.get(timeout=max(0.1, timeout))
        except queue.Empty:
            return "timeout"

    def send(self, obj: dict) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def tail(self, n: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def quit(self) -> None:
        try:
            self.send({"op": "quit"})
            self.proc.wait(timeout=30)
        except Exception:
            pass
        self.kill()


def err_line(err: str) -> str:
    return (err.strip().splitlines() or ["?"])[0].strip()


def _ratio(r: dict, other: dict | None) -> str:
    return f"{r['tok_s'] / other['tok_s']:.2f}" if other and other.get("tok_s") else "—"


def fmt_table(rows: list[dict]) -> str:
    head = ("| workload | shape | method | seq×batch | stack | tok/s | peak GiB (alloc / reserved) | MFU | "
            "loss first → last | ×HF | ×Unsloth |")
    lines = [head, "|" + "---|" * 11]
    by = {}
    for r in rows:
        by.setdefault((r["workload"], r["shape"], r["method"], r["seq"], r["batch"]), {})[r["stack"]] = r
    for key, stacks in by.items():
        for st in STACKS:
            r = stacks.get(st)
            if r is None:
                continue
            wl, shape, method, seq, batch = key
            if r.get("error"):
                err = err_line(r["error"])[:100].replace("|", "/")
                lines.append(f"| {wl} | {shape} | {method} | {seq}×{batch} | {st} | — | — | — | — | — | {err} |")
                continue

            mem = "—" if r["peak_gib"] is None else f"{r['peak_gib']:.2f} / {r['peak_reserved_gib']:.2f}"
            mfu = "—" if r.get("mfu") is None else f"{100 * r['mfu']:.1f} %"
            if r.get("mfu_run") is not None:
                mfu += f" ({100 * r['mfu_run']:.1f} % run)"
            lines.append(f"| {wl} | {shape} | {method} | {seq}×{batch} | {st} | {r['tok_s']:,.0f} | {mem} | {mfu} | "
                         f"{r['loss_first']:.4f} → {r['loss_last']:.4f} | {_ratio(r, stacks.get('hf'))} | "
                         f"{_ratio(r, stacks.get('unsloth'))} |")
    return "\n".join(lines)


def default_scratch() -> str:
    try:
        if shutil.disk_usage("/dev/shm").free > 40 * 1024 ** 3:  # RAM-backed: the 15 GB 7B folder writes fast
            return "/dev/shm/tunesmith-bench"
    except OSError:
        pass
    return os.path.join(tempfile.gettempdir(), "tunesmith-bench")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for <date>-<gpu>.json/.md and logs")
    ap.add_argument("--device", default="cuda", help="cuda or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: a plumbing check (on the CPU: tunesmith and HF only)")
    ap.add_argument("--rows", help=f"comma list of shape:method[:SEQxBATCH]; default: {','.join(ROWS)}")
    ap.add_argument("--stacks", default=None, help="comma list of tunesmith,hf,unsloth (default: all; on the CPU no unsloth)")
    ap.add_argument("--workloads", default="full,varlen")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--alpha", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scratch", default=default_scratch(),
                    help="model folders and work dirs, about 21 GB for the default rows (default: /dev/shm "
                         "where it has 40 GB free, else the temp dir)")
    ap.add_argument("--tok", default=str(REPO / ".gpu" / "tok" / "qwen"),
                    help="Qwen2.5 tokenizer files (tokenizer.json may be .gz) for the model folders")
    ap.add_argument("--unsloth-site", default=str(REPO / ".gpu" / "unsloth-site"),
                    help="put on PYTHONPATH for the Unsloth worker")
    ap.add_argument("--hf-site", default=None, help="put on PYTHONPATH for the tunesmith and HF workers (bitsandbytes, pydantic)")
    ap.add_argument("--min-timed-tokens", type=int, default=0,
                    help="time at least this many tokens a row (more timed steps where --steps gives fewer), for "
                         "every stack alike. The small rows' 12 steps last ~2 s on an H200 and moved 20,095-31,146 "
                         "tok/s between runs (thirteenth run); 250000 gives them 6-12 s")
    ap.add_argument("--budget-s", type=float, default=450, help="start no row after this many seconds")
    ap.add_argument("--row-timeout", type=float, default=180, help="kill a worker stuck on one row this long")
    ap.add_argument("--fresh-workers", action="store_true",
                    help="each row in new worker processes, nothing left from earlier rows (twelfth run: 7B QLoRA "
                         "after 7B LoRA in one tunesmith process ran ~6%% slower a step, its first timed step 1.47 s; the "
                         "garbage collector frozen after the first step removed both, thirteenth run)")
    ap.add_argument("--ready-timeout", type=float, default=240)
    ap.add_argument("--parallel-gpus", default=None,
                    help="comma list of GPU indices: rows spread over them, one speed.py per GPU at once, one merged "
                         "table (all stacks of a row stay on one GPU, so each row is still a same-run comparison)")
    a = ap.parse_args(argv)
    if a.warmup < 1:
        ap.error("--warmup must be >= 1 (tunesmith's step times are differences of step end times)")
    t_begin = time.monotonic()
    rows = [parse_row(x) for x in (a.rows.split(",") if a.rows else TINY_ROWS if a.tiny else ROWS)]
    for row in rows:
        row["steps"] = timed_steps(row, a.steps, a.min_timed_tokens)
    if a.parallel_gpus:
        return run_parallel(a, rows, argv if argv is not None else sys.argv[1:])
    stacks = a.stacks.split(",") if a.stacks else [s for s in STACKS if not (a.device == "cpu" and s == "unsloth")]
    workloads = a.workloads.split(",")
    bad = [s for s in stacks if s not in STACKS] + [w for w in workloads if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown stack/workload {bad}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(a.scratch)
    (scratch / "models").mkdir(parents=True, exist_ok=True)
    (scratch / "work").mkdir(parents=True, exist_ok=True)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H%MZ")

    base_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1",
                    PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")

    def env_for(stack: str) -> dict:
        extra = [str(REPO / "src")] if stack == "tunesmith" else []
        site = a.unsloth_site if stack == "unsloth" else a.hf_site
        if site:
            extra.append(str(Path(site).resolve()))
        old = base_env.get("PYTHONPATH")
        return dict(base_env, PYTHONPATH=os.pathsep.join(extra + ([old] if old else [])))

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_begin:6.1f}s] {msg}", flush=True)

    # builder and workers start together (imports overlap the folder writes); timing starts when all are ready
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    folders = {s: str(scratch / "models" / f"m-{s.replace('.', '_')}") for s in shapes}
    build_log = open(out / "build.log", "w")
    builder = subprocess.Popen([sys.executable, str(HERE), "_build", "--models", str(scratch / "models"),
                                "--device", a.device, "--tok", a.tok, "--seed", str(a.seed), *shapes],
                               stdout=build_log, stderr=subprocess.STDOUT, env=env_for("hf"))
    workers: dict[str, Worker | None] = {}
    info: dict = {"versions": {}, "gpu": None}
    dead: dict[str, str] = {}

    def start(stack: str) -> None:
        workers[stack] = Worker(stack, a, env_for(stack), str(scratch / "work"), out / f"worker-{stack}.log")

    def wait_ready(stack: str) -> None:
        w = workers[stack]
        msg = w.get(a.ready_timeout)
        if isinstance(msg, dict) and msg.get("op") == "ready" and not msg.get("error"):
            info["versions"][stack] = msg["versions"]
            info["gpu"] = info["gpu"] or msg.get("gpu")
            log(f"{stack} worker ready")
            return
        err = msg.get("error") if isinstance(msg, dict) else f"worker not ready ({msg}): {w.tail()}"
        dead[stack] = err
        w.kill()
        workers[stack] = None
        log(f"{stack} worker failed to start: {err_line(err)[:300]}")

    for st in stacks:
        start(st)
    rc = builder.wait()
    build_log.close()
    log(f"model folders built (rc {rc}); build.log:\n" + (out / "build.log").read_text()[-2000:])
    build_err = None if rc == 0 else f"building model folders failed:\n{(out / 'build.log').read_text()[-2000:]}"
    for st in stacks:
        wait_ready(st)

    gpu = info["gpu"] or ("cpu" if a.device == "cpu" else "unknown")
    peak = peak_bf16_flops(info["gpu"])
    gpu_tag = "".join(c if c.isalnum() else "-" for c in gpu).strip("-")
    json_path = out / f"{date}-{gpu_tag}.json"
    record = {"date": date, "gpu": gpu, "peak_bf16_flops": peak, "versions": info["versions"],
              "command": " ".join([Path(sys.executable).name, os.path.relpath(HERE, Path.cwd())] + sys.argv[1:]),
              "env": env_switches(),
              "settings": {"warmup": a.warmup, "steps": a.steps, "min_timed_tokens": a.min_timed_tokens, "r": a.r,
                           "alpha": a.alpha, "lr": a.lr, "seed": a.seed, "device": a.device,
                           "mfu": "6*N*tok/s / peak, N = matmul weights"},
              "rows": []}

    def markdown() -> str:
        return (f"# {date} · {gpu}\n\ncommand: `{record['command']}`\n\nenv: `{json.dumps(record['env'])}`"
                f"\n\nversions: `{json.dumps(record['versions'])}`"
                f"\n\n{a.warmup} warm-up + {a.steps} timed steps"
                f"{f' (at least {a.min_timed_tokens:,} tokens a row)' if a.min_timed_tokens else ''}; "
                f"r={a.r}, alpha={a.alpha}; MFU = 6·N·tok/s / "
                f"{(peak or 0) / 1e12:.0f} TFLOP/s (\"run\": the matmuls run, less the down projections' recompute "
                f"where it was skipped)\n\n{fmt_table(record['rows'])}\n")

    def save() -> None:  # after every result, so a run cut short still leaves what it measured
        for path, text in ((json_path, json.dumps(record, indent=1)), (json_path.with_suffix(".md"), markdown())):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)

    def add(row: dict, stack: str, wl: str, res: dict) -> None:
        rec = {"workload": wl, "shape": row["shape"], "method": row["method"], "seq": row["seq"],
               "batch": row["batch"], "steps": row["steps"], "stack": stack, "tok_s": None, "peak_gib": None,
               "peak_reserved_gib": None, "mfu": None, "loss_first": None, "loss_last": None, "error": None}
        rec.update({k: v for k, v in res.items() if k != "op"})
        if rec["tok_s"] and peak:
            sh = SHAPES[row["shape"]]
            rec["mfu"] = 6 * matmul_params(sh) * rec["tok_s"] / peak
            if rec.get("lean_recompute"):  # the matmuls actually run: the recompute skipped the down projections
                skipped = sh["hidden"] * sh["inter"]  # (and, with the attention's values kept, its projections)
                if rec.get("kept_attention"):
                    skipped += attn_params(sh)
                rec["mfu_run"] = (6 * matmul_params(sh) - 2 * sh["layers"] * skipped) * rec["tok_s"] / peak
        record["rows"].append(rec)
        save()
        if rec["error"]:
            log(f"  {stack:9s} {wl:6s} ERROR {err_line(rec['error'])[:200]}")
        else:
            mem = "" if rec["peak_gib"] is None else f", peak {rec['peak_gib']:.2f} GiB"
            mfu = "" if rec["mfu"] is None else f", MFU {100 * rec['mfu']:.1f}%"
            ts = sorted(rec.get("step_s") or [])
            steps = f", step ms min/median/max {1e3 * ts[0]:.0f}/{1e3 * ts[len(ts) // 2]:.0f}/{1e3 * ts[-1]:.0f}" if ts else ""
            log(f"  {stack:9s} {wl:6s} {rec['tok_s']:,.0f} tok/s{mem}{mfu}, "
                f"loss {rec['loss_first']:.4f} -> {rec['loss_last']:.4f}{steps}")

    save()
    for row in rows:
        log(f"row {row['shape']} {row['method']} {row['seq']}x{row['batch']}")
        for st in stacks:
            if build_err:
                for wl in workloads:
                    add(row, st, wl, {"error": build_err})
                continue
            if time.monotonic() - t_begin > a.budget_s:
                for wl in workloads:
                    add(row, st, wl, {"error": f"skipped: past --budget-s {a.budget_s:.0f}"})
                continue
            if workers.get(st) is None and st not in dead:  # killed on an earlier row: a fresh one
                start(st)
                wait_ready(st)
            if workers.get(st) is None:  # it could not start (an import error, say): it will not now either
                for wl in workloads:
                    add(row, st, wl, {"error": f"worker cannot start: {dead[st]}"})
                continue
            w = workers[st]
            w.send({"op": "row", **row, "folder": folders[row["shape"]], "workloads": workloads,
                    "warmup": a.warmup, "r": a.r, "alpha": a.alpha, "lr": a.lr, "seed": a.seed,
                    "device": a.device, "scratch": str(scratch / "work")})
            done, deadline = set(), time.monotonic() + a.row_timeout
            while True:
                msg = w.get(deadline - time.monotonic())
                if isinstance(msg, dict) and msg.get("op") == "result":
                    done.add(msg["workload"])
                    add(row, st, msg["workload"], msg)
                    continue
                if isinstance(msg, dict) and msg.get("op") == "row_done":
                    if a.fresh_workers:  # the next row gets a new process (see --fresh-workers)
                        w.quit()
                        workers[st] = None
                    break
                why = (f"timeout: no answer within --row-timeout {a.row_timeout:.0f}s" if msg == "timeout"
                       else f"worker died (exit {w.proc.poll()})")
                w.kill()
                workers[st] = None
                for wl in workloads:
                    if wl not in done:
                        add(row, st, wl, {"error": f"{why}; log tail:\n{w.tail()}"})
                break
    for w in workers.values():
        if w is not None:
            w.quit()
    save()
    log(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    print("\n" + fmt_table(record["rows"]), flush=True)
    return 0


def _drop_flag(args: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for x in args:
        if skip:
            skip = False
            continue
        if x == flag:
            skip = True
            continue
        if not x.startswith(flag + "="):
            out.append(x)
    return out


def run_parallel(a, rows: list[dict], argv: list[str]) -> int:
    """--parallel-gpus: one child speed.py per GPU (CUDA_VISIBLE_DEVICES), rows dealt out by estimated wall time
    (biggest first, each to the least loaded GPU); one merged JSON/markdown."""
    gpus = [g.strip() for g in a.parallel_gpus.split(",") if g.strip()]
    load = {g: 0.0 for g in gpus}
    plan: dict[str, list[dict]] = {g: [] for g in gpus}

    def cost(r: dict) -> float:  # rough seconds a row takes with all three stacks: loading and compiling dominate
        return 100 + 6 * matmul_params(SHAPES[r["shape"]]) / 1e9

    for r in sorted(rows, key=lambda r: -cost(r)):
        g = min(gpus, key=lambda k: load[k])
        plan[g].append(r)
        load[g] += cost(r)
    base = _drop_flag(_drop_flag(_drop_flag(_drop_flag(argv, "--parallel-gpus"), "--rows"), "--out"), "--scratch")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for g, rs in plan.items():
        if not rs:
            continue
        spec = ",".join(f"{r['shape']}:{r['method']}:{r['seq']}x{r['batch']}" for r in rs)
        sub = out / f"gpu{g}"
        cmd = [sys.executable, str(HERE), *base, "--rows", spec, "--out", str(sub),
               "--scratch", str(Path(a.scratch) / f"gpu{g}")]
        print(f"[parallel] GPU {g}: {spec}", flush=True)
        procs.append((g, sub, subprocess.Popen(cmd, env=dict(os.environ, CUDA_VISIBLE_DEVICES=g),
                                               stdout=open(out / f"gpu{g}.log", "w"), stderr=subprocess.STDOUT)))
    merged: dict | None = None
    found: list[dict] = []
    for g, sub, p in procs:
        p.wait()
        for f in sorted(sub.glob("*.json")):
            rec = json.loads(f.read_text())
            merged = merged or rec
            found += rec["rows"]
    if merged is None:
        print("[parallel] no results", flush=True)
        return 1
    order = {(r["shape"], r["method"]): i for i, r in enumerate(rows)}
    found.sort(key=lambda r: (order.get((r["shape"], r["method"]), 99), STACKS.index(r["stack"])
                              if r["stack"] in STACKS else 9))
    merged["rows"] = found
    merged["command"] = " ".join([Path(sys.executable).name, os.path.relpath(HERE, Path.cwd())] + argv)
    merged["gpu"] = f"{merged['gpu']} x{len(procs)} (rows in parallel, one process per GPU)"
    tag = "".join(c if c.isalnum() else "-" for c in merged["gpu"].split(" (")[0]).strip("-")
    path = out / f"{merged['date']}-{tag}.json"
    merged["env"] = env_switches()
    path.write_text(json.dumps(merged, indent=1))
    path.with_suffix(".md").write_text(f"# {merged['date']} · {merged['gpu']}\n\ncommand: `{merged['command']}`\n\n"
                                       f"env: `{json.dumps(merged['env'])}`\n\n"
                                       f"versions: `{json.dumps(merged['versions'])}`\n\n{fmt_table(found)}\n")
    print(f"\nwrote {path}\n\n{fmt_table(found)}", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker_main(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif len(sys.argv) > 1 and sys.argv[1] == "_build":
        builder_main(sys.argv[2:])
    else:
        sys.exit(main())
