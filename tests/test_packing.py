import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith.data.packing import collate, fit_length, pack
from tunesmith.data.template import IGNORE, Rendered, render


def _samples(tok):
    convs = [
        [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Tuney."}],
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, of course."}],
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi " * 30}],
    ]
    return [render(tok, c) for c in convs]


def test_pack_never_splits_and_restarts_positions(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    samples = _samples(tok)
    lens = [len(s.input_ids) for s in samples]
    rows = pack(samples, max_length=max(lens) + 5, seed=0)
    assert sum(len(r.lengths) for r in rows) == 3
    assert sorted(x for r in rows for x in r.lengths) == sorted(lens)
    for r in rows:
        assert len(r.input_ids) <= max(lens) + 5
        starts = [i for i, p in enumerate(r.position_ids) if p == 0]
        assert len(starts) == len(r.lengths)


def test_packed_samples_do_not_see_each_other(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    a, b, _ = _samples(tok)
    rows = pack([a, b], max_length=len(a.input_ids) + len(b.input_ids), seed=0)
    assert len(rows) == 1
    row = rows[0]
    batch = collate(rows, tok.pad_token_id)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        off = 0
        for n in row.lengths:
            ids = torch.tensor([row.input_ids[off:off + n]])
            alone = model(input_ids=ids).logits[0]
            torch.testing.assert_close(packed[off:off + n], alone, atol=1e-5, rtol=1e-4)
            off += n


def test_fit_length_truncates_or_drops_and_counts():
    s = [Rendered(list(range(10)), [IGNORE] * 5 + list(range(5, 10))), Rendered([1, 2], [IGNORE, 2]),
         Rendered(list(range(10)), [IGNORE] * 9 + [9])]
    kept, rep = fit_length(s, 6, "truncate")
    assert rep.truncated == 2 and rep.no_loss == 1 and len(kept) == 2 and len(kept[0].input_ids) == 6
    kept, rep = fit_length(s, 6, "drop")
    assert rep.dropped == 2 and len(kept) == 1
