"""Several processes (torchrun): the model sharded with FSDP2, each rank training on its share of a global step.

World size 1 (no torchrun) takes none of these paths: every function here falls back to exactly what the
single-device loop did before.

How a sharded run works:
- process group: nccl on CUDA (device cuda:LOCAL_RANK), gloo on the CPU; one flat mesh over all ranks.
- loading: rank 0 loads the real model on the CPU; the other ranks build the same model on the meta device
  (no weights read: host memory holds one copy of the model, not one per GPU). After `fully_shard` (each
  decoder layer, then the root) rank 0 broadcasts the full state and every rank keeps its shards.
  QLoRA: every rank loads the NF4 model onto its own GPU; the 4-bit weights stay whole on every rank (FSDP
  ignores them: packed NF4 bytes with their quantization state cannot be split) and the rest is sharded.
  LoRA (`train.shard_frozen`): the frozen base may instead stay whole on every rank too (each rank loads it
  onto its own device; FSDP ignores it), so a step all-gathers only the small LoRA weights, which are still
  sharded with their optimizer state. 'auto' does so when the weight files take at most REPLICATE_FRACTION of
  one device's memory (host memory / local processes on the CPU). Full fine-tunes have nothing frozen.
- data parallel: when every frozen weight stays whole on every rank (LoRA with the base replicated; QLoRA unless
  `train.shard_frozen: true`), nothing is left worth sharding: the LoRA weights are a few hundred MB at most.
  Then FSDP is not used at all. Every rank runs the single-device step (tunesmith's checkpointing with host
  offload, compiled layers) on its own micro-batches, and one all-reduce per step (`sync_grads`, flat buckets)
  sums the LoRA gradients; every rank then takes the same optimizer step, so the replicas stay equal. Profiles
  showed the one-device step bound by the CPU issuing work, which FSDP's per-layer hooks add to; a 2-GPU FSDP run
  could not use offload or compiled layers at all. Checkpoints: rank 0 writes its own copy.
- data: every rank reads and tokenises the data itself (deterministic, so all agree; nobody waits on a
  collective meanwhile) and takes its contiguous share of each global step's micro-batches.
- the loss: every rank computes sum-of-CE / (trained tokens of the whole global step) on its own rows, and
  FSDP SUMs the gradients (no averaging), so gradients equal the single-process ones.
- checkpoints: full state dicts are gathered to rank 0 (CPU) and written in the single-device format;
  resume loads the full state (every rank reads trainer_state.pt: keep work_dir on storage all nodes see)
  and re-shards, so the number of processes may change between runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from torch import nn

from ..errors import UserError
from ..models import load as mload

# Long enough for rank 0 to load a large model or write a large checkpoint while the others wait.
TIMEOUT = timedelta(minutes=30)
# shard_frozen 'auto': keep a LoRA run's frozen base whole on every rank when it takes at most this share of one
# device's memory (the rest is left for activations, LoRA weights, gather buffers).
REPLICATE_FRACTION = 0.4


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this process group was started here (and is ended by `close`)
    # `load_model`'s decision: the frozen (base) weights whole on every rank instead of sharded. The default
    # (sharded) is what `shard` does with a model that every rank did not load itself (rank 0 real, meta elsewhere).
    replicate_frozen: bool = False
    frozen_bytes: int | None = None  # the base model's weight files, when known
    # `load_model`'s decision: every frozen weight whole on every rank, so no FSDP: gradients all-reduced instead
    data_parallel: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Several processes (each with its share of a step's micro-batches)."""
        return self.world > 1

    @property
    def fsdp(self) -> bool:
        """Several processes with the model wrapped by FSDP2 (not data parallel)."""
        return self.world > 1 and not self.data_parallel


def setup(device_pref: str = "auto") -> Dist:
    """Read torchrun's environment and start the process group; world 1 without torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=mload.pick_device(device_pref))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = mload.pick_device(device_pref)
    owns = False
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=TIMEOUT)
        owns = True
    return Dist(rank, local_rank, world, device, owns)


def close(d: Dist) -> None:
    if d.owns_group:
        import torch.distributed as dist

        # every rank done (rank 0 may still be writing the final save) before any tears its connections down: a
        # rank that left early once aborted in gloo's teardown ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- model


def load_model(d: Dist, path: str, *, method: str, dtype: torch.dtype, trust_remote_code: bool,
               attn_implementation: str | None, shard_frozen: str | bool = True):
    """The base model as `models.load.load_model` gives it; sharded runs: real on rank 0 (CPU), meta elsewhere.

    Sharded LoRA runs first decide `shard_frozen` (recorded on `d` for `shard`); keeping the frozen base whole,
    every rank loads the real model onto its own device.
    """
    kw = {"method": method, "dtype": dtype, "trust_remote_code": trust_remote_code,
          "attn_implementation": attn_implementation}
    if d.sharded and method == "lora":
        decide_frozen(d, path, shard_frozen)
    # no FSDP when nothing frozen is sharded: LoRA with the base replicated, QLoRA (its NF4 weights stay whole
    # anyway) unless asked to shard the rest (embeddings, head, norms) with shard_frozen: true
    d.data_parallel = d.sharded and (d.replicate_frozen or (method == "qlora" and shard_frozen is not True))
    # QLoRA: every rank loads its own NF4 copy onto its GPU; LoRA with the base replicated: its own full copy
    if not d.sharded or method == "qlora" or d.replicate_frozen:
        return mload.load_model(path, device=d.device, **kw)
    if d.is_main:
        return mload.load_model(path, device=torch.device("cpu"), **kw)
    return _meta_model(path, dtype, trust_remote_code, attn_implementation)


def weight_bytes(path: str) -> int | None:
    """Bytes of a model folder's weight files (*.safetensors, else *.bin); None when there are none."""
    from pathlib import Path

    p = Path(path)
    if not p.is_dir():
        return None
    files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
    return sum(f.stat().st_size for f in files) if files else None


