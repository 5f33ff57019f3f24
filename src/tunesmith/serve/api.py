"""OpenAI-compatible HTTP API and the web chat page, over one base model and any number of LoRA adapters.

Concurrency: one worker thread owns the model. A request puts a `Job` on the engine's waiting line and awaits
its text pieces on an `asyncio.Queue`, which the worker feeds with `loop.call_soon_threadsafe`; the event loop
never runs model compute, so it keeps accepting, queueing and streaming while the model works. The worker
takes waiting jobs in arrival order and decodes those for the same model (base or one adapter) together as a
batch, up to a size and a KV-token budget. A client that goes away cancels its job: a waiting job is skipped,
a running one stops at its next token (its row leaves the batch) and frees its place.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import ipaddress
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.template import prompt_ids
from ..errors import UserError
from .generate import Finish, GenParams, _sample, model_end_ids, stream_chat

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY = 1_000_000  # bytes
DEFAULT_MAX_TOKENS = 1024  # when a request names none (and the context has room)
MAX_STOP = 16
KEEPALIVE_S = 2.0  # a queued stream sends an SSE comment this often (and notices a client that left)
PUBLIC_PATHS = ("/", "/health", "/favicon.ico")  # with --api-key, everything else needs the key
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")

log = logging.getLogger("tunesmith.serve")


# ----------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param)

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def error_body(message: str, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _validation_error(exc: RequestValidationError) -> APIError:
    errs = exc.errors()
    first = errs[0] if errs else {}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON ({detail})".replace(" ()", ""), code="invalid_json")
    problems, params = [], []
    for e in errs[:3]:
        # drop "body" and pydantic's union-branch tags ("str", "list[ContentPart]") from the location
        loc = [str(x) for x in e.get("loc", ()) if x != "body" and not re.search(r"[\[\]]|^str$|^int$", str(x))]
        where = ".".join(loc)
        msg = "a JSON object is required" if (not where and e.get("type") in ("missing", "model_attributes_type",
                                                                             "dict_type")) else e.get("msg", "")
        problems.append(f"{where}: {msg}" if where else msg)
        params.append(where or None)
    more = f" (and {len(errs) - 3} more)" if len(errs) > 3 else ""
    return APIError(400, "invalid request: " + "; ".join(problems) + more, param=params[0] if params else None)


# ----------------------------------------------------------------------------- request schema


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send many fields we do not use


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class Message(_Lenient):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatRequest(_Lenient):
    model: str | None = None  # None: the base model
    messages: list[Message]
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None


def _messages(req: ChatRequest) -> list[dict]:
    if not req.messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(req.messages):
        role = ROLES.get(m.role)
        if role is None:
            raise APIError(400, f"messages[{i}].role '{m.role}' is not supported; use one of system, user, "
                           "assistant (tools are not run by this server)", param=f"messages.{i}.role")
        if m.content is None:
            raise APIError(400, f"messages[{i}].content is required", param=f"messages.{i}.content")
        if isinstance(m.content, list):
            if any(p.type != "text" or p.text is None for p in m.content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages.{i}.content")
            text = "\n".join(p.text for p in m.content)
        else:
            text = m.content
        out.append({"role": role, "content": text})
    if not any(m["role"] == "user" for m in out):
        raise APIError(400, "messages must contain at least one user message", param="messages")
    return out


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP:
        raise APIError(400, f"stop: at most {MAX_STOP} sequences", param="stop")
    return tuple(s for s in stops if s)


# ----------------------------------------------------------------------------- the engine


@dataclass
class Job:
    messages: list[dict]
    params: GenParams
    adapter: str | None  # None: the base model
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    prompt: list[int] = field(default_factory=list)  # the rendered prompt's token ids
    finish: Finish = field(default_factory=Finish)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finish_sent: bool = False  # "done" or "error" was emitted (worker thread only)

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, kind: str, value: Any = None) -> None:
        """Hand an event to the request's coroutine (from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody listens any more
            self.cancel()


class _ShuttingDown(RuntimeError):
    pass


