"""ouroboros.patch: a patched model computes the same logits as the unpatched one (fp32), on prefill, decode and tree
verification, for tiny random models of every supported family; patch is idempotent and unpatch restores."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():   # Triton on CPU tensors through the interpreter; must precede `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")

transformers = pytest.importorskip("transformers")

import ouroboros_kernels  # noqa: E402
from ouroboros.patch import ATTN_NAME, TreeSpec, is_patched, ouroboros_attention, patch, unpatch  # noqa: E402
from ouroboros_kernels import tree  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

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


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
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
    patch_mod = importlib.import_module("ouroboros.patch")   # the attribute ouroboros.patch is the function

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
