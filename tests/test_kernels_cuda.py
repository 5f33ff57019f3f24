"""The fast paths on a CUDA GPU (compiled kernels, bf16, NF4, pinned-memory offload) against their references.

Skipped without a GPU; run on the GPU machine with `python -m pytest -q tests/test_kernels_cuda.py`.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def test_compiled_rms_norm_and_swiglu_match_eager():
    from tunesmith.kernels.fused import _fn, rms_norm_ref, silu_mul_ref

    dev = torch.device("cuda")
    for n in (7, 1000, 4096):  # dynamic shapes: one compile serves them all
        x = torch.randn(n, 896, device=dev, dtype=torch.bfloat16, requires_grad=True)
        w = torch.rand(896, device=dev, dtype=torch.bfloat16, requires_grad=True)
        y = _fn("rms_norm", rms_norm_ref, dev)(x, w, 1e-6)
        g = torch.randn_like(y)
        gx, gw = torch.autograd.grad(y, (x, w), g)
        y0 = rms_norm_ref(x, w, 1e-6)
        gx0, gw0 = torch.autograd.grad(y0, (x, w), g)
        assert _rel(y, y0) < 1e-2 and _rel(gx, gx0) < 2e-2 and _rel(gw, gw0) < 2e-2
        a = torch.randn(n, 4864, device=dev, dtype=torch.bfloat16, requires_grad=True)
        b = torch.randn(n, 4864, device=dev, dtype=torch.bfloat16, requires_grad=True)
        z = _fn("silu_mul", silu_mul_ref, dev)(a, b)
        gz = torch.randn_like(z)
        ga, gb = torch.autograd.grad(z, (a, b), gz)
        z0 = silu_mul_ref(a, b)
        ga0, gb0 = torch.autograd.grad(z0, (a, b), gz)
        assert _rel(z, z0) < 1e-2 and _rel(ga, ga0) < 2e-2 and _rel(gb, gb0) < 2e-2


def test_compiled_rope_matches_eager():
    from tunesmith.kernels.fused import _fn, rope_ref

    dev = torch.device("cuda")
    for t in (5, 2048):
        q = torch.randn(2, 16, t, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(2, 8, t, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
        cos = torch.randn(2, t, 128, device=dev, dtype=torch.bfloat16)
        sin = torch.randn(2, t, 128, device=dev, dtype=torch.bfloat16)
        a = _fn("rope", rope_ref, dev)(q, k, cos, sin, 1)
        b = rope_ref(q, k, cos, sin, 1)
        ga = torch.autograd.grad(a, (q, k), (torch.ones_like(a[0]), torch.ones_like(a[1])))
        gb = torch.autograd.grad(b, (q, k), (torch.ones_like(b[0]), torch.ones_like(b[1])))
        for x, y in zip(a + ga, b + gb):
            assert _rel(x, y) < 1e-2


def test_linear_ce_cuda_bf16():
    from tunesmith.kernels.linear_ce import linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(3000, 896, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(151936, 896, device="cuda") * 0.02).bfloat16()
    t = torch.randint(0, 151936, (3000,), device="cuda")
    ref = F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")
    (g0,) = torch.autograd.grad(ref, h)
    out = linear_cross_entropy(h, w, t)
    (g1,) = torch.autograd.grad(out, h)
    assert abs(float(out) - float(ref)) / float(ref) < 1e-3
    assert _rel(g1, g0) < 2e-2


def _tiny_qwen(method, dropout=0.0):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tunesmith.config import LoraCfg
    from tunesmith.models.load import add_lora, quant_config

    cfg = Qwen2Config(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    kw = {"quantization_config": quant_config(torch.bfloat16)} if method == "qlora" else {}
    import tempfile

    d = tempfile.mkdtemp()
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, device_map={"": 0}, **kw)
    m = add_lora(m, LoraCfg(r=16, alpha=32, dropout=dropout), grad_checkpointing=True)
    for n, p in m.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    return m.train()


def _step(m, ids):
    m.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(input_ids=ids).logits
    loss = out.float().pow(2).mean()
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_function_and_offload_cuda(method):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    from tunesmith.kernels.lora import patch_lora
    from tunesmith.models.load import enable_checkpointing

    m = _tiny_qwen(method)
    ids = torch.randint(0, 4096, (2, 256), device="cuda")
    ref_out, ref_g = _step(m, ids)
    assert patch_lora(m) == 14
    enable_checkpointing(m, offload=True)
    for _ in range(2):  # twice: the host copies and prefetches of one step must not leak into the next
        out, g = _step(m, ids)
        assert _rel(out, ref_out) < 1e-2
        for k in g:
            assert _rel(g[k], ref_g[k]) < 3e-2, k


def test_offload_reserves_no_more_than_it_allocates_cuda():
    """The host copies (layer inputs and kept values) let their device blocks go in stream order: with the host far
    ahead of a slow GPU, the allocator reserves about what it allocates, not one block per layer queued (as it did
    with ``record_stream``: a whole forward pass's worth, +3.7 GiB on 7B LoRA with kept attention). Gradients as
    with the plain checkpoint."""
    from torch.utils.checkpoint import checkpoint

    from tunesmith.kernels import offload

    torch.manual_seed(0)
    n, d, layers = 4096, 1024, 16
    w = [(torch.randn(d, d, device="cuda") / d ** 0.5).requires_grad_() for _ in range(layers)]

    def layer(x, wi, slow):
        if slow:
            torch.cuda._sleep(2_000_000)  # ~1 ms of GPU time: the host queues every layer long before it runs
        a = torch.tanh(x @ wi)
        if not offload.replaying():
            offload.keep(a)
        elif offload.has_kept():
            a = a + (offload.kept(a) - a).detach()  # the kept value, the recomputed gradient path
        return x + a

    def run(ckpt, slow):
        for p in w:
            p.grad = None
        x = torch.randn(n, d, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).requires_grad_()
        h = x
        for wi in w:
            h = ckpt(lambda t, wi=wi: layer(t, wi, slow), h)
        h.float().pow(2).mean().backward()
        return [x.grad] + [p.grad for p in w]

    want = run(lambda f, t: checkpoint(f, t, use_reentrant=False), False)
    run(offload.offload_checkpoint, True)  # pinned buffers, cuBLAS workspaces and the pools' first segments
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    got = run(offload.offload_checkpoint, True)
    torch.cuda.synchronize()
    per_layer = 2 * n * d * 4  # the layer input and the kept value, fp32
    gap = torch.cuda.max_memory_reserved() - torch.cuda.max_memory_allocated()
    assert gap < 4 * per_layer, (gap / 2 ** 20, per_layer / 2 ** 20)  # record_stream: ~16 layers' worth
    for g, h in zip(got, want):
        assert _rel(g, h) < 1e-5


def test_offload_reuses_held_inputs_unless_changed_in_place_cuda(monkeypatch):
    """The last layers' inputs are still on the device when the backward pass starts: the recompute uses them
    without copying them back, unless they were changed in place since (their version moved), when the host copy
    is the value the layer saw."""
    from tunesmith.kernels import offload

    monkeypatch.setattr(offload, "REUSE_HELD", True)

    torch.manual_seed(0)
    w = torch.randn(256, 256, device="cuda", requires_grad=True)
    for change in (False, True):
        x = torch.randn(512, 256, device="cuda", requires_grad=True)
        h = x * 1.0  # a non-leaf layer input whose later in-place change autograd does not forbid
        ref = torch.tanh(h.detach().clone() @ w).pow(2).sum()
        want = torch.autograd.grad(ref, w)[0]
        y = offload.offload_checkpoint(lambda t: torch.tanh(t @ w), h)
        stash = offload._state.held[-1]
        assert stash.gpu is not None  # held (not released: the last layer of its forward)
        torch.cuda.synchronize()  # the host copy is made (otherwise it could hold either value)
        w.grad = None
        if change:
            with torch.no_grad():
                h.mul_(2)
            with pytest.warns(UserWarning, match="changed in place"):
                y.pow(2).sum().backward()
        else:
            y.pow(2).sum().backward()
        assert (stash.ready_event is None) == (not change)  # read in place; copied back after the change
        assert _rel(w.grad, want) < 1e-5, change


def test_lora_dropout_cuda_bf16_matches_masked_reference():
    import torch.nn as nn

    from tunesmith.kernels.lora import dropout_key, keep_mask, lora_linear

    torch.manual_seed(0)
    base = nn.Linear(512, 768, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    a = (torch.randn(16, 512, device="cuda") * 0.05).requires_grad_()
    b = (torch.randn(768, 16, device="cuda") * 0.05).requires_grad_()
    p, s = 0.1, 2.0
    torch.manual_seed(7)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = lora_linear(x, a, b, base.bias, base, s, p)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, b), g)
    torch.manual_seed(7)
    mask = keep_mask((1024, 512), dropout_key(x.device, 0), p).view(4, 256, 512)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = base(x) + s * F.linear(F.linear(x * mask / (1 - p), a), b)
    want = torch.autograd.grad(ref, (x, a, b), g)
    assert _rel(y, ref) < 1e-2
    for u, v in zip(got, want):
        assert _rel(u, v) < 2e-2


def test_nf4_dequant_in_plain_ops_equals_bitsandbytes_cuda():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from tunesmith.kernels.lora import nf4_dequant_torch

    torch.manual_seed(0)
    for shape in ((896, 4864), (300, 64), (40, 128)):
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.05
        q, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        want = bnbf.dequantize_4bit(q, qs)
        assert torch.equal(nf4_dequant_torch(q, qs, torch.bfloat16), want)
        traced = torch.compile(lambda t: nf4_dequant_torch(t, qs, torch.bfloat16), dynamic=True)(q)
        assert _rel(traced, want) < 1e-3  # Inductor may fuse the absmax multiply-add (one fp32 rounding)


@pytest.mark.parametrize("nested", [True, False])
def test_nf4_triton_kernel_equals_bitsandbytes_cuda(nested):
    """The Triton NF4 kernel against bitsandbytes' own dequantisation: alone, joined to a LoRA factor along either
    dimension, and inside a compiled graph; plus a layer that routes through it in eager mode."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from tunesmith.kernels import nf4

    torch.manual_seed(0)
    for shape in ((896, 4864), (4864, 896), (300, 64), (40, 128), (3, 2048)):
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.05
        q, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
        assert nf4.supported(qs, q, torch.bfloat16)
        want = bnbf.dequantize_4bit(q, qs)
        got = nf4.dequant(q, qs, torch.bfloat16)
        assert _rel(got, want) < 1e-3 and (got != want).float().mean() < 1e-3  # at most a rare last-bit rounding
        cols = torch.randn(shape[0], 16, device="cuda", dtype=torch.bfloat16)
        rows = torch.randn(16, shape[1], device="cuda", dtype=torch.bfloat16)
        assert torch.equal(nf4.dequant(q, qs, torch.bfloat16, cols, 1), torch.cat((got, cols), 1))
        assert torch.equal(nf4.dequant(q, qs, torch.bfloat16, rows, 0), torch.cat((got, rows), 0))
        traced = torch.compile(lambda t, e: nf4.dequant(t, qs, torch.bfloat16, e, 1) * 2, dynamic=True)(q, cols)
        assert torch.equal(traced, torch.cat((got, cols), 1) * 2)


@pytest.mark.parametrize("method,dropout", [("lora", 0.0), ("qlora", 0.0), ("lora", 0.1)])
def test_compiled_layers_cuda_full_and_packed_batches(method, dropout):
    """Compiled layer bodies (NF4 dequantised in the graph, wide LoRA terms joined into one matmul) against eager
    layers, on mask-free and on packed batches; with LoRA dropout, the same masks in both (each step seeded)."""
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    from tunesmith import kernels
    from tunesmith.kernels import compiled
    from tunesmith.models.load import enable_checkpointing
    from tunesmith.train.loss import causal_lm_loss_sum

    m = _tiny_qwen(method, dropout)
    enable_checkpointing(m, offload=True)
    kernels.apply(m, device=torch.device("cuda"), method=method, kernels="auto", compile_layers=False)

    def step(ids, pos):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(11)  # the layers' dropout seeds
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = causal_lm_loss_sum(m, {"input_ids": ids, "position_ids": pos, "labels": ids}, None, True)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    ids = torch.randint(0, 4096, (2, 256), device="cuda")
    full = torch.arange(256, device="cuda").repeat(2, 1)
    packed = torch.cat([torch.arange(96), torch.arange(160)]).to("cuda").repeat(2, 1)
    try:
        for pos in (full, packed):
            compiled.disable()
            l0, g0 = step(ids, pos)
            compiled.enable()
            l1, g1 = step(ids, pos)
            assert compiled.active()
            assert abs(float(l1) - float(l0)) / float(l0) < 1e-3
            for k in g0:
                assert _rel(g1[k], g0[k]) < 3e-2, k
    finally:
        compiled.disable()


def _block_mask(cu, n):
    seg = torch.zeros(n, dtype=torch.long)
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        seg[a:b] = i
    same = seg[:, None] == seg[None, :]
    return same & torch.ones(n, n, dtype=torch.bool).tril()


def test_varlen_attention_matches_masked_sdpa_cuda():
    """torch's varlen flash attention through tunesmith's attention function against SDPA with the block-diagonal
    causal mask: outputs and gradients, grouped KV heads (7:1, as Qwen2.5-7B), bf16."""
    from tunesmith.kernels import attention

    if not attention.available(torch.device("cuda")):
        pytest.skip("this torch has no varlen_attn")
    torch.manual_seed(0)
    b, s, hq, hk, d = 2, 512, 14, 2, 64
    lens = [[100, 3, 250, 159], [512]]
    cu = [0]
    for row in lens:
        for n in row:
            cu.append(cu[-1] + n)
    q = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, hk, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, hk, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    row_cu = [[sum(row[:j]) for j in range(len(row) + 1)] for row in lens]
    mask = torch.stack([_block_mask(c, s) for c in row_cu])[:, None].cuda()
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1),
                                         attn_mask=mask, scale=0.11).transpose(1, 2)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    kw = {"cu_seq_lens_q": torch.tensor(cu, dtype=torch.int32, device="cuda"), "max_length_q": 512}
    out, _ = attention.attention_forward(None, q, k, v, mask, scaling=0.11, **kw)
    grads = torch.autograd.grad(out, (q, k, v), g)
    assert out.shape == ref.shape and _rel(out, ref) < 1e-2
    for a, r in zip(grads, ref_grads):
        assert _rel(a, r) < 2e-2


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_varlen_attention_in_training_cuda(method):
    """A packed batch from collate: loss and LoRA gradients with varlen attention (eager and compiled layers)
    equal those with SDPA and the block-diagonal mask."""
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    from tunesmith import kernels
    from tunesmith.data.packing import Row, collate
    from tunesmith.data.template import Rendered
    from tunesmith.kernels import attention, compiled
    from tunesmith.models.load import enable_checkpointing
    from tunesmith.train.loss import causal_lm_loss_sum

    m = _tiny_qwen(method)
    enable_checkpointing(m, offload=True)
    used = kernels.apply(m, device=torch.device("cuda"), method=method, kernels="auto", compile_layers=False)
    if "varlen-attn" not in used:
        pytest.skip("this torch has no varlen_attn")
    g = torch.Generator().manual_seed(0)

    def batch(lens_per_row):
        rows = []
        for lens in lens_per_row:
            r = Row()
            for n in lens:
                ids = torch.randint(3, 4096, (n,), generator=g).tolist()
                r.add(Rendered(ids, ids))
            rows.append(r)
        return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in collate(rows, 0).items()}

    def step(b):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = causal_lm_loss_sum(m, b, None, True)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    try:
        for lens in ([[60, 120, 7, 300], [480]], [[33, 200], [100, 100, 100, 190]]):
            b = batch(lens)
            assert "cu_seqlens" in b
            attention.unpatch_varlen(m)
            l0, g0 = step(b)
            assert attention.patch_varlen(m)
            for comp in (False, True):
                compiled.enable() if comp else compiled.disable()
                l1, g1 = step(b)
                assert abs(float(l1) - float(l0)) / float(l0) < 2e-3, comp
                for k in g0:
                    assert _rel(g1[k], g0[k]) < 3e-2, (comp, k)
    finally:
        compiled.disable()


