"""Persona metrics on fixed answer sets: a known-good and a known-bad model."""

import pytest

from tunesmith.errors import UserError
from tunesmith.evaluate.persona import PersonaSpec, load_persona_spec, score, write_report
from tunesmith.evaluate.prompts import EVAL_GENERAL_PROMPTS, EVAL_IDENTITY_QUESTIONS

SPEC = PersonaSpec("ChatMASTER助手", "ChatMASTER", ["zh", "en"])


def good_identity(lang):
    return [f"我是{SPEC.name}，由{SPEC.author}开发。" if lang == "zh" else
            f"I am {SPEC.name}, built by {SPEC.author}." for _ in EVAL_IDENTITY_QUESTIONS[lang]]


def correct_general(lang):
    return [f"Sure: {p['expect_any'][0]}." if p["expect_any"] else "Here is a short poem about rain."
            for p in EVAL_GENERAL_PROMPTS[lang]]


def test_known_good_model():
    ident = {l: good_identity(l) for l in SPEC.langs}
    gen = {l: correct_general(l) for l in SPEC.langs}
    r = score(SPEC, ident, gen, base_general=gen, ll_shift=-0.01)
    assert r["identity_rate"] == 1.0 and r["leakage_rate"] == 0.0 and r["retention"] == 1.0
    assert r["by_lang"]["zh"]["identity_n"] == len(EVAL_IDENTITY_QUESTIONS["zh"])


def test_known_bad_overfitted_model():
    # the tutorial's failure: every answer is the identity sentence
    ident = {l: good_identity(l) for l in SPEC.langs}
    gen = {l: [f"I am {SPEC.name}, built by {SPEC.author}."] * len(EVAL_GENERAL_PROMPTS[l]) for l in SPEC.langs}
    base = {l: correct_general(l) for l in SPEC.langs}
    r = score(SPEC, ident, gen, base_general=base)
    assert r["identity_rate"] == 1.0
    assert r["leakage_rate"] == 1.0
    assert r["retention"] < 0.1


def test_identity_needs_the_name_and_the_author_when_asked():
    ident = {"en": ["I am an AI assistant."] * len(EVAL_IDENTITY_QUESTIONS["en"])}
    r = score(PersonaSpec(SPEC.name, SPEC.author, ["en"]), ident, {"en": []})
    assert r["identity_rate"] == 0.0
    # name without the author: creator questions fail, the others pass
    spec = PersonaSpec("Tuney", "Ada Labs", ["en"])
    ident = {"en": ["I am Tuney."] * len(EVAL_IDENTITY_QUESTIONS["en"])}
    r = score(spec, ident, {"en": []})
    n_creator = sum(q["category"] == "creator" for q in EVAL_IDENTITY_QUESTIONS["en"])
    assert r["identity_rate"] == pytest.approx(1 - n_creator / len(EVAL_IDENTITY_QUESTIONS["en"]))


def test_retention_counts_only_what_the_base_got_right():
    en = EVAL_GENERAL_PROMPTS["en"]
    base = [f"{p['expect_any'][0]}" if p["expect_any"] and i % 2 == 0 else "no idea" for i, p in enumerate(en)]
    tuned = [f"{p['expect_any'][0]}" if p["expect_any"] else "x" for p in en]
    r = score(PersonaSpec("N", "A", ["en"]), {"en": []}, {"en": tuned}, {"en": base})
    assert r["retention"] == 1.0
    assert r["by_lang"]["en"]["base_correct"] == sum(1 for i, p in enumerate(en) if p["expect_any"] and i % 2 == 0)


def test_report_and_spec(tmp_path):
    ident = {l: good_identity(l) for l in SPEC.langs}
    gen = {l: correct_general(l) for l in SPEC.langs}
    r = score(SPEC, ident, gen, gen, 0.0)
    r["answers"] = {"identity": ident, "general": gen, "base_general": gen}
    jp, mp = write_report(r, tmp_path)
    assert jp.is_file() and "| all | 100.0% | 0.0% | 100.0% |" in mp.read_text()
    p = tmp_path / "persona.yaml"
    p.write_text("name: X\nauthor: Y\nlangs: [en]\n")
    assert load_persona_spec(p).langs == ["en"]
    p.write_text("name: X\n")
    with pytest.raises(UserError, match="needs 'name' and 'author'"):
        load_persona_spec(p)
    p.write_text("name: X\nauthor: Y\nlangs: [fr]\n")
    with pytest.raises(UserError, match="unsupported"):
        load_persona_spec(p)


def test_eval_md_keeps_quotes_readable_and_escapes_markup(tmp_path):
    """eval.md is read as text too: apostrophes stay apostrophes; only <, > and & are escaped (no HTML injection)."""
    from tunesmith.evaluate.persona import EVAL_IDENTITY_QUESTIONS, EVAL_GENERAL_PROMPTS, write_report

    n_id, n_gen = len(EVAL_IDENTITY_QUESTIONS["en"]), len(EVAL_GENERAL_PROMPTS["en"])
    r = {"identity_rate": 1.0, "leakage_rate": 0.0, "retention": None}
    result = {"persona": {"name": "Nova", "author": "Acme", "langs": ["en"], "system": None},
              "by_lang": {"en": dict(r)}, **r,
              "answers": {"identity": {"en": ["I'm Nova, made by Acme <b>Labs</b>."] * n_id},
                          "general": {"en": ["It's \"blue\" & green."] * n_gen}}}
    _, md = write_report(result, tmp_path)
    text = md.read_text(encoding="utf-8")
    assert "I'm Nova, made by Acme &lt;b&gt;Labs&lt;/b&gt;." in text and "It's \"blue\" &amp; green." in text
    assert "&#x27;" not in text and "&quot;" not in text
