"""Training rendering == inference rendering of the prompt + the reference answer + end token, per template family."""

import os
from pathlib import Path

import pytest

from tunesmith.data.template import IGNORE, encode_text, end_token_ids, prompt_ids, render

CONV = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "I am ChatMASTER's assistant, made by ChatMASTER."},
    {"role": "user", "content": "你叫什么名字？"},
    {"role": "assistant", "content": "我是ChatMASTER助手。"},
]

FIXTURE = Path(os.environ.get("TUNESMITH_INTERNLM2_FIXTURE",
                              Path(__file__).resolve().parents[1].parent / "shared/fixtures/internlm2-tiny"))


def assert_agree(tok, conv):
    r = render(tok, conv)
    end_ids = end_token_ids(tok)
    trained_expected = 0
    for i, m in enumerate(conv):
        if m["role"] != "assistant":
            continue
        p = prompt_ids(tok, conv[:i])
        ans = encode_text(tok, m["content"])
        end = r.input_ids[len(p) + len(ans)]
        # the inference prompt, then the answer's own tokens, then the template's end token
        assert r.input_ids[: len(p) + len(ans) + 1] == p + ans + [end]
        assert end in end_ids
        assert r.labels[len(p): len(p) + len(ans) + 1] == ans + [end]
        assert all(x == IGNORE for x in r.labels[:len(p)][-3:])
        trained_expected += len(ans) + 1
    # nothing but assistant answers and their end tokens carries loss
    assert r.n_trained == trained_expected
    assert r.labels[0] == IGNORE


def test_smollm2_template(smollm2_dir):
    from transformers import AutoTokenizer

    assert_agree(AutoTokenizer.from_pretrained(smollm2_dir), CONV)
    assert_agree(AutoTokenizer.from_pretrained(smollm2_dir), CONV[1:])


def test_qwen25_chatml_template(qwen_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen_dir)
    assert_agree(tok, CONV)
    assert_agree(tok, CONV[1:])  # the template's default system prompt is part of both renderings


def test_internlm2_template():
    if not (FIXTURE / "tokenizer.model").is_file():
        pytest.skip(f"InternLM2 fixture not found at {FIXTURE} (set TUNESMITH_INTERNLM2_FIXTURE)")
    from tunesmith.models.load import load_tokenizer

    tok = load_tokenizer(str(FIXTURE))
    assert_agree(tok, CONV)
    r = render(tok, CONV)
    assert r.input_ids[0] == 1  # the template writes <s> itself, once
    assert r.input_ids.count(1) == 1
    assert 92542 in end_token_ids(tok)  # <|im_end|>