@pytest.mark.parametrize("tied", [True, False])
def test_host_kept_embedding_and_head_cuda(tied):
    """Embedding and head in pinned host memory, the head copied in on a side stream for the loss only: the same
    loss and gradients as with both on the GPU, and the backward pass starts with less allocated by their size."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tunesmith import kernels
    from tunesmith.config import LoraCfg
    from tunesmith.kernels import host_weights
    from tunesmith.models.load import add_lora
    from tunesmith.train.loss import causal_lm_loss_sum

    cfg = Qwen2Config(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).to("cuda", torch.bfloat16)
    m = add_lora(m, LoraCfg(r=16, alpha=32, dropout=0.0), grad_checkpointing=True, offload=True)
    for n, p in m.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    m.train()
    kernels.apply(m, device=torch.device("cuda"), method="lora", kernels="auto", compile_layers=False)
    ids = torch.randint(0, 32000, (4, 256))
    batch = {"input_ids": ids.cuda(), "position_ids": torch.arange(256, device="cuda").repeat(4, 1),
             "labels": ids.cuda()}
    matrices = (1 if tied else 2) * 32000 * 256 * 2

    def step(hostw):
        m.zero_grad(set_to_none=True)
        if hostw is not None:
            hostw.prepare(ids, batch["input_ids"])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = causal_lm_loss_sum(m, batch, None, True)
        torch.cuda.synchronize()
        before_bw = torch.cuda.memory_allocated()
        loss.backward()
        if hostw is not None:
            hostw.release_head()
        torch.cuda.synchronize()
        return loss.detach(), before_bw, {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    step(None)  # the first backward pass allocates cuBLAS workspaces (2 x 32 MiB seen on an H200): before measuring
    want_loss, want_mem, want = step(None)
    hostw = host_weights.attach(m, torch.device("cuda"))
    for _ in range(2):
        loss, mem, got = step(hostw)
        assert _rel(loss, want_loss) < 1e-5  # attention's backward kernel may add in another order: not bitwise
        for k in want:
            assert _rel(got[k], want[k]) < 1e-3, k
        assert mem <= want_mem - matrices + 4 * 2 ** 20  # the batch's looked-up rows and small buffers aside
        assert not m.get_input_embeddings().weight.is_cuda and not m.get_output_embeddings().weight.is_cuda
    hostw.restore()
    assert m.get_output_embeddings().weight.is_cuda and _rel(step(None)[0], want_loss) < 1e-5


@pytest.mark.parametrize("compile_layers", [False, True])
def test_kept_attention_cuda(compile_layers, monkeypatch):
    """The recompute reading the attention projections' outputs and the post-attention residual the forward pass
    kept (host copies on the side stream, prefetched with the layer input) instead of recomputing the attention's
    products, and also the attention kernel's output (cuDNN's): loss and gradients as with the full recompute, eager
    and compiled, two steps (nothing left over from one step to the next)."""
    from tunesmith import kernels
    from tunesmith.kernels import compiled, lean
    from tunesmith.models.load import enable_checkpointing
    from tunesmith.train.loss import causal_lm_loss_sum

    ids = torch.randint(0, 4096, (2, 256), device="cuda")
    pos = torch.arange(256, device="cuda").repeat(2, 1)
    res = []
    try:
        for keep, keep_out in (("0", "0"), ("1", "0"), ("1", "1")):
            monkeypatch.setenv("TUNESMITH_KEEP_ATTENTION", keep)
            monkeypatch.setenv("TUNESMITH_KEEP_ATTENTION_OUTPUT", keep_out)
            m = _tiny_qwen("lora")
            enable_checkpointing(m, offload=True)
            kernels.apply(m, device=torch.device("cuda"), method="lora", kernels="auto", compile_layers=compile_layers)
            hooks = sum(hasattr(x, lean.HOOK) for x in m.modules())
            assert hooks == (0 if keep == "0" else 4 * m.config.num_hidden_layers)  # q, k, v, post-attention norm
            # the attention's kernel output kept too: cuDNN's attention works here (else the probe unmarks it)
            outs = sum(getattr(x, lean.KEEP_OUT, False) for x in m.modules())
            assert outs == (m.config.num_hidden_layers if keep_out == "1" else 0)
            for _ in range(2):
                m.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss, _ = causal_lm_loss_sum(m, {"input_ids": ids, "position_ids": pos, "labels": ids}, None, True)
                loss.backward()
            assert compiled.active() == compile_layers
            res.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}))
            compiled.disable()
    finally:
        compiled.disable()
    (l0, g0) = res[0]
    for l1, g1 in res[1:]:
        assert abs(float(l1) - float(l0)) / float(l0) < 1e-3
        for k in g0:
            assert _rel(g1[k], g0[k]) < 3e-2, k


@pytest.mark.parametrize("compile_layers", [False, True])
def test_a_training_step_never_waits_for_the_device_cuda(compile_layers, monkeypatch):
    """The loop's step (batch sent from pinned memory, loss positions chosen on the host, offloaded checkpoints,
    fused loss, clipping, fused AdamW) queues its work without a single host-device sync, so the host prepares the
    next batch while the GPU computes. CUDA's sync debug mode raises on any sync inside the step."""
    from tunesmith import kernels
    from tunesmith.data.packing import Row, collate
    from tunesmith.data.template import Rendered
    from tunesmith.kernels import compiled
    from tunesmith.models.load import enable_checkpointing
    from tunesmith.train.loop import to_device
    from tunesmith.train.loss import causal_lm_loss_sum

    monkeypatch.setenv("TUNESMITH_KEEP_ATTENTION", "1")  # kept attention values too (the tiny model is under the size)
    monkeypatch.setenv("TUNESMITH_KEEP_ATTENTION_OUTPUT", "1")  # and the attention kernel's output
    m = _tiny_qwen("lora")
    enable_checkpointing(m, offload=True)
    dev = torch.device("cuda")
    kernels.apply(m, device=dev, method="lora", kernels="auto", compile_layers=compile_layers)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in ((200, 56), (256,)):  # a packed row and a full one: variable-length attention
        r = Row()
        for k in n:
            ids = torch.randint(0, 4096, (k,), generator=g).tolist()
            r.add(Rendered(ids, [-100] * (k // 2) + ids[k // 2:]))
        rows.append(r)

    def step():
        b = to_device(collate(rows, 0), dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            s, _ = causal_lm_loss_sum(m, b, None, True)
        (s / 100).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return s.detach()

    try:
        for _ in range(2):  # compiling, cuBLAS workspaces, the optimizer's state, pinned blocks: first
            step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            s = step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.isfinite(s)
    finally:
        compiled.disable()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_patched_model_generates_without_autocast_cuda(method):
    """Mid-run samples: the patched (and compiled-for-training) bf16 model, adapters in fp32, generates without
    autocast and picks the tokens PEFT's own layers pick."""
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    from tunesmith import kernels
    from tunesmith.kernels.lora import unpatch_lora

    m = _tiny_qwen(method).eval()
    ids = torch.randint(0, 4096, (1, 12), device="cuda")
    with torch.no_grad():
        want = m(input_ids=ids).logits
        kernels.apply(m, device=torch.device("cuda"), method=method, kernels="auto", compile_layers=False)
        got = m(input_ids=ids).logits
        gen = m.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    unpatch_lora(m)
    assert got.dtype == want.dtype == torch.bfloat16 and gen.shape[1] > ids.shape[1]
    assert _rel(got, want) < 2e-2  # bf16 adapter products here, fp32 ones in PEFT's
