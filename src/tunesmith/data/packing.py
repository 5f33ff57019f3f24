"""Fit rendered samples to max_length and pack them into rows without splitting any sample.

Each packed sample keeps its own position ids (restarting at 0). transformers reads sample boundaries from
restarting position ids when no attention mask is given, so samples in one row never attend to each other.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from .template import IGNORE, Rendered


@dataclass
class FitReport:
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    no_loss: int = 0  # samples whose trained tokens all fell past max_length


def fit_length(samples: list[Rendered], max_length: int, mode: str) -> tuple[list[Rendered], FitReport]:
    """Truncate (mode='truncate') or drop (mode='drop') samples longer than max_length; count both."""
    out, rep = [], FitReport()
    for s in samples:
        if len(s.input_ids) > max_length:
            if mode == "drop":
                rep.dropped += 1
                continue
            s = Rendered(s.input_ids[:max_length], s.labels[:max_length], s.kl)
            rep.truncated += 1
            if s.n_trained == 0:
                rep.no_loss += 1
                continue
        out.append(s)
    rep.kept = len(out)
    return out, rep


@dataclass
class Row:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    kl: list[bool] = field(default_factory=list)  # per sample: trained by KL to the base model (Rendered.kl)

    def add(self, s: Rendered) -> None:
        self.input_ids += s.input_ids
        self.labels += s.labels
        self.position_ids += list(range(len(s.input_ids)))
        self.lengths.append(len(s.input_ids))
        self.kl.append(s.kl)

    def kl_mask(self) -> list[bool]:
        """Per token: whether it belongs to a sample trained by KL to the base model."""
        return [d for n, d in zip(self.lengths, self.kl) for _ in range(n)]


def pack(samples: list[Rendered], max_length: int, seed: int = 0) -> list[Row]:
    """First-fit-decreasing bin packing into rows of at most max_length tokens, rows in shuffled order."""
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i].input_ids))
    rows: list[Row] = []
    space: list[int] = []
    for i in order:
        n = len(samples[i].input_ids)
        for r, free in enumerate(space):
            if free >= n:
                rows[r].add(samples[i])
                space[r] -= n
                break
        else:
            row = Row()
            row.add(samples[i])
            rows.append(row)
            space.append(max_length - n)
    random.Random(seed).shuffle(rows)
    return rows


def unpacked(samples: list[Rendered], seed: int = 0) -> list[Row]:
    rows = []
    for s in samples:
        r = Row()
        r.add(s)
        rows.append(r)
    random.Random(seed).shuffle(rows)
    return rows


# Batches that need an attention mask anyway (packed or padded rows) are padded to a width from a short list:
# a multiple of PAD_MULTIPLE, and of a coarser step as widths grow (16 widths per doubling, so at most 1/16 of a
# row is padding). Every new width costs once per process: compiled layers specialise on the mask's alignment (an
# unaligned width compiled the layer again, bench/RESULTS.md), and on a 4-GPU run each rank's first batch of
# a new width was 150-200 ms slower even eagerly, which every other rank then waited for.
PAD_MULTIPLE = 8


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def padded_width(width: int) -> int:
    """The width a batch that needs a mask is padded to: 9 -> 16, 300 -> 304, 2008 -> 2048 (never less than
    `width`, at most 1/16 more above 256)."""
    return _round_up(width, max(PAD_MULTIPLE, 1 << max(0, width.bit_length() - 5)))


def cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sample boundaries of a (batch, width) block of position ids, flattened: a segment starts at every row start
    and wherever the position id is 0. Returns (int32 cumulative lengths with 0 first and the total last, the
    longest segment)."""
    b, w = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True
    idx = torch.nonzero(starts.reshape(-1), as_tuple=False).reshape(-1)
    cu = torch.cat([idx, torch.tensor([b * w])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def collate(rows: list[Row], pad_id: int, coarse: bool = True) -> dict:
    """Right-pad rows to a common width; padding continues position ids as its own span and carries no loss.

    Batches whose rows differ in length or hold several samples are padded to `padded_width` (`coarse`, for GPUs,
    where each new width costs) or to a multiple of `PAD_MULTIPLE` (the CPU, where it does not) and carry their
    sample boundaries for variable-length attention: `cu_seqlens` (int32, flattened over the batch, padding
    spans included as samples of their own) and `max_seqlen` (a Python int); a batch of equal single-sample rows
    is left as it is (it needs no attention mask). When a row holds a sample flagged `kl`, the batch also carries
    `kl_mask` (bool, per token).
    """
    width = max(len(r.input_ids) for r in rows)
    masked = any(len(r.input_ids) != width or len(r.lengths) > 1 for r in rows)
    if masked:
        width = padded_width(width) if coarse else _round_up(width, PAD_MULTIPLE)
    ids, labels, pos, dmask = [], [], [], []
    for r in rows:
        pad = width - len(r.input_ids)
        ids.append(r.input_ids + [pad_id] * pad)
        labels.append(r.labels + [IGNORE] * pad)
        pos.append(r.position_ids + list(range(pad)))
        dmask.append(r.kl_mask() + [False] * pad)
    out = {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(pos, dtype=torch.long),
    }
    if masked:
        out["cu_seqlens"], out["max_seqlen"] = cu_seqlens(out["position_ids"])
    if any(any(r.kl) for r in rows):
        out["kl_mask"] = torch.tensor(dmask, dtype=torch.bool)
    return out
