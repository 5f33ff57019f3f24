"""FSDP2 scaling of tunesmith training: tokens/s per GPU on 1, 2 (and 4) GPUs, LoRA bf16 and QLoRA.

Nothing is downloaded: the models are random weights of real shapes with a throwaway byte-level tokenizer
(ChatML template), and the data is tunesmith's own persona generator, packed into rows of --seq tokens.

  7b   Qwen2.5-7B shapes. Its folder (15 GB of safetensors) is written under --scratch and every run is the
       real command: `tunesmith train CFG` on 1 GPU, `tunesmith train CFG --nproc N` on N.
  72b  Qwen2.5-72B shapes, on 4 GPUs (LoRA only). No weight files are written (145 GB would be): the folder
       holds config and tokenizer, and the run is this script's own torchrun entry (`_worker`), which calls
       tunesmith's train() with only the weight source replaced: rank 0 fills the model with random values
       on the CPU, the other ranks build it on the meta device, and tunesmith's sharding code broadcasts and
       shards it exactly as it does a loaded model (frozen base sharded too, whatever --shard-frozen says:
       no rank but 0 holds it). Needs ~150 GB of host memory on rank 0.

Every run uses tunesmith's defaults (--offload auto): one GPU checkpoints with host offload and compiled layers,
and so do N GPUs whenever the run is data parallel (LoRA with the frozen base whole on every GPU, QLoRA), so the
1-GPU baseline is tunesmith's fastest single-GPU path. FSDP-sharded runs (a sharded base, full fine-tunes) use
the layers' own checkpointing. `--offload false` turns offload (and with it compiled layers) off everywhere, the
setting of the earlier FSDP-only runs. --shard-frozen sets train.shard_frozen (several GPUs: 'auto' keeps a LoRA
run's frozen base whole on every GPU when it fits in 40 % of one and trains data parallel, as QLoRA does;
'true' shards the frozen weights with FSDP2 (QLoRA: all but the NF4 ones), 'false' replicates them).

Each run trains --steps steps; tokens/s is the median of the steps after the first --skip (metrics.jsonl of
the run: real tokens of the global step over its wall time). Scaling efficiency = tokens/s per GPU over the
1-GPU figure of the same model and method. Writes fsdp_scaling.json (date, gpu, versions, command, rows) and
fsdp_scaling.md into --out.

GPU (one command per machine size; each stays well inside 10 minutes):
  python bench/fsdp_scaling.py --models 7b --gpus 1,2 --methods lora,qlora --out bench/results/fsdp
  python bench/fsdp_scaling.py --models 7b,72b --gpus 4 --methods lora --out bench/results/fsdp4
CPU check of the whole script (tiny shapes, gloo):
  OMP_NUM_THREADS=1 python bench/fsdp_scaling.py --tiny --device cpu --runs 7b:lora:1,7b:lora:2,72b:lora:2 \
      --steps 3 --out /tmp/fsdp-bench
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Qwen2.5 shapes (config.json of Qwen/Qwen2.5-7B and -72B); vocab 152064, untied head, q/k/v biases
SHAPES = {
    "7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "rms_norm_eps": 1e-6},
    "72b": {"hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80, "num_attention_heads": 64,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-5},
}
TINY = {
    "7b": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "rms_norm_eps": 1e-6},
    "72b": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-5},
}
WRITE_WEIGHTS = {"7b": True, "72b": False}
MIN_GPUS = {"7b": 1, "72b": 4}


@dataclass
class Row:
    model: str
    method: str
    gpus: int
    seq: int
    rows_per_step: int  # global: batch_size x grad_accum x gpus
    steps: int
    status: str = "ok"
    tokens_per_s: float | None = None  # all GPUs together
    tokens_per_s_per_gpu: float | None = None
    scaling_efficiency: float | None = None
    step_s: float | None = None
    step_s_max: float | None = None  # the slowest timed step; far above step_s: stragglers (new shapes, a slow rank)
    final_loss: float | None = None
    wall_s: float | None = None
    frozen_base: str = ""  # several GPUs: "replicated, data parallel" / "sharded, FSDP2" (from the run's log line)
    command: str = ""
    error: str = field(default="", repr=False)


# ----------------------------------------------------------------------------- model folders


def throwaway_tokenizer():
    """Byte-level tokenizer (256 bytes, no merges) with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    return fast


