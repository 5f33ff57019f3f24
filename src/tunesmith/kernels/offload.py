"""Activation checkpointing whose saved layer inputs live in host memory.

With plain checkpointing each decoder layer keeps its input (tokens × hidden, in bf16) on the GPU until the
backward pass: layers × tokens × hidden × 2 bytes (1.6 GiB for a 7B model at 8k tokens a step). Here the input
is copied to pinned host memory on a side stream while the GPU goes on computing, and brought back — the
layer before it prefetched while this one recomputes — in the backward pass, which recomputes the layer from
it as usual. The recompute replays the forward pass's autocast state and RNG state (so dropout matches).

Used for CUDA training on one device, or on each rank of a data-parallel run (`train.offload_activations`); the
reference is ``torch.utils.checkpoint.checkpoint`` (``tests/test_kernels.py`` compares gradients on the CPU, where
the "host copy" is a plain copy).
"""

from __future__ import annotations

import os

import torch


class _Stash:
    """One layer input in host memory; `fetch()` returns it on the device (prefetched when possible).

    No ``record_stream``: the allocator would then hold each device block until it sees (from the host, which runs
    far ahead of the GPU) that the side stream's copy finished, and map new memory meanwhile: a whole forward
    pass's worth of inputs and kept values reserved beyond what is allocated (~1.6 GiB on 7B LoRA; ~3.7 GiB with
    kept attention). Instead the device tensor is held and dropped in stream order (:meth:`release`), and the
    prefetched copy is allocated on the compute stream, so every block goes back to the compute stream's pool,
    reusable at once."""

    def __init__(self, x: torch.Tensor, stream):
        self.device, self.stream = x.device, stream
        self.ready = self.gpu = self.ready_event = None
        self.extras: list[_Stash] = []  # tensors the layer call kept for its recompute (see `keep`), fetched with x
        if stream is None:
            self.host = x.detach().clone()
            return
        self.host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            self.host.copy_(x.detach(), non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record(stream)
        self.gpu = x.detach()  # held until the compute stream has waited for the copy (release)
        self.version = x._version  # an in-place change since (seen at prefetch) means the host copy is the value

    def release(self) -> None:
        """Let the device tensor go: the compute stream first waits (on the GPU, not the host) for its copy to host
        memory, so the allocator may hand its block to any later work at once."""
        for e in self.extras:
            e.release()
        if self.gpu is not None:
            if self.gpu._version != self.version:
                _warn_changed()
            torch.cuda.current_stream(self.device).wait_event(self.copied)
            self.gpu = None

    def __del__(self):
        # Dropped with a copy back still pending (prefetched, never fetched: a step that raised): the compute stream
        # waits for it before the block can serve other work.
        try:
            if self.ready is not None and self.ready_event is not None:
                torch.cuda.current_stream(self.device).wait_event(self.ready_event)
        except Exception:  # interpreter shutdown
            pass

    def prefetch(self) -> None:
        for e in self.extras:
            e.prefetch()
        if self.stream is None or self.ready is not None or self.host is None:
            return
        cur = torch.cuda.current_stream(self.device)
        if REUSE_HELD and self.gpu is not None and self.gpu._version == self.version and self.gpu.is_contiguous():
            # one of the last layers of the forward pass, still held: its device tensor serves, no copy back
            cur.wait_event(self.copied)  # (its block is freed in stream order once the recompute is done with it)
            self.ready, self.gpu, self.ready_event = self.gpu, None, None
            return
        self.release()
        self.ready = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)  # compute stream's pool
        self.stream.wait_stream(cur)  # its block may still serve work queued on the compute stream
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.copied)
            self.ready.copy_(self.host, non_blocking=True)
            self.ready_event = torch.cuda.Event()
            self.ready_event.record(self.stream)

    def fetch(self) -> torch.Tensor:
        if self.stream is None:
            x, self.host = self.host, None
            return x
        self.prefetch()
        if self.ready_event is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready_event)
        x = self.ready
        self.ready = self.host = None
        return x


