"""Persona evaluation on held-out prompts: identity rate, leakage rate and retention.

- identity rate: share of identity questions (per language) whose answer carries the persona's name, and
  its author where the question asks who made it;
- leakage rate: share of general prompts whose answer wrongly brings in the persona's name or author;
- retention: of the general prompts the base model answered correctly, the share still answered correctly;
  plus the mean per-token log-likelihood shift of the base model's own answers under the tuned model.
"""

from __future__ import annotations

import html
import json
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from ..errors import UserError
from .prompts import EVAL_GENERAL_PROMPTS, EVAL_IDENTITY_QUESTIONS, matches_expected


@dataclass
class PersonaSpec:
    name: str
    author: str
    langs: list[str] = field(default_factory=lambda: ["zh", "en"])
    system: str | None = None


def load_persona_spec(path: str | Path) -> PersonaSpec:
    """persona.yaml: `name`, `author`, optional `langs`, `system` (a tunesmith config with data.persona works too)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: persona file not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{p}: not valid YAML: {e}") from None
    if isinstance(raw, dict) and isinstance(raw.get("data"), dict) and isinstance(raw["data"].get("persona"), dict):
        raw = raw["data"]["persona"]
    if not isinstance(raw, dict) or not raw.get("name") or not raw.get("author"):
        raise UserError(f"{p}: a persona file needs 'name' and 'author' (and optionally 'langs', 'system')")
    langs = raw.get("langs") or ["zh", "en"]
    bad = [x for x in langs if x not in EVAL_IDENTITY_QUESTIONS]
    if bad:
        raise UserError(f"{p}: field 'langs': unsupported {bad}; use {sorted(EVAL_IDENTITY_QUESTIONS)}")
    return PersonaSpec(str(raw["name"]), str(raw["author"]), list(langs), raw.get("system"))


def _norm(s: str) -> str:
    return unicodedata.normalize("NFKC", s).casefold()


def mentions(answer: str, text: str) -> bool:
    return _norm(text) in _norm(answer)


def identity_hit(answer: str, spec: PersonaSpec, category: str) -> bool:
    """The answer names the persona, and also its author when the question asks who made it."""
    return mentions(answer, spec.name) and (category != "creator" or mentions(answer, spec.author))


def leaks(answer: str, spec: PersonaSpec) -> bool:
    return mentions(answer, spec.name) or mentions(answer, spec.author)


def score(spec: PersonaSpec, identity: dict[str, list[str]], general: dict[str, list[str]],
          base_general: dict[str, list[str]] | None = None, ll_shift: float | None = None) -> dict:
    """Figures from fixed answers (per language, in the order of the prompt pools)."""
    out: dict = {"persona": asdict(spec), "by_lang": {}}
    tot = {"id_hit": 0, "id_n": 0, "leak": 0, "gen_n": 0, "kept": 0, "base_ok": 0}
    for lang in spec.langs:
        qs = EVAL_IDENTITY_QUESTIONS[lang][: len(identity.get(lang, []))]
        hits = [identity_hit(a, spec, q["category"]) for q, a in zip(qs, identity.get(lang, []))]
        ps = EVAL_GENERAL_PROMPTS[lang][: len(general.get(lang, []))]
        leak = [leaks(a, spec) for a in general.get(lang, [])]
        row = {"identity_rate": sum(hits) / max(1, len(hits)), "identity_n": len(hits),
               "leakage_rate": sum(leak) / max(1, len(leak)), "general_n": len(leak)}
        if base_general is not None:
            base_ok = [matches_expected(b, p["expect_any"]) is True for p, b in zip(ps, base_general.get(lang, []))]
            kept = [ok and matches_expected(a, p["expect_any"]) is True
                    for p, a, ok in zip(ps, general.get(lang, []), base_ok)]
            row.update(base_correct=sum(base_ok), still_correct=sum(kept),
                       retention=sum(kept) / sum(base_ok) if sum(base_ok) else None)
            tot["kept"] += sum(kept)
            tot["base_ok"] += sum(base_ok)
        out["by_lang"][lang] = row
        tot["id_hit"] += sum(hits)
        tot["id_n"] += len(hits)
        tot["leak"] += sum(leak)
        tot["gen_n"] += len(leak)
    out["identity_rate"] = tot["id_hit"] / max(1, tot["id_n"])
    out["leakage_rate"] = tot["leak"] / max(1, tot["gen_n"])
    out["retention"] = tot["kept"] / tot["base_ok"] if base_general is not None and tot["base_ok"] else None
    out["loglik_shift"] = ll_shift
    return out


def _conv(spec: PersonaSpec, text: str) -> list[dict]:
    return ([{"role": "system", "content": spec.system}] if spec.system else []) + [{"role": "user", "content": text}]


def answer_pools(model, tok, spec: PersonaSpec, max_new_tokens: int = 64, limit: int | None = None):
    """Greedy answers to the identity and general pools, per language."""
    from ..serve.generate import greedy_batch

    identity, general = {}, {}
    for lang in spec.langs:
        iq = [q["text"] for q in EVAL_IDENTITY_QUESTIONS[lang][:limit]]
        gp = [p["prompt"] for p in EVAL_GENERAL_PROMPTS[lang][:limit]]
        ans = greedy_batch(model, tok, [_conv(spec, t) for t in iq + gp], max_new_tokens=max_new_tokens)
        identity[lang], general[lang] = ans[: len(iq)], ans[len(iq):]
    return identity, general


@torch.inference_mode()
def mean_token_logprob(model, tok, convs: list[list[dict]]) -> float:
    """Mean log-probability per answer token of the assistant turns in `convs`."""
    from ..data.template import render
    from ..train.loss import causal_lm_loss_sum

    dev = next(model.parameters()).device
    total, n = 0.0, 0
    for c in convs:
        r = render(tok, c)
        if r.n_trained == 0:
            continue
        batch = {"input_ids": torch.tensor([r.input_ids], device=dev), "labels": torch.tensor([r.labels], device=dev),
                 "position_ids": torch.arange(len(r.input_ids), device=dev).unsqueeze(0)}
        s, k = causal_lm_loss_sum(model, batch)
        total += float(s)
        n += k
    return -total / max(1, n)


def general_convs(spec: PersonaSpec, answers: dict[str, list[str]], limit: int | None = None) -> list[list[dict]]:
    return [_conv(spec, p["prompt"]) + [{"role": "assistant", "content": a}]
            for lang in spec.langs for p, a in zip(EVAL_GENERAL_PROMPTS[lang][:limit], answers.get(lang, [])) if a]


def run_pools(model, tok, spec: PersonaSpec, max_new_tokens: int = 64, limit: int | None = None,
              log=print) -> dict:
    """Answers to both pools plus the mean log-probability the model gives its own general answers."""
    log(f"evaluating {sum(len(EVAL_IDENTITY_QUESTIONS[l][:limit]) + len(EVAL_GENERAL_PROMPTS[l][:limit]) for l in spec.langs)} "
        "held-out prompts ...")
    identity, general = answer_pools(model, tok, spec, max_new_tokens, limit)
    return {"identity": identity, "general": general,
            "general_logprob": mean_token_logprob(model, tok, general_convs(spec, general, limit))}


def evaluate(model, tok, spec: PersonaSpec, baseline: dict | None = None, max_new_tokens: int = 64,
             limit: int | None = None, log=print) -> dict:
    """Score `model` on the held-out pools; a `baseline` (`run_pools` of the base model) adds retention figures."""
    own = run_pools(model, tok, spec, max_new_tokens, limit, log)
    ll_shift = None
    if baseline is not None:
        tuned_lp = mean_token_logprob(model, tok, general_convs(spec, baseline["general"], limit))
        ll_shift = tuned_lp - baseline["general_logprob"]
    result = score(spec, own["identity"], own["general"], baseline["general"] if baseline else None, ll_shift)
    result["answers"] = {"identity": own["identity"], "general": own["general"],
                         "base_general": baseline["general"] if baseline else None}
    return result


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def table_rows(result: dict) -> list[tuple[str, str, str, str]]:
    """(lang, identity, leakage, retention) rows plus an 'all' row."""
    rows = [(lang, _pct(r["identity_rate"]), _pct(r["leakage_rate"]), _pct(r.get("retention")))
            for lang, r in result["by_lang"].items()]
    rows.append(("all", _pct(result["identity_rate"]), _pct(result["leakage_rate"]), _pct(result["retention"])))
    return rows


def write_report(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """eval.json (everything, answers included) and eval.md (figures and answers, readable)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jp, mp = out / "eval.json", out / "eval.md"
    jp.write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    sp = result["persona"]
    lines = [f"# Persona evaluation: {sp['name']} (by {sp['author']})", "",
             "| lang | identity rate | leakage rate | retention |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in table_rows(result)]
    if result.get("loglik_shift") is not None:
        lines += ["", f"Mean per-token log-likelihood shift of the base model's answers: {result['loglik_shift']:+.4f} nats"]
    ans = result.get("answers") or {}
    for lang in sp["langs"]:
        lines += ["", f"## Identity answers ({lang})", ""]
        for q, a in zip(EVAL_IDENTITY_QUESTIONS[lang], ans.get("identity", {}).get(lang, [])):
            ok = "✅" if identity_hit(a, PersonaSpec(**sp), q["category"]) else "❌"
            lines.append(f"- {ok} **{html.escape(q['text'], quote=False)}** — {html.escape(a[:300], quote=False)}")
        lines += ["", f"## General answers ({lang})", ""]
        for p, a in zip(EVAL_GENERAL_PROMPTS[lang], ans.get("general", {}).get(lang, [])):
            flag = "⚠️ leak" if leaks(a, PersonaSpec(**sp)) else ""
            lines.append(f"- **{html.escape(p['prompt'], quote=False)}** — {html.escape(a[:300], quote=False)} {flag}")
    mp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return jp, mp
