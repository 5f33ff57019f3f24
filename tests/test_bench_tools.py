"""bench/memtrace_peak.py on a hand-made allocation history (the GPU writes the real ones)."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def _frames(line: int, name: str) -> list[dict]:
    return [{"filename": "/x/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"},
            {"filename": "/w/src/tunesmith/kernels/lora.py", "line": line, "name": name}]


def test_memtrace_peak_reports_what_is_alive_at_the_peak(tmp_path):
    events = [
        {"action": "alloc", "addr": 1, "size": 100 * MiB, "frames": _frames(10, "forward"), "time_us": 1},
        {"action": "alloc", "addr": 2, "size": 300 * MiB, "frames": _frames(20, "backward"), "time_us": 2},
        {"action": "free_requested", "addr": 1, "size": 100 * MiB, "time_us": 3},
        {"action": "free_completed", "addr": 1, "size": 100 * MiB, "time_us": 3},
        {"action": "alloc", "addr": 3, "size": 50 * MiB, "frames": _frames(10, "forward"), "time_us": 4},
        {"action": "free_requested", "addr": 9, "size": 1000 * MiB, "time_us": 5},  # allocated before recording
    ]
    segments = [{"blocks": [{"address": 2, "size": 300 * MiB, "state": "active_allocated"},
                            {"address": 7, "size": 20 * MiB, "state": "active_allocated"}]}]
    trace = tmp_path / "t.pickle"
    trace.write_bytes(pickle.dumps({"device_traces": [events], "segments": segments}))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "memtrace_peak.py"), str(trace)],
                         capture_output=True, text=True, check=True).stdout
    # peak: the two blocks from before recording (1000 + 20) + 100 + 300 MiB, reached by the 300 MiB allocation
    assert f"peak {(1420 * MiB) / 2**30:.3f} GiB allocated at event 1" in out
    lines = out.splitlines()
    assert any("1020.0" in ln and "live before recording began" in ln for ln in lines)
    assert any("300.0" in ln and "tunesmith/kernels/lora.py:20 backward" in ln for ln in lines)
    assert any("100.0" in ln and "tunesmith/kernels/lora.py:10 forward" in ln for ln in lines)
    assert "the allocation that reached the peak: 300.0 MiB" in out


def test_profile_summary_splits_gpu_time_by_kind_and_reports_the_wait(tmp_path, monkeypatch):
    """bench/speed.py's profile summary on a hand-made profiler: device events only, by kind, and the wall time the
    compute stream was idle (copies overlap it and are not counted as compute)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import speed
    finally:
        sys.path.pop(0)

    class Ev:
        def __init__(self, key, device_us, count=1, cuda=True, flops=0, shapes=None, total_us=0):
            self.key, self.self_device_time_total, self.count = key, device_us, count
            self.device_type = "DeviceType.CUDA" if cuda else "DeviceType.CPU"
            self.flops, self.input_shapes, self.device_time_total = flops, shapes, total_us

    class Evs(list):
        def table(self, **k):
            return "table"

    class Prof:
        def key_averages(self, group_by_input_shape=False):
            evs = [Ev("nvjet_tst_gemm", 300_000), Ev("triton_poi_fused_add", 50_000),
                   Ev("## Call CompiledFxGraph abc", 340_000),  # an annotation around kernels: not counted again
                   Ev("Memcpy HtoD (Pinned -> Device)", 80_000), Ev("triton_poi_fused_add", 50_000, cuda=False),
                   Ev("cudaLaunchKernel", 0, count=4000, cuda=False)]
            if group_by_input_shape:  # 2 x 8192 x 4096 x 4096 FLOPs a call, 4 calls: 1.1 PFLOP in 2 ms
                evs += [Ev("aten::mm", 0, count=4, cuda=False, flops=4 * 2 * 8192 * 4096 * 4096,
                           shapes=[[8192, 4096], [4096, 4096]], total_us=2_000),
                        Ev("aten::mm", 0, count=2, cuda=False, flops=2 * 2 * 8192 * 4096 * 64,
                           shapes=[[8192, 4096], [4096, 64]], total_us=100),
                        Ev("aten::linear", 0, count=2, cuda=False, flops=1, shapes=[[1]], total_us=999_000)]
            return Evs(evs)

    monkeypatch.setenv("TS_BENCH_PROFILE", str(tmp_path))
    speed._save_profile(Prof(), "row", seconds=1.0, steps=2)  # 500 ms a step
    head = (tmp_path / "row.txt").read_text()
    assert "wall 500.0 ms/step" in head and "2000 kernel launches/step" in head
    assert "GPU compute kernels 175.0 ms/step = 35 % of wall" in head and "other 325.0 ms" in head
    assert "gemm 150.0" in head and "copies 40.0" in head and "triton 25.0" in head
    # matmuls by shape: the kernel-launching ops only (aten::linear would count its mm again), slowest first
    table = head[head.index("matmuls by shape"):].splitlines()
    assert "all shapes 1.1 ms" in table[0] and "linear" not in head
    assert "1.0 ms" in table[1] and "2 calls" in table[1] and "550 TFLOP/s" in table[1] and "[4096, 4096]" in table[1]
    assert "0.1 ms" in table[2] and "86 TFLOP/s" in table[2]


