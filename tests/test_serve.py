"""The OpenAI-compatible server, end to end over HTTP with SmolLM2-135M-Instruct and a random LoRA adapter."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import torch

from tunesmith.errors import UserError
from tunesmith.serve.api import BackgroundServer, create_app, parse_adapters
from tunesmith.serve.generate import GenParams, chat_once

BASE = "smollm2-135m-instruct"
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 200_000
HELLO = [{"role": "user", "content": "What is the capital of France?"}]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir():
    from tunesmith.models import registry

    try:
        return registry.fetch(BASE, log=lambda m: None)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"{BASE} is not available here: {e}")


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    """(url, engine, reference greedy answer of the plain base) for a server with one random adapter and a key."""
    from peft import LoraConfig, get_peft_model

    from tunesmith.models.load import load_for_inference

    model, tok = load_for_inference(str(model_dir), device="cpu")
    reference = chat_once(model, tok, HELLO, GenParams(max_new_tokens=8))
    # a random LoRA adapter for this base, saved as a PEFT folder, then taken off the model again
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                     task_type="CAUSAL_LM")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, cfg)
    adapter = tmp_path_factory.mktemp("adapter") / "rand"
    peft_model.save_pretrained(adapter)
    model = peft_model.unload()
    app = create_app(model, tok, {"rand": str(adapter)}, BASE, api_key=KEY, max_body_bytes=MAX_BODY)
    with BackgroundServer(app) as server:
        yield server.url, app.state.engine, reference


@pytest.fixture(scope="module")
def url(served):
    return served[0]


@pytest.fixture
def client(url):
    with httpx.Client(base_url=url, headers=AUTH, timeout=120) as c:
        yield c


@pytest.fixture
def oai(url):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _is_error_shape(body: dict) -> bool:
    return set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"} and \
        isinstance(body["error"]["message"], str) and body["error"]["message"]


def _chat(client, **kw) -> httpx.Response:
    body = {"model": BASE, "messages": HELLO, "max_tokens": 8, "temperature": 0, **kw}
    return client.post("/v1/chat/completions", json=body)


# ----------------------------------------------------------------------------- basics


def test_health_page_and_models(client, url):
    h = httpx.get(url + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["auth_required"] is True
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "<title>tunesmith chat</title>" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert httpx.get(url + asset).status_code == 200
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [BASE, "rand"]
    assert client.get("/v1/models/rand").json()["parent"] == BASE
    r = client.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_api_key(url):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(url + "/v1/models", headers=headers)
        assert r.status_code == 401 and _is_error_shape(r.json()), headers
        r = httpx.post(url + "/v1/chat/completions", headers=headers, json={"messages": HELLO})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models", headers=AUTH).status_code == 200


def test_openai_client_non_streaming(oai, served):
    r = oai.chat.completions.create(model=BASE, messages=HELLO, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.model == BASE
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == served[2]  # the plain base, as computed without the server
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_openai_client_streaming(oai, served):
    stream = oai.chat.completions.create(model=BASE, messages=HELLO, max_completion_tokens=8, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == served[2]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_stop_seed_and_unknown_fields(client, served):
    full = served[2]
    word = full.split()[2]  # "The capital of France is Paris." -> stop at the third word
    r = _chat(client, stop=[word, "zzz-never"]).json()
    assert r["choices"][0]["message"]["content"] == full[: full.index(word)]
    assert r["choices"][0]["finish_reason"] == "stop"
    sampled = [_chat(client, temperature=1.0, top_p=0.9, seed=7).json()["choices"][0]["message"]["content"]
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    # fields this server does not use are ignored, as OpenAI clients send many
    r = _chat(client, frequency_penalty=0, presence_penalty=0, user="u1", logit_bias={}, n=1, tools=None,
              response_format={"type": "text"}, something_new={"x": 1})
    assert r.status_code == 200
    # text content parts and the developer role are understood
    r = client.post("/v1/chat/completions", json={"max_tokens": 2, "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]})
    assert r.status_code == 200 and r.json()["model"] == BASE


def test_adapter_is_selectable(client, served):
    base = _chat(client).json()["choices"][0]["message"]["content"]
    tuned = _chat(client, model="rand").json()
    assert tuned["model"] == "rand"
    assert tuned["choices"][0]["message"]["content"] != base
    # the base answers as before once the adapter has run
    assert _chat(client).json()["choices"][0]["message"]["content"] == base == served[2]


# ----------------------------------------------------------------------------- bad requests


def _msgs(**kw):
    return {"model": BASE, "messages": HELLO, "max_tokens": 4, **kw}


BAD = [
    ("invalid json", b'{"messages": [', 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("no messages", {"model": BASE}, 400, "messages"),
    ("empty messages", _msgs(messages=[]), 400, "messages"),
    ("messages not a list", _msgs(messages="hi"), 400, "messages"),
    ("wrong role", _msgs(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages.0.role"),
    ("tool role", _msgs(messages=[{"role": "tool", "content": "hi"}]), 400, "messages.0.role"),
    ("no content", _msgs(messages=[{"role": "user"}]), 400, "messages.0.content"),
    ("content wrong type", _msgs(messages=[{"role": "user", "content": 5}]), 400, "messages.0.content"),
    ("image part", _msgs(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), 400,
     "messages.0.content"),
    ("no user turn", _msgs(messages=[{"role": "system", "content": "x"}]), 400, "messages"),
    ("temperature high", _msgs(temperature=2.5), 400, "temperature"),
    ("temperature negative", _msgs(temperature=-0.1), 400, "temperature"),
    ("top_p zero", _msgs(top_p=0), 400, "top_p"),
    ("top_p high", _msgs(top_p=1.5), 400, "top_p"),
    ("max_tokens zero", _msgs(max_tokens=0), 400, "max_tokens"),
    ("max_completion_tokens zero", _msgs(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("temperature string", _msgs(temperature="hot"), 400, "temperature"),
    ("stop wrong type", _msgs(stop=5), 400, "stop"),
    ("n=2", _msgs(n=2), 400, "n"),
    ("unknown model", _msgs(model="gpt-9"), 404, "model", "model_not_found"),
    ("max_tokens over context", _msgs(max_tokens=8190), 400, "messages", "context_length_exceeded"),
    ("prompt over context", _msgs(messages=[{"role": "user", "content": "hello " * 9000}]), 400, "messages",
     "context_length_exceeded"),
]


@pytest.mark.parametrize("body,status,param,code", [(b + (None,))[1:5] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request(client, body, status, param, code):
    if isinstance(body, bytes):
        r = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()
    assert _is_error_shape(err), err
    assert err["error"]["param"] == param
    if code:
        assert err["error"]["code"] == code


def test_a_body_sent_without_a_json_content_type_is_told_so(client):
    """curl -d sends application/x-www-form-urlencoded: the body is never parsed, and the error says why."""
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    r = client.post("/v1/chat/completions", content=body,
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and _is_error_shape(r.json())
    assert "Content-Type: application/json" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "invalid_content_type"


def test_body_too_large_and_unknown_route(client):
    r = client.post("/v1/chat/completions", content=b"{" + b" " * MAX_BODY + b"}",
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and _is_error_shape(r.json())
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and _is_error_shape(r.json())


def test_parse_adapters(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    (tmp_path / "plain").mkdir()
    assert parse_adapters([f"a={tmp_path / 'a'}"]) == {"a": str(tmp_path / "a")}
    for bad, says in [("a", "NAME=DIR"), (f"={tmp_path}", "NAME=DIR"), ("a=", "NAME=DIR"),
                      (f"a b={tmp_path / 'a'}", "name"), (f"a={tmp_path / 'none'}", "does not exist"),
                      (f"a={tmp_path / 'plain'}", "adapter_config.json")]:
        with pytest.raises(UserError, match=says):
            parse_adapters([bad])
    with pytest.raises(UserError, match="twice"):
        parse_adapters([f"a={tmp_path / 'a'}", f"a={tmp_path / 'a'}"])


# ----------------------------------------------------------------------------- load


async def _stream_one(client: httpx.AsyncClient, i: int) -> list[str]:
    body = {"model": BASE if i % 2 else "rand", "max_tokens": 6, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": f"Say a word about the number {i}."}]}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return [line async for line in r.aiter_lines() if line.startswith("data:")]


def test_32_concurrent_streams(url, served):
    async def run():
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=300) as c:
            streams = asyncio.gather(*(_stream_one(c, i) for i in range(32)))
            await asyncio.sleep(0.5)
            # the event loop is not blocked by the model: /health answers while 32 streams are queued
            t0 = time.perf_counter()
            h = await c.get("/health")
            health_s = time.perf_counter() - t0
            return await streams, h.json(), health_s

    t0 = time.perf_counter()
    results, health, health_s = asyncio.run(run())
    elapsed = time.perf_counter() - t0
    assert health["waiting"] + health["running"] > 0 and health_s < 2.0, (health, health_s)
    for lines in results:
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[5:]) for line in lines[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert len({c["id"] for c in chunks}) == 1
    assert elapsed < 120, f"32 streams took {elapsed:.1f}s"
    assert served[1].largest > 1  # requests that waited together were decoded as a batch


def test_batched_answers_equal_one_at_a_time(url, served):
    """Greedy answers are the same whether a request runs alone or in a left-padded batch with others."""
    prompts = ["Hi!", "Name three colours.", "What is 2+2? Answer with a number only, please.", "Tell me a joke."]
    bodies = [{"model": BASE, "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": p}]}
              for p in prompts]
    bodies += [{**bodies[1], "model": "rand"}, {**bodies[2], "model": "rand"}, {**bodies[3], "stop": [" a"]},
               {**bodies[0], "max_tokens": 3}]

    def text(r: httpx.Response) -> tuple:
        c = r.json()["choices"][0]
        return c["message"]["content"], c["finish_reason"], r.json()["usage"]["completion_tokens"]

    with httpx.Client(base_url=url, headers=AUTH, timeout=120) as c:
        alone = [text(c.post("/v1/chat/completions", json=b)) for b in bodies]

    async def together():
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for b in bodies))

    batches = served[1].batches
    assert [text(r) for r in asyncio.run(together())] == alone
    assert served[1].batches - batches < len(bodies)  # some of them shared a batch


def test_continuous_batching_matches_one_at_a_time(model_dir):
    """On a tiny random model: requests that join a running batch, leave it early (short max_tokens, stop
    strings) and share it with longer prompts get the same greedy answers as one at a time via stream_chat."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.models.load import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.5, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    long = {"max_tokens": 300, "temperature": 0, "messages": [{"role": "user", "content": "long"}]}
    bodies = [{"max_tokens": 3 + 2 * i, "temperature": 0, "messages": [{"role": "user", "content": "x" * (9 * i + 1)}]}
              for i in range(6)]
    bodies[1]["stop"] = ["e"]
    bodies[4]["stop"] = ["a", "o"]

    def answers(batch_size: int) -> list[tuple]:
        app = create_app(model, tok, None, "tiny", batch_size=batch_size)
        engine = app.state.engine
        with BackgroundServer(app) as server:
            async def run():
                async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
                    first = asyncio.ensure_future(c.post("/v1/chat/completions", json=long))
                    while not engine.busy and not first.done():
                        await asyncio.sleep(0.001)
                    rest = await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for b in bodies))
                    return [await first, *rest]

            out = [r.json()["choices"][0] for r in asyncio.run(run())]
        assert engine.completed == len(bodies) + 1 and engine.failed == 0
        return [(c["message"]["content"], c["finish_reason"]) for c in out], engine.largest

    alone, largest_1 = answers(1)
    together, largest_16 = answers(16)
    assert together == alone
    assert largest_1 == 1 and largest_16 > 2