def device_memory(d: Dist) -> int:
    """Memory one rank may count on: its GPU's, or on the CPU the host's shared by this node's processes."""
    if d.device.type == "cuda":
        return torch.cuda.get_device_properties(d.device).total_memory
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", d.world)))


def replicate_choice(shard_frozen: str | bool, frozen_bytes: int | None, memory: int) -> bool:
    """True: keep the frozen weights whole on every rank. 'auto': when they are known and fit the budget."""
    if shard_frozen == "auto":
        return frozen_bytes is not None and frozen_bytes <= REPLICATE_FRACTION * memory
    return not shard_frozen


def decide_frozen(d: Dist, path: str, shard_frozen: str | bool) -> None:
    """Set `d.replicate_frozen` (the same on every rank: replicated only where every rank chose it)."""
    import torch.distributed as dist

    d.frozen_bytes = weight_bytes(path)
    mine = replicate_choice(shard_frozen, d.frozen_bytes, device_memory(d))
    t = torch.tensor([int(mine)], dtype=torch.int32, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    d.replicate_frozen = bool(t.item())


def describe_frozen(d: Dist, model: nn.Module) -> str | None:
    """The log line of the choice for a sharded run with frozen weights; None otherwise."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    if not d.sharded or not frozen:
        return None
    if _nf4_params(model):
        if d.data_parallel:
            return "frozen base: NF4 model whole on every rank; data parallel (LoRA gradients all-reduced)"
        return "frozen base: NF4 weights whole on every rank, the rest sharded (FSDP2)"
    gib = (d.frozen_bytes if d.frozen_bytes is not None else
           sum(p.numel() * p.element_size() for p in {id(p): p for p in frozen}.values())) / 2**30
    if d.replicate_frozen:
        return f"frozen base: replicated on every rank ({gib:.3g} GiB); data parallel (LoRA gradients all-reduced)"
    return f"frozen base: sharded over {d.world} ranks ({gib:.3g} GiB)"


def _meta_model(path: str, dtype: torch.dtype, trust_remote_code: bool, attn_implementation: str | None):
    """The same model class, config and generation config as rank 0's, on the meta device (no weights read)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": dtype, "device_map": "meta"}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if mload._is_internlm2(path) and not trust_remote_code:
        from ..models import internlm2

        return internlm2.load_internlm2(path, **kwargs)
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)