class Engine:
    """Owns the model. One worker thread takes waiting jobs in arrival order and decodes up to `batch_size` of
    them for the same model (base or one adapter) together, continuously: waiting jobs join the running batch
    between steps, finished ones leave it at once. `batch_tokens` bounds a batch's padded width + new tokens
    times its rows, i.e. its KV-cache memory. `batch_size=1` runs one job at a time through `stream_chat`."""

    def __init__(self, model, tokenizer, adapters: list[str], max_waiting: int = 1024, batch_size: int = 16,
                 batch_tokens: int = 32768):
        self.model, self.tokenizer, self.adapters = model, tokenizer, adapters
        self.end_ids = model_end_ids(model, tokenizer)
        self.context = context_length(model, tokenizer)
        self.max_waiting, self.batch_size, self.batch_tokens = max_waiting, max(1, batch_size), batch_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # transformers renamed `past_key_values` to `cache` (5.2x; remote-code models keep the old name), and
        # `logits_to_keep` spares computing the prompt's logits: use what this model's forward takes
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(type(base).forward).parameters
        self.cache_kw = "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"
        self.keep_logits = "logits_to_keep" in params
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.running = 0  # jobs in the batch now running
        # counters: jobs completed / cancelled / failed, batches run, most rows a batch held
        self.completed = self.cancelled = self.failed = self.batches = self.largest = 0

    @property
    def busy(self) -> bool:
        return self.running > 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        with self._cv:
            if len(self._waiting) >= self.max_waiting:
                raise APIError(503, f"the server is busy ({self.max_waiting} requests waiting); retry later",
                               type="server_error", code="server_overloaded")
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="tunesmith-generate", daemon=True)
                self._thread.start()
            self._waiting.append(job)
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            thread, self._thread, self._stopping = self._thread, None, True
            self._cv.notify()
        if thread is not None:
            thread.join(timeout=30)

    def _take(self, batch: _Batch | None) -> list[Job]:
        """Waiting jobs to start now (the caller holds the lock). A new batch starts with the oldest job and the
        waiting jobs for the same model; a running batch takes more of those only while the oldest waiting job
        is for its model too (so one for another model waits just until this batch drains), within the batch
        size and token budget."""
        while self._waiting and self._waiting[0].cancelled.is_set():
            self._waiting.popleft()
            self.cancelled += 1
        if not self._waiting:
            return []
        head = self._waiting[0]
        if batch is None:
            adapter, rows, width, most_new = head.adapter, 0, 0, 0
        elif head.adapter != batch.adapter or not batch.can_join:
            return []
        else:
            adapter, rows, width, most_new = batch.adapter, len(batch.rows), batch.width, batch.most_new
        out: list[Job] = []
        for job in list(self._waiting):
            if rows + len(out) >= self.batch_size:
                break
            if job.adapter != adapter or job.cancelled.is_set():
                continue
            w, m = max(width, len(job.prompt)), max(most_new, job.params.max_new_tokens)
            if (rows or out) and (rows + len(out) + 1) * (w + m) > self.batch_tokens:
                continue  # the first job of a batch always goes, whatever its size
            self._waiting.remove(job)
            out.append(job)
            width, most_new = w, m
        return out

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                jobs = self._take(None)
            if jobs:
                self._serve(jobs)

    def _serve(self, jobs: list[Job]) -> None:
        """Run `jobs` (all for one model) to the end, taking in more waiting jobs for it between steps."""
        active = list(jobs)
        self.batches += 1
        try:
            with self._select(jobs[0].adapter):
                if self.batch_size == 1:  # strictly one at a time, through the shared single-sequence loop
                    self.running = self.largest = 1
                    self._one(jobs[0])
                    self._retire(jobs[0])
                    return
                batch = _Batch(self, jobs[0].adapter)
                while jobs or batch.rows:
                    if self._stopping:
                        raise _ShuttingDown("the server is shutting down")
                    if jobs:
                        batch.add(jobs)
                        self.largest = max(self.largest, len(batch.rows))
                    if batch.rows:
                        batch.step()
                    with self._cv:
                        jobs = self._take(batch)
                    active = [j for j in active if not j.finish_sent] + jobs
        except Exception as e:
            if not isinstance(e, _ShuttingDown):
                log.exception("generation failed")
            for job in active:
                if not job.finish_sent:
                    self.failed += 1
                    job.finish_sent = True
                    job.emit("error", e)
        finally:
            self.running = 0

    def _retire(self, job: Job) -> None:
        """A job is finished (or its client left): count it and tell its request."""
        if job.cancelled.is_set():
            self.cancelled += 1
        else:
            self.completed += 1
        job.finish_sent = True
        job.emit("done", job.finish)

    @contextmanager
    def _select(self, adapter: str | None):
        """Activate `adapter` (or none: the base) on the shared PEFT model; worker thread only."""
        if not self.adapters:
            yield
        elif adapter is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(adapter)
            yield

    def _one(self, job: Job) -> None:
        pieces = stream_chat(self.model, self.tokenizer, job.messages, job.params, job.finish, self.end_ids)
        try:
            for piece in pieces:
                if job.cancelled.is_set():
                    break
                job.emit("piece", piece)
        finally:
            pieces.close()  # stops generation when the client went away


