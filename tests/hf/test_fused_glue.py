"""``ouroboros.hf.fused_glue``: Llama-family models with fused norms, RoPE, qkv and gate/up GEMMs and SwiGLU compute what
the unpatched model computes, compose with ``ouroboros.patch`` and the engine's tree calls, revert exactly, and run
far fewer kernels per decoder layer.

Tiny random fp32 models (conftest). The glue ops run the PyTorch reference on CPU unless "triton" is asked for; the
Triton checks run through the interpreter (TRITON_INTERPRET=1, set here without CUDA) on short inputs, since each
interpreted launch costs ~0.1 s.
"""
from __future__ import annotations

import collections
import copy
import os

import pytest
import torch

if not torch.cuda.is_available():   # Triton on CPU tensors through the interpreter; must precede `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ouroboros  # noqa: E402
import transformers  # noqa: E402
from conftest import hf_greedy, make_model, noisy_copy, random_prompt, repetitive_prompt  # noqa: E402  # noqa: E402
from ouroboros.hf.attention import TreeSpec, tree_call_kwargs  # noqa: E402
from ouroboros.hf.fused_forwards import fused_forward  # noqa: E402
from ouroboros.hf.fused_glue import apply_fused_glue, is_fused, revert_fused_glue  # noqa: E402
from ouroboros.hf.packed_linear import adjacent as packed_adjacent  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from ouroboros_kernels import glue, tree  # noqa: E402

CUDA = torch.cuda.is_available()
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = torch.device("cuda" if CUDA else "cpu")    # where the Triton checks run (CPU: interpreted)
needs_triton = pytest.mark.skipif(not (CUDA or INTERP), reason="triton needs CUDA or TRITON_INTERPRET=1")
FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def fresh(family: str, gqa: bool = True, seed: int = 0, **config):
    """A tiny model of ``family`` (its own copy: tests mutate it), optionally with extra config entries."""
    model = make_model(family, gqa, seed)
    if config:
        cfg = model.config
        for key, value in config.items():
            setattr(cfg, key, value)
        torch.manual_seed(seed)
        model = type(model)(cfg).eval()
        model.generation_config.eos_token_id = None
    return model


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


# ---------------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("family", FAMILIES + ["llama-biases"])
def test_prefill_logits_match(family):
    """Patched logits == unpatched within 1e-5 (batch 2; q/k/v biases in Qwen2, every projection biased in
    "llama-biases"); the forwards really are the fused ones; revert gives back the exact original outputs."""
    model = fresh("llama", attention_bias=True, mlp_bias=True) if family == "llama-biases" else fresh(family)
    ids = torch.tensor([random_prompt(1, 13), random_prompt(2, 13)])
    want = logits(model, ids)
    apply_fused_glue(model)
    assert is_fused(model)
    layer = model.model.layers[0]
    assert layer.forward.__func__ is fused_forward("layer")
    assert layer.self_attn.forward.__func__ is fused_forward("attention")
    assert layer.mlp.forward.__func__ is fused_forward("mlp")
    assert model.model.norm.forward.__func__ is fused_forward("norm")
    torch.testing.assert_close(logits(model, ids), want, atol=1e-5, rtol=1e-5)
    revert_fused_glue(model)
    assert not is_fused(model) and "forward" not in layer.__dict__
    assert torch.equal(logits(model, ids), want)


