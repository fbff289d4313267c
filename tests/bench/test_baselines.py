"""The benchmark's baselines compute what they claim (no timing here: bench/ measures, tests check).

A ratio in bench/results.md means something only if the PyTorch and ONNX Runtime loops
follow the spec's generation semantics exactly as the C program does; these tests pin
that down against the reference interpreter, and check the roofline's schedules.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from crystalc.ir import interpret
from crystalc.model import model_from_graph
from tests.conftest import FIXTURE_SHAPES, REPO, random_graph, require_module

sys.path.insert(0, str(REPO / "bench"))
import roofline  # noqa: E402
import torch_gen  # noqa: E402
import workload  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("shape", sorted(FIXTURE_SHAPES))
def test_last_position_logits_match_the_interpreter(shape):
    g = random_graph(shape, seed=3)
    model = model_from_graph(g).eval()
    ids = [i % g.config.vocab_size for i in range(3, 3 + g.config.n_ctx)]
    want = interpret.forward(g, ids)
    with torch.inference_mode():
        got = torch_gen.forward_last(model, torch.tensor([ids])).numpy()
        pruned = torch_gen.forward_last_pruned(model, torch.tensor([ids])).numpy()
        every = torch_gen.forward_all(model, torch.tensor([ids])).numpy()
    # cdist's matrix-product distance rounds differently from the direct sum: float32 noise only.
    np.testing.assert_allclose(got, want[-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pruned, want[-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(every, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", sorted(FIXTURE_SHAPES))
def test_kv_cache_forward_matches_recompute(shape):
    g = random_graph(shape, seed=5)
    model = model_from_graph(g).eval()
    t = g.config.n_ctx
    ids = [(7 * i + 1) % g.config.vocab_size for i in range(t)]
    with torch.inference_mode():
        cache = torch_gen.KVCache(model)
        torch_gen._forward_cached(model, cache, ids[:2], 0)
        for p in range(2, t):
            got = torch_gen._forward_cached(model, cache, [ids[p]], p).numpy()
            want = torch_gen.forward_last(model, torch.tensor([ids[:p + 1]])).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            # a recompute of the whole window with the last block's dead rows skipped: the same logits
            pruned = torch_gen._forward_cached(model, torch_gen.KVCache(model), ids[:p + 1], 0, pruned=True).numpy()
            np.testing.assert_allclose(pruned, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", sorted(FIXTURE_SHAPES))
def test_generation_loops_follow_the_spec_window_semantics(shape):
    g = random_graph(shape, seed=11)
    model = model_from_graph(g).eval()
    t, v = g.config.n_ctx, g.config.vocab_size
    n = 3 * t + 2
    for prompt in ([1], [(5 * i + 2) % v for i in range(t + 3)]):
        for shift in sorted({1, 2, t}):
            want = interpret.generate(g, prompt, n, shift)
            assert list(torch_gen.generate_recompute(model, prompt, n, shift)) == want
            assert list(torch_gen.generate_recompute_pruned(model, prompt, n, shift)) == want
            assert list(torch_gen.generate_kv(model, prompt, n, shift)) == want
            assert list(torch_gen.generate_kv(model, prompt, n, shift, pruned=True)) == want
            assert list(torch_gen.generate_full_logits(model, prompt, n, shift)) == want


def test_onnx_export_generates_the_sliding_window(tmp_path):
    require_module("onnx")
    require_module("onnxruntime")
    g = random_graph("d40_h5", seed=2)
    model = model_from_graph(g).eval()
    t = g.config.n_ctx
    prompt = [(3 * i) % g.config.vocab_size for i in range(t)]
    want = interpret.generate(g, prompt, 2 * t, 1)
    for pruned in (False, True):
        sess = torch_gen.ort_session(torch_gen.export_onnx(model, tmp_path / f"m{pruned}.onnx", pruned=pruned))
        assert list(torch_gen.generate_ort_window(sess, t, prompt, 2 * t)) == want, pruned


def test_schedules_cost_what_the_spec_says():
    cfg = workload.CONFIG
    t = cfg.n_ctx
    for k in (1, 2, 32, t):
        forwards, tokens = roofline.schedule("past-kv", cfg, k)
        # The spec: amortised (T-K)/K recomputed positions plus one new position per token.
        assert sum(s for _, s in forwards) / tokens == pytest.approx(t / k)
        assert all(start + s <= t for start, s in forwards)
    assert roofline.schedule("past-kv", cfg, 1) == roofline.schedule("past-recompute", cfg)
    kv, _ = roofline.schedule("window-kv", cfg)
    rec, _ = roofline.schedule("window-recompute", cfg)
    assert [start + s for start, s in kv] == [s for _, s in rec]  # same last positions, same tokens


def test_work_per_token():
    cfg = workload.CONFIG
    g = random_graph(dict(cfg.to_dict()), seed=0)
    f32 = {x.name: x.nbytes for x in g.tensors()}
    w_kv = roofline.work(cfg, f32, "window-kv")
    w_rec = roofline.work(cfg, f32, "window-recompute")
    w_past = roofline.work(cfg, f32, "past-recompute")
    # The head's product dominates a single position; a whole window costs far more FLOPs, not bytes.
    assert 2 * cfg.vocab_size * cfg.d_model < w_kv.flops < 2 * roofline.head_flops(cfg)
    assert w_kv.flops < w_rec.flops < w_past.flops
    assert w_kv.bytes == pytest.approx(w_past.bytes, rel=0.05)
    # Every weight but the embeddings' unused rows is read once a forward.
    head = f32["head.weight"] + f32["head.bias"]
    assert head < w_kv.bytes < sum(f32.values())
    all_logits = roofline.work(cfg, f32, "window-recompute", all_logits=True)
    # Forwards of S = 2..64 positions run S - 1 extra heads each: 32 a token on average.
    assert all_logits.flops - w_rec.flops == pytest.approx(roofline.head_flops(cfg) * 32, rel=1e-9)
    # Dead rows skipped: the window's other 63 positions stop at the (one) block's keys and values.
    pruned = roofline.work(cfg, f32, "past-recompute", pruned=True)
    no_keys, _ = roofline.position_flops(cfg, 0, cfg.n_neurons[0])  # a position's work but the attention's
    skipped = (cfg.n_ctx - 1) * (no_keys - roofline.kv_flops(cfg))
    attention = sum(4 * c * cfg.d_model + 5 * c * cfg.n_heads for c in range(1, cfg.n_ctx))  # c keys seen
    assert w_past.flops - pruned.flops == pytest.approx(skipped + attention, rel=1e-9)
    assert pruned.bytes == w_past.bytes and roofline.work(cfg, f32, "window-kv", pruned=True) == w_kv
    rate, bound = roofline.roofline(w_kv, peak_flops=100e9, peak_bw=50e9)
    assert bound == "memory" and rate == pytest.approx(50e9 / w_kv.bytes)


def test_timed_counts_only_the_tokens_after_skip(monkeypatch):
    # a fake clock that each token advances by 1 s (and the first by 100 s, a warm-up's cost): the
    # time before the generation, or before the skipped tokens, must not be counted
    import sampling

    clock = [1000.0]
    monkeypatch.setattr(sampling.time, "process_time", lambda: clock[0])
    monkeypatch.setattr(sampling.time, "perf_counter", lambda: clock[0])

    def gen():
        for i in range(5):
            clock[0] += 100.0 if i == 0 else 1.0
            yield i

    for skip, want in ((0, 104.0), (1, 4.0), (2, 3.0)):
        toks, cpu, wall = sampling.timed(gen(), skip)
        assert toks == [0, 1, 2, 3, 4] and cpu == wall == want


def test_pytorchs_int8_path_quantizes_the_head_and_stays_close():
    # the int8 baseline: every linear layer, the head among them, on PyTorch's dynamic int8 kernels; its
    # logits within int8 noise of float32's (its own numerics: activations are quantized too)
    g = random_graph("d40_h5", seed=3)
    model = model_from_graph(g).eval()
    int8 = torch_gen.int8_dynamic(model)
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    assert isinstance(int8.head_linear, DynamicInt8Linear) and isinstance(int8.blocks[0].ffn.fc1, DynamicInt8Linear)
    ids = [1, 5, 2, 7]
    want = interpret.forward(g, ids)[-1]
    with torch.inference_mode():
        kv = list(torch_gen.generate_kv(int8, ids, 3))
        cache = torch_gen.KVCache(int8)
        got = torch_gen._forward_cached(int8, cache, ids, 0).numpy()
    assert len(kv) == 3
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max() and np.abs(got - want).max() > 1e-6
    assert not hasattr(model, "head_linear")  # a copy: the float32 model is untouched


@pytest.mark.parametrize("pruned", [False, True])
def test_onnx_runtime_int8_path_has_int8_weights_and_generates(tmp_path, pruned):
    # ONNX Runtime's int8 baseline: every linear layer's weight (the head among them) and the field's values are
    # int8 initializers of one scale each, the codes of the model's own weights; the embeddings stay float32; it
    # generates the requested tokens, its logits within int8 noise of float32's (not equal: its own numerics)
    onnx = require_module("onnx")
    require_module("onnxruntime")
    from onnx import numpy_helper

    g = random_graph("d40_h5", seed=3)
    model = model_from_graph(g).eval()
    t, v = g.config.n_ctx, g.config.vocab_size
    f32 = torch_gen.export_onnx(model, tmp_path / "m.onnx", pruned=pruned)
    q = onnx.load(str(torch_gen.quantize_onnx_int8(f32, tmp_path / "m-int8.onnx")))

    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    # no float product with a constant weight is left
    for node in q.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            assert not any(name in inits for name in node.input), (node.op_type, list(node.input))
    codes = {name[:-len("_quantized")]: a for name, a in inits.items() if name.endswith("_quantized")}
    assert codes and all(a.dtype == np.int8 for a in codes.values())
    deq = []
    for name, a in codes.items():
        scale, zero = inits[name + "_scale"], inits[name + "_zero_point"]
        assert scale.shape == () and zero.shape == () and zero.dtype == np.int8  # one scale a tensor
        deq.append((a.astype(np.float32) - zero) * scale)
    sd = {k: x.detach().numpy() for k, x in model.state_dict().items()}
    blk = "blocks.0."
    wanted = [sd[blk + n + ".weight"].T for n in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj",
                                                  "ffn.fc1", "ffn.fc2")]
    wanted += [sd["head.weight"].T, sd[blk + "field.values"]]
    for w in wanted:
        step = np.abs(w).max() / 127
        assert any(d.shape == w.shape and np.abs(d - w).max() <= 0.51 * step for d in deq), w.shape
        # and the float32 weight is gone (the graph cannot compute with it)
        assert not any(a.dtype == np.float32 and a.shape == w.shape and np.allclose(a, w) for a in inits.values())
    emb = sd["token_embed.weight"]
    assert any(a.dtype == np.float32 and a.shape == emb.shape and np.array_equal(a, emb) for a in inits.values())

    prompt = [(3 * i) % v for i in range(t)]
    ids = np.array([prompt], dtype=np.int64)
    sess = torch_gen.ort_session(tmp_path / "m-int8.onnx")
    n = 2 * t + 1
    toks = list(torch_gen.generate_ort_window(sess, t, prompt, n))
    assert len(toks) == n and all(0 <= x < v for x in toks)
    got = sess.run(None, {"ids": ids})[0][0]
    want = interpret.forward(g, prompt)[-1]
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max() and np.abs(got - want).max() > 1e-6


def test_the_gate_tells_a_wrong_build_from_a_right_one(tmp_path):
    # an audit: a fast but wrong C build was reported with its targets met; run.py now fails on its logits
    import cprog
    import report

    from crystalc.backends.c import BACKEND

    g, other = random_graph("d40_h5", seed=5), random_graph("d40_h5", seed=6)
    BACKEND.emit(g, tmp_path)
    exe = BACKEND.build(tmp_path, cflags="-O2")
    prompt = [1, 2, 3, 4]
    assert cprog.logit_error(exe, model_from_graph(g).eval(), prompt) <= 1e-5
    assert cprog.logit_error(exe, model_from_graph(other).eval(), prompt) > report.LOGIT_TOL
    assert not report._right({"logit_errors": {"f32": 0.5}}, "f32") and report._right({}, "mixed8")
