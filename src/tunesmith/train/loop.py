"""The training loop: plain PyTorch, readable top to bottom.

setup (model, data, optimizer) -> for each step: accumulate micro-batches, clip, step, schedule, log,
sample chats, checkpoint -> save the final adapter (or model), metrics and loss curve.

Under torchrun the same loop runs on every rank, with the model sharded (FSDP2) or, when only LoRA weights train
on a base every rank holds whole, replicated (data parallel); `distributed.py` holds those details and is a
no-op for one process.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import Config, dump_config
from ..data.build import gather_conversations, length_stats, prepare
from ..data.packing import collate
from ..data.regularize import cached_self_distill, regularization_prompts
from ..errors import UserError
from ..fsutil import atomic_dir
from .. import kernels
from ..models import load as mload
from ..serve.generate import GenParams, chat_once
from . import checkpoint as ck
from . import distributed
from .logging import RunLogger
from .loss import causal_lm_loss_sum, trained_positions


@dataclass
class TrainResult:
    work_dir: Path
    output_dir: Path  # final adapter (or full model) folder
    base: str  # resolved base model path / id
    steps: int
    losses: list[float] = field(default_factory=list)
    samples: dict[int, list[str]] = field(default_factory=dict)


def _quiet(*args, **kwargs) -> None:
    pass


class _PhaseTimer:
    """TUNESMITH_STEP_TIMING=1: each rank prints, per step, where its wall time went (device synchronised at
    each mark, so it slows the run a little; for diagnosing scaling, not for timing runs)."""

    def __init__(self, rank: int, device: torch.device):
        self.rank, self.device = rank, device
        self.t = time.perf_counter()
        self.parts: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.parts.append((name, now - self.t))
        self.t = now

    def flush(self, step: int) -> None:
        total = sum(s for _, s in self.parts)
        body = " ".join(f"{n} {1e3 * s:.1f}" for n, s in self.parts)
        print(f"[timing] rank {self.rank} step {step}: {body} | total {1e3 * total:.1f} ms", file=sys.stderr,
              flush=True)
        self.parts = []


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch, with the positions its loss is taken at (`trained_positions`), sent to `device`: from pinned
    memory without waiting, on a GPU (a copy from ordinary memory would first wait for all queued work)."""
    b = {**batch, **trained_positions(batch)}
    if device.type != "cuda":
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in b.items()}


class _StepStats:
    """One step's loss sum and gradient norm, copied to the host behind the step's work and read when the next
    step's batch is on its way: the host never waits for the device in between, so it prepares the next batch (and
    its embedding rows) while the device still computes. Each step is logged at the start of the next one, once
    the device has finished it (the log's time stamps are those of finished steps)."""

    def __init__(self, step: int, loss_sum: torch.Tensor, gnorm: torch.Tensor | None, n_tok: int, tokens: int,
                 lr: float):
        self.step, self.n_tok, self.tokens, self.lr = step, n_tok, tokens, lr
        vals = torch.stack([loss_sum.float(), (gnorm if gnorm is not None else loss_sum.new_zeros(())).float()])
        self.done = None
        if vals.device.type == "cuda":
            self.vals = vals.to("cpu", non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.vals = vals

    def read(self) -> tuple[float, float]:
        if self.done is not None:
            self.done.synchronize()
        loss_sum, gnorm = self.vals.tolist()
        return loss_sum, gnorm


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def grad_scaler(device: torch.device, dtype: torch.dtype):
    """Loss scaling for fp16 training (GPUs without bf16: T4, V100, RTX 20xx), so small gradients do not
    underflow; disabled (pass-through) for bf16 and fp32."""
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and dtype == torch.float16)