class Root(nn.Module):
    """`root(fn, *args)` is `fn(model, *args)` run as this module's forward.

    FSDP gathers the root unit's parameters (embeddings, final norm, output head) around the root's forward,
    and the chunked loss reaches the head's weight directly, so every pass over a sharded model (loss, chat
    samples) goes through here. Unsharded, it is a plain call.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(self.model, *args)


def shard(d: Dist, model: nn.Module) -> Root:
    """FSDP2 over each decoder layer and the root; fills every rank's shards from rank 0's weights."""
    root = Root(model)
    if not d.sharded:
        return root
    import torch.distributed as dist

    if d.data_parallel:
        for p in model.parameters():  # every rank loaded the same base; the LoRA init must agree too
            if p.requires_grad:
                dist.broadcast(p.data, src=0)
        return root
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
        raise UserError(f"training on several processes needs torch >= 2.8 (FSDP2); this is torch {torch.__version__}")
    # Kept whole on every rank (FSDP ignores them): QLoRA's NF4 weights; LoRA's frozen base when replicated.
    ignored = _nf4_params(model)
    if d.replicate_frozen:
        ignored |= {p for p in model.parameters() if not p.requires_grad}
    if ignored:  # all ranks hold real weights; only the (randomly initialised) LoRA weights must agree
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)
        full = None
    else:
        full = dict(model.state_dict()) if d.is_main else {}
    on_meta = any(p.is_meta for p in model.parameters())

    mesh = init_device_mesh(d.device.type, (d.world,))
    # When the layers' big weights are kept whole (replicated frozen base, NF4), what FSDP shards in a layer is
    # only its small LoRA weights: keep them gathered from forward to backward instead of gathering them again
    # for the recompute and the backward pass (a few MB per layer, two collectives fewer per layer and step).
    keep_gathered = bool(ignored)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, ignored_params=ignored or None, reshard_after_forward=not keep_gathered)
    fully_shard(root, mesh=mesh, ignored_params=ignored or None)
    for m in root.modules():
        if isinstance(m, FSDPModule):  # each rank's loss is already a share of the global mean: SUM, not AVG
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)

    if full is not None:
        if on_meta:
            root.to_empty(device=d.device)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for b in root.buffers():  # incl. non-persistent ones (rotary inv_freq) a state dict leaves out
            dist.broadcast(b, src=0)
        del full
    # Gather and free every unit once, here: FSDP keeps the gather buffers it makes first, and buffers made
    # under the inference mode of chat generation (the first pass when samples come at step 0) cannot be
    # written in training.
    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.unshard()
            m.reshard()
    return root


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None)
    if layers is None:
        raise UserError(f"{type(base).__name__}: no decoder .layers to shard; several processes are not "
                        "supported for this model (train with one process)")
    return list(layers)


def _nf4_params(model: nn.Module) -> set[nn.Parameter]:
    """bitsandbytes' 4-bit weights (packed bytes + quantization state: FSDP cannot split them)."""
    return {p for p in model.parameters() if type(p).__name__ == "Params4bit"}


# ----------------------------------------------------------------------------- the step


def share(d: Dist, items: list) -> list:
    """This rank's contiguous share of a global step's micro-batches (rank 0 first, as one process would)."""
    if len(items) % d.world:
        raise ValueError(f"{len(items)} micro-batches do not split over {d.world} ranks")
    k = len(items) // d.world
    return items[d.rank * k:(d.rank + 1) * k]


def step_seed(d: Dist, seed: int, step: int) -> None:
    """Sharded runs: a per-rank, per-step torch seed (dropout differs between ranks; resume is exact)."""
    if d.sharded:
        torch.manual_seed((seed * 1_000_003 + step) * 1009 + d.rank)


def all_sum(d: Dist, x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` (a tensor on this rank's device) over the ranks, without waiting for it on the host."""
    if not d.sharded:
        return x
    import torch.distributed as dist

    t = x.detach().clone()
    dist.all_reduce(t)
    return t


# gradients summed per all-reduce call (fp32 elements: 256 MiB); a 7B model's r=64 LoRA takes three
BUCKET = 1 << 26


def sync_grads(d: Dist, params: list[nn.Parameter]) -> None:
    """Data parallel: sum every trainable gradient over the ranks (each rank's loss is already its share of the
    global mean), in flat buckets of one dtype. A parameter without a gradient counts as zeros on that rank."""
    if not d.data_parallel:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        i = 0
        while i < len(grads):
            bucket, n = [], 0
            while i < len(grads) and (not bucket or n + grads[i].numel() <= BUCKET):
                bucket.append(grads[i])
                n += grads[i].numel()
                i += 1
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            for g, v in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(v.view_as(g))


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` that also takes FSDP's sharded gradients (the norm over all shards)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not hasattr(grads[0], "full_tensor"):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    total = torch.nn.utils.get_total_norm(grads)
    total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


# ----------------------------------------------------------------------------- checkpoints


def full_state(d: Dist, model: nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool
               ) -> tuple[dict | None, dict | None]:
    """Gather (model state dict, optimizer state dict) to rank 0's CPU; every rank must call this.

    Unsharded or data parallel: (None, None): the checkpoint code reads the model and optimizer itself. The
    optimizer state comes back in `optimizer.state_dict()`'s own form (parameters numbered), the single-device
    format.
    """
    if not d.fsdp:
        return None, None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    sd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    if not d.is_main:
        return None, None
    first: dict[int, str] = {}  # tied weights (embeddings = head) share one tensor again, as save_pretrained expects
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
        if name in sd and first[id(p)] in sd:
            sd[name] = sd[first[id(p)]]
    index = {name: i for i, name in enumerate(n for g in osd["param_groups"] for n in g["params"])}
    osd = {"state": {index[k]: v for k, v in osd["state"].items()},
           "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]}
    return sd, osd


def load_optimizer(d: Dist, model: nn.Module, optimizer: torch.optim.Optimizer, osd: dict) -> None:
    """Load a full (single-device format) optimizer state dict; sharded runs keep only their shards."""
    if not d.fsdp:
        optimizer.load_state_dict(osd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    name = {id(p): n for n, p in model.named_parameters()}
    names = [name[id(p)] for g in optimizer.param_groups for p in g["params"]]
    osd = {"state": {names[i]: v for i, v in osd["state"].items()},
           "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))
