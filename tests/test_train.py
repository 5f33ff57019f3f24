import json
import os

import pytest
import torch

from tunesmith.config import Config
from tunesmith.train import checkpoint as ck
from tunesmith.train.loop import train


def make_cfg(tiny_dir, work, **train_kw):
    t = {"max_steps": 6, "batch_size": 2, "grad_accum": 2, "lr": 5e-3, "warmup_ratio": 0.2, "save_steps": 3,
         "sample_steps": 0, "grad_checkpointing": False, "evaluation_inputs": [], "device": "cpu", **train_kw}
    return Config.model_validate({
        "model": {"name": str(tiny_dir)},
        "method": train_kw.pop("method", "lora") if "method" in train_kw else "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"persona": {"name": "Tuney", "author": "Ada", "langs": ["en"], "n": 24}, "max_length": 128},
        "train": t,
        "work_dir": str(work),
    })


def quiet(*a, **k):
    pass


def test_train_writes_peft_adapter_metrics_and_curve(tiny_dir, tmp_path):
    cfg = make_cfg(tiny_dir, tmp_path / "run", max_steps=12, evaluation_inputs=["Who are you?"], sample_steps=6,
                   max_new_tokens=4)
    res = train(cfg, log=quiet)
    assert len(res.losses) == 12 and all(l == l for l in res.losses)
    assert sum(res.losses[-3:]) < sum(res.losses[:3])  # it learns
    # a PEFT adapter folder that plain peft loads
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    PeftModel.from_pretrained(base, str(res.output_dir))
    work = tmp_path / "run"
    lines = (work / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert [r["loss"] for r in recs] == res.losses  # logged a step late, but each with its own step's numbers
    assert recs[0]["lr"] == pytest.approx(5e-3 / 2)  # the rate the step trained with (warmup: 2 steps)
    assert recs[2]["lr"] == pytest.approx(5e-3)
    assert all(r["grad_norm"] > 0 for r in recs)
    assert (work / "loss.png").stat().st_size > 1000
    assert list((work / "tensorboard").iterdir())
    assert sorted(p.name for p in (work / "samples").iterdir()) == ["step-000000.json", "step-000006.json",
                                                                     "step-000012.json"]
    # keep the last K checkpoints, each with its resolved config
    ckpts = ck.list_checkpoints(work / "checkpoints")
    assert [s for s, _ in ckpts] == [9, 12]
    assert (ckpts[-1][1] / "tunesmith_config.yaml").is_file()


def test_resume_matches_uninterrupted(tiny_dir, tmp_path):
    full = train(make_cfg(tiny_dir, tmp_path / "a"), log=quiet)
    cfg_b = make_cfg(tiny_dir, tmp_path / "b")
    train(cfg_b, log=quiet)
    # simulate a crash after step 3: only the step-3 checkpoint survives
    import shutil

    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000006")
    resumed = train(cfg_b, resume="auto", log=quiet)
    assert len(resumed.losses) == 3
    assert resumed.losses == pytest.approx(full.losses[3:], rel=1e-5, abs=1e-6)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_checkpoint_write_is_atomic(tiny_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    opt = torch.optim.AdamW(model.parameters())
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    root = tmp_path / "ck"
    ck.save_checkpoint(root, 1, model, tok, opt, sch, "x: 1\n", {}, keep=3)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(RuntimeError):
        ck.save_checkpoint(root, 2, model, tok, opt, sch, "x: 1\n", {}, keep=3)
    assert [s for s, _ in ck.list_checkpoints(root)] == [1]
    assert sorted(p.name for p in root.iterdir()) == ["step-000001"]


def test_merge_matches_base_plus_adapter(tiny_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.export.merge import merge

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(adapter)
    out = merge(str(tiny_dir), adapter, tmp_path / "merged", dtype="fp32", log=quiet)
    merged = AutoModelForCausalLM.from_pretrained(out)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(adapter)).eval()
    ids = torch.tensor([[1, 5, 9, 200, 3000, 42]])
    with torch.no_grad():
        a, b = merged(ids).logits, ref(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_dir)(ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (a - plain).abs().max() > 1e-3  # the adapter changed something
    assert not any(p.name.startswith(".") for p in (tmp_path).iterdir())
    umask = os.umask(0)
    os.umask(umask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes  # the weights too (safetensors writes them 0600)


def test_merge_rejects_a_folder_that_is_not_an_adapter(tiny_dir, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "tunesmith", "merge", str(tiny_dir), str(tmp_path), str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not a PEFT adapter folder" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_an_adapter_for_another_base_gets_a_message_not_a_traceback(tiny_dir, smollm2_dir, tmp_path):
    """Merging (or chatting with) an adapter onto a base of other shapes: one user error naming the base the adapter
    was trained on, not peft's traceback with a line per mismatched tensor; nothing written."""
    import subprocess
    import sys

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from conftest import make_tiny_llama

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    other = make_tiny_llama(tmp_path / "wider", smollm2_dir, hidden=64, intermediate=128)
    for cmd in (["merge", str(other), str(adapter), str(tmp_path / "o")],
                ["chat", str(other), "--adapter", str(adapter), "--prompt", "hi"]):
        r = subprocess.run([sys.executable, "-m", "tunesmith", *cmd], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert "does not fit this base model" in r.stderr and f"trained on '{tiny_dir}'" in r.stderr, r.stderr
        assert len(r.stderr.splitlines()) < 8, r.stderr
    assert not (tmp_path / "o").exists()


def test_fp16_loss_scaling_path_trains_like_the_unscaled_one(tiny_dir, tmp_path, monkeypatch):
    """GPUs without bf16 train in fp16 with a GradScaler; its scale/unscale/step plumbing must not change the
    result (power-of-two scaling is exact in fp32, so the losses match the unscaled run)."""
    from tunesmith.train import loop

    assert loop.grad_scaler(torch.device("cpu"), torch.float32).is_enabled() is False
    ref = train(make_cfg(tiny_dir, tmp_path / "a", max_steps=4, save_steps=0), log=quiet)
    made = []

    def scaler(device, dtype):
        made.append(torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, enabled=True))
        return made[-1]

    monkeypatch.setattr(loop, "grad_scaler", scaler)
    got = train(make_cfg(tiny_dir, tmp_path / "b", max_steps=4, save_steps=0), log=quiet)
    assert made and made[0].get_scale() == 2.0 ** 12  # no overflow, no skipped step
    for x, y in zip(got.losses, ref.losses):
        assert abs(x - y) <= 1e-5 * abs(y)


def test_row_stream_is_the_per_epoch_shuffles_in_order():
    """Each epoch is a seeded shuffle of all rows; any window of the stream (a step, a resume point) is the same
    slice of it, across epoch boundaries too."""
    import random

    from tunesmith.train.loop import row_stream

    n, seed = 7, 3
    epochs = []
    for e in range(4):
        perm = list(range(n))
        random.Random(seed * 1_000_003 + e).shuffle(perm)
        epochs += perm
    assert row_stream(n, seed, 0, 4 * n) == epochs
    for start, count in ((0, 3), (5, 4), (6, 9), (13, 1), (20, 8)):
        assert row_stream(n, seed, start, count) == epochs[start:start + count]
    assert sorted(row_stream(n, seed, 2 * n, n)) == list(range(n))  # an epoch holds every row once
    assert row_stream(n, seed + 1, 0, n) != row_stream(n, seed, 0, n)


def test_trained_positions_pick_the_rows_a_boolean_mask_would():
    """The loss takes its positions from host-made indices (no device sync); they must equal the mask selection,
    for cross-entropy and for KL samples, with padding and rows of several samples."""
    from tunesmith.data.template import IGNORE
    from tunesmith.train.loop import to_device
    from tunesmith.train.loss import trained_positions

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 50, (3, 9), generator=g)
    labels[torch.rand(3, 9, generator=g) < 0.4] = IGNORE
    labels[2, 5:] = IGNORE  # padding
    kl = torch.zeros(3, 9, dtype=torch.bool)
    kl[1, 4:] = True
    hidden = torch.randn(3, 9, 5, generator=g)
    keep = labels[:, 1:] != IGNORE
    for batch, kl_keep in (({"labels": labels}, None), ({"labels": labels, "kl_mask": kl}, keep & kl[:, 1:])):
        pos = trained_positions(batch)
        ce = keep if kl_keep is None else keep & ~kl_keep
        flat = hidden.reshape(-1, 5)
        assert torch.equal(flat[pos["loss_index"]], hidden[:, :-1][ce])
        assert torch.equal(pos["loss_targets"], labels[:, 1:][ce])
        if kl_keep is None:
            assert "kl_index" not in pos
        else:
            assert kl_keep.sum() > 0 and torch.equal(flat[pos["kl_index"]], hidden[:, :-1][kl_keep])
    sent = to_device({"labels": labels, "input_ids": labels.clamp(min=0), "max_seqlen": 9}, torch.device("cpu"))
    assert sent["max_seqlen"] == 9
    assert torch.equal(sent["loss_index"], trained_positions({"labels": labels})["loss_index"])


def test_training_freezes_the_garbage_collector_after_the_first_step(tiny_dir, tmp_path, monkeypatch):
    """After the first step everything then alive (model, compiled graphs, caches) is moved out of the collector's
    reach (`gc.freeze`), so full collections during training scan only what training creates (on the CPU a full
    collection over a compiled tiny model's ~700k objects took 0.2-0.5 s, a stall in some early step); unfrozen when
    training ends, also when it raises; `TUNESMITH_GC_FREEZE=0` leaves the collector alone."""
    import gc

    from tunesmith.train import loop

    seen = []
    freeze = loop._freeze_gc

    def spy():
        froze = freeze()
        seen.append((froze, gc.get_freeze_count()))
        return froze

    monkeypatch.setattr(loop, "_freeze_gc", spy)
    before = gc.get_freeze_count()
    train(make_cfg(tiny_dir, tmp_path / "a", max_steps=3, save_steps=0), log=quiet)
    assert len(seen) == 1 and seen[0][0] and seen[0][1] > before  # once, after the first step
    assert gc.get_freeze_count() == before

    seed = loop.distributed.step_seed

    def boom(dist, s, step):
        if step == 1:
            raise RuntimeError("boom")
        return seed(dist, s, step)

    monkeypatch.setattr(loop.distributed, "step_seed", boom)
    seen.clear()
    with pytest.raises(RuntimeError, match="boom"):
        train(make_cfg(tiny_dir, tmp_path / "b", max_steps=3, save_steps=0), log=quiet)
    assert seen and seen[0][0] and gc.get_freeze_count() == before  # frozen, then let go on the way out
    monkeypatch.setattr(loop.distributed, "step_seed", seed)

    monkeypatch.setenv("TUNESMITH_GC_FREEZE", "0")
    seen.clear()
    train(make_cfg(tiny_dir, tmp_path / "c", max_steps=3, save_steps=0), log=quiet)
    assert seen == [(False, before)]


def test_a_run_that_fails_before_training_leaves_no_work_dir(tiny_dir, tmp_path):
    """A missing model or a target-module typo stops the run before its work dir exists, so no folder that looks
    like a run is left behind; the model is checked before any self-distillation is generated."""
    from tunesmith.errors import UserError

    work = tmp_path / "wd"
    cfg = make_cfg(tiny_dir, work)
    cfg.model.name = str(tmp_path / "nope")
    with pytest.raises(UserError, match="no such file or directory"):
        train(cfg, log=quiet)
    assert not work.exists()
    cfg = make_cfg(tiny_dir, work)
    cfg.lora.target_modules = ["q_prj"]
    cfg.data.regularize.ratio = 0.5  # would answer prompts with the base model first, before this change
    with pytest.raises(UserError, match="'q_prj' match no module"):
        train(cfg, log=quiet)
    assert not work.exists()
