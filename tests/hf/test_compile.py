"""The torch.compile path of the fast runner (issue 17 item 1): tree attention as one opaque custom op, the patched
tree forward as one graph (no break), one static graph per bucket (no dynamic recompile), compiled == eager, and
``generate(fast=True, compile=True)`` token-exact.

The ``compile`` tests run inductor's C++ backend on this CPU (seconds per graph): they stay on in CI, and share the
engine's shapes (static cache of 4096 slots, tiny Llama) so inductor's FX graph cache serves repeated graphs.
"""
from __future__ import annotations

import functools
import warnings

import ouroboros
import pytest
import torch
from conftest import (
    VOCAB,
    hf_greedy,
    make_model,
    noisy_copy,
    random_prompt,
    repetitive_prompt,
)
from ouroboros.core.tokentree import TokenTree
from ouroboros.hf.static_runner import StaticRunner

import ouroboros_kernels as ok
from ouroboros_kernels import custom_ops, reference

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
BACKENDS = [None] + [b for b in ok.available_backends() if b != "cuda" or torch.cuda.is_available()]
ENGINE_MAX_LEN = 4096          # engine.make_runner's static cache size for short calls: the same compiled shapes


def _parents(t: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, t)]


def _tree(t: int, seed: int) -> TokenTree:
    """A random token tree of exactly ``t`` nodes (distinct tokens, so no path merges; parents before children)."""
    tree = TokenTree()
    tokens = (torch.randperm(VOCAB - 3, generator=torch.Generator().manual_seed(seed))[:t] + 3).tolist()
    for i, parent in enumerate(_parents(t, seed)):
        tree.add_path(parent, [tokens[i]])
    assert len(tree) == t
    return tree


def _graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@pytest.fixture
def fresh_dynamo():
    """No compiled entries left by earlier tests (their guards could match a new runner's step)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---- the custom op ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,t,s,d,window,softcap", [(4, 2, 1, 37, 16, None, None), (6, 3, 13, 77, 24, 9, None),
                                                         (4, 1, 17, 50, 8, None, 20.0), (2, 2, 5, 5, 32, 3, 5.0)])
def test_custom_op_equals_reference(dtype, hq, hkv, t, s, d, window, softcap):
    """The op gives the reference's answer for int and device prefix lengths, a tree mask or none, window, softcap,
    on every backend usable here (automatic choice, and each one by name)."""
    gen = torch.Generator().manual_seed(t * s)
    q = torch.randn(1, hq, t, d, generator=gen).to(dtype)
    k, v = (torch.randn(1, hkv, s, d, generator=gen).to(dtype) for _ in range(2))
    mask = ok.pack_mask(ok.ancestor_mask(_parents(t, s)))
    for prefix in (s - t, torch.tensor(max(0, s - t - 2))):
        for m in (None, mask):
            want = reference.tree_attention(q, k, v, prefix, m, 0.3, window=window, softcap=softcap)
            for backend in BACKENDS:
                got = custom_ops.tree_attention(q, k, v, prefix, m, 0.3, window=window, softcap=softcap,
                                                backend=backend)
                assert got.dtype == dtype and got.shape == q.shape and got.is_contiguous()
                torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda msg: f"{backend}: {msg}")


def test_custom_op_schema_fake_and_compile():
    """``torch.library.opcheck`` (schema, fake vs real, no aliasing) passes, and the op compiles with fullgraph."""
    q = torch.randn(1, 4, 6, 16)
    k, v = torch.randn(1, 2, 21, 16), torch.randn(1, 2, 21, 16)
    mask, prefix = ok.pack_mask(ok.ancestor_mask(_parents(6, 1))), torch.tensor(15)
    torch.library.opcheck(torch.ops.ouroboros_kernels.tree_attention.default,
                          (q, k, v, prefix, 0, mask, 0.25, 4, 30.0, None),
                          test_utils=("test_schema", "test_faketensor"))
    want = reference.tree_attention(q, k, v, prefix, mask, 0.25, window=4, softcap=30.0)
    compiled = torch.compile(lambda *a: custom_ops.tree_attention(*a, 0.25, window=4, softcap=30.0), fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, prefix, mask), want, **TOL[torch.float32])


def test_custom_op_rejects_bad_input_by_name():
    q, k = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 21, 16)
    with pytest.raises(ValueError, match="tree_mask"):
        custom_ops.tree_attention(q, k, k, 3, torch.zeros(5, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="prefix_len"):
        custom_ops.tree_attention(q, k, k, 2.5, None)
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError, match="prefix_len must be"):   # the fake, while tracing
        torch.compile(lambda *a: custom_ops.tree_attention(*a, None), fullgraph=True, backend="aot_eager")(
            q, k, k, torch.tensor([1.0]))


# ---- one graph, no break ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma2"])          # gemma2: window and softcap through the op
def test_patched_tree_forward_is_one_graph(family, fresh_dynamo):
    """Dynamo captures the runner's whole tree forward (HF glue + our attention as one custom-op node per layer) in a
    single graph: the TreeSpec dataclass traces through the HF kwargs, and the backend choice stays out of it."""
    model = make_model(family)
    runner = StaticRunner(model, 96, use_graphs=False)
    tree = _tree(16, 0)
    with torch.inference_mode():
        runner.prefill(random_prompt(5, 11))
        explained = torch._dynamo.explain(runner._forward_impl)(*runner._stage(tree))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    code = explained.graphs[0].code
    assert code.count("ouroboros_kernels.tree_attention") == model.config.num_hidden_layers


def test_causal_path_is_one_graph(fresh_dynamo):
    """A patched model's plain forward (no mask: the bottom-right causal path) also traces with the op, no break."""
    model = ouroboros.patch(make_model("llama"))
    ids = torch.tensor([random_prompt(6, 9)])
    with torch.inference_mode():
        explained = torch._dynamo.explain(lambda x: model(input_ids=x, use_cache=False).logits)(ids)
        compiled = torch.compile(lambda x: model(input_ids=x, use_cache=False).logits, fullgraph=True,
                                 backend="aot_eager")
        torch.testing.assert_close(compiled(ids), model(input_ids=ids, use_cache=False).logits, **TOL[torch.float32])
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert "ouroboros_kernels.tree_attention" in explained.graphs[0].code