def _left_pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class _Batch:
    """Sequences decoding together on one KV cache (continuous batching). Joining rows are prefilled on a
    cache of their own, which is then left-padded and stacked onto the batch's; finished rows leave it."""

    def __init__(self, engine: Engine, adapter: str | None):
        self.e, self.adapter = engine, adapter
        self.dev = next(engine.model.parameters()).device
        self.rows: list[_Decoder] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # [rows, width]: 1 where the cache holds a real token
        self.next: list[int] = []  # each row's sampled token, not yet fed to the model

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    @property
    def most_new(self) -> int:
        return max((d.p.max_new_tokens - len(d.out) for d in self.rows), default=0)

    @property
    def can_join(self) -> bool:
        """Stacking caches needs plain per-layer key/value tensors."""
        from transformers.cache_utils import DynamicLayer

        return self.cache is None or all(type(layer) is DynamicLayer for layer in self.cache.layers)

    @torch.inference_mode()
    def add(self, jobs: list[Job]) -> None:
        from transformers import DynamicCache

        rows = [_Decoder(j, self.e.tokenizer, self.e.end_ids) for j in jobs]
        width, pad = max(len(j.prompt) for j in jobs), self.e.pad_id
        ids = torch.tensor([[pad] * (width - len(j.prompt)) + j.prompt for j in jobs], device=self.dev)
        mask = torch.tensor([[0] * (width - len(j.prompt)) + [1] * len(j.prompt) for j in jobs], device=self.dev)
        cache = DynamicCache()
        logits = self._forward(ids, mask, cache)
        nxt = [d.sample(logits[i]) for i, d in enumerate(rows)]
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            width = max(self.width, mask.shape[1])
            for a, b in zip(self.cache.layers, cache.layers):
                a.keys = torch.cat([_left_pad(a.keys, width, -2), _left_pad(b.keys, width, -2)], dim=0)
                a.values = torch.cat([_left_pad(a.values, width, -2), _left_pad(b.values, width, -2)], dim=0)
            self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)], dim=0)
        first = len(self.rows)
        self.rows += rows
        self.next += nxt
        self.e.running = len(self.rows)
        self._push(range(first, len(self.rows)))

    @torch.inference_mode()
    def step(self) -> None:
        ids = torch.tensor(self.next, device=self.dev).unsqueeze(1)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        logits = self._forward(ids, self.mask, self.cache)
        self.next = [d.sample(logits[i]) for i, d in enumerate(self.rows)]
        self._push(range(len(self.rows)))

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        n = ids.shape[1]
        pos = (mask.sum(-1, keepdim=True) - n + torch.arange(n, device=self.dev)).clamp(min=0)
        kw = {self.e.cache_kw: cache, **({"logits_to_keep": 1} if self.e.keep_logits else {})}
        out = self.e.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw)
        return out.logits[:, -1].float().cpu()

    def _push(self, which) -> None:
        """Hand each row its sampled token; rows that finish leave the batch."""
        done = {i for i in which if not self.rows[i].push(self.next[i])}
        if not done:
            return
        keep = [i for i in range(len(self.rows)) if i not in done]
        self.e.running = len(keep)
        for i in done:
            self.e._retire(self.rows[i].job)
        if not keep:
            self.rows, self.next, self.cache, self.mask = [], [], None, None
            return
        idx = torch.tensor(keep, device=self.dev)
        self.cache.batch_select_indices(idx)
        self.rows, self.next, self.mask = [self.rows[i] for i in keep], [self.next[i] for i in keep], self.mask[idx]
        start = int(self.mask.any(dim=0).nonzero()[0])  # columns that are padding in every row left
        if start and self.can_join:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]