class _State:
    stream = None
    last: "_Stash | None" = None
    call = None  # set by kernels.compiled: runs each layer's body through torch.compile
    in_layer = False  # inside a checkpointed layer call: `seed` holds the call's dropout seed
    seed: "torch.Tensor | None" = None  # one 0-d int64 tensor, refilled for every layer call (forward, recompute)
    replay = False  # inside a recompute (the backward pass's forward): see `replaying`
    kept: list = []  # a layer call's kept tensors, in call order: filled by `keep`, then by the recompute (`kept`)
    held: list = []  # the last layers' stashes whose device tensors are still held (see _Stash.release)


# 2 against 4 on 7B LoRA: the same speed, 0.36 GiB less at the peak (bench/RESULTS.md, eleventh run)
HELD_LAYERS = 2  # how many layers' device tensors wait for their copies before the compute stream waits for them
# The backward pass starts with the last layers, whose device tensors are still held: reading them saves copying
# them back (~4 ms at the start of a 7B step, where nothing overlaps the copy). Written after the eleventh run's
# device time: off until its CUDA test (test_offload_reuses_held_inputs_unless_changed_in_place_cuda) has run;
# TUNESMITH_REUSE_HELD=1 turns it on for A/B runs.
REUSE_HELD = os.environ.get("TUNESMITH_REUSE_HELD") == "1"


_state = _State()


def layer_seed(device: torch.device) -> "torch.Tensor | None":
    """The dropout seed of the checkpointed layer call being run, on `device` (see kernels.lora.dropout_key)."""
    if not _state.in_layer or _state.seed is None or _state.seed.device != device:
        return None
    return _state.seed


def replaying() -> bool:
    """True while a checkpointed layer is being recomputed for its backward pass. There the layer's output is only
    the root of the backward pass: its values are never read, so a module whose output feeds nothing but the
    layer's output (the MLP's down projection, see :mod:`.lean`) may skip computing it."""
    return _state.replay


class KeptValueError(RuntimeError):
    """A recompute did not read the kept values as its forward pass kept them: a layer that runs differently the
    second time. Never retried eagerly (that would hide it)."""


def keep(t: torch.Tensor) -> None:
    """In a checkpointed layer's forward pass: keep `t` (an intermediate value) for the recompute, in host memory
    beside the layer's input; the recompute gets it back, in the same order, from :func:`kept`."""
    _state.kept.append(t.detach())


def has_kept() -> bool:
    """In a recompute: a kept value is waiting (:func:`kept` would return one)."""
    return len(_state.kept) > 0


def kept(like: torch.Tensor) -> torch.Tensor:
    """In a recompute: the next value the forward pass kept (see :func:`keep`), which stands in for `like` (the
    recomputed tensor): a value of another shape or dtype means the recompute reads them out of order."""
    return take(like.shape, like.dtype)


def take(shape, dtype) -> torch.Tensor:
    """In a recompute: the next kept value, which must have `dtype` and (unless None) `shape`."""
    if not _state.kept:
        raise KeptValueError("tunesmith: a recomputed layer read more kept values than its forward pass kept")
    t = _state.kept.pop(0)
    if (shape is not None and tuple(t.shape) != tuple(shape)) or t.dtype != dtype:
        raise KeptValueError(f"tunesmith: a recomputed layer read a kept value of shape {tuple(t.shape)} "
                             f"{t.dtype} for one of {tuple(shape) if shape is not None else '(any)'} {dtype}")
    return t


def _run_layer(seed: int, device: torch.device, fn, *args, replay: bool = False):
    """`fn(*args)` with `seed` as the layer's dropout seed (the same number in the forward pass and the
    recompute, so the LoRA dropout masks match whatever order the random ops run in)."""
    if _state.seed is None or _state.seed.device != device:
        _state.seed = torch.zeros((), dtype=torch.int64, device=device)
    _state.seed.fill_(seed)
    _state.in_layer, _state.replay = True, replay
    try:
        return fn(*args)
    finally:
        _state.in_layer = _state.replay = False


def _warn_changed() -> None:
    import warnings

    warnings.warn("tunesmith: a checkpointed layer's input (or a value it kept) was changed in place after the layer "
                  "ran; its host copy may hold either value, so gradients may be wrong. Train with "
                  "train.offload_activations: false for this model, and please report it.", stacklevel=3)