def _wait_idle(engine, timeout=20.0) -> None:
    t0 = time.monotonic()
    while engine.busy or engine.waiting:
        assert time.monotonic() - t0 < timeout, "the model is still busy with a request whose client left"
        time.sleep(0.05)


def test_disconnect_mid_stream_frees_the_model(url, served):
    engine = served[1]
    _wait_idle(engine)
    cancelled = engine.cancelled
    # a long sampled answer (temperature 2 makes an early end token very unlikely), dropped after 3 pieces
    body = {"model": BASE, "max_tokens": 4000, "temperature": 2.0, "seed": 1, "stream": True,
            "messages": [{"role": "user", "content": "Write a very long story."}]}
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            pieces = 0
            for line in r.iter_lines():
                if line.startswith("data:") and '"content": ""' not in line and '"content"' in line:
                    pieces += 1
                    if pieces == 3:
                        break
            assert engine.busy
    # leaving the `with` closed the connection: generation stops and the next request is served at once
    _wait_idle(engine)
    assert engine.cancelled == cancelled + 1
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
        t0 = time.perf_counter()
        assert _chat(c, max_tokens=2).status_code == 200
        assert time.perf_counter() - t0 < 30


def test_disconnect_non_streaming_frees_the_model(url, served):
    engine = served[1]
    _wait_idle(engine)
    cancelled = engine.cancelled
    body = {"model": BASE, "max_tokens": 4000, "temperature": 2.0, "seed": 2,
            "messages": [{"role": "user", "content": "Write a very long story."}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH, timeout=3)
    _wait_idle(engine)
    assert engine.cancelled == cancelled + 1
