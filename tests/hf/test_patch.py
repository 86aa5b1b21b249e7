"""ouroboros.patch: a patched model computes the same logits as the unpatched one (fp32), on prefill, decode and tree
verification, for tiny random models of every supported family; patch is idempotent and unpatch restores."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():   # Triton on CPU tensors through the interpreter; must precede `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers  # noqa: E402  (a hard dependency: no importorskip)
from ouroboros.hf.attention import (  # noqa: E402
    ATTN_NAME,
    TreeSpec,
    is_patched,
    ouroboros_attention,
    patch,
    unpatch,
)
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

import ouroboros_kernels  # noqa: E402
from ouroboros_kernels import tree  # noqa: E402

BACKENDS = ["reference"] + (["triton"] if "triton" in ouroboros_kernels.available_backends() else [])
VOCAB = 128


def make_config(family: str, kv_heads: int = 2, **over):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                  eos_token_id=None, bos_token_id=None, pad_token_id=0)
    common.update(over)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "mistral":
        return transformers.MistralConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "qwen3":
        return transformers.Qwen3Config(head_dim=16, **common)
    if family == "gemma2":  # softcap 50 on attention logits, alternating sliding/full layers
        return transformers.Gemma2Config(head_dim=16, **common)
    if family == "gemma3":
        return transformers.Gemma3TextConfig(head_dim=16, **common)
    if family == "phi3":
        return transformers.Phi3Config(**common)
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]


def make_model(family, kv_heads=2, seed=0, **over):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(make_config(family, kv_heads, **over)).eval()


def dense_4d(model, visible: torch.Tensor) -> torch.Tensor:
    """(1, 1, T, S) mask in the form the model's own (unpatched) implementation expects."""
    if model.config._attn_implementation == "eager":  # eager adds the mask
        return torch.zeros(visible.shape, dtype=torch.float32).masked_fill(~visible, torch.finfo(torch.float32).min)[
            None, None]
    return visible[None, None]