def model_config(key: str, tiny: bool, tok):
    from transformers import Qwen2Config

    shape = (TINY if tiny else SHAPES)[key]
    return Qwen2Config(vocab_size=1024 if tiny else 152064, max_position_embeddings=32768, rope_theta=1e6,
                       tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, **shape)


def fill_random(model: torch.nn.Module, seed: int = 0) -> None:
    """Random-looking weights fast: one block of N(0, 0.02) tiled over every matrix; norms 1, biases 0.02-ish.

    Each tensor is filled by one broadcast copy with all CPU threads (torchrun sets OMP_NUM_THREADS=1, which
    made a 72B fill take minutes).
    """
    g = torch.Generator().manual_seed(seed)
    n_block = 1 << 24
    block = torch.randn(n_block, generator=g) * 0.02
    twice = torch.cat([block, block])
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        with torch.no_grad():
            for i, (name, p) in enumerate(model.named_parameters()):
                if p.ndim == 1 and "norm" in name:
                    p.fill_(1.0)
                    continue
                flat = p.view(-1)
                off = (i * 7919) % n_block
                blk = twice[off:off + n_block].to(p.dtype)
                rows = flat.numel() // n_block
                if rows:
                    flat[:rows * n_block].view(rows, n_block).copy_(blk.expand(rows, n_block))
                rest = flat.numel() - rows * n_block
                if rest:
                    flat[rows * n_block:].copy_(blk[:rest])
    finally:
        torch.set_num_threads(threads)


