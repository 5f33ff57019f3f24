"""Assemble a config's training conversations and turn them into packed rows of token ids."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from ..errors import UserError
from .formats import load_dataset
from .packing import FitReport, Row, fit_length, pack, unpacked
from .template import Rendered, check_template, end_token_ids, render


@dataclass
class Prepared:
    rows: list[Row]
    samples: list[Rendered]
    fit: FitReport
    n_conversations: int


def gather_conversations(data_cfg) -> list[list[dict]]:
    """Persona data (generated) plus every dataset file (repeated as configured), as message lists."""
    convs: list[list[dict]] = []
    if data_cfg.persona is not None:
        from .persona import generate_persona

        p = data_cfg.persona
        convs += [r["messages"] for r in generate_persona(p.name, p.author, langs=p.langs, n=p.n, seed=p.seed,
                                                          system=p.system, system_ratio=p.system_ratio)]
    for f in data_cfg.files:
        ds = load_dataset(f.path, f.format, f.fields)
        convs += [r["messages"] for r in ds.records] * f.repeat
    return convs


def tokenize(tokenizer, convs: list[list[dict]], generation_config=None) -> list[Rendered]:
    check_template(tokenizer)
    end_ids = end_token_ids(tokenizer, generation_config)
    return [render(tokenizer, m, end_ids) for m in convs]


def prepare(tokenizer, convs: list[list[dict]], max_length: int, truncation: str, packed: bool, seed: int,
            generation_config=None, n_kl: int = 0) -> Prepared:
    """Tokenize, fit and pack; the last `n_kl` conversations are flagged `kl` (trained towards the base model's
    distribution instead of by cross-entropy, see train/loss.py)."""
    samples = tokenize(tokenizer, convs, generation_config)
    for s in samples[len(samples) - n_kl:] if n_kl else []:
        s.kl = True
    kept, rep = fit_length(samples, max_length, truncation)
    if not kept:
        raise UserError(f"no sample is left to train on: {rep.dropped} dropped as longer than max_length="
                        f"{max_length}, {rep.no_loss} with no answer tokens left after truncation. "
                        "Raise data.max_length or use data.truncation=truncate.")
    rows = pack(kept, max_length, seed) if packed else unpacked(kept, seed)
    return Prepared(rows, kept, rep, len(convs))


def length_stats(samples: list[Rendered]) -> dict[str, int]:
    lens = sorted(len(s.input_ids) for s in samples)
    p95 = lens[min(len(lens) - 1, int(round(0.95 * (len(lens) - 1))))]
    return {"min": lens[0], "median": int(statistics.median(lens)), "p95": p95, "max": lens[-1]}
