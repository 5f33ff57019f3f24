"""Two processes (torchrun, gloo, CPU, FSDP2) train like one process with the same global batch.

One torchrun job (this file run as a script) trains LoRA (frozen base sharded, and replicated on every rank:
`train.shard_frozen`), resumes both, and trains full and QLoRA fine-tunes; the same runs in this process
(grad_accum doubled) must give the same losses, adapter and chat samples.
Checkpoints move between process counts both ways (1 from 2 here; 2 from 1 through `tunesmith train --nproc 2`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tunesmith.config import Config
from tunesmith.train.loop import train

HERE = Path(__file__).resolve()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
STEPS = 6


def make_cfg(model_dir, work, method="lora", grad_accum=1, **train_kw) -> dict:
    """Global batch 2 rows x grad_accum x world; dropout 0 (dropout masks differ between ranks by design)."""
    t = {"max_steps": STEPS, "batch_size": 2, "grad_accum": grad_accum, "lr": 5e-3, "warmup_ratio": 0.2,
         "save_steps": 3, "sample_steps": 0, "grad_checkpointing": False, "evaluation_inputs": [],
         "device": "cpu", **train_kw}
    return {"model": {"name": str(model_dir)}, "method": method, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"persona": {"name": "Tuney", "author": "Ada", "langs": ["en"], "n": 24}, "max_length": 128},
            "train": t, "work_dir": str(work)}


def launch(cmd: list[str], log: Path, timeout: float = 180) -> str:
    """Run a command (output to `log`); on timeout SIGTERM it: torchrun then stops its workers."""
    with log.open("w") as f:
        p = subprocess.Popen(cmd, env=ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            pytest.fail(f"timed out after {timeout}s:\n{log.read_text()[-4000:]}")
    out = log.read_text()
    assert p.returncode == 0, out[-6000:]
    return out


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]


def quiet(*a, **k):
    pass


def adapter_tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def tiny64_dir(tmp_path_factory, smollm2_dir):
    """Like `tiny_dir` but 64 wide: bitsandbytes' CPU NF4 kernels need in_features >= its 64 block size."""
    from conftest import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny64"), smollm2_dir, hidden=64, intermediate=128)


def _jobs(tiny_dir, tiny64_dir, root: Path, grad_accum: int) -> dict[str, tuple[dict, str | None]]:
    """name -> (config, resume) for the runs both sides make; grad_accum 1 for two processes, 2 for one."""
    lora = make_cfg(tiny_dir, root / "lora", grad_accum=grad_accum, grad_checkpointing=True,
                    evaluation_inputs=["Who are you?"], max_new_tokens=4)
    return {
        "lora": (lora, None),
        "full": (make_cfg(tiny_dir, root / "full", "full", grad_accum, max_steps=3, save_steps=0), None),
        "qlora": (make_cfg(tiny64_dir, root / "qlora", "qlora", grad_accum, max_steps=3, save_steps=0), None),
    }


# two-process LoRA job -> its train.shard_frozen (the one-process run is the same for both)
LORA_JOBS = {"lora": True, "lora_rep": False}


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory, tiny_dir, tiny64_dir):
    """One torchrun job, two ranks: the jobs above with LoRA's frozen base sharded ("lora") and replicated
    ("lora_rep"), then each LoRA run resumed (2 procs, same setting) from its own step-3 checkpoint."""
    root = tmp_path_factory.mktemp("two")
    jobs = _jobs(tiny_dir, tiny64_dir, root, grad_accum=1)
    lora = jobs.pop("lora")[0]
    for name, shard_frozen in LORA_JOBS.items():
        # replicated: data parallel, where tunesmith's own (offloading) checkpoint function can run
        extra = {"offload_activations": True} if shard_frozen is False else {}
        jobs[name] = ({**lora, "work_dir": str(root / name),
                       "train": {**lora["train"], "shard_frozen": shard_frozen, **extra}}, None)
        resume = make_cfg(tiny_dir, root / f"{name}_resumed", grad_accum=1, shard_frozen=shard_frozen)
        jobs[f"{name}_resumed"] = (resume, str(root / name / "checkpoints" / "step-000003"))
    q = jobs["qlora"][0]  # QLoRA's default is data parallel; shard_frozen: true shards all but the NF4 weights
    jobs["qlora_sharded"] = ({**q, "work_dir": str(root / "qlora_sharded"), "train": {**q["train"], "shard_frozen": True}},
                             None)
    spec = root / "jobs.json"
    spec.write_text(json.dumps({"jobs": jobs, "out": str(root / "results.json")}))
    launch(torchrun(str(HERE), str(spec)), root / "torchrun.log")
    return root, json.loads((root / "results.json").read_text())