class _Decoder:
    """One job's share of a batched decode: sampling, end tokens, stop strings and text pieces, as
    `stream_chat` does for a single sequence."""

    def __init__(self, job: Job, tokenizer, end_ids: set[int]):
        self.job, self.tokenizer, self.end_ids, self.p = job, tokenizer, end_ids, job.params
        self.gen = torch.Generator().manual_seed(self.p.seed) if self.p.seed is not None and \
            self.p.temperature > 0 else None
        self.out: list[int] = []
        self.emitted = ""
        self.hold = max((len(s) - 1 for s in self.p.stop), default=0)
        job.finish.prompt_tokens, job.finish.completion_tokens, job.finish.reason = len(job.prompt), 0, "length"

    def sample(self, logits: torch.Tensor) -> int:
        return _sample(logits, self.p, self.gen)

    def push(self, tok: int) -> bool:
        """Take the next token; False once this sequence is finished."""
        job, f = self.job, self.job.finish
        if job.cancelled.is_set():
            return False
        if tok in self.end_ids:
            f.reason = "stop"
            self._flush()
            return False
        self.out.append(tok)
        f.completion_tokens = len(self.out)
        text = self.tokenizer.decode(self.out, skip_special_tokens=True)
        if self.p.stop:
            cut = min((text.find(s) for s in self.p.stop if s in text), default=-1)
            if cut >= 0:
                if cut > len(self.emitted):
                    job.emit("piece", text[len(self.emitted):cut])
                f.reason = "stop"
                return False
        if len(self.out) >= self.p.max_new_tokens:
            f.reason = "length"
            self._flush(text)
            return False
        if not text.endswith("\ufffd"):  # an unfinished multi-byte character waits for the next token
            safe = len(text) - self.hold
            if safe > len(self.emitted):
                job.emit("piece", text[len(self.emitted):safe])
                self.emitted = text[:safe]
        return True

    def _flush(self, text: str | None = None) -> None:
        text = self.tokenizer.decode(self.out, skip_special_tokens=True) if text is None else text
        if len(text) > len(self.emitted):
            self.job.emit("piece", text[len(self.emitted):])
            self.emitted = text


async def _events(job: Job) -> AsyncIterator[tuple[str, Any]]:
    """The job's ("piece" | "done" | "error", value) events, with ("idle", None) every KEEPALIVE_S of silence."""
    while True:
        try:
            kind, value = await asyncio.wait_for(job.out.get(), KEEPALIVE_S)
        except asyncio.TimeoutError:
            yield "idle", None
            continue
        yield kind, value
        if kind in ("done", "error"):
            return


class _JobStream(StreamingResponse):
    """A streaming response that cancels its job however it ends (finished, client gone, never started)."""

    def __init__(self, content, job: Job, **kw):
        super().__init__(content, **kw)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def context_length(model, tokenizer) -> int:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    return v if isinstance(v, int) and 0 < v < 10_000_000 else 2048


# ----------------------------------------------------------------------------- ASGI guard (auth, body size)