def tree_inputs(prefix_len: int, parents: list[int], window: int | None = None, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    t = len(parents)
    ids = torch.randint(1, VOCAB, (1, t), generator=gen)
    depths = torch.tensor(tree.depths(parents), dtype=torch.int64)
    anc = tree.ancestor_mask(parents)
    visible = torch.cat([torch.ones(t, prefix_len, dtype=torch.bool), anc], dim=1)
    if window is not None:
        qpos = prefix_len + depths
        kpos = torch.cat([torch.arange(prefix_len), qpos])
        visible &= kpos[None, :] > qpos[:, None] - window
    spec = TreeSpec(prefix_len=prefix_len, mask=tree.pack_mask(anc), depths=depths)
    return ids, (prefix_len + depths)[None], visible, spec


def random_parents(t: int, seed: int = 2) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [-1] + [int(torch.randint(-1, i, (1,), generator=gen)) for i in range(1, t)]


def run_all(model, prompt, tree_ids, tree_pos, visible, spec, patched: bool):
    """Logits of: prefill without cache, prefill into a DynamicCache, 2 decode steps, a tree verification."""
    out = {}
    with torch.no_grad():
        out["prefill"] = model(prompt).logits
        cache = DynamicCache()
        p = prompt.shape[1]
        out["prefill_cache"] = model(input_ids=prompt[:, :-2], cache=cache, use_cache=True).logits
        for i in (2, 1):
            pos = torch.tensor([[p - i]])
            out[f"decode{i}"] = model(input_ids=prompt[:, p - i:p - i + 1], position_ids=pos, cache=cache,
                                      use_cache=True).logits
        kw = dict(ouro_tree=spec) if patched else dict(attention_mask=dense_4d(model, visible))
        out["tree"] = model(input_ids=tree_ids, position_ids=tree_pos, cache=cache, use_cache=True,
                            **({"attention_mask": None} if patched else {}), **kw).logits
    return out


def assert_same(a: dict, b: dict, atol=2e-5):
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=atol, rtol=1e-4, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_patched_logits_match(family, backend):
    model = make_model(family)
    prompt = torch.randint(1, VOCAB, (1, 21), generator=torch.Generator().manual_seed(0))
    tree_ids, tree_pos, visible, spec = tree_inputs(21, random_parents(11))
    want = run_all(model, prompt, tree_ids, tree_pos, visible, spec, patched=False)
    patch(model, backend=backend)
    got = run_all(model, prompt, tree_ids, tree_pos, visible, spec, patched=True)
    assert_same(want, got)
    unpatch(model)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_patched_logits_match_without_gqa(family):
    model = make_model(family, kv_heads=4)
    prompt = torch.randint(1, VOCAB, (1, 19), generator=torch.Generator().manual_seed(3))
    tree_ids, tree_pos, visible, spec = tree_inputs(19, [i - 1 for i in range(6)] + [-1, 6, 6])
    want = run_all(model, prompt, tree_ids, tree_pos, visible, spec, patched=False)
    patch(model, backend=BACKENDS[-1])
    got = run_all(model, prompt, tree_ids, tree_pos, visible, spec, patched=True)
    assert_same(want, got)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3"])
def test_sliding_window_that_cuts(family):
    """Window 6 over a 21-token prompt: prefill, decode (DynamicCache with and without sliding layers) and a tree."""
    model = make_model(family, sliding_window=6)
    prompt = torch.randint(1, VOCAB, (1, 21), generator=torch.Generator().manual_seed(4))
    parents = random_parents(9, seed=5)
    window = 6
    tree_ids, tree_pos, visible, spec = tree_inputs(21, parents, window=window)
    # SDPA/eager ignore the sliding_window kwarg when given a 4-D mask, so the unpatched tree twin needs the window in
    # its mask; that is one mask for all layers only for mistral (gemma2 alternates: see the next test).
    want = run_all(model, prompt, tree_ids, tree_pos, visible, spec, patched=False)
    if family != "mistral":
        want.pop("tree")
    with torch.no_grad():
        cache_cfg = DynamicCache(config=model.config)  # sliding-window cache layers keep only window - 1 entries
        want["slide_prefill"] = model(input_ids=prompt[:, :-1], cache=cache_cfg, use_cache=True).logits
        want["slide_decode"] = model(input_ids=prompt[:, -1:], cache=cache_cfg, use_cache=True).logits
    patch(model, backend=BACKENDS[-1])
    got = run_all(model, prompt, tree_ids, tree_pos, visible, spec, patched=True)
    if family != "mistral":
        got.pop("tree")
    with torch.no_grad():
        cache_cfg = DynamicCache(config=model.config)
        got["slide_prefill"] = model(input_ids=prompt[:, :-1], cache=cache_cfg, use_cache=True).logits
        got["slide_decode"] = model(input_ids=prompt[:, -1:], cache=cache_cfg, use_cache=True).logits
    assert_same(want, got)
    # A tree over a sliding-window cache (which dropped old entries) is refused clearly.
    with torch.no_grad(), pytest.raises(ValueError, match="full history"):
        model(input_ids=tree_ids, position_ids=tree_pos, cache=cache_cfg, use_cache=True, attention_mask=None,
              ouro_tree=TreeSpec(21, spec.mask, spec.depths))


def test_gemma2_tree_with_cutting_window_matches_eager_twin():
    """Gemma2 alternates sliding and full layers: the unpatched twin gets the per-layer mask through a mask dict."""
    model = make_model("gemma2", sliding_window=6)
    prompt = torch.randint(1, VOCAB, (1, 21), generator=torch.Generator().manual_seed(6))
    parents = random_parents(9, seed=7)
    tree_ids, tree_pos, vis_win, spec = tree_inputs(21, parents, window=6)
    _, _, vis_full, _ = tree_inputs(21, parents)
    masks = {"full_attention": dense_4d(model, vis_full), "sliding_attention": dense_4d(model, vis_win)}
    with torch.no_grad():
        cache = DynamicCache()
        model(input_ids=prompt, cache=cache, use_cache=True)
        want = model(input_ids=tree_ids, position_ids=tree_pos, cache=cache, use_cache=True,
                     attention_mask=masks).logits
        patch(model, backend=BACKENDS[-1])
        cache = DynamicCache()
        model(input_ids=prompt, cache=cache, use_cache=True)
        got = model(input_ids=tree_ids, position_ids=tree_pos, cache=cache, use_cache=True, attention_mask=None,
                    ouro_tree=spec).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_identical(family):
    model = make_model(family, seed=1)
    ids = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(8))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        want = model.generate(ids, **kw)
        patch(model, backend=BACKENDS[-1] if family == "gemma2" else "reference")
        got = model.generate(ids, **kw)
    assert torch.equal(got, want)