def lr_lambda(warmup: int, total: int):
    """Linear warmup then cosine decay to zero."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


@functools.lru_cache(maxsize=2)
def _epoch_order(n_rows: int, seed: int, epoch: int) -> tuple[int, ...]:
    """One epoch's shuffle, made once (each step reads a slice of it: a big dataset's shuffle is not cheap)."""
    perm = list(range(n_rows))
    random.Random(seed * 1_000_003 + epoch).shuffle(perm)
    return tuple(perm)


def row_stream(n_rows: int, seed: int, start: int, count: int) -> list[int]:
    """Row indices [start, start+count) of an endless stream of per-epoch shuffles; resume needs only `start`."""
    out: list[int] = []
    i = start
    while len(out) < count:
        epoch, k = divmod(i, n_rows)
        take = min(count - len(out), n_rows - k)
        out += _epoch_order(n_rows, seed, epoch)[k:k + take]
        i += take
    return out


def sample_chats(model, tokenizer, inputs: list[str], system: str | None, max_new_tokens: int) -> list[str]:
    was_training = model.training
    model.eval()
    answers = []
    for q in inputs:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
        answers.append(chat_once(model, tokenizer, msgs, GenParams(max_new_tokens=max_new_tokens)))
    if was_training:
        model.train()
    return answers


def _freeze_gc() -> bool:
    """Move every object alive after the first step (the model, the compiled layers' graphs and caches: ~700k objects
    for a tiny model) out of the garbage collector's reach until training ends (``gc.freeze``). Python's full
    collections otherwise walk them all once enough new objects have piled up: 0.2-0.5 s each on this repository's
    CPU, a pause in which the host queues no GPU work (bench/gc_pauses.py; in a step in 1 of 5 CPU runs). Later
    collections scan only what training creates. ``TUNESMITH_GC_FREEZE=0`` leaves the collector as it is. Returns
    whether it froze (the caller unfreezes)."""
    if os.environ.get("TUNESMITH_GC_FREEZE") == "0":
        return False
    gc.collect()
    gc.freeze()
    return True


def train(cfg: Config, resume: str | None = None, log=print, extra_conversations: list[list[dict]] | None = None
          ) -> TrainResult:
    tc = cfg.train
    dist = distributed.setup(tc.device)  # one process, or this rank of a torchrun job
    if not dist.is_main:
        log = _quiet
    work = Path(cfg.work_dir)
    ckpt_root = work / "checkpoints"
    config_yaml = dump_config(cfg)

    # ---- resume point
    resume_dir = None
    if resume:
        if resume == "auto":
            found = ck.list_checkpoints(ckpt_root)
            resume_dir = found[-1][1] if found else None
            if resume_dir is None:
                log(f"--resume auto: no checkpoint in {ckpt_root}, starting fresh")
        else:
            resume_dir = Path(resume)
            if not (resume_dir / ck.STATE_FILE).is_file():
                raise UserError(f"--resume {resume}: not a tunesmith checkpoint (no {ck.STATE_FILE})")

    seed_all(tc.seed)
    device = dist.device
    dtype = mload.pick_dtype(device, cfg.model.dtype)
    if cfg.method == "qlora" and device.type == "cpu" and dtype != torch.float32:
        dtype = torch.float32

    # ---- data first (its errors need no model), then model and tokenizer; the work dir once both are good
    convs = gather_conversations(cfg.data) + list(extra_conversations or [])
    base = mload.resolve(cfg.model.name)
    tokenizer = mload.load_tokenizer(base, cfg.model.trust_remote_code)
    load_from = str(resume_dir) if (resume_dir and cfg.method == "full") else base
    model = distributed.load_model(dist, load_from, method=cfg.method, dtype=dtype,
                                   trust_remote_code=cfg.model.trust_remote_code,
                                   attn_implementation=cfg.model.attn_implementation,
                                   shard_frozen=tc.shard_frozen)
    model.config.use_cache = False
    if cfg.method != "full":
        mload.check_targets(model, cfg.lora.target_modules)  # before the self-distillation below, not after it
    work.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        (work / "config.yaml").write_text(config_yaml, encoding="utf-8")

    # ---- self-distillation answers written by the base model before training
    reg = cfg.data.regularize
    n_kl = 0  # the last n_kl conversations are trained by KL to the base model (data.regularize.kl)
    if reg.ratio > 0:
        langs = cfg.data.persona.langs if cfg.data.persona else ["en", "zh"]
        system = cfg.data.persona.system if cfg.data.persona else None
        n_reg = round(reg.ratio * len(convs))
        key = hashlib.sha256(json.dumps([base, langs, n_reg, reg.max_new_tokens, system, tc.seed,
                                         regularization_prompts(langs)]).encode()).hexdigest()  # a new pool: new answers
        distilled = cached_self_distill(work / f"regularize-{key[:12]}.jsonl", model, tokenizer, reg, langs, n_reg,
                                        system, tc.seed, dist.is_main, log)
        convs += distilled
        n_kl = len(distilled) if cfg.use_kl() else 0
    offload = kernels.use_offload(tc.offload_activations, device, dist.fsdp, tc.grad_checkpointing)
    if tc.offload_activations is True and not offload:
        log("train.offload_activations ignored: it needs grad_checkpointing and no FSDP sharding "
            "(one process, or LoRA/QLoRA with the frozen base whole on every rank)")
    if cfg.method == "full":
        if tc.grad_checkpointing:
            mload.enable_checkpointing(model, offload)
        if dtype != torch.float32 and device.type == "cpu":
            model.float()
    else:
        model = mload.add_lora(model, cfg.lora, tc.grad_checkpointing, offload)
        if resume_dir:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(str(resume_dir / "adapter_model.safetensors")))
    compile_layers = kernels.use_compile(tc.compile, device, offload, tc.kernels)
    if tc.compile is True and not compile_layers:
        log("train.compile ignored: it needs train.kernels on/auto and checkpointed, offloaded layers "
            "(grad_checkpointing with offload_activations, no FSDP sharding)")
    fast = kernels.apply(model, device=device, method=cfg.method, kernels=tc.kernels, compile_layers=compile_layers)
    hostw = None  # frozen embedding and head kept in host memory (kernels/host_weights.py)
    if tc.offload_embeddings is not False and cfg.method != "full":
        from ..kernels import host_weights

        why = host_weights.why_not(tc.offload_embeddings, model, device, offload, fast)
        if why is None:
            hostw = host_weights.attach(model, device)
            fast.append("host-embeddings")
        elif tc.offload_embeddings is True:
            log(f"train.offload_embeddings ignored: {why}")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    frozen_line = distributed.describe_frozen(dist, model)
    root = distributed.shard(dist, model)  # root(fn, *args) = fn(model, *args); FSDP2 across ranks if several

    prep = prepare(tokenizer, convs, cfg.data.max_length, cfg.data.truncation, cfg.data.pack, tc.seed,
                   getattr(model, "generation_config", None), n_kl=n_kl)
    rows = prep.rows
    stats = length_stats(prep.samples)
    fit = prep.fit
    log(f"data: {prep.n_conversations} conversations -> {len(prep.samples)} samples "
        f"(tokens min/median/p95/max {stats['min']}/{stats['median']}/{stats['p95']}/{stats['max']}; "
        f"truncated {fit.truncated}, dropped {fit.dropped + fit.no_loss}) -> {len(rows)} rows of <= {cfg.data.max_length}")
    if n_kl:
        log(f"regularisation: {n_kl} self-distillation samples trained by KL to the base model's distribution")

    world = dist.world
    per_step_rows = tc.batch_size * tc.grad_accum * world
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * len(rows) / per_step_rows))
    warmup = int(tc.warmup_ratio * total_steps)
    log(f"model: {base} | method {cfg.method} | {device.type} {str(dtype).replace('torch.', '')} | "
        f"trainable {n_train:,} of {n_all:,} params")
    if frozen_line:
        log(frozen_line)
    log(f"fast paths: {', '.join(fast) or 'none (reference path)'}" + ("; activations offloaded to host" if offload else ""))
    log(f"batch: {tc.batch_size} rows x {tc.grad_accum} accumulation x {world} device(s) = {per_step_rows} rows per "
        f"step; {total_steps} steps (~{total_steps * per_step_rows / len(rows):.2f} epochs)")

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr, betas=(0.9, 0.999), fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total_steps))
    scaler = grad_scaler(device, dtype)

    start_step = 0
    if resume_dir:
        state = ck.load_state(resume_dir)
        distributed.load_optimizer(dist, model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ck.set_rng_state(state["rng"])
        start_step = state["step"]
        log(f"resumed from {resume_dir} at step {start_step}")

    logger = RunLogger(work, total_steps, start_step, enabled=dist.is_main)
    result = TrainResult(work, work / ("model" if cfg.method == "full" else "adapter"), base, total_steps)
    pad_id = tokenizer.pad_token_id

    def save(step: int) -> dict | None:
        """Checkpoint (every rank gathers, rank 0 writes); returns the gathered model state for the final save."""
        sd, osd = distributed.full_state(dist, model, optimizer, trainable_only=cfg.method != "full")
        if dist.is_main:
            ck.save_checkpoint(ckpt_root, step, model, tokenizer, optimizer, scheduler, config_yaml, {},
                               tc.save_total_limit, model_state=sd, optim_state=osd)
        return sd

    def do_samples(step: int) -> None:
        if not tc.evaluation_inputs:
            return
        # a sharded model needs every rank in each forward pass: all ranks generate, rank 0 logs
        if hostw is not None:
            hostw.for_generation()  # the head on the GPU for the logits; embedding rows still from the host
        try:
            answers = root(sample_chats, tokenizer, tc.evaluation_inputs, tc.system, tc.max_new_tokens)
        except Exception as e:  # noqa: BLE001 — not the user's doing: once more with the plain model
            if hostw is None or not hostw.active:
                raise
            log(f"sampling with the embedding in host memory failed ({type(e).__name__}: {str(e)[:200]}); "
                "sampling with the whole model on the device")
            hostw.restore()
            answers = root(sample_chats, tokenizer, tc.evaluation_inputs, tc.system, tc.max_new_tokens)
        if hostw is not None and step != total_steps:
            hostw.offload()
        result.samples[step] = answers
        logger.samples(step, tc.evaluation_inputs, answers)

    if start_step == 0:
        do_samples(0)
    model.train()
    t_last, tokens_since = time.perf_counter(), 0
    phases = _PhaseTimer(dist.rank, device) if os.environ.get("TUNESMITH_STEP_TIMING") else None
    pending: _StepStats | None = None  # the last step's numbers, read once the device has them (see _StepStats)

    def flush() -> None:
        nonlocal pending, t_last
        if pending is None:
            return
        p, pending = pending, None
        loss_sum, gnorm = p.read()
        loss = loss_sum / max(1, p.n_tok)
        now = time.perf_counter()  # after the device finished that step
        result.losses.append(loss)
        logger.step(p.step, loss=loss, lr=p.lr, grad_norm=gnorm, epoch=p.step * per_step_rows / len(rows),
                    tokens=p.tokens, seconds=now - t_last)
        t_last = now

    gc_frozen = False
    try:
        for step in range(start_step, total_steps):
            # the whole global step's rows, known to every rank; each rank trains on its share of the micro-batches
            idx = row_stream(len(rows), tc.seed, step * per_step_rows, per_step_rows)
            micro = [collate([rows[i] for i in idx[j:j + tc.batch_size]], pad_id, coarse=device.type == "cuda")
                     for j in range(0, len(idx), tc.batch_size)]
            n_tok_step = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
            tokens_since += sum(len(rows[i].input_ids) for i in idx)  # real tokens, padding not counted
            # this rank's micro-batches start for the device (pinned memory, no wait) while it finishes the last step
            staged = [(to_device(b, device), b["input_ids"]) for b in distributed.share(dist, micro)]
            if hostw is not None:
                hostw.prepare(staged[0][1], staged[0][0]["input_ids"])  # the first one's embedding rows, from the host
            flush()
            distributed.step_seed(dist, tc.seed, step)
            loss_sum = torch.zeros((), dtype=torch.float32, device=device)
            if phases:
                phases.mark("data")
            for k, (b, ids_host) in enumerate(staged):
                if hostw is not None and k:
                    hostw.prepare(ids_host, b["input_ids"])
                with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda" and dtype != torch.float32):
                    s, _ = root(causal_lm_loss_sum, b, None, "linear-ce" in fast)
                scaler.scale(s / max(1, n_tok_step)).backward()  # FSDP sums (not averages) these over ranks
                if hostw is not None:
                    hostw.release_head()  # where the loss could not (a KL batch, the unfused loss)
                loss_sum += s.detach().float()
            if phases:
                phases.mark("compute")
            loss_sum = distributed.all_sum(dist, loss_sum)
            if phases:
                phases.mark("wait")  # the slowest rank's compute, seen by the others
            distributed.sync_grads(dist, params)  # data parallel: sum the ranks' gradients (FSDP did it in backward)
            if phases:
                phases.mark("grad-sync")
            scaler.unscale_(optimizer)  # fp16 only: true gradients before clipping (a no-op otherwise)
            gnorm = distributed.clip_grad_norm(params, tc.max_grad_norm) if tc.max_grad_norm > 0 else None
            scaler.step(optimizer)  # skips the step if fp16 gradients overflowed
            scaler.update()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            pending = _StepStats(step + 1, loss_sum, gnorm, n_tok_step, tokens_since, lr)
            if step == start_step:
                gc_frozen = _freeze_gc()  # while the device runs the first step (compiles done by now)
            tokens_since = 0
            if phases:
                phases.mark("optimizer")
                phases.flush(step + 1)
            done = step + 1
            if tc.sample_steps and done % tc.sample_steps == 0 and done != total_steps:
                flush()
                do_samples(done)
            if tc.save_steps and done % tc.save_steps == 0 and done != total_steps:
                flush()
                save(done)
    finally:
        if gc_frozen:
            gc.unfreeze()
    flush()
    final_state = save(total_steps)
    # the optimizer's moments are saved and no longer needed: freed before the last samples and the hand-back,
    # which bring the host-kept head and embedding back to the device (else they peaked above every step)
    optimizer.state.clear()
    do_samples(total_steps)  # host-kept weights: as mid-run, only the head comes to the GPU for it
    if hostw is not None:
        hostw.restore()  # the trained model is handed back whole
    if dist.is_main:
        with atomic_dir(result.output_dir) as tmp:
            ck.save_model_dir(model, tokenizer, tmp, config_yaml, state_dict=final_state)
    logger.close()
    distributed.close(dist)
    log(f"saved {'model' if cfg.method == 'full' else 'adapter'}: {result.output_dir}")
    return result
