"""InternLM2 native loading against logits of the original remote code (tiny random fixture).

The fixture is read at run time from $TUNESMITH_INTERNLM2_FIXTURE or
<repo>/../shared/fixtures/internlm2-tiny; see its README.md for what the references hold.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tunesmith.errors import UserError
from tunesmith.models import internlm2 as il

ATOL = 1e-5  # README: observed <= 1.9e-6; subtle mapping bugs show up at >= 1.2e-4
SEQS = ("chat_zh", "english", "random300")
CHAT = [
    {"role": "system", "content": "You are an AI assistant whose name is InternLM (书生·浦语)."},
    {"role": "user", "content": "请做一下自我介绍"},
]


def _fixture_dir() -> Path:
    env = os.environ.get("TUNESMITH_INTERNLM2_FIXTURE")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared/fixtures/internlm2-tiny"
    if not (path / "model.safetensors").is_file() or not (path / "reference.safetensors").is_file():
        pytest.skip(f"InternLM2 fixture not found at {path} (set TUNESMITH_INTERNLM2_FIXTURE)")
    return path


@pytest.fixture(scope="module")
def fixture_dir() -> Path:
    return _fixture_dir()


@pytest.fixture(scope="module")
def ref(fixture_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(fixture_dir / "reference.safetensors"))


@pytest.fixture(scope="module")
def model(fixture_dir: Path):
    return il.load_internlm2(fixture_dir, attn_implementation="eager").eval()


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def _forward(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full logits [T, V] and final hidden state (after model.norm) [T, H] for one sequence."""
    out = model(ids[None], output_hidden_states=True, use_cache=False)
    return out.logits[0].float(), out.hidden_states[-1][0].float()


def _check_against_ref(logits, hidden, ref, name: str) -> dict[str, float]:
    """Compare full logits [T, V] and final hidden [T, H] with the reference; returns the max diffs."""
    cols = logits[:, ref["probe_token_ids"]]
    rows = logits[ref[f"{name}.rows_positions"]]
    return _compare(cols, rows, logits.logsumexp(-1), logits.max(-1).values, logits.argmax(-1), hidden, ref, name,
                    "logits_probe")


def _compare(cols, rows, lse, mx, argmax, hidden, ref, name, probe_key):
    diffs = {
        "probe": _maxdiff(cols, ref[f"{name}.{probe_key}"]),
        "rows": _maxdiff(rows, ref[f"{name}.logits_rows"]),
        "logsumexp": _maxdiff(lse, ref[f"{name}.logsumexp"]),
        "max_logit": _maxdiff(mx, ref[f"{name}.max_logit"]),
        "hidden": _maxdiff(hidden, ref[f"{name}.final_hidden"]),
    }
    assert all(d <= ATOL for d in diffs.values()), (name, diffs)
    assert torch.equal(argmax, ref[f"{name}.argmax"]), name
    return diffs


@torch.no_grad()
def _check_long_against_ref(model, ref, name: str) -> dict[str, float]:
    """Like _check_against_ref, with the lm_head applied in chunks (full logits would be 850 MB)."""
    hidden = model.model(ref[f"{name}.input_ids"][None], use_cache=False).last_hidden_state[0]
    stats = [(lg.logsumexp(-1), lg.max(-1).values, lg.argmax(-1))
             for lg in (model.lm_head(h).float() for h in hidden.split(256))]
    lse, mx, argmax = (torch.cat(x) for x in zip(*stats))
    cols = model.lm_head(hidden[ref[f"{name}.probe_positions"]]).float()[:, ref["probe_token_ids"]]
    rows = model.lm_head(hidden[ref[f"{name}.rows_positions"]]).float()
    return _compare(cols, rows, lse, mx, argmax, hidden.float(), ref, name, "logits_probe_at_positions")


# --------------------------------------------------------------------------- config / layout