def build_folder(key: str, tiny: bool, scratch: Path, log) -> Path:
    """config + tokenizer (+ random bf16 safetensors when WRITE_WEIGHTS[key]); reused when already there."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    out = scratch / f"qwen2.5-{key}{'-tiny' if tiny else ''}-random"
    done = out / ".complete"
    if done.is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = throwaway_tokenizer()
    cfg = model_config(key, tiny, tok)
    tok.save_pretrained(out)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(out)
    if WRITE_WEIGHTS[key]:
        t = time.perf_counter()
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        fill_random(model)
        model.save_pretrained(out, max_shard_size="5GB")
        log(f"wrote {out} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params) "
            f"in {time.perf_counter() - t:.0f}s")
        del model
    else:
        cfg.save_pretrained(out)
        (out / "NO_WEIGHTS.txt").write_text("random weights are made at run time by bench/fsdp_scaling.py\n")
    done.touch()
    return out


# ----------------------------------------------------------------------------- the runs


def train_config(folder: Path, method: str, work: Path, a) -> dict:
    return {
        "model": {"name": str(folder), "dtype": "bf16" if a.device == "cuda" else "fp32"},
        "method": method,
        "lora": {"r": a.lora_r, "alpha": 2 * a.lora_r, "dropout": 0.0},
        "data": {"persona": {"name": "Benchy", "author": "tunesmith", "langs": ["en", "zh"], "n": a.samples},
                 "max_length": a.seq, "pack": True},
        "train": {"max_steps": a.steps, "batch_size": a.batch_size, "grad_accum": a.grad_accum, "lr": 1e-4,
                  "warmup_ratio": 0.0, "save_steps": 0, "sample_steps": 0, "evaluation_inputs": [],
                  "grad_checkpointing": True, "offload_activations": a.offload, "shard_frozen": a.shard_frozen,
                  "device": a.device},
        "work_dir": str(work),
    }


def command(folder: Path, cfg_file: Path, gpus: int) -> list[str]:
    if (folder / "NO_WEIGHTS.txt").is_file():
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
                str(Path(__file__).resolve()), "_worker", str(cfg_file)]
    cmd = [sys.executable, "-m", "tunesmith", "train", str(cfg_file)]
    return cmd + (["--nproc", str(gpus)] if gpus > 1 else [])


def run_one(key: str, method: str, gpus: int, a, log) -> Row:
    row = Row(key, method, gpus, a.seq, a.batch_size * a.grad_accum * gpus, a.steps)
    folder = build_folder(key, a.tiny, Path(a.scratch), log)
    if method == "qlora" and not WRITE_WEIGHTS[key]:
        row.status, row.error = "skipped", "QLoRA needs a weights folder to quantize (not written for this size)"
        return row
    work = Path(a.scratch) / "runs" / f"{key}-{method}-{gpus}gpu"
    work.mkdir(parents=True, exist_ok=True)
    (work / "metrics.jsonl").unlink(missing_ok=True)
    cfg_file = work / "cfg.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump(train_config(folder, method, work, a)))
    cmd = command(folder, cfg_file, gpus)
    row.command = shlex.join(cmd)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if a.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    else:
        env["OMP_NUM_THREADS"] = "1"
    log(f"run {key} {method} on {gpus} {a.device}: {row.command}")
    t = time.perf_counter()
    with (work / "log.txt").open("w") as f:
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=a.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 15)  # torchrun stops its workers on SIGTERM
            rc = p.wait()
            row.status = "timeout"
    row.wall_s = round(time.perf_counter() - t, 1)
    recs = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()] \
        if (work / "metrics.jsonl").is_file() else []
    if rc != 0 or len(recs) < a.steps:
        row.status = row.status if row.status == "timeout" else "failed"
        row.error = (work / "log.txt").read_text(errors="replace")[-3000:]
        log(f"  {row.status} (exit {rc}); log: {work / 'log.txt'}")
        return row
    timed = recs[a.skip:] or recs
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    row.tokens_per_s = round(tps, 1)
    row.tokens_per_s_per_gpu = round(tps / gpus, 1)
    gaps = [b["time"] - x["time"] for x, b in itertools.pairwise(recs)][max(0, a.skip - 1):]
    row.step_s = round(statistics.median(gaps), 3) if gaps else None
    row.step_s_max = round(max(gaps), 3) if gaps else None
    row.final_loss = recs[-1]["loss"]
    for line in (work / "log.txt").read_text(errors="replace").splitlines():
        if "frozen base: " in line:
            said = line.split("frozen base: ", 1)[1]
            row.frozen_base = ("replicated, data parallel" if "data parallel" in said else
                               "sharded, FSDP2" if "sharded" in said else said.split()[0])
    log(f"  {row.tokens_per_s_per_gpu:,.0f} tok/s per GPU ({row.tokens_per_s:,.0f} total), {row.wall_s}s")
    return row


def plan(a) -> list[tuple[str, str, int]]:
    if a.runs:
        out = []
        for spec in a.runs.split(","):
            key, method, n = spec.split(":")
            out.append((key, method, int(n)))
        return out
    gpus = sorted(int(x) for x in a.gpus.split(","))
    models, methods = a.models.split(","), a.methods.split(",")
    return [(k, m, n) for k in models for m in methods for n in gpus
            if n >= MIN_GPUS[k] and not (m == "qlora" and not WRITE_WEIGHTS[k])]


def versions() -> dict:
    import importlib.metadata as md

    v = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "tunesmith"):
        try:
            v[name] = md.version(name)
        except md.PackageNotFoundError:
            v[name] = None
    v["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        v["nccl"] = ".".join(str(x) for x in torch.cuda.nccl.version())
    return v


def markdown(rep: dict) -> str:
    lines = [f"# FSDP2 scaling, {rep['date']}", "",
             f"{rep['gpu']} x{rep['gpu_count']} | " + ", ".join(f"{k} {v}" for k, v in rep["versions"].items() if v),
             "", f"`{rep['command']}`", "",
             ("| model | method | GPUs | rows/step x seq | tok/s (all) | tok/s per GPU | scaling eff. | step s | "
              "slowest step s | final loss | frozen base | status |"),
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rep["rows"]:
        f = (lambda x, d=0: "-" if x is None else f"{x:,.{d}f}")
        lines.append(f"| {r['model']} | {r['method']} | {r['gpus']} | {r['rows_per_step']} x {r['seq']} | "
                     f"{f(r['tokens_per_s'])} | {f(r['tokens_per_s_per_gpu'])} | {f(r['scaling_efficiency'], 2)} | "
                     f"{f(r['step_s'], 2)} | {f(r.get('step_s_max'), 2)} | {f(r['final_loss'], 3)} | "
                     f"{r.get('frozen_base') or '-'} | {r['status']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="7b,72b", help="7b and/or 72b")
    ap.add_argument("--gpus", default="1,2,4", help="process counts; 72b runs only on >= 4")
    ap.add_argument("--methods", default="lora,qlora")
    ap.add_argument("--runs", default=None, help="explicit list model:method:gpus,... (overrides the three above)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU check of this script)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=3, help="first steps left out of the timing")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4000, help="persona conversations (packed into rows)")
    ap.add_argument("--scratch", default="/tmp/tunesmith-fsdp-bench", help="model folders and run dirs (local disk)")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per run")
    ap.add_argument("--shard-frozen", default="auto", choices=["auto", "true", "false"],
                    help="train.shard_frozen of the LoRA runs (72b: always sharded)")
    ap.add_argument("--offload", default="auto", choices=["auto", "false"],
                    help="train.offload_activations of every run (false: also no compiled layers)")
    ap.add_argument("--out", default="bench/results/fsdp_scaling")
    a = ap.parse_args(argv)
    a.offload = {"auto": "auto", "false": False}[a.offload]
    a.shard_frozen = {"auto": "auto", "true": True, "false": False}[a.shard_frozen]
    if a.tiny and a.seq == 2048:
        a.seq, a.samples = 256, 200
    a.skip = min(a.skip, max(0, a.steps - 2))
    log = lambda m: print(m, file=sys.stderr, flush=True)
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU visible: use --device cpu (with --tiny)")

    rows = [run_one(k, m, n, a, log) for k, m, n in plan(a)]
    base = {(r.model, r.method): r.tokens_per_s_per_gpu for r in rows if r.gpus == 1 and r.tokens_per_s_per_gpu}
    for r in rows:
        if r.tokens_per_s_per_gpu and (r.model, r.method) in base:
            r.scaling_efficiency = round(r.tokens_per_s_per_gpu / base[(r.model, r.method)], 3)
    rep = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "gpu": torch.cuda.get_device_name(0) if a.device == "cuda" else f"CPU ({platform.processor() or 'cpu'})",
        "gpu_count": torch.cuda.device_count() if a.device == "cuda" else 0,
        "versions": versions(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "settings": {k: v for k, v in vars(a).items() if k not in ("out",)},
        "rows": [asdict(r) for r in rows],
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fsdp_scaling.json").write_text(json.dumps(rep, indent=1))
    (out / "fsdp_scaling.md").write_text(markdown(rep))
    print(markdown(rep))
    return rep


# ----------------------------------------------------------------------------- torchrun entry (no weight files)


def _worker(cfg_file: str) -> None:
    """tunesmith's train() with the base model's weights made here (random) instead of read from files."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from tunesmith.config import load_config
    from tunesmith.train import distributed
    from tunesmith.train.loop import train

    def random_base(d, path, *, method, dtype, trust_remote_code, attn_implementation, shard_frozen=True):
        # rank 0 alone holds the weights, so the frozen base is sharded (d.replicate_frozen stays False)
        if method == "qlora":
            raise SystemExit("QLoRA needs weight files to quantize")
        cfg = AutoConfig.from_pretrained(path)
        kw = {"dtype": dtype, **({"attn_implementation": attn_implementation} if attn_implementation else {})}
        if d.sharded and not d.is_main:
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(cfg, **kw)
        t = time.perf_counter()
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(cfg, **kw)
        fill_random(model)
        print(f"rank 0: random {sum(p.numel() for p in model.parameters()) / 1e9:.1f} B params on the CPU in "
              f"{time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
        return model if d.sharded else model.to(d.device)

    distributed.load_model = random_base
    train(load_config(cfg_file), log=lambda m: print(m, file=sys.stderr, flush=True))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_worker":
        _worker(sys.argv[2])
    else:
        main()
