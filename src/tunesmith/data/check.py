"""`tunesmith data check`: what a dataset becomes once rendered for one model."""

from __future__ import annotations

from dataclasses import dataclass

from .build import length_stats, tokenize
from .formats import Dataset
from .template import IGNORE, Rendered

MARK_OPEN, MARK_CLOSE = "«", "»"


@dataclass
class CheckReport:
    path: str
    format: str
    records: int
    stats: dict[str, int]
    over_length: int
    max_length: int
    trained_tokens: int
    total_tokens: int
    first: Rendered


def check_dataset(ds: Dataset, tokenizer, max_length: int, generation_config=None) -> CheckReport:
    samples = tokenize(tokenizer, [r["messages"] for r in ds.records], generation_config)
    return CheckReport(
        path=ds.path, format=ds.format, records=len(ds.records), stats=length_stats(samples),
        over_length=sum(len(s.input_ids) > max_length for s in samples), max_length=max_length,
        trained_tokens=sum(s.n_trained for s in samples), total_tokens=sum(len(s.input_ids) for s in samples),
        first=samples[0])


def spans(tokenizer, r: Rendered) -> list[tuple[str, bool]]:
    """Consecutive (text, trained) pieces of one rendered sample, decoded without dropping special tokens."""
    out: list[tuple[str, bool]] = []
    i = 0
    while i < len(r.input_ids):
        trained = r.labels[i] != IGNORE
        j = i
        while j < len(r.input_ids) and (r.labels[j] != IGNORE) == trained:
            j += 1
        out.append((tokenizer.decode(r.input_ids[i:j], skip_special_tokens=False), trained))
        i = j
    return out


def marked_text(tokenizer, r: Rendered) -> str:
    """The sample as text, trained pieces wrapped in « »."""
    return "".join(f"{MARK_OPEN}{t}{MARK_CLOSE}" if tr else t for t, tr in spans(tokenizer, r))
