"""The frozen input embedding and output head in pinned host memory between their uses (LoRA/QLoRA on CUDA).

In LoRA and QLoRA training the embedding matrix and the output head are frozen, unquantised and large: 2 x 0.36 GiB
for InternLM2-1.8B, 2 x 1.02 GiB for Qwen2.5-7B (one shared matrix when they are tied, as in Qwen2.5-0.5B). They
sit in GPU memory through the whole step, the backward pass included, although neither is used there:

- the embedding is a row lookup. Here it runs on the host, from a pinned copy of the matrix, and only the batch's
  rows (tokens x hidden) go to the GPU, copied asynchronously;
- the head is needed only by the fused linear + cross-entropy (:mod:`.linear_ce`), which makes its gradients in
  the forward pass. Here its weight is copied to the GPU on a side stream while the decoder layers run, the loss
  waits for that copy, and the GPU copy is dropped as soon as the loss is computed. The backward pass, where the
  step's memory peaks, runs without it.

Between steps both matrices are host tensors. Sample generation during training (and after its last step) brings
only the head to the GPU (:meth:`HostWeights.for_generation`; the embedding rows are still looked up on the host);
the trained model handed back gets both (:meth:`HostWeights.restore`). Used where the layers' activations are
offloaded already (one device per process, no FSDP sharding); ``train.offload_embeddings`` turns it off. The
reference is the same model with both matrices on the GPU (``tests/test_kernels.py``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import restore_forward, swap_forward

ATTR = "_tunesmith_host_weights"


def eligible(model: nn.Module) -> str | None:
    """Why the embedding and head cannot be kept on the host (None: they can)."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if type(emb) is not nn.Embedding or emb.max_norm is not None:
        return "the input embedding is not a plain nn.Embedding"
    if emb.weight.requires_grad or not emb.weight.is_floating_point():
        return "the input embedding is trained or quantised"
    if head is not None and (type(head) is not nn.Linear or head.weight.requires_grad
                             or not head.weight.is_floating_point()):
        return "the output head is trained, quantised or not a plain nn.Linear"
    return None


def why_not(setting, model: nn.Module, device: torch.device, offload: bool, fast: list[str]) -> str | None:
    """Why `train.offload_embeddings` (`setting`: "auto" or True) does not keep `model`'s embedding and head on the
    host (None: it does). "auto" is CUDA only and skips tied heads: one matrix the loss needs anyway, so it saved
    0.12 GiB on Qwen2.5-0.5B for 15 % of its speed (bench/RESULTS.md, eighth run); True also takes the CPU, where
    it saves nothing (tests run the same steps there)."""
    if not (offload and "linear-ce" in fast and (device.type == "cuda" or setting is True)):
        return "it needs offloaded activations (CUDA, no FSDP sharding) and train.kernels on/auto"
    why = eligible(model)
    if why is None and setting == "auto" and tied(model):
        why = "tied embedding and head"
    return why


def tied(model: nn.Module) -> bool:
    """The output head shares the input embedding's matrix (kept on the host it saves little: the loss needs it)."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def _host_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    h = t.detach().to("cpu", copy=True)
    return h.pin_memory() if pin else h


def _embed_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
    return getattr(self, ATTR).embed(input_ids)


class HostWeights:
    def __init__(self, model: nn.Module, device: torch.device):
        self.emb = model.get_input_embeddings()
        self.head = model.get_output_embeddings()
        self.device = device
        self.tied = tied(model)
        self.cuda = device.type == "cuda"  # elsewhere (tests on the CPU) the same steps, without streams or pinning
        self.e_host = _host_copy(self.emb.weight, self.cuda)
        self.h_host = None if self.head is None else self.e_host if self.tied else _host_copy(self.head.weight, self.cuda)
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.ready = None  # a CUDA event while the head's GPU copy exists (True on the CPU)
        self.stash: tuple[torch.Tensor, torch.Tensor] | None = None
        setattr(self.emb, ATTR, self)
        setattr(model, ATTR, self)
        self.offload()

    # -- where the matrices live
    def offload(self) -> None:
        """Both matrices to their host copies (the GPU copies are freed); the embedding looks rows up there."""
        self.emb.weight.data = self.e_host
        if self.head is not None:
            self.head.weight.data = self.h_host
        swap_forward(self.emb, _embed_forward)
        self.active, self.generating = True, False

    def for_generation(self) -> None:
        """Sampling during training: the head on the GPU for the logits, the embedding still on the host (a tied
        matrix comes back whole). :meth:`offload` afterwards, as after a loss."""
        if not self.active:
            return
        if self.head is None or self.tied:
            self.restore()
            return
        self.head.weight.data = self.h_host.to(self.device)
        self.ready = self.stash = None
        self.generating = True

    def restore(self) -> None:
        """The plain model again: both matrices on the GPU, the embedding's own forward. Once only (a sampling
        fallback may have restored the model already: copying again would hold both copies at once)."""
        if not self.active:
            return
        self.emb.weight.data = self.e_host.to(self.device)
        if self.head is not None and not self.tied and not self.generating:  # sampling brought the head already:
            self.head.weight.data = self.h_host.to(self.device)  # a second copy would hold both at once
        restore_forward(self.emb)
        self.ready = self.stash = None
        self.active = self.generating = False

    # -- the embedding
    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the host matrix for `ids` (any device; device ids are copied back first, a sync), on the GPU."""
        flat = ids.reshape(-1).to("cpu")
        rows = torch.empty((flat.numel(), self.e_host.shape[1]), dtype=self.e_host.dtype, pin_memory=self.cuda)
        torch.index_select(self.e_host, 0, flat, out=rows)
        return rows.to(self.device, non_blocking=True).view(*ids.shape, -1)

    def prepare(self, ids_host: torch.Tensor, ids_device: torch.Tensor) -> None:
        """Before a forward pass on `ids_device`: look its rows up from the host ids (no sync), and start copying
        the head to the GPU behind the decoder layers."""
        self.stash = (ids_device, self.lookup(ids_host))
        self.fetch_head()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.stash is not None and self.stash[0] is ids:
            out, self.stash = self.stash[1], None  # not kept: the first layer's input is offloaded by its owner
            return out
        return self.lookup(ids)

    # -- the head
    def fetch_head(self) -> None:
        if self.head is None or self.ready is not None:
            return
        buf = torch.empty(self.h_host.shape, dtype=self.h_host.dtype, device=self.device)  # main stream's memory
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                buf.copy_(self.h_host, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(self.stream)
        else:
            buf.copy_(self.h_host)
            self.ready = True
        self.head.weight.data = buf

    def head_weight(self) -> torch.Tensor:
        """The head's weight on the GPU, for the loss (fetched now if `prepare` did not)."""
        self.fetch_head()
        if self.cuda and self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
        return self.head.weight

    def release_head(self) -> None:
        """After the loss: the GPU copy goes (the fused loss made its gradients already)."""
        if self.head is not None and self.ready is not None:
            if self.cuda:  # the copy may not have been waited for (no trained token): not into freed memory
                torch.cuda.current_stream(self.device).wait_event(self.ready)
            self.head.weight.data = self.h_host
            self.ready = None


def attach(model: nn.Module, device: torch.device) -> HostWeights:
    return HostWeights(model, device)


def of(model: nn.Module) -> HostWeights | None:
    """The model's host-kept weights while they are on the host (None once restored, or never attached)."""
    hw = getattr(model, ATTR, None)
    return hw if hw is not None and hw.active else None
