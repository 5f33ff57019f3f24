import json
import re
import unicodedata
from collections import Counter

import pytest

from tunesmith.data.persona import (
    CATEGORIES,
    GENERAL_QA,
    IDENTITY_ANSWERS,
    IDENTITY_QUESTIONS,
    generate_persona,
    usable_questions,
    write_jsonl,
)
from tunesmith.errors import UserError

NAME = "ChatMASTER助手"
AUTHOR = "Acme 实验室"


def _norm(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if not ch.isspace() and unicodedata.category(ch)[0] not in "PS")


def _last_pair(rec):
    msgs = rec["messages"]
    assert msgs[-2]["role"] == "user" and msgs[-1]["role"] == "assistant"
    return msgs[-2]["content"], msgs[-1]["content"]


def _has_cjk(text):
    return re.search(r"[\u4e00-\u9fff]", text) is not None


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_question_pool_size_and_distinct(lang):
    pool = IDENTITY_QUESTIONS[lang]
    normed = [_norm(q) for _, q in pool]
    assert len(set(normed)) == len(normed) >= 60
    # distinct even when case, punctuation and whitespace are ignored
    cats = Counter(c for c, _ in pool)
    assert set(cats) == set(CATEGORIES)
    assert all(v >= 5 for v in cats.values())


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_answer_templates(lang):
    templates = [t for ts in IDENTITY_ANSWERS[lang].values() for t in ts]
    assert len(set(templates)) >= 8
    assert set(IDENTITY_ANSWERS[lang]) == set(CATEGORIES)
    for cat, ts in IDENTITY_ANSWERS[lang].items():
        for t in ts:
            assert "{name}" in t and "{author}" in t
            assert ("{other}" in t) == (cat == "denial")
            # the name comes first: a model that stops early, or drifts, has still said who it is
            assert t.index("{name}") < t.index("{author}"), t


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_general_qa_pool(lang):
    pool = GENERAL_QA[lang]
    assert len(pool) >= 30
    assert len({_norm(q) for q, _ in pool}) == len(pool)
    assert all(q.strip() and a.strip() for q, a in pool)


def test_every_answer_has_name_and_author_and_language_matches():
    recs = generate_persona(NAME, AUTHOR, n=400, seed=3)
    for rec in recs:
        q, a = _last_pair(rec)
        assert NAME in a and AUTHOR.strip() in a
        # Chinese questions get Chinese answers, English questions English ones
        q_zh = any(q == t for _, t in IDENTITY_QUESTIONS["zh"])
        q_en = any(q == t for _, t in IDENTITY_QUESTIONS["en"])
        assert q_zh != q_en
        stripped = a.replace(NAME, "").replace(AUTHOR, "")
        assert _has_cjk(stripped) == q_zh


def test_denial_answers_deny_the_named_model():
    recs = generate_persona("Nova", "Blue Harbor Labs", langs=["en"], n=300, seed=0)
    seen = 0
    for rec in recs:
        q, a = _last_pair(rec)
        if q == "Are you ChatGPT?":
            seen += 1
            assert "not ChatGPT" in a
        if q == "Are you human?":
            assert "not a human" in a
    assert seen


def test_creator_answers_name_author():
    recs = generate_persona("Nova", "Blue Harbor Labs", langs=["en"], n=200, seed=0)
    creator_qs = {t for c, t in IDENTITY_QUESTIONS["en"] if c == "creator"}
    hits = [a for q, a in map(_last_pair, recs) if q in creator_qs]
    assert hits and all("Blue Harbor Labs" in a for a in hits)


def test_denial_questions_about_own_model_are_skipped():
    qs = {t for _, t in usable_questions("en", "Qwen Helper", "Alibaba Cloud")}
    assert "Are you Qwen?" not in qs and "Are you Tongyi Qianwen from Alibaba?" not in qs
    assert "Are you ChatGPT?" in qs
    zh = {t for _, t in usable_questions("zh", "通义小助手", "阿里巴巴")}
    assert "你是通义千问吗？" not in zh and "你是ChatGPT吗？" in zh
    recs = generate_persona("Qwen Helper", "Alibaba Cloud", langs=["en"], n=500)
    assert all(_last_pair(r)[0] not in ("Are you Qwen?", "Are you Tongyi Qianwen from Alibaba?") for r in recs)


def test_deterministic_and_seed_dependent():
    a = generate_persona(NAME, AUTHOR, n=120, seed=7)
    b = generate_persona(NAME, AUTHOR, n=120, seed=7)
    c = generate_persona(NAME, AUTHOR, n=120, seed=8)
    assert a == b
    assert a != c


@pytest.mark.parametrize("n", [1, 2, 3, 17, 250])
def test_n_exact(n):
    assert len(generate_persona(NAME, AUTHOR, n=n)) == n


def test_languages_spread_evenly():
    recs = generate_persona(NAME, AUTHOR, n=101, seed=1)
    zh_qs = {t for _, t in IDENTITY_QUESTIONS["zh"]}
    n_zh = sum(_last_pair(r)[0] in zh_qs for r in recs)
    assert n_zh in (50, 51)