def reset() -> None:
    """Forget the stashes of an earlier forward pass (one whose backward pass never ran: a step that raised), so
    no prefetch reaches across runs and nothing they hold stays alive."""
    for s in _state.held:
        s.release()
    _state.held.clear()
    _state.kept.clear()
    _state.last = None


def _copy_stream(device: torch.device):
    if device.type != "cuda":
        return None
    if _state.stream is None:
        _state.stream = torch.cuda.Stream(device)
    return _state.stream


class _OffloadCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, x, *rest):
        dev = x.device.type
        ctx.seed = int(torch.randint(0, 2 ** 31, ()).item())  # before the RNG state is saved: replays match
        ctx.run = run
        ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)) if dev != "cpu" else (False, None)
        ctx.dev = dev
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if dev == "cuda" else None
        ctx.stash = _Stash(x, _copy_stream(x.device))
        ctx.prev = _state.last  # the layer before this one: prefetched while this one recomputes
        _state.last = ctx.stash
        ctx.rest = rest
        _state.kept.clear()
        try:
            with torch.no_grad():
                out = _run_layer(ctx.seed, x.device, _call, run, x, *rest)
            ctx.stash.extras = [_Stash(t, ctx.stash.stream) for t in _state.kept]
        finally:
            _state.kept.clear()
        if ctx.stash.stream is not None:
            _state.held.append(ctx.stash)
            while len(_state.held) > HELD_LAYERS:
                _state.held.pop(0).release()
        ctx.tuple_out = isinstance(out, tuple)
        return out

    @staticmethod
    def backward(ctx, *grads):
        x0 = ctx.stash.fetch().detach()
        kept_values = [e.fetch().detach() for e in ctx.stash.extras]
        if ctx.prev is not None:
            ctx.prev.prefetch()
        try:
            gx = _replay(ctx, x0, kept_values, grads, _state.call)
        except Exception as e:
            if _state.call is None or isinstance(e, KeptValueError):
                raise
            from . import compiled  # the compiled layer failed in its backward pass: once more, eagerly

            compiled.disable(f"{type(e).__name__}: {str(e)[:300]}")
            gx = _replay(ctx, x0, kept_values, grads, None)
        n_rest = len(ctx.rest)
        ctx.stash = ctx.prev = ctx.run = ctx.rest = None
        return (None, gx) + (None,) * n_rest


def _replay(ctx, x0, kept_values, grads, call):
    """Recompute the layer from its saved input and kept values (RNG and autocast as in the forward pass) and
    backpropagate."""
    x = x0.detach().requires_grad_(True)
    _state.kept[:] = kept_values
    devs = [torch.device(ctx.dev)] if ctx.cuda_rng is not None else []
    with torch.random.fork_rng(devices=devs, device_type=ctx.dev if ctx.dev != "cpu" else "cuda"):
        torch.set_rng_state(ctx.cpu_rng)
        if ctx.cuda_rng is not None:
            torch.cuda.set_rng_state(ctx.cuda_rng, devs[0])
        with torch.enable_grad(), torch.autocast(ctx.dev, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
            fn, args = (ctx.run, (x, *ctx.rest)) if call is None else (call, (ctx.run, x, *ctx.rest))
            try:
                out = _run_layer(ctx.seed, x.device, fn, *args, replay=True)
            finally:
                left = len(_state.kept)
                _state.kept.clear()
    if left:  # a kept value the recompute did not take: the layer ran differently from its forward pass
        raise KeptValueError(f"tunesmith: a recomputed layer left {left} kept value(s) unused")
    outs = out if ctx.tuple_out else (out,)
    pairs = [(o, g) for o, g in zip(outs, grads)
             if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return x.grad


def _call(run, *args):
    return run(*args) if _state.call is None else _state.call(run, *args)


def offload_checkpoint(fn, x, *rest):
    """Checkpoint `fn(x, *rest)` keeping `x` in host memory; only `x` may need a gradient among the inputs."""
    if not torch.is_grad_enabled():
        return fn(x, *rest)
    return _OffloadCheckpoint.apply(fn, x, *rest)
