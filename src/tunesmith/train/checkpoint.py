"""Atomic checkpoints: a PEFT adapter (or HF model) folder plus what resume needs, written beside the run."""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..fsutil import atomic_dir

STEP_RE = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.pt"


def save_model_dir(model, tokenizer, out: Path, config_yaml: str | None = None, state_dict: dict | None = None
                   ) -> None:
    """Write an adapter (PEFT) or full model folder with tokenizer and resolved config into `out` (not atomic).

    `state_dict`: the model's weights gathered from a sharded model (else they are read from `model`).
    """
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(out)
    if config_yaml is not None:
        (out / "tunesmith_config.yaml").write_text(config_yaml, encoding="utf-8")


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(ckpt_root: Path, step: int, model, tokenizer, optimizer, scheduler, config_yaml: str,
                    extra: dict, keep: int, model_state: dict | None = None, optim_state: dict | None = None) -> Path:
    """`model_state` / `optim_state`: full state dicts gathered from a sharded run (else read from the objects)."""
    final = ckpt_root / f"step-{step:06d}"
    with atomic_dir(final) as tmp:
        save_model_dir(model, tokenizer, tmp, config_yaml, state_dict=model_state)
        optim_state = optimizer.state_dict() if optim_state is None else optim_state
        torch.save({"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                    "rng": rng_state(), **extra}, tmp / STATE_FILE)
    prune(ckpt_root, keep)
    return final


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = STEP_RE.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune(ckpt_root: Path, keep: int) -> None:
    ckpts = list_checkpoints(ckpt_root)
    for _, p in ckpts[: max(0, len(ckpts) - max(keep, 1))]:
        shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_root.glob(".step-*.tmp-*"):  # leftovers of a crash mid-save
        shutil.rmtree(p, ignore_errors=True)


def load_state(ckpt: Path) -> dict:
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