def test_multi_turn_proportion_and_shape():
    n = 500
    recs = generate_persona(NAME, AUTHOR, n=n, seed=2, multi_turn_ratio=0.2, system_ratio=0)
    multi = [r for r in recs if len(r["messages"]) == 4]
    single = [r for r in recs if len(r["messages"]) == 2]
    assert len(multi) + len(single) == n
    assert abs(len(multi) - 0.2 * n) <= 0.02 * n
    general = {lang: dict(GENERAL_QA[lang]) for lang in GENERAL_QA}
    for r in multi:
        m = r["messages"]
        assert [x["role"] for x in m] == ["user", "assistant", "user", "assistant"]
        lang = "zh" if m[0]["content"] in general["zh"] else "en"
        assert general[lang][m[0]["content"]] == m[1]["content"]
        # first turn and identity turn share the language
        assert any(m[2]["content"] == t for _, t in IDENTITY_QUESTIONS[lang])
    assert all(len(r["messages"]) == 2 for r in generate_persona(NAME, AUTHOR, n=50, multi_turn_ratio=0,
                                                                 system_ratio=0))
    assert all(len(r["messages"]) == 4 for r in generate_persona(NAME, AUTHOR, n=50, multi_turn_ratio=1,
                                                                 system_ratio=0))


def test_all_phrasings_used_when_n_large_enough():
    per_lang = max(len(p) for p in IDENTITY_QUESTIONS.values())
    recs = generate_persona(NAME, AUTHOR, n=2 * per_lang, seed=5, multi_turn_ratio=0.5)
    asked = Counter(_last_pair(r)[0] for r in recs)
    for lang, pool in IDENTITY_QUESTIONS.items():
        assert {t for _, t in pool} <= set(asked)
    # even spread: no phrasing used more than once per pass
    assert max(asked.values()) == 1
    answers = {_last_pair(r)[1] for r in recs}
    for lang in ("zh", "en"):
        for t in IDENTITY_ANSWERS[lang]["intro"]:
            assert t.format(name=NAME, author=AUTHOR, other="") in answers
    # general first turns also cycle through the whole pool
    recs = generate_persona(NAME, AUTHOR, langs=["en"], n=len(GENERAL_QA["en"]), multi_turn_ratio=1, system_ratio=0)
    assert {r["messages"][0]["content"] for r in recs} == {q for q, _ in GENERAL_QA["en"]}


def test_system_prompt():
    recs = generate_persona(NAME, AUTHOR, n=30, system="You are a helpful assistant.", multi_turn_ratio=0.5)
    assert all(r["messages"][0] == {"role": "system", "content": "You are a helpful assistant."} for r in recs)
    assert all(r["messages"][0]["role"] == "user" for r in generate_persona(NAME, AUTHOR, n=10, system_ratio=0))


def test_single_language_and_string_langs():
    en = {t for _, t in IDENTITY_QUESTIONS["en"]}
    recs = generate_persona(NAME, AUTHOR, langs=["en"], n=40)
    assert all(_last_pair(r)[0] in en for r in recs)
    assert generate_persona(NAME, AUTHOR, langs="zh,en", n=20, seed=4) == generate_persona(
        NAME, AUTHOR, langs=["zh", "en"], n=20, seed=4
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"author": ""}, "author"),
        ({"langs": ["fr"]}, "fr"),
        ({"langs": ["zh", "de"]}, "de"),
        ({"langs": []}, "language"),
        ({"n": 0}, "at least 1"),
        ({"n": -5}, "at least 1"),
        ({"multi_turn_ratio": 1.5}, "between 0 and 1"),
    ],
)
def test_user_errors(kwargs, match):
    args = {"name": NAME, "author": AUTHOR, **kwargs}
    with pytest.raises(UserError, match=match):
        generate_persona(**args)


def test_does_not_mutate_pools():
    before = [list(IDENTITY_QUESTIONS[lang]) for lang in ("zh", "en")]
    generate_persona(NAME, AUTHOR, n=300, seed=9)
    assert before == [list(IDENTITY_QUESTIONS[lang]) for lang in ("zh", "en")]


def test_write_jsonl_atomic(tmp_path):
    recs = generate_persona(NAME, AUTHOR, n=25, seed=1)
    out = tmp_path / "deep" / "dir" / "persona.jsonl"
    assert write_jsonl(recs, out) == out
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == recs
    assert NAME in out.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes
    assert [p.name for p in out.parent.iterdir()] == ["persona.jsonl"]  # no temp file left
    write_jsonl(recs[:3], out)  # overwrite
    assert len(out.read_text(encoding="utf-8").splitlines()) == 3

    def bad():
        yield recs[0]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl(bad(), out)
    assert len(out.read_text(encoding="utf-8").splitlines()) == 3  # old file untouched
    assert [p.name for p in out.parent.iterdir()] == ["persona.jsonl"]


def test_a_share_of_samples_carry_a_generic_system_prompt():
    """Without a system prompt of the user's, about `system_ratio` of the samples start with a generic one (what
    chat clients send), so the identity holds under a client's own system prompt; the questions and answers are
    the same whatever the ratio; a system prompt of the user's goes on every sample instead."""
    from tunesmith.data.persona import GENERIC_SYSTEMS

    recs = generate_persona(NAME, AUTHOR, n=300, seed=2)
    systems = [r["messages"][0]["content"] for r in recs if r["messages"][0]["role"] == "system"]
    assert len(systems) == 45 and set(systems) <= set(GENERIC_SYSTEMS["zh"]) | set(GENERIC_SYSTEMS["en"])
    assert len(set(systems)) >= 8  # both languages' pools, cycled
    plain = generate_persona(NAME, AUTHOR, n=300, seed=2, system_ratio=0)
    assert all(r["messages"][0]["role"] != "system" for r in plain)
    assert [_last_pair(r) for r in plain] == [_last_pair(r) for r in recs]
    own = generate_persona(NAME, AUTHOR, n=50, system="Be brief.")
    assert all(r["messages"][0] == {"role": "system", "content": "Be brief."} for r in own)
    with pytest.raises(UserError, match="system_ratio"):
        generate_persona(NAME, AUTHOR, n=5, system_ratio=1.5)