# ---- the runner's fallbacks (dynamo only: the backend is swapped for "eager") ---------------------------------------
def _prefilled(model, **kw) -> StaticRunner:
    runner = StaticRunner(model, 96, use_graphs=False, **kw)
    runner.prefill(random_prompt(7, 12))
    return runner


def test_graph_break_recompiles_without_fullgraph(monkeypatch, fresh_dynamo):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    model = make_model("llama")
    tree = _tree(16, 3)
    with torch.inference_mode():
        want = _prefilled(model).forward_tree(tree)
        runner = _prefilled(model, compile=True)
        inner = runner._logits_impl

        def broken(*args):
            torch._dynamo.graph_break()
            return inner(*args)

        runner._logits_impl = broken
        with pytest.warns(UserWarning, match="does not compile as one graph"):
            got = runner.forward_tree(tree)
    assert got == want and runner.compiled and not runner._fullgraph


def test_compile_failure_runs_eager(monkeypatch, fresh_dynamo):
    def failing_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=failing_backend))
    model = make_model("llama")
    tree = _tree(16, 4)
    with torch.inference_mode():
        want = _prefilled(model).forward_tree(tree)
        runner = _prefilled(model, compile=True)
        with pytest.warns(UserWarning, match="failed"):
            got = runner.forward_tree(tree)
        assert runner.forward_tree(tree) == want          # eager from then on, no second warning needed
    assert got == want and not runner.compiled


# ---- inductor (C++ on this CPU) ----------------------------------------------------------------------------------
@pytest.mark.compile
def test_compiled_runner_equals_eager_one_graph_per_bucket(fresh_dynamo):
    """Inductor-compiled steps (argmax and logits) equal eager for T=1, a 16-node tree and a 20-node tree (bucket 32);
    each new size compiles exactly one graph, a size seen before compiles nothing (dynamic=False: no dynamic-shape
    graph takes over the later buckets)."""
    model = make_model("llama")
    prompt = random_prompt(8, 23)
    with torch.inference_mode():
        eager = StaticRunner(model, ENGINE_MAX_LEN, use_graphs=False, compile=False)
        runner = StaticRunner(model, ENGINE_MAX_LEN, use_graphs=False, compile=True)
        for r in (eager, runner):
            r.prefill(prompt)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)       # no fallback warning (graph break, compile failure)
            for t, seed in ((1, 0), (16, 1), (20, 2)):
                tree = _tree(t, seed)
                before = _graphs()
                assert runner.forward_tree(tree) == eager.forward_tree(tree), t
                assert _graphs() - before == 1, f"T={t}: expected one new graph"
            tree = _tree(16, 5)                               # bucket 16 again, another tree: no recompile
            before = _graphs()
            assert runner.forward_tree(tree) == eager.forward_tree(tree)
            assert _graphs() == before
            got = runner.forward_tree_logits(tree)            # the logits step: its own graph for this bucket
            assert _graphs() - before == 1
        torch.testing.assert_close(got, eager.forward_tree_logits(tree), atol=1e-4, rtol=1e-4)
    assert runner.compiled and runner._fullgraph


@pytest.mark.compile
def test_generate_compiled_is_token_exact(fresh_dynamo):
    """``generate(method="ouroboros", fast=True, compile=True)`` greedy equals HF greedy (target and draft runners
    compiled with fullgraph, nothing fell back)."""
    target = make_model("llama")
    draft = noisy_copy(target, 0.02)
    for prompt in (repetitive_prompt(62, 5, 6), random_prompt(61, 17), [9]):
        expected = hf_greedy(target, prompt, 16)
        out = ouroboros.generate(target, draft, torch.tensor([prompt]), max_new_tokens=16, method="ouroboros",
                                 fast=True, compile=True)
        assert out[0, len(prompt):].tolist() == expected, prompt
    for model in (target, draft):
        runner = model._ouroboros_static_runner
        assert runner.compiled and runner._fullgraph