def test_is_internlm2(fixture_dir: Path, tmp_path: Path) -> None:
    assert il.is_internlm2(fixture_dir)
    assert not il.is_internlm2(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert not il.is_internlm2(tmp_path)


def test_llama_config_mapping(fixture_dir: Path) -> None:
    cfg = json.loads((fixture_dir / "config.json").read_text())
    lc = il.llama_config_from_internlm2(cfg)
    assert (lc.hidden_size, lc.intermediate_size, lc.num_hidden_layers) == (32, 64, 2)
    assert (lc.num_attention_heads, lc.num_key_value_heads, lc.head_dim) == (4, 2, 8)
    assert (lc.vocab_size, lc.max_position_embeddings, lc.rms_norm_eps) == (92544, 2048, 1e-5)
    assert (lc.bos_token_id, lc.eos_token_id, lc.pad_token_id) == (1, 2, 2)
    assert lc.attention_bias is False and lc.mlp_bias is False and lc.tie_word_embeddings is False
    assert lc.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}

    dyn = json.loads((fixture_dir / "config.rope_dynamic.json").read_text())
    lc = il.llama_config_from_internlm2(dyn)
    assert lc.rope_parameters == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}
    with pytest.raises(UserError, match="rope_scaling"):
        il.llama_config_from_internlm2({**dyn, "rope_scaling": {"type": "yarn", "factor": 2.0}})


def test_wqkv_grouped_layout(fixture_dir: Path) -> None:
    """README table: rows of wqkv are q0 q1 k0 v0 | q2 q3 k1 v1 (8 rows each)."""
    sd = load_file(str(fixture_dir / "model.safetensors"))
    cfg = json.loads((fixture_dir / "config.json").read_text())
    llama = il.internlm2_to_llama_state_dict(sd, cfg)
    w = sd["model.layers.1.attention.wqkv.weight"]
    q, k, v = (llama[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    blocks = [w[i * 8:(i + 1) * 8] for i in range(8)]
    assert torch.equal(q, torch.cat([blocks[0], blocks[1], blocks[4], blocks[5]]))
    assert torch.equal(k, torch.cat([blocks[2], blocks[6]]))
    assert torch.equal(v, torch.cat([blocks[3], blocks[7]]))
    assert torch.equal(llama["model.layers.0.mlp.gate_proj.weight"], sd["model.layers.0.feed_forward.w1.weight"])
    assert torch.equal(llama["model.layers.0.mlp.up_proj.weight"], sd["model.layers.0.feed_forward.w3.weight"])
    assert torch.equal(llama["lm_head.weight"], sd["output.weight"])

    back = il.llama_to_internlm2_state_dict(llama, cfg)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[key], sd[key]) for key in sd)


