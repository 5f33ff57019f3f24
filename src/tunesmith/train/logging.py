"""Progress bar, metrics.jsonl, TensorBoard events, chat samples and the loss curve of one run."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RunLogger:
    def __init__(self, work: Path, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.work, self.enabled = work, enabled
        self.console = Console(stderr=True)
        self.metrics_path = work / "metrics.jsonl"
        self.samples_dir = work / "samples"
        self.tb = None
        self.progress = None
        if not enabled:
            return
        # a fresh run starts a fresh log; a resumed one keeps the steps up to its checkpoint
        kept = []
        if start_step and self.metrics_path.is_file():
            kept = [ln for ln in self.metrics_path.read_text(encoding="utf-8").splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= start_step]
        self.metrics_path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(work / "tensorboard"))
        except ImportError:  # tensorboard not installed: metrics.jsonl still has everything
            self.tb = None
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=False)
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
        self.progress.start()
        self._tok_ema = None

    def step(self, step: int, *, loss: float, lr: float, grad_norm: float, epoch: float, tokens: int,
             seconds: float) -> None:
        if not self.enabled:
            return
        tps = tokens / max(seconds, 1e-9)
        rec = {"step": step, "epoch": round(epoch, 4), "loss": loss, "lr": lr, "grad_norm": grad_norm,
               "tokens": tokens, "tokens_per_s": round(tps, 1), "time": time.time()}
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k in ("loss", "lr", "grad_norm", "tokens_per_s"):
                self.tb.add_scalar(f"train/{k}", rec[k], step)
        self.progress.update(self.task, completed=step,
                             info=f"epoch {epoch:.2f} loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s")

    def samples(self, step: int, inputs: list[str], answers: list[str]) -> None:
        if not self.enabled:
            return
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        data = [{"input": q, "answer": a} for q, a in zip(inputs, answers)]
        (self.samples_dir / f"step-{step:06d}.json").write_text(json.dumps(data, ensure_ascii=False, indent=1),
                                                                encoding="utf-8")
        lines = [f"[bold cyan]chat samples at step {step}[/]"]
        for q, a in zip(inputs, answers):
            lines.append(f"  [green]Q:[/] {escape(q)}\n  [yellow]A:[/] {escape(a.strip()[:300])}")
        self.console.print("\n".join(lines), highlight=False, markup=True)
        if self.tb is not None:
            self.tb.add_text("samples", "\n\n".join(f"**{q}**\n\n{a}" for q, a in zip(inputs, answers)), step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.progress.stop()
        if self.tb is not None:
            self.tb.close()
        plot_loss(self.metrics_path, self.work / "loss.png")


def plot_loss(metrics_path: Path, out: Path) -> Path | None:
    if not metrics_path.is_file():
        return None
    steps, losses = [], []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        steps.append(rec["step"])
        losses.append(rec["loss"])
    if not steps:
        return None
    try:
        import matplotlib
    except ImportError:  # plotting is a nicety; metrics.jsonl and TensorBoard hold the numbers
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