def test_hidden_states_and_attention_weights_are_still_recorded():
    """transformers' output capture (hooks on decoder layers and attention modules) sees the fused forwards."""
    model = fresh("qwen3")
    model.set_attn_implementation("eager")
    ids = torch.tensor([random_prompt(5, 8)])
    kwargs = dict(output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        want = model(ids, **kwargs)
        got = apply_fused_glue(model)(ids, **kwargs)
    assert len(got.hidden_states) == len(want.hidden_states) and len(got.attentions) == len(want.attentions)
    for g, w in zip(got.hidden_states + got.attentions, want.hidden_states + want.attentions):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("family", FAMILIES)
def test_triton_backend_logits_match(family):
    """The same with the Triton kernels (interpreted on CPU): 2 layers, 5 tokens."""
    model = fresh(family).to(TRITON_DEVICE)
    ids = torch.tensor([random_prompt(3, 5)], device=TRITON_DEVICE)
    want = logits(model, ids)
    apply_fused_glue(model, backend="triton")
    before = glue.launches.total
    got = logits(model, ids)
    assert glue.launches.total - before == 4 * 2 + 1 + (4 if family == "qwen3" else 0)   # + q/k norms
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_generate_and_tree_decoding_are_token_exact(family):
    """HF's own greedy generate (DynamicCache, one token per step) and ouroboros' tree decoding on the static-cache
    fast path (which patches the fused model's attention: fused first, then patch) return exactly the unpatched
    model's greedy tokens; the draft is fused too."""
    target = fresh(family)
    draft = noisy_copy(target, 0.02)
    prompts = [random_prompt(11, 17), repetitive_prompt(12, 5, 5)]
    want = [hf_greedy(target, p, 24) for p in prompts]
    apply_fused_glue(target)
    apply_fused_glue(draft)
    for prompt, expected in zip(prompts, want):
        assert hf_greedy(target, prompt, 24) == expected
        ids = ouroboros.generate(target, draft, torch.tensor([prompt]), max_new_tokens=24, method="ouroboros",
                                 fast=True)
        assert ids[0, len(prompt):].tolist() == expected
    assert ouroboros.is_patched(target) and is_fused(target)


@needs_triton
def test_tree_call_with_triton_kernels_in_either_order():
    """A tree verification forward (``ouro_tree`` travelling through the fused layers' **kwargs to our attention)
    with every kernel on Triton: fused-then-patched and patched-then-fused both match the patched-only model."""
    dev = TRITON_DEVICE
    prompt = random_prompt(21, 6)
    parents = [-1, 0, 0, 1, 2]
    mask = tree.pack_mask(tree.ancestor_mask(parents)).to(dev)
    depths = torch.tensor([0, 1, 1, 2, 2], device=dev)
    tree_ids = torch.tensor([random_prompt(22, 5)], device=dev)

    def tree_logits(model):
        cache = transformers.DynamicCache()
        with torch.no_grad():
            model(torch.tensor([prompt], device=dev), cache=cache, use_cache=True)
            spec = TreeSpec(len(prompt), mask, depths)
            return model(tree_ids, position_ids=(len(prompt) + depths)[None], cache=cache, use_cache=True,
                         **tree_call_kwargs(spec)).logits

    base = fresh("qwen2").to(dev)
    want = tree_logits(ouroboros.patch(copy.deepcopy(base), backend="reference"))
    first_fused = ouroboros.patch(apply_fused_glue(copy.deepcopy(base), backend="triton"), backend="triton")
    first_patched = apply_fused_glue(ouroboros.patch(copy.deepcopy(base), backend="triton"), backend="triton")
    for model in (first_fused, first_patched):
        torch.testing.assert_close(tree_logits(model), want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------ weights
def adjacent(ts) -> bool:
    return packed_adjacent(list(ts))


def test_weights_stay_views_and_follow_conversions():
    """q/k/v and gate/up stay their own Parameters, as adjacent views of one buffer: the state_dict, parameter count
    and in-place loads are unchanged; a dtype conversion splits them and the next forward packs them again; a deep
    copy keeps working."""
    model = fresh("qwen2")
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    count = sum(p.numel() for p in model.parameters())
    apply_fused_glue(model)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    assert [n for n, _ in model.named_parameters()] == names and sum(p.numel() for p in model.parameters()) == count
    assert all(p is params[n] for n, p in model.named_parameters())
    assert adjacent([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert adjacent([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
    assert adjacent([mlp.gate_proj.weight, mlp.up_proj.weight])

    other = fresh("qwen2", seed=5)
    ids = torch.tensor([random_prompt(4, 9)])
    model.load_state_dict(other.state_dict())            # in place: the views see the new values
    torch.testing.assert_close(logits(model, ids), logits(other, ids), atol=1e-5, rtol=1e-5)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(logits(twin, ids), logits(other, ids), atol=1e-5, rtol=1e-5)

    model.to(torch.bfloat16)
    other.to(torch.bfloat16)
    assert not adjacent([mlp.gate_proj.weight, mlp.up_proj.weight])
    got = logits(model, ids)
    assert adjacent([mlp.gate_proj.weight, mlp.up_proj.weight])
    assert mlp.gate_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(got, logits(other, ids), atol=3e-2, rtol=3e-2)
    revert_fused_glue(model)
    assert not adjacent([mlp.gate_proj.weight, mlp.up_proj.weight])
    assert torch.equal(logits(model, ids), logits(other, ids))


def test_gradients_reach_every_part():
    """With autograd recording, the concatenated weights are built by torch.cat, so every part gets its gradient."""
    model = fresh("llama")
    ref = copy.deepcopy(model)
    apply_fused_glue(model)
    ids = torch.tensor([random_prompt(6, 7)])
    model(ids).logits.sum().backward()
    ref(ids).logits.sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------------------------ refusals
def test_refusals():
    gemma = make_model("gemma")
    with pytest.raises(ValueError, match="model_type 'gemma'"):
        apply_fused_glue(gemma)
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        apply_fused_glue(fresh("llama", hidden_act="gelu"))
    with pytest.raises(ValueError, match="unknown backend"):
        apply_fused_glue(fresh("llama"), backend="cuda")
    hooked = fresh("llama")
    hooked.model.layers[1].mlp.up_proj.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="up_proj has forward hooks"):
        apply_fused_glue(hooked)
    assert not is_fused(hooked) and "forward" not in hooked.model.layers[0].__dict__   # refused before any change
    model = fresh("mistral")
    assert apply_fused_glue(apply_fused_glue(model), backend="reference") is model      # idempotent
    assert revert_fused_glue(revert_fused_glue(model)) is model and not is_fused(model)


# -------------------------------------------------------------------------------------------------------- kernel count
_NOT_KERNELS = {torch.ops.aten.detach.default, torch.ops.aten.detach_.default, torch.ops.aten.lift_fresh.default,
                torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default}


class KernelCount(TorchDispatchMode):
    """Counts the kernels one forward launches on CPU tensors: every aten op that computes (not a view, detach or
    bare allocation) counts one, a Triton glue launch counts one, and the tensor ops the Triton interpreter runs
    inside a launch are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not glue.launches.active and not func.is_view and func not in _NOT_KERNELS:
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    def run(self, model, ids) -> int:
        with torch.inference_mode():
            model(ids)                                   # warm: caches, lazy init
            start = glue.launches.total
            with self:
                model(ids)
        self.ops["triton"] += glue.launches.total - start
        return sum(self.ops.values())


def kernels(layers: int, fused: bool) -> tuple[int, collections.Counter]:
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if fused:
        apply_fused_glue(model, backend="triton" if INTERP else "reference")
    counter = KernelCount()
    return counter.run(model, torch.tensor([random_prompt(8, 5)])), counter.ops


def test_kernels_per_layer():
    """Kernels per decoder layer, from the difference between a 4-layer and a 2-layer Llama (SDPA attention, a
    DynamicCache, fp32, inference mode, 5 tokens).

    Fused, 12 per layer: input RMSNorm 1 + qkv GEMM 1 + RoPE 1 + cache writes 2 (DynamicCache concatenates k and v)
    + SDPA 1 + o_proj 1 + add+RMSNorm 1 + gate/up GEMM 1 + SwiGLU 1 + down_proj 1 + residual add 1.
    Unpatched, 36 per layer: each RMSNorm is 6 (pow, mean, add, rsqrt, mul, mul; 8 in bf16 with its casts), RoPE 10
    (per q and k: mul, neg, cat, mul, add), 7 GEMMs, SiLU and mul, two residual adds, cache writes 2, SDPA 1.
    Outside the layers a forward runs 11 more (embedding, position ids, rotary cos/sin 6, final norm, lm_head), so the
    4-layer model runs 59 kernels, under 15 per layer, against 160 unpatched (whose final norm is 6). CPU tensors
    only: without the Triton interpreter the glue runs on the reference and only the unpatched count is checked."""
    fused4, ops = kernels(4, fused=True)
    fused2, _ = kernels(2, fused=True)
    plain4, plain_ops = kernels(4, fused=False)
    plain2, _ = kernels(2, fused=False)
    per_layer, plain_per_layer = (fused4 - fused2) // 2, (plain4 - plain2) // 2
    assert plain_per_layer == 36 and plain4 == 36 * 4 + 16, plain_ops
    if INTERP:
        assert per_layer == 12, ops
        assert fused4 == 12 * 4 + 11 and fused4 < 15 * 4, ops
        assert ops["triton"] == 4 * 4 + 1 and ops["linear"] == 4 * 4 + 1 and ops["scaled_dot_product_attention"] == 4