@pytest.fixture(scope="module")
def one_proc(tmp_path_factory, tiny_dir, tiny64_dir):
    root = tmp_path_factory.mktemp("one")
    res = {}
    for name, (cfg, resume) in _jobs(tiny_dir, tiny64_dir, root, grad_accum=2).items():
        r = train(Config.model_validate(cfg), resume=resume, log=quiet)
        res[name] = {"losses": r.losses, "samples": {str(k): v for k, v in r.samples.items()}}
    return root, res


@pytest.mark.parametrize("name", list(LORA_JOBS))
def test_lora_two_procs_match_one(two_procs, one_proc, name):
    (root2, two), (root1, one) = two_procs, one_proc
    kept = "replicated on every rank" if name == "lora_rep" else "sharded over 2 ranks"
    assert [x.split(" (")[0] for x in two[name]["frozen"]] == [f"frozen base: {kept}"]
    assert len(two[name]["losses"]) == STEPS
    assert two[name]["losses"] == pytest.approx(one["lora"]["losses"], rel=1e-5, abs=1e-6)
    assert one["lora"]["losses"][-1] < one["lora"]["losses"][0]
    # chat samples generated by the sharded model (all ranks in step) equal the single-process ones
    assert two[name]["samples"] == one["lora"]["samples"] and set(one["lora"]["samples"]) == {"0", "6"}
    a, b = adapter_tensors(root2 / name / "adapter"), adapter_tensors(root1 / "lora" / "adapter")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    # a two-process checkpoint is the single-device format
    ck2 = root2 / name / "checkpoints" / "step-000003"
    assert (ck2 / "adapter_config.json").is_file() and (ck2 / "trainer_state.pt").is_file()
    state = torch.load(ck2 / "trainer_state.pt", weights_only=False)
    assert sorted(state["optimizer"]["state"]) == list(range(len(a)))
    log = (root2 / name / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in log] == list(range(1, STEPS + 1))


@pytest.mark.parametrize("name", list(LORA_JOBS))
def test_resume_two_procs_from_two_procs(two_procs, one_proc, name):
    two, one = two_procs[1], one_proc[1]
    assert two[f"{name}_resumed"]["losses"] == pytest.approx(one["lora"]["losses"][3:], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", list(LORA_JOBS))
def test_resume_one_proc_from_two_procs(two_procs, one_proc, tiny_dir, tmp_path, name):
    root2, one = two_procs[0], one_proc[1]
    cfg = Config.model_validate(make_cfg(tiny_dir, tmp_path / "r", grad_accum=2))
    r = train(cfg, resume=str(root2 / name / "checkpoints" / "step-000003"), log=quiet)
    assert r.losses == pytest.approx(one["lora"]["losses"][3:], rel=1e-5, abs=1e-6)


def test_resume_two_procs_from_one_proc_via_cli(one_proc, tiny_dir, tmp_path):
    """`tunesmith train CFG --nproc 2` re-launches itself under torchrun and resumes a 1-process checkpoint."""
    root1, one = one_proc
    work = tmp_path / "cli"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(make_cfg(tiny_dir, work, grad_accum=1)))
    out = launch([sys.executable, "-m", "tunesmith", "train", str(cfg_file), "--nproc", "2",
                  "--resume", str(root1 / "lora" / "checkpoints" / "step-000003")], tmp_path / "cli.log")
    assert "2 rows x 1 accumulation x 2 device(s) = 4 rows per step" in out
    assert "frozen base: replicated on every rank" in out  # shard_frozen auto: a tiny base fits every rank
    losses = [json.loads(x)["loss"] for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(one["lora"]["losses"][3:], rel=1e-5, abs=1e-6)
    assert (work / "adapter" / "adapter_model.safetensors").is_file()


def test_full_two_procs_match_one(two_procs, one_proc):
    (root2, two), (root1, one) = two_procs, one_proc
    assert two["full"]["losses"] == pytest.approx(one["full"]["losses"], rel=1e-5, abs=1e-6)
    from safetensors.torch import load_file

    a, b = (load_file(str(r / "full" / "model" / "model.safetensors")) for r in (root2, root1))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,line", [
    ("qlora", "frozen base: NF4 model whole on every rank; data parallel (LoRA gradients all-reduced)"),
    ("qlora_sharded", "frozen base: NF4 weights whole on every rank, the rest sharded (FSDP2)")])
def test_qlora_two_procs_match_one(two_procs, one_proc, name, line):
    two, one = two_procs[1], one_proc[1]
    assert two[name]["frozen"] == [line]
    assert two[name]["losses"] == pytest.approx(one["qlora"]["losses"], rel=1e-5, abs=1e-6)


