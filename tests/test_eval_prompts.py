import re
import unicodedata
from itertools import product

import pytest

from tunesmith.data.persona import GENERAL_QA, IDENTITY_QUESTIONS
from tunesmith.data.regularize import OPEN_PROMPTS
from tunesmith.evaluate.prompts import (
    EVAL_CATEGORIES,
    EVAL_GENERAL_PROMPTS,
    EVAL_IDENTITY_QUESTIONS,
    GENERAL_KINDS,
    matches_expected,
)

LANGS = ("zh", "en")


def _norm(text: str) -> str:
    """Case-folded, without punctuation, symbols or whitespace."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if not ch.isspace() and unicodedata.category(ch)[0] not in "PS")


def _training_texts():
    out = []
    for lang in LANGS:
        out += [t for _, t in IDENTITY_QUESTIONS[lang]]
        out += [q for q, _ in GENERAL_QA[lang]]
        out += OPEN_PROMPTS[lang]  # self-distillation prompts are training data too
    return out


def _eval_texts():
    out = []
    for lang in LANGS:
        out += [q["text"] for q in EVAL_IDENTITY_QUESTIONS[lang]]
        out += [p["prompt"] for p in EVAL_GENERAL_PROMPTS[lang]]
    return out


def _overlaps():
    bad = []
    for ev, tr in product(_eval_texts(), _training_texts()):
        e, t = _norm(ev), _norm(tr)
        if e == t:
            bad.append((ev, tr, "equal"))
        elif len(e) > 8 and e in t:
            bad.append((ev, tr, "eval inside training"))
        elif len(t) > 8 and t in e:
            bad.append((ev, tr, "training inside eval"))
    return bad


def test_norm_helper():
    assert _norm("Who are  you?!") == _norm("who are you") == "whoareyou"
    assert _norm("你是谁？") == _norm("你是谁") == "你是谁"


def test_no_overlap_with_training_pools():
    assert _overlaps() == []


@pytest.mark.parametrize("lang", LANGS)
def test_identity_pool(lang):
    pool = EVAL_IDENTITY_QUESTIONS[lang]
    assert len(pool) >= 60  # large enough that one answer moves the rate by under 2 points
    assert all(set(q) == {"category", "text"} for q in pool)
    assert {q["category"] for q in pool} == set(EVAL_CATEGORIES)
    normed = [_norm(q["text"]) for q in pool]
    assert len(set(normed)) == len(normed)


@pytest.mark.parametrize("lang", LANGS)
def test_general_pool(lang):
    pool = EVAL_GENERAL_PROMPTS[lang]
    assert len(pool) >= 120
    normed = [_norm(p["prompt"]) for p in pool]
    assert len(set(normed)) == len(normed)
    kinds = {p["kind"] for p in pool}
    assert kinds == set(GENERAL_KINDS)
    for p in pool:
        assert set(p) == {"prompt", "expect_any", "kind"}
        assert isinstance(p["expect_any"], list)
        if p["kind"] == "writing":
            assert p["expect_any"] == []
        else:
            assert p["expect_any"], p["prompt"]
            assert all(isinstance(e, str) and e.strip() for e in p["expect_any"])


def test_chinese_expectations_are_chinese_or_digits():
    for p in EVAL_GENERAL_PROMPTS["zh"]:
        if p["kind"] in ("fact", "arithmetic"):
            assert all(re.fullmatch(r"[\d\u4e00-\u9fff]+", e) for e in p["expect_any"]), p


def test_arithmetic_has_digits_and_words():
    for lang in LANGS:
        for p in EVAL_GENERAL_PROMPTS[lang]:
            if p["kind"] == "arithmetic":
                assert any(e.isdigit() for e in p["expect_any"]), p
                assert any(not e.isdigit() for e in p["expect_any"]), p


def test_arithmetic_answer_is_not_in_the_question():
    """An answer that merely repeats the question must not count as correct."""
    for lang in LANGS:
        for p in EVAL_GENERAL_PROMPTS[lang]:
            if p["kind"] == "arithmetic":
                assert matches_expected(p["prompt"], p["expect_any"]) is False, p


def test_identity_pool_has_third_person_questions():
    """Users ask about "this assistant / chatbot / AI", not only "you"."""
    for lang, words in (("en", ("this assistant", "this chatbot", "this ai", "this bot")), ("zh", ("这个",))):
        third = [q for q in EVAL_IDENTITY_QUESTIONS[lang] if any(w in q["text"].casefold() for w in words)]
        assert {q["category"] for q in third} >= {"name", "creator"}, lang


@pytest.mark.parametrize("lang", LANGS)
def test_a_limited_pool_is_a_fair_sample(lang):
    """`eval.limit` / `--limit N` take the first N prompts: those mix every category and kind."""
    assert {q["category"] for q in EVAL_IDENTITY_QUESTIONS[lang][:10]} == set(EVAL_CATEGORIES)
    assert {p["kind"] for p in EVAL_GENERAL_PROMPTS[lang][:20]} == set(GENERAL_KINDS)
    facts = [p for p in EVAL_GENERAL_PROMPTS[lang][:40] if p["kind"] == "fact"]
    assert len(facts) >= 20  # in proportion: facts are most of the pool


def test_matches_expected():
    assert matches_expected("The capital is ROME.", ["Rome"]) is True
    assert matches_expected("Nineteen.", ["19", "nineteen"]) is True
    assert matches_expected("I don't know", ["19"]) is False
    assert matches_expected("anything", []) is None