def test_padded_batch_uses_the_4d_mask():
    model = make_model("qwen2")
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(9))
    am = torch.ones_like(ids)
    am[1, :3] = 0  # left padding on the second row
    with torch.no_grad():
        want = model(ids, attention_mask=am).logits
        patch(model, backend="reference")
        got = model(ids, attention_mask=am).logits
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[1, 3:], want[1, 3:], atol=2e-5, rtol=1e-4)


def test_patch_idempotent_and_unpatch_restores():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for family, before in (("llama", "sdpa"), ("gemma2", "eager")):
        model = make_model(family)
        assert model.config._attn_implementation == before and not is_patched(model)
        assert patch(model, backend="reference") is model
        patch(model)  # again, other backend: still patched, original remembered
        assert is_patched(model) and model.config._attn_implementation == ATTN_NAME
        assert ALL_ATTENTION_FUNCTIONS[ATTN_NAME] is ouroboros_attention
        assert all(m.config._attn_implementation == ATTN_NAME for m in model.modules() if hasattr(m, "q_proj"))
        assert {getattr(m, "_ouroboros_backend", None) for m in model.modules() if hasattr(m, "q_proj")} == {"auto"}
        unpatch(model)
        assert not is_patched(model) and model.config._attn_implementation == before
        assert not any(hasattr(m, "_ouroboros_backend") for m in model.modules())
        unpatch(model)  # no-op
        assert model.config._attn_implementation == before


def test_patched_forward_really_calls_ours(monkeypatch):
    import importlib
    patch_mod = importlib.import_module("ouroboros.hf.attention")   # the attribute ouroboros.patch is the function

    calls = []
    real = patch_mod.ouroboros_kernels.tree_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(patch_mod.ouroboros_kernels, "tree_attention", spy)
    model = patch(make_model("llama"), backend="reference")
    with torch.no_grad():
        model(torch.randint(1, VOCAB, (1, 5)))
    assert calls == ["reference"] * model.config.num_hidden_layers


def test_bad_arguments():
    model = make_model("llama")
    with pytest.raises(ValueError, match="backend"):
        patch(model, backend="nope")
    with pytest.raises(ValueError):
        patch(torch.nn.Linear(2, 2))
    assert not is_patched(model)