@pytest.mark.parametrize(("heads", "kv", "bias"), [(4, 4, False), (4, 1, True), (6, 2, True)])
def test_state_dict_round_trip_synthetic(heads: int, kv: int, bias: bool) -> None:
    """MHA, MQA and GQA, with attention bias: the conversion is exactly invertible."""
    hd, hidden = 3, 5
    cfg = {"num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd, "hidden_size": hidden}
    rows = (heads + 2 * kv) * hd
    sd = {"model.tok_embeddings.weight": torch.randn(7, hidden), "output.weight": torch.randn(7, hidden),
          "model.norm.weight": torch.randn(hidden), "model.layers.0.attention.wqkv.weight": torch.randn(rows, hidden),
          "model.layers.0.attention.wo.weight": torch.randn(hidden, heads * hd),
          "model.layers.0.rotary_emb.inv_freq": torch.randn(hd // 2)}
    if bias:
        sd["model.layers.0.attention.wqkv.bias"] = torch.randn(rows)
        sd["model.layers.0.attention.wo.bias"] = torch.randn(hidden)
    llama = il.internlm2_to_llama_state_dict(sd, cfg)
    assert llama["model.layers.0.self_attn.q_proj.weight"].shape == (heads * hd, hidden)
    assert llama["model.layers.0.self_attn.k_proj.weight"].shape == (kv * hd, hidden)
    back = il.llama_to_internlm2_state_dict(llama, cfg)
    del sd["model.layers.0.rotary_emb.inv_freq"]
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(UserError, match="unexpected"):
        il.internlm2_to_llama_state_dict({"model.layers.0.attention.wq.weight": torch.zeros(1)}, cfg)


# --------------------------------------------------------------------------- logits


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_native_logits_match_reference(fixture_dir: Path, ref, model, attn: str) -> None:
    m = model if attn == "eager" else il.load_internlm2(fixture_dir, attn_implementation=attn).eval()
    assert m.dtype == torch.float32 and m.config.model_type == "llama"
    for name in SEQS:
        logits, hidden = _forward(m, ref[f"{name}.input_ids"])
        _check_against_ref(logits, hidden, ref, name)


def test_generation_config_has_im_end(model) -> None:
    assert 92542 in model.generation_config.eos_token_id
    assert 2 in model.generation_config.eos_token_id


def test_greedy_with_and_without_cache(ref, model) -> None:
    ids = ref["chat_zh.input_ids"][None]
    want = ref["chat_zh.greedy_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    assert torch.equal(out[0, ids.shape[1]:], want)

    seq = ids
    with torch.no_grad():
        for _ in range(10):
            nxt = model(seq, use_cache=False).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    assert torch.equal(seq[0, ids.shape[1]:], want)


def test_dynamic_rope_long_sequence(fixture_dir: Path, tmp_path: Path) -> None:
    ref = load_file(str(fixture_dir / "reference.rope_dynamic.safetensors"))
    variant = tmp_path / "dyn"
    variant.mkdir()
    for f in fixture_dir.iterdir():
        if f.name not in ("config.json", "config.rope_dynamic.json") and not f.name.startswith("reference"):
            (variant / f.name).symlink_to(f)
    shutil.copy(fixture_dir / "config.rope_dynamic.json", variant / "config.json")

    m = il.load_internlm2(variant, attn_implementation="eager").eval()  # fresh instance: dynamic rope is stateful
    assert m.config.rope_parameters["rope_type"] == "dynamic"
    _check_long_against_ref(m, ref, "long2304")


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_chat_ids(fixture_dir: Path, ref) -> None:
    tok = il.load_internlm2_tokenizer(fixture_dir)
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == ref["chat_zh.input_ids"].tolist()
    assert tok("The quick brown fox jumps over the lazy dog.")["input_ids"] == ref["english.input_ids"].tolist()
    assert tok.convert_tokens_to_ids("<|im_end|>") == 92542 == tok.eos_token_id
    assert tok.convert_tokens_to_ids("<|im_start|>") == 92543
    assert len(tok) <= 92544


def test_tokenizer_guard_rejects_llama_tokenizer(fixture_dir: Path) -> None:
    """LlamaTokenizer re-adds the chat tokens past the vocab (92548/92549) and adds a dummy prefix."""
    from transformers import LlamaTokenizer

    with pytest.raises(UserError):
        il.check_internlm2_tokenizer(LlamaTokenizer.from_pretrained(str(fixture_dir)), fixture_dir, 92544)


# --------------------------------------------------------------------------- import / export


def test_import_loads_in_plain_transformers(fixture_dir: Path, ref, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = il.import_internlm2(fixture_dir, tmp_path / "llama")
    assert not il.is_internlm2(out)
    assert [p.name for p in tmp_path.iterdir()] == ["llama"]  # no temp dirs left behind
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())

    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(m).__name__ == "LlamaForCausalLM"
    assert 92542 in m.generation_config.eos_token_id
    for name in SEQS:
        logits, hidden = _forward(m, ref[f"{name}.input_ids"])
        _check_against_ref(logits, hidden, ref, name)

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == ref["chat_zh.input_ids"].tolist()
    assert tok("The quick brown fox jumps over the lazy dog.")["input_ids"] == ref["english.input_ids"].tolist()

    with pytest.raises(UserError, match="already exists"):
        il.import_internlm2(fixture_dir, out)


def test_atomic_write_cleans_up_on_failure(fixture_dir: Path, tmp_path: Path, monkeypatch) -> None:
    def boom(*_a, **_k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(il, "_save_safetensors", boom)
    with pytest.raises(RuntimeError):
        il.import_internlm2(fixture_dir, tmp_path / "llama")
    assert list(tmp_path.iterdir()) == []


def test_lora_merge_save_internlm2_layout_round_trip(fixture_dir: Path, ref, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = il.load_internlm2(fixture_dir, attn_implementation="eager")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ids = ref["chat_zh.input_ids"][None]
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    loss = peft_model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    merged = peft_model.merge_and_unload().eval()
    with pytest.raises(UserError, match="merge"):
        il.save_internlm2_layout(peft_model, merged.config, tmp_path / "x", fixture_dir)

    # original dir with a remote-code file, which must be carried over
    orig = tmp_path / "orig"
    orig.mkdir()
    for f in fixture_dir.iterdir():
        (orig / f.name).symlink_to(f)
    (orig / "modeling_internlm2.py").write_text("# remote code placeholder\n")

    out = il.save_internlm2_layout(merged, merged.config, tmp_path / "out", orig)
    want_logits, want_hidden = _forward(merged, ids[0])
    assert _maxdiff(want_logits[:, ref["probe_token_ids"]], ref["chat_zh.logits_probe"]) > 1e-3  # it trained

    reloaded = il.load_internlm2(out, attn_implementation="eager").eval()
    logits, hidden = _forward(reloaded, ids[0])
    assert _maxdiff(logits, want_logits) <= 1e-6 and _maxdiff(hidden, want_hidden) <= 1e-6

    def shapes(path: Path) -> dict[str, tuple[int, ...]]:
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    assert shapes(out) == shapes(fixture_dir)
    orig_cfg = json.loads((fixture_dir / "config.json").read_text())
    new_cfg = json.loads((out / "config.json").read_text())
    assert list(new_cfg) == list(orig_cfg) and new_cfg["torch_dtype"] == "float32"
    assert {k: v for k, v in new_cfg.items() if k != "torch_dtype"} == {
        k: v for k, v in orig_cfg.items() if k != "torch_dtype"}
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json", "modeling_internlm2.py"):
        assert (out / name).is_file(), name
    assert not (out / "reference.safetensors").exists()


def test_quantized_load_matches_folder_path(fixture_dir: Path, ref, tmp_path: Path) -> None:
    """QLoRA path: in-memory bnb 4-bit load equals from_pretrained of the imported Llama folder."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    try:
        m = il.load_internlm2(fixture_dir, quantization_config=q, device_map="cpu")
    except (RuntimeError, ImportError, NotImplementedError) as e:  # bnb build without CPU support
        pytest.skip(f"bitsandbytes 4-bit not usable on this machine: {e}")
    assert m.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8
    assert 92542 in m.generation_config.eos_token_id
    folder = il.import_internlm2(fixture_dir, tmp_path / "llama")
    # train mode: the QLoRA path; bnb's CPU inference packing needs in_features >= 64 (fixture has 32)
    m.train()
    m2 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=q, device_map="cpu")
    m2.train()
    ids = ref["english.input_ids"]
    logits, _ = _forward(m, ids)
    logits2, _ = _forward(m2, ids)
    assert torch.equal(logits, logits2)

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    loss = peft_model(input_ids=ids[None], labels=ids[None]).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()


def test_tutorial_config_trains_merges_and_chats_on_internlm2(fixture_dir, tmp_path):
    """The tutorial's built-in config on an InternLM2 folder: train (LoRA), merge in both layouts, chat."""
    import subprocess
    import sys

    fixture = fixture_dir
    from tunesmith.config import load_config
    from tunesmith.export.merge import merge
    from tunesmith.train.loop import train

    cfg = load_config("internlm2_chat_1_8b_qlora_persona", [
        f"model.name={fixture}", "method=lora", "data.persona.n=8", "data.max_length=256", "train.max_steps=1",
        "train.grad_accum=1", "train.sample_steps=0", "train.evaluation_inputs=[]", f"work_dir={tmp_path / 'w'}"])
    res = train(cfg, log=lambda *a: None)
    assert json.loads((res.output_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(fixture)
    merge(str(fixture), res.output_dir, tmp_path / "llama", dtype="fp32", log=lambda *a: None)
    merge(str(fixture), res.output_dir, tmp_path / "il", dtype="fp32", layout="internlm2", log=lambda *a: None)
    assert json.loads((tmp_path / "il" / "config.json").read_text())["model_type"] == "internlm2"
    r = subprocess.run([sys.executable, "-m", "tunesmith", "chat", str(tmp_path / "il"), "--prompt", "你好",
                        "--max-new-tokens", "3", "--temperature", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