def test_profile_timeline_finds_the_idle_gaps_and_the_kernels_around_them():
    """The timeline part of the profile: compute time counted once where streams overlap, copies and annotations
    not counted, and the idle gaps grouped by the kernels either side."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import speed
    finally:
        sys.path.pop(0)

    def k(name, ts, dur, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    evs = [k("gemm", 0, 100), k("silu", 100, 50), k("gemm", 200, 100),  # 50 us gap: silu -> gemm
           k("side_stream_norm", 250, 100),  # overlaps the gemm: counted from 300 on only
           k("Memcpy HtoD", 350, 500, cat="gpu_memcpy"), k("## Call CompiledFxGraph", 0, 2000, cat="gpu_user_annotation"),
           k("attn", 360, 40),  # a 10 us gap: too short to list, still idle
           k("gemm", 1400, 600)]  # 1000 us gap: attn -> gemm
    out = speed._timeline(evs, steps=2)
    assert "busy 0.5 ms/step" in out.splitlines()[0]  # (100+50+100+50+40+600) us / 2 steps
    assert "idle 0.5 ms/step" in out  # (50 + 10 + 1000) / 2
    rows = out.splitlines()[1:]
    assert len(rows) == 2 and "after attn" in rows[0] and "before gemm" in rows[0] and "0.50 ms/step" in rows[0]
    assert "after silu" in rows[1] and "0.03 ms/step" in rows[1]
    assert speed._timeline([], 1).startswith("timeline: no kernel events")


def test_bench_records_the_switches_set_in_the_environment():
    """Switches that change what is measured (kept attention, compile mode, bench profiling) are not in the command
    line: each result records them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("speed", Path(__file__).parent.parent / "bench" / "speed.py")
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    env = {"TUNESMITH_KEEP_ATTENTION": "1", "TS_BENCH_STEPPEAKS": "1", "HOME": "/root", "PATH": "/bin",
           "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert speed.env_switches(env) == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
                                       "TS_BENCH_STEPPEAKS": "1", "TUNESMITH_KEEP_ATTENTION": "1"}


def test_bench_times_at_least_the_asked_tokens_a_row():
    """--min-timed-tokens: rows whose --steps cover fewer tokens get more timed steps (rounded up), bigger rows
    keep --steps, and 0 leaves every row at --steps."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("speed", Path(__file__).parent.parent / "bench" / "speed.py")
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    small = speed.parse_row("qwen2.5-0.5b:qlora")  # 1024 x 4 = 4096 tokens a step
    big = speed.parse_row("qwen2.5-7b:lora")  # 2048 x 4 = 8192
    assert speed.timed_steps(small, 12, 250_000) == 62  # 61.04 rounded up
    assert speed.timed_steps(big, 12, 250_000) == 31
    assert speed.timed_steps(big, 40, 250_000) == 40
    assert speed.timed_steps(small, 12, 0) == 12
