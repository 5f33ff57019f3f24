"""Atomic folder writes, shared by checkpoints, merged models and converted checkpoints."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() gives a new file here; mkstemp and safetensors give 0600
DIR_MODE = 0o777 & ~_UMASK


def usual_modes(folder: str | os.PathLike) -> None:
    """Give files written owner-only (safetensors writes its files 0600, as mkstemp does) the usual mode
    (`FILE_MODE`), so a merged model or adapter can be read by the server's or a colleague's user like its config
    files next to it."""
    for f in Path(folder).rglob("*"):
        if f.is_file() and not f.is_symlink() and f.stat().st_mode & 0o077 == 0:
            os.chmod(f, FILE_MODE)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh folder beside `final`; on success it replaces `final` in one rename, else it is removed.

    A crash mid-write leaves `final` as it was (a previous version stays intact).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = final.parent / f".{final.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    usual_modes(tmp)
    if final.exists():
        old = final.parent / f".{final.name}.old-{tag}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
