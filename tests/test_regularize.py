"""Self-distillation data: answers cut at max_new_tokens are left out (they would teach stopping mid-sentence)."""

from tunesmith.data import regularize
from tunesmith.serve import generate


def _fake(ended_every):
    def greedy_batch(model, tok, convs, max_new_tokens=128, batch_size=16, finished=None):
        flags = [i % ended_every == 0 for i in range(len(convs))]
        if finished is not None:
            finished[:] = flags
        return [f"answer {i}" + ("." if f else " and then") for i, f in enumerate(flags)]
    return greedy_batch


def test_cut_answers_are_left_out(monkeypatch):
    monkeypatch.setattr(generate, "greedy_batch", _fake(2))
    logs = []
    out = regularize.self_distill(None, None, ["en"], 40, max_new_tokens=8, log=logs.append)
    assert len(out) == 40
    assert all(c[-1]["content"].endswith(".") for c in out)
    assert any("cut at 8 tokens left out" in x for x in logs)


def test_cut_answers_kept_when_too_few_ended(monkeypatch):
    monkeypatch.setattr(generate, "greedy_batch", _fake(10 ** 6))  # only the first answer ends
    logs = []
    out = regularize.self_distill(None, None, ["en"], 10, max_new_tokens=8, log=logs.append)
    assert len(out) == 10 and any(c[-1]["content"].endswith("and then") for c in out)
    assert any("raise data.regularize.max_new_tokens" in x for x in logs)


def test_greedy_batch_reports_finished(tiny_dir):
    from tunesmith.models.load import load_for_inference

    model, tok = load_for_inference(str(tiny_dir), device="cpu")
    flags = []
    ans = generate.greedy_batch(model, tok, [[{"role": "user", "content": "hi"}]] * 3, max_new_tokens=2,
                                finished=flags)
    assert len(ans) == 3 and len(flags) == 3 and all(isinstance(f, bool) for f in flags)