def test_tree_over_a_longer_static_cache():
    """A StaticCache holds max_cache_len slots: entries past prefix_len + T are ignored by the tree call."""
    model = make_model("llama")
    prompt = torch.randint(1, VOCAB, (1, 21), generator=torch.Generator().manual_seed(10))
    tree_ids, tree_pos, visible, spec = tree_inputs(21, random_parents(7, seed=11))
    with torch.no_grad():
        cache = DynamicCache()
        model(input_ids=prompt, cache=cache, use_cache=True)
        want = model(input_ids=tree_ids, position_ids=tree_pos, cache=cache, use_cache=True,
                     attention_mask=dense_4d(model, visible)).logits
        patch(model, backend=BACKENDS[-1])
        static = transformers.StaticCache(config=model.config, max_cache_len=64)
        prefill = model(input_ids=prompt, cache=static, use_cache=True).logits  # 4-D mask path (static cache)
        got = model(input_ids=tree_ids, position_ids=tree_pos, cache=static, use_cache=True, attention_mask=None,
                    ouro_tree=spec).logits
        unpatch(model)
        torch.testing.assert_close(prefill, model(prompt).logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------- the fast path's code (StaticRunner)
SLIDING = {"mistral": 6, "gemma2": 6, "gemma3": 6}   # windows that cut inside the prompt and inside the tree


def _chain_tree_logits_unpatched(model, prompt: list[int], decode: int, parents: list[int], tree_ids: list[int]):
    """The unpatched model's logits for: the prompt (prefill), one decode token, then a tree (dense per-layer masks,
    the path ``ModelRunner`` takes on unpatched models)."""
    from ouroboros.hf.masks import dense_tree_masks

    with torch.no_grad():
        prefill = model(torch.tensor([prompt])).logits[0]
        step = model(torch.tensor([prompt + [decode]])).logits[0, -1:]
        cache = DynamicCache()
        n = len(prompt) + 1
        model(input_ids=torch.tensor([prompt + [decode]]), cache=cache, use_cache=True)
        depths = tree.depths(parents)
        masks = dense_tree_masks(model.config.get_text_config(), n, parents, depths, torch.float32, "cpu")
        tree_logits = model(input_ids=torch.tensor([tree_ids]), position_ids=torch.tensor([depths]) + n, cache=cache,
                            use_cache=True, attention_mask=masks).logits[0]
    return prefill, step, tree_logits


def _chain_tree_logits_static(runner, prompt: list[int], decode: int, parents: list[int], tree_ids: list[int]):
    """The same three forwards through ``StaticRunner._logits_impl`` (device interface, no graphs), committing each."""
    def run(ids, depths, bits):
        with torch.no_grad():
            logits = runner._logits_impl(torch.tensor([ids]), torch.tensor(depths), bits)
        runner.commit_device(torch.arange(len(ids)), torch.tensor(len(ids)))
        return logits

    prefill = run(prompt, list(range(len(prompt))), None)
    step = run([decode], [0], torch.ones(1, 1, dtype=torch.bool))
    tree_logits = run(tree_ids, tree.depths(parents), tree.ancestor_mask(parents))
    return prefill, step, tree_logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_static_runner_logits_match_unpatched(family, backend, monkeypatch):
    """The fast path's forward (StaticRunner on CPU tensors, no graphs) patches the model and gives the unpatched
    model's logits for prefill, T=1 decode and a tree, with sliding windows that cut and Gemma2's softcap, passing the
    device length to the kernel and no (T x max_len) mask."""
    import importlib

    from ouroboros.hf.static_runner import StaticRunner

    patch_mod = importlib.import_module("ouroboros.hf.attention")
    over = {"sliding_window": SLIDING[family]} if family in SLIDING else {}
    model = make_model(family, **over)
    gen = torch.Generator().manual_seed(12)
    prompt = torch.randint(1, VOCAB, (21,), generator=gen).tolist()
    parents = [-1, 0, 1, 2, 3, 4, 5, 6, 2, 8, 0]          # a trunk deeper than the window, and branches
    tree_ids = torch.randint(1, VOCAB, (len(parents),), generator=gen).tolist()
    want = _chain_tree_logits_unpatched(model, prompt, 7, parents, tree_ids)

    calls, masks = [], []
    real_kernel, real_attention = patch_mod.ouroboros_kernels.tree_attention, patch_mod.ouroboros_attention

    def spy_kernel(q, k, v, prefix_len, tree_mask, scale=None, **kw):
        calls.append((type(prefix_len), kw.get("window"), kw.get("softcap"), kw.get("backend")))
        return real_kernel(q, k, v, prefix_len, tree_mask, scale, **kw)

    def spy_attention(module, query, key, value, attention_mask, *args, **kwargs):
        masks.append(None if attention_mask is None else tuple(attention_mask.shape))
        return real_attention(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setattr(patch_mod.ouroboros_kernels, "tree_attention", spy_kernel)
    from transformers import AttentionInterface
    if backend != "reference":
        patch(model, backend=backend)
    runner = StaticRunner(model, max_len=64, use_graphs=False)
    assert runner.tree_kernel and is_patched(model)
    AttentionInterface.register(ATTN_NAME, spy_attention)
    try:
        got = _chain_tree_logits_static(runner, prompt, 7, parents, tree_ids)
    finally:
        AttentionInterface.register(ATTN_NAME, real_attention)
    for name, a, b in zip(("prefill", "decode", "tree"), want, got):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")

    layers = model.config.num_hidden_layers
    assert len(calls) == 3 * layers and all(c[0] is torch.Tensor for c in calls)     # the device length, always
    assert {c[3] for c in calls} == {backend}                                        # auto on CPU: the reference
    assert all(m is None or m[-1] == 0 for m in masks)                               # no (T x max_len) mask
    windows = {c[1] for c in calls}
    assert windows == ({None} if family not in SLIDING else {SLIDING[family]} if family != "gemma2"
                       else {None, SLIDING[family]})
    assert {c[2] for c in calls} == ({model.config.attn_logit_softcapping} if family == "gemma2" else {None})
    unpatch(model)


def test_static_runner_dense_fallback_for_layers_that_drop_kwargs():
    """A family whose decoder layers drop extra kwargs (StableLM) keeps its attention: the runner uses dense masks."""
    from ouroboros.hf.static_runner import StaticRunner

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(transformers.StableLmConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)).eval()
    gen = torch.Generator().manual_seed(13)
    prompt = torch.randint(1, VOCAB, (15,), generator=gen).tolist()
    parents = [-1, 0, 1, 1, 3]
    tree_ids = torch.randint(1, VOCAB, (5,), generator=gen).tolist()
    want = _chain_tree_logits_unpatched(model, prompt, 9, parents, tree_ids)
    runner = StaticRunner(model, max_len=48, use_graphs=False)
    assert not runner.tree_kernel and not is_patched(model)
    got = _chain_tree_logits_static(runner, prompt, 9, parents, tree_ids)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="keyword arguments"):   # and ouroboros.patch refuses it, saying why
        patch(model, backend="reference")