class _Guard:
    """Pure ASGI middleware: API key on every non-public path, then a request-body size limit.

    The body is read up front (up to the limit) and replayed to the app; later `receive` calls go to the
    server, so the app still hears a client disconnect.
    """

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        public = path in PUBLIC_PATHS or path.startswith("/static/")
        if self.api_key and not public and scope["method"] != "OPTIONS" and not self._authorized(scope):
            err = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
            return await err.response()(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"the request body is larger than this server's limit of {self.max_body} bytes",
                             code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await too_large.response()(scope, receive, send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await too_large.response()(scope, receive, send)
            chunks.append(chunk)
            if not msg.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


# ----------------------------------------------------------------------------- adapters


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """`NAME=DIR` command-line values -> {name: dir}, each dir checked to be a PEFT adapter folder."""
    out: dict[str, str] = {}
    for s in specs:
        name, sep, path = s.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise UserError(f"--adapter '{s}': expected NAME=DIR, e.g. --adapter persona=runs/persona/adapter")
        if not ADAPTER_NAME.match(name):
            raise UserError(f"--adapter '{s}': the name may use letters, digits and . _ : - (no spaces)")
        if name in out:
            raise UserError(f"--adapter: the name '{name}' is given twice")
        p = Path(path).expanduser()
        if not p.is_dir():
            raise UserError(f"--adapter {name}: folder '{path}' does not exist")
        if not (p / "adapter_config.json").is_file():
            raise UserError(f"--adapter {name}: '{path}' is not a PEFT adapter folder (no adapter_config.json)")
        out[name] = str(p)
    return out


def attach_adapters(model, adapters: dict[str, str]):
    """Load every adapter onto one shared base (in place) and return the PEFT model."""
    from peft import PeftModel

    peft_model = None
    for name, path in adapters.items():
        try:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, path, adapter_name=name)
            else:
                peft_model.load_adapter(path, adapter_name=name)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            from ..models.load import adapter_load_error

            raise UserError(f"--adapter {name}: {adapter_load_error(path, e)}") from None
    peft_model.eval()
    return peft_model


# ----------------------------------------------------------------------------- the app


def create_app(model, tokenizer, adapters: dict[str, str] | None, base_name: str, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY, default_max_tokens: int = DEFAULT_MAX_TOKENS,
               max_waiting: int = 1024, batch_size: int = 16, batch_tokens: int = 32768) -> FastAPI:
    """The server app. With adapters, they are loaded onto `model` in place (one base in memory).

    Up to `batch_size` requests for the same model decode together (1: strictly one at a time); `batch_tokens`
    caps rows x (padded width + new tokens) of a batch, i.e. its KV-cache memory.
    """
    adapters = dict(adapters or {})
    if base_name in adapters:
        raise UserError(f"an adapter may not share the base model's name '{base_name}'")
    if adapters:
        model = attach_adapters(model, adapters)
    model.eval()
    engine = Engine(model, tokenizer, list(adapters), max_waiting=max_waiting, batch_size=batch_size,
                    batch_tokens=batch_tokens)
    created = int(time.time())
    names = [base_name, *adapters]

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(_Guard, api_key=api_key, max_body=max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        ctype = request.headers.get("content-type", "")
        if request.method == "POST" and "json" not in ctype.lower():  # curl -d sends a form type: nothing parsed
            return APIError(400, f"the request body must be JSON, sent with the header Content-Type: "
                                 f"application/json (got {ctype or 'no Content-Type'})",
                            code="invalid_content_type").response()
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = f"no route {request.method} {request.url.path}" if kind else str(exc.detail)
        return JSONResponse(error_body(msg, code=kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                       "base-uri 'none'; frame-ancestors 'none'",
            "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health():
        return {"status": "ok", "auth_required": bool(api_key), "running": engine.running,
                "waiting": engine.waiting}

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "tunesmith",
                "parent": None if name == base_name else base_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(n) for n in names]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str):
        if name not in names:
            raise _unknown(name)
        return model_card(name)

    def _unknown(name: str) -> APIError:
        return APIError(404, f"the model '{name}' does not exist; available: {', '.join(names)}",
                        code="model_not_found", param="model")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        name = req.model or base_name
        if name not in names:
            raise _unknown(name)
        if req.n not in (None, 1):
            raise APIError(400, "only n=1 is supported", param="n")
        messages = _messages(req)
        stops = _stops(req.stop)
        try:
            ids = await asyncio.to_thread(prompt_ids, tokenizer, messages)
        except Exception as e:  # noqa: BLE001 - the chat template rejects this conversation (e.g. role order)
            raise APIError(400, f"the model's chat template cannot render these messages: {e}",
                           param="messages") from None
        n_prompt = len(ids)
        asked = req.max_completion_tokens or req.max_tokens
        room = engine.context - n_prompt
        if (asked or 1) > room:
            raise APIError(400, f"this model's maximum context length is {engine.context} tokens, but the request "
                           f"needs {n_prompt + (asked or 1)} ({n_prompt} in the messages, {asked or 1} for the "
                           "completion); shorten the messages or lower max_tokens",
                           code="context_length_exceeded", param="messages")
        params = GenParams(max_new_tokens=asked or min(default_max_tokens, room),
                           temperature=1.0 if req.temperature is None else req.temperature,
                           top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=stops)
        job = Job(messages, params, None if name == base_name else name, asyncio.get_running_loop(), asyncio.Queue(),
                  prompt=ids)
        engine.submit(job)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _JobStream(_sse(job, rid, now, name, usage), job, media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await _complete(job, request, rid, now, name)
        finally:
            job.cancel()

    return app


def _usage(f: Finish) -> dict:
    return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
            "total_tokens": f.prompt_tokens + f.completion_tokens}


async def _complete(job: Job, request: Request, rid: str, created: int, name: str):
    text: list[str] = []
    checked = time.monotonic()
    async for kind, value in _events(job):
        if time.monotonic() - checked > 1.0:  # a client that left frees the model (no reply is read)
            checked = time.monotonic()
            if await request.is_disconnected():
                job.cancel()
                return JSONResponse(error_body("client closed the request"), status_code=499)
        if kind == "piece":
            text.append(value)
        elif kind == "error":
            return JSONResponse(error_body(f"generation failed: {value}", "server_error"), status_code=500)
    f = job.finish
    return {"id": rid, "object": "chat.completion", "created": created, "model": name, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text), "refusal": None},
                         "logprobs": None, "finish_reason": f.reason}],
            "usage": _usage(f)}


