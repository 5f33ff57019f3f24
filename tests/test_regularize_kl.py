"""data.regularize.kl: self-distillation samples trained by KL(base || model), the base being the adapter-off model."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith.config import load_config
from tunesmith.data.build import prepare
from tunesmith.data.packing import collate, pack
from tunesmith.errors import UserError
from tunesmith.train.loss import causal_lm_loss_sum, reference_kl_sum, reference_loss_sum

CONVS = [
    [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Tuney, made by Ada."}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2 + 2 = 4."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sky."}],
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there! How can I help?"}],
]


def _lora(tiny_dir):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="sdpa")
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))


def _batch(tiny_dir, n_kl=2):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    prep = prepare(tok, CONVS, max_length=256, truncation="truncate", packed=True, seed=0, n_kl=n_kl)
    return collate(prep.rows, tok.pad_token_id), prep


def _perturb(model, scale=0.3):
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, scale)


def test_kl_mask_marks_exactly_the_flagged_samples(tiny_dir):
    batch, prep = _batch(tiny_dir, n_kl=2)
    assert len(prep.rows) == 1  # all four packed into one row
    row = prep.rows[0]
    assert sorted(row.kl) == [False, False, True, True]
    mask = batch["kl_mask"][0].tolist()
    off = 0
    for n, flag in zip(row.lengths, row.kl):
        assert mask[off:off + n] == [flag] * n
        off += n
    assert not any(mask[off:])
    # no flagged sample: no mask in the batch, the plain cross-entropy path
    batch0, _ = _batch(tiny_dir, n_kl=0)
    assert "kl_mask" not in batch0
    # pack() keeps the flags of samples it moves around
    rows = pack(prep.samples, max_length=40, seed=3)
    assert sum(sum(r.kl) for r in rows) == 2


def test_kl_is_zero_at_init_and_matches_full_logits_reference(tiny_dir):
    model = _lora(tiny_dir)
    batch, _ = _batch(tiny_dir)
    kl_only = dict(batch, labels=torch.where(batch["kl_mask"], batch["labels"], -100))
    with torch.no_grad():
        s, n = causal_lm_loss_sum(model, kl_only, chunk=5)
    assert n > 0 and abs(float(s)) < 1e-5  # LoRA B = 0: the model is its base
    _perturb(model)
    with torch.no_grad():
        s_kl, _ = causal_lm_loss_sum(model, kl_only, chunk=5)
        ref_kl = reference_kl_sum(model, batch)
        s_mix, n_mix = causal_lm_loss_sum(model, batch, chunk=5)
        ce_only = dict(batch, labels=torch.where(batch["kl_mask"], -100, batch["labels"]))
        del ce_only["kl_mask"]
        ref_ce, n_ce = reference_loss_sum(model, ce_only)
    assert float(ref_kl) > 1e-3
    torch.testing.assert_close(s_kl, ref_kl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s_mix, ref_ce + ref_kl, rtol=1e-4, atol=1e-4)
    assert n_mix == n_ce + int(((batch["labels"][:, 1:] != -100) & batch["kl_mask"][:, 1:]).sum())


def test_kl_gradient_matches_reference_with_fast_paths(tiny_dir):
    from tunesmith import kernels

    model = _lora(tiny_dir)
    _perturb(model)
    batch, _ = _batch(tiny_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    ce_only = dict(batch, labels=torch.where(batch["kl_mask"], -100, batch["labels"]))
    del ce_only["kl_mask"]
    ref = reference_loss_sum(model, ce_only)[0] + reference_kl_sum(model, batch)
    g_ref = torch.autograd.grad(ref, params)
    fast = kernels.apply(model, device=torch.device("cpu"), method="lora", kernels="auto")
    s, _ = causal_lm_loss_sum(model, batch, chunk=7, fused="linear-ce" in fast)
    g = torch.autograd.grad(s, params)
    kernels.restore_forwards(model)
    torch.testing.assert_close(s, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_kl_trains_the_adapter_back_towards_the_base(tiny_dir):
    model = _lora(tiny_dir)
    _perturb(model)
    batch, _ = _batch(tiny_dir)
    kl_only = dict(batch, labels=torch.where(batch["kl_mask"], batch["labels"], -100))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(30):
        s, n = causal_lm_loss_sum(model, kl_only)
        first = float(s.detach()) if first is None else first
        opt.zero_grad()
        (s / n).backward()
        opt.step()
    assert float(s) < 0.5 * first


def test_train_with_kl_regularisation(tiny_dir, tmp_path, monkeypatch):
    from tunesmith.config import Config
    from tunesmith.train import loop

    # a random tiny model writes empty answers; stand in for the base model's own answers
    monkeypatch.setattr(loop, "cached_self_distill", lambda *a, **k: [c for c in CONVS[1:]] * 2)

    cfg = Config.model_validate({
        "model": {"name": str(tiny_dir)}, "method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"persona": {"name": "Tuney", "author": "Ada", "langs": ["en"], "n": 12}, "max_length": 256,
                 "regularize": {"ratio": 0.5, "max_new_tokens": 8, "kl": True}},
        "train": {"max_steps": 3, "batch_size": 2, "grad_accum": 1, "lr": 5e-3, "sample_steps": 0, "save_steps": 0,
                  "evaluation_inputs": [], "device": "cpu"},
        "work_dir": str(tmp_path / "run")})
    logs = []
    res = loop.train(cfg, log=logs.append)
    assert len(res.losses) == 3 and all(x == x for x in res.losses)
    assert any("6 self-distillation samples trained by KL" in m for m in logs), logs


def test_kl_with_full_fine_tune_is_a_clear_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {name: x}\nmethod: full\ndata: {persona: {name: A, author: B}, regularize: {ratio: 0.5, "
                 "kl: true}}\n")
    with pytest.raises(UserError, match="data.regularize.kl needs"):
        load_config(str(p))
    with pytest.raises(UserError, match="kl"):
        load_config(str(p), ["method=lora", "data.regularize.kl=maybe"])
    assert load_config(str(p), ["method=lora"]).use_kl()
    # auto (the default): on where there is an adapter to switch off, off for a full fine-tune
    p.write_text("model: {name: x}\nmethod: full\ndata: {persona: {name: A, author: B}, regularize: {ratio: 0.5}}\n")
    assert load_config(str(p)).data.regularize.kl == "auto"
    assert not load_config(str(p)).use_kl()
    assert load_config(str(p), ["method=qlora"]).use_kl()
    assert not load_config(str(p), ["method=qlora", "data.regularize.kl=false"]).use_kl()


def test_self_distillation_reports_its_progress(tiny_dir):
    """The base model's answers to the general prompts take minutes on a CPU: the log says how far it got, batch by
    batch, and every prompt gets its conversation."""
    from tunesmith.data.regularize import regularization_prompts, self_distill

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    logs = []
    total = len(regularization_prompts(["en"]))
    convs = self_distill(model, tok, ["en"], n=total, max_new_tokens=2, log=logs.append)
    steps = [x for x in logs if "answered" in x]
    assert steps[0].startswith(f"self-distillation: 16/{total} answered") and len(steps) == (total - 1) // 16, logs
    assert len(convs) <= total and all(c[-1]["role"] == "assistant" for c in convs)