def test_tree_kwargs_dropped_on_the_way_are_refused():
    """If a layer gets tree_call_kwargs' empty mask without the tree (its caller dropped ``ouro_tree``), the patched
    attention raises instead of attending over nothing."""
    from ouroboros.hf.attention import tree_call_kwargs

    model = patch(make_model("llama"), backend="reference")
    attn = model.model.layers[0].self_attn
    q = k = v = torch.zeros(1, 4, 3, 16)
    spec = TreeSpec(0, tree.causal_packed_mask(3), torch.arange(3))
    with pytest.raises(ValueError, match="drops extra keyword arguments"):
        ouroboros_attention(attn, q, k[:, :2], v[:, :2], tree_call_kwargs(spec)["attention_mask"])
    unpatch(model)


# ----------------------------------------------------------------------------------------------------------- CUDA
def _gpu_backend() -> str:
    return "cuda" if "cuda" in ouroboros_kernels.available_backends() else "triton"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_cuda_patched_models_match_unpatched_bf16(family, head_dim):
    """The GPU kernel inside patched bf16 models (head_dim 64 and 128): logits equal to the unpatched model's within
    bf16 tolerance, on plain forwards and on the fast path's StaticRunner (prefill, decode, tree)."""
    from ouroboros.hf.static_runner import StaticRunner

    over = dict(head_dim=head_dim, hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2)
    if family == "gemma2":
        over["sliding_window"] = 6
    model = make_model(family, **over).to("cuda", torch.bfloat16)
    gen = torch.Generator().manual_seed(14)
    prompt = torch.randint(1, VOCAB, (40,), generator=gen).tolist()
    parents = random_parents(13, seed=15)
    tree_ids = torch.randint(1, VOCAB, (13,), generator=gen).tolist()
    want = _chain_tree_logits_unpatched(model.float().cpu(), prompt, 5, parents, tree_ids)
    model.to("cuda", torch.bfloat16)
    patch(model, backend=_gpu_backend())
    runner = StaticRunner(model, max_len=128, use_graphs=False)
    got = _chain_tree_logits_static(runner, prompt, 5, parents, tree_ids)
    with torch.no_grad():
        plain = model(torch.tensor([prompt], device="cuda")).logits[0]
    for a, b in zip(want + (want[0],), got + (plain,)):
        torch.testing.assert_close(b.float().cpu(), a, atol=0.15, rtol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_static_runner_fp32_triton_is_token_exact():
    """fp32 on the GPU through the Triton kernel (the CUDA kernel is fp16/bf16 only): same argmax as unpatched."""
    from ouroboros.hf.static_runner import StaticRunner

    model = make_model("qwen3", head_dim=64, hidden_size=256).cuda()
    gen = torch.Generator().manual_seed(16)
    prompt = torch.randint(1, VOCAB, (33,), generator=gen).tolist()
    parents = random_parents(9, seed=17)
    tree_ids = torch.randint(1, VOCAB, (9,), generator=gen).tolist()
    want = _chain_tree_logits_unpatched(model.cpu(), prompt, 3, parents, tree_ids)
    model.cuda()
    patch(model, backend="triton")
    got = _chain_tree_logits_static(StaticRunner(model, max_len=96, use_graphs=False), prompt, 3, parents, tree_ids)
    for a, b in zip(want, got):
        torch.testing.assert_close(b.cpu(), a, atol=1e-3, rtol=1e-3)
        assert torch.equal(b.argmax(-1).cpu(), a.argmax(-1))