async def _sse(job: Job, rid: str, created: int, name: str, include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict | None, finish: str | None = None, usage: dict | None = None) -> str:
        c: dict = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                   "system_fingerprint": None,
                   "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                         "finish_reason": finish}]}
        if include_usage:
            c["usage"] = usage
        return f"data: {json.dumps(c, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for kind, value in _events(job):
            if kind == "idle":
                yield ": keep-alive\n\n"
            elif kind == "piece":
                yield chunk({"content": value})
            elif kind == "error":
                yield f"data: {json.dumps(error_body(f'generation failed: {value}', 'server_error'))}\n\n"
            else:
                yield chunk({}, job.finish.reason)
                if include_usage:
                    yield chunk(None, usage=_usage(job.finish))
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


# ----------------------------------------------------------------------------- running it


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a UserError saying why not."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise UserError(f"cannot resolve host '{host}': {e}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port or --host") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class BackgroundServer:
    """Run an app with uvicorn in a daemon thread (tests, benchmarks): `with BackgroundServer(app) as s: s.url`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = bind(host, port)
        h, p = self.sock.getsockname()[:2]
        self.url = f"http://{'[' + h + ']' if ':' in h else h}:{p}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> BackgroundServer:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > 30:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(model_name: str, adapters: dict[str, str] | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
          max_body_bytes: int = DEFAULT_MAX_BODY, threads: int | None = None, batch_size: int = 16,
          log: Callable[[str], None] = print) -> None:
    """Load the model (and adapters) and serve the API and the chat page until interrupted.

    `threads` sets torch's CPU threads (on a busy CPU, fewer threads than cores is often faster).
    """
    import torch
    import uvicorn

    from ..models.load import load_for_inference

    if threads:
        torch.set_num_threads(threads)

    if not _is_loopback(host) and not api_key:
        log(f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model")
    sock = bind(host, port)  # fail fast on a busy port, before the slow model load
    try:
        model, tok = load_for_inference(model_name, None, device=device, dtype=dtype,
                                        trust_remote_code=trust_remote_code)
        local = Path(model_name).expanduser()
        base_name = local.resolve().name if local.is_dir() else model_name
        app = create_app(model, tok, adapters, base_name, api_key=api_key, max_body_bytes=max_body_bytes,
                         batch_size=batch_size)
        h, p = sock.getsockname()[:2]
        shown = f"[{h}]" if ":" in h else h
        log(f"serving {', '.join([base_name, *(adapters or {})])} on http://{shown}:{p}  "
            f"(chat page: http://{shown}:{p}/, API: http://{shown}:{p}/v1)")
        uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)).run(sockets=[sock])
    finally:
        sock.close()