def test_data_parallel_sync_grads_sums_in_buckets(monkeypatch):
    """Gradients are summed bucket by bucket, dtype by dtype, in place; a missing gradient counts as zeros."""
    import torch.distributed as tdist

    from tunesmith.train import distributed as D

    calls = []

    def fake_all_reduce(t):  # two ranks holding the same gradients: the sum is twice each
        calls.append((t.dtype, t.numel()))
        t.mul_(2)

    monkeypatch.setattr(tdist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(D, "BUCKET", 10)
    ps = [torch.nn.Parameter(torch.full((2, 3), float(i + 1))) for i in range(3)]
    ps.append(torch.nn.Parameter(torch.ones(4, dtype=torch.float64)))
    ps.append(torch.nn.Parameter(torch.ones(5)))  # no gradient on this rank
    for p in ps[:4]:
        p.grad = p.detach().clone()
    d = D.Dist(rank=0, world=2, data_parallel=True)
    D.sync_grads(d, ps)
    assert calls == [(torch.float32, 6)] * 3 + [(torch.float32, 5), (torch.float64, 4)]
    for i in range(3):
        assert torch.equal(ps[i].grad, torch.full((2, 3), 2.0 * (i + 1)))
    assert torch.equal(ps[3].grad, torch.full((4,), 2.0, dtype=torch.float64))
    assert torch.equal(ps[4].grad, torch.zeros(5))
    D.sync_grads(D.Dist(rank=0, world=2, data_parallel=False), ps)  # FSDP runs: nothing here
    assert len(calls) == 5


def test_shard_frozen_choice():
    from tunesmith.train.distributed import REPLICATE_FRACTION, replicate_choice

    gib = 2**30
    assert replicate_choice(True, gib, 100 * gib) is False and replicate_choice(False, 99 * gib, gib) is True
    assert replicate_choice("auto", int(REPLICATE_FRACTION * 80 * gib), 80 * gib) is True
    assert replicate_choice("auto", int(REPLICATE_FRACTION * 80 * gib) + 1, 80 * gib) is False
    assert replicate_choice("auto", None, 80 * gib) is False  # size unknown: shard


def test_bench_fsdp_scaling_runs_on_cpu(tmp_path, monkeypatch):
    """bench/fsdp_scaling.py on tiny shapes: the path without weight files (the 72B case) and its report."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fsdp_scaling", HERE.parents[1] / "bench" / "fsdp_scaling.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "fsdp_scaling", bench)
    spec.loader.exec_module(bench)
    rep = bench.main(["--tiny", "--device", "cpu", "--runs", "72b:lora:2", "--steps", "2", "--timeout", "150",
                      "--scratch", str(tmp_path / "scratch"), "--out", str(tmp_path / "out")])
    (row,) = rep["rows"]
    assert row["status"] == "ok", row["error"]
    assert row["gpus"] == 2 and row["tokens_per_s_per_gpu"] > 0 and row["final_loss"] > 0
    assert row["step_s_max"] >= row["step_s"] > 0
    assert json.loads((tmp_path / "out" / "fsdp_scaling.json").read_text())["versions"]["torch"]
    assert "| 72b | lora | 2 |" in (tmp_path / "out" / "fsdp_scaling.md").read_text()


def _worker(spec_file: str) -> None:
    """Under torchrun: run each job of the spec on this rank; rank 0 writes the losses and samples.

    The process group is made once here (train() uses one it finds and leaves it open).
    """
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    spec = json.loads(Path(spec_file).read_text())
    res = {}
    for name, (cfg, resume) in spec["jobs"].items():
        lines: list[str] = []
        r = train(Config.model_validate(cfg), resume=resume, log=lines.append)
        res[name] = {"losses": r.losses, "samples": {str(k): v for k, v in r.samples.items()},
                     "frozen": [x for x in lines if x.startswith("frozen base:")]}
    if dist.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(res))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])


def test_nproc_beyond_the_visible_gpus_is_a_clear_error(monkeypatch):
    from tunesmith import cli
    from tunesmith.errors import UserError

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cli._check_nproc(2, "auto")
    cli._check_nproc(8, "cpu")  # CPU processes (gloo): as many as asked
    with pytest.raises(UserError, match=r"--nproc 4: this node has 2 CUDA GPU\(s\) visible"):
        cli._check_nproc(4, "auto")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(UserError, match="no CUDA GPU is visible"):
        cli._check_nproc(2, "cuda")
    r = subprocess.run([sys.executable, "-m", "tunesmith", "train", "smollm2_135m_instruct_lora_persona", "--nproc", "0"],
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--nproc 0" in r.stderr and "Traceback" not in r.stderr
