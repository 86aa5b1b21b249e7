"""The measurement probes (``ouroboros.tuning.probes``) and the lean decoder floor (``bench.lean_decoder``), on CPU."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
import transformers
from ouroboros.hf.runner import cache_kwarg
from ouroboros.tuning.probes import (
    FREE_OPS,
    HostReads,
    OpCounter,
    classify_cuda_events,
    cuda_kernels,
    launch,
    reads_back,
)

from bench import lean_decoder

triton_ok = pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                               reason="Triton runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1")


def _llama(layers: int, dtype=torch.float32, model_type: str = "llama"):
    cls_cfg, cls_model = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                          "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[model_type]
    cfg = cls_cfg(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(layers)
    return cls_model(cfg).eval().to(dtype)


# ----------------------------------------------------------------------------------------------------- host reads
def test_host_reads_catches_every_read():
    x = torch.arange(6.0).view(2, 3)
    with HostReads() as reads:
        x[0, 0].item()
        int(x[1, 2])
        bool(x[0, 1] > 0)
        x.tolist()
        torch.nonzero(x > 2)
        x.numpy()
    assert len(reads.seen) == 6, reads.seen
    assert reads.seen.count("Tensor.tolist") == 1 and reads.seen.count("Tensor.numpy") == 1
    assert sum("nonzero" in s for s in reads.seen) == 1
    assert sum("_local_scalar_dense" in s or "item" in s for s in reads.seen) == 3


def test_host_reads_copy_rule_and_pure_device_ops():
    """A device-to-host copy (``.to("cpu")``, ``host.copy_(device)``) is a read; the rule is checked on meta tensors
    (no GPU here); pure device work is not a read."""
    aten = torch.ops.aten
    dev = torch.empty(3, device="meta")
    host = torch.empty(3)
    assert reads_back(aten._to_copy.default, (dev,), {"device": torch.device("cpu")})
    assert not reads_back(aten._to_copy.default, (dev,), {"dtype": torch.float16})
    assert not reads_back(aten._to_copy.default, (host,), {"device": "meta"})        # an upload
    assert reads_back(aten.copy_.default, (host, dev), {})
    assert not reads_back(aten.copy_.default, (dev, host), {})
    x, idx = torch.randn(4, 8), torch.tensor([2, 0])
    with HostReads() as reads:
        y = (x @ x.T).softmax(-1).argmax(-1)
        z = torch.where(x > 0, x, 0.0).index_select(0, idx)
        x.clone().index_copy_(0, idx, z)
        torch.cat([y[None], y[None]]).sum()
        x.to(torch.float16)
        x.to("cpu")                     # a CPU tensor already: no copy, no read
    assert reads.seen == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a real device-to-host copy)")
def test_host_reads_sees_downloads_on_cuda():
    x = torch.ones(3, device="cuda")
    with HostReads() as reads:
        x.to("cpu")
        torch.empty(3).copy_(x)
        x.sum().item()
    assert len(reads.seen) == 3, reads.seen


# ----------------------------------------------------------------------------------------------------- op counter
def test_op_counter_counts_a_known_function_exactly():
    x, w, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(6)

    def fn():
        y = F.linear(x, w, b)                               # addmm (t is a view)
        y = y.view(30).view(5, 6).t().transpose(0, 1)[:, :4].unsqueeze(0).expand(2, 5, 4)   # views only
        z = torch.relu(y) * 2 + y.sum(-1, keepdim=True)     # relu, mul, sum, add
        first, second = z.split(2, -1)                      # views
        return torch.cat([first, second], 0).contiguous()   # cat (already contiguous: no copy)

    for mode in (torch.no_grad, torch.inference_mode):      # composites reach the mode undecomposed in inference
        with mode(), OpCounter() as counter:
            fn()
        assert dict(counter.counts) == {"addmm": 1, "relu": 1, "mul": 1, "sum": 1, "add": 1, "cat": 1}, mode
        assert counter.total == 6
    with OpCounter() as counter:
        x.reshape(40).reshape(8, 5)          # views
        x.t().reshape(40)                    # a copy
        torch.empty(4), torch.empty_like(x)  # allocation: no kernel
        torch.zeros(4)                       # a fill
    assert dict(counter.counts) == {"clone": 1, "zeros": 1} or dict(counter.counts) == {"_reshape_copy": 1,
                                                                                          "zeros": 1}
    assert {"view", "expand", "permute", "slice", "select", "empty", "t"} <= FREE_OPS


def test_op_counter_fused_opaque_and_launches():
    x, weight = torch.randn(3, 16), torch.ones(16)
    with OpCounter() as counter:
        F.rms_norm(x, (16,), weight, 1e-6)               # one kernel on CUDA (aten._fused_rms_norm)
        with counter.opaque("my_fused_kernel"):
            (x.exp() + 1).log()                          # the reference twin of one fused kernel
            with counter.opaque("inner"):
                x.sin()
        counter.count_launch("external", 2)
        x.cos()
    assert dict(counter.counts) == {"rms_norm": 1, "my_fused_kernel": 1, "external": 2, "cos": 1}
    assert counter.top(1) == [("external", 2)] and counter.total == 5
    with OpCounter() as outer, OpCounter() as inner, launch("wrapper_kernel"):
        x.exp().sin()                                    # one launch in every active counter, ops hidden
    assert dict(outer.counts) == dict(inner.counts) == {"wrapper_kernel": 1}
    with launch("nobody_counts"):                        # no active counter: a no-op
        x.exp()

    holder = type("Holder", (), {"fn": staticmethod(lambda t: (t * 2).exp().sum())})
    with OpCounter() as counter, counter.opaque_function(holder, "fn", "fused_fn"):
        holder.fn(x)
        holder.fn(x)
    assert dict(counter.counts) == {"fused_fn": 2}
    assert holder.fn(torch.zeros(1)).item() == 1.0       # restored


@triton_ok
def test_op_counter_counts_a_triton_launch_once():
    from ouroboros_kernels import ancestor_mask, pack_mask
    from ouroboros_kernels.triton.tree_attention import tree_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = torch.randn(1, 4, 5, 16, device=device), torch.randn(1, 2, 20, 16, device=device), \
        torch.randn(1, 2, 20, 16, device=device)
    mask = pack_mask(ancestor_mask([-1, 0, 1, 1, 3], device))
    prefix = torch.tensor(7, device=device)
    with OpCounter() as counter:
        tree_attention(q, k, v, prefix, mask)
    assert dict(counter.counts) == {"triton:tree_attn_split_kernel": 1}
    with OpCounter(triton=False) as counter:             # without the hook: the launch itself is invisible
        tree_attention(q, k, v, prefix, mask)
    assert "triton:tree_attn_split_kernel" not in counter.counts
    from triton.runtime.jit import JITFunction
    assert JITFunction.run.__name__ == "run" and "probes" not in JITFunction.run.__module__   # hook removed


def test_cuda_event_classification():
    seen = classify_cuda_events([("cudaGraphLaunch", False), ("cudaLaunchKernel", False), ("ampere_gemm", True),
                                 ("ampere_gemm", True), ("Memcpy DtoD (Device -> Device)", True),
                                 ("Memset (Device)", True), ("triton_red_fused", True), ("Event Sync", True)])
    assert (seen.kernels, seen.memcpy, seen.memset, seen.graph_launches, seen.total) == (3, 1, 1, 1, 5)
    assert seen.names["ampere_gemm"] == 2
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            cuda_kernels(lambda: None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the profiler)")
def test_cuda_kernels_counts_a_graph_replay():
    x = torch.randn(64, 64, device="cuda")

    def eager():
        return (x @ x).relu() + 1

    eager()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        eager()
    assert cuda_kernels(eager).kernels == 3
    seen = cuda_kernels(graph.replay, eager=eager)
    assert seen.kernels == 3 and seen.graph_launches <= 1, seen


# ----------------------------------------------------------------------------------------------------- lean decoder
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_lean_decoder_matches_hf(model_type):
    """The floor computes the model's own function: HF's logits for a prefill, then a tree after it."""
    lean = lean_decoder
    model = _llama(2, model_type=model_type)
    dec = lean.LeanDecoder.from_hf(model, max_len=64)
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(ids).logits[0]
        pos = torch.arange(9)
        got = dec.forward(ids[:, :9], pos, pos, dec.tree_mask(torch.ones(9, 9, dtype=torch.bool).tril(), 0), 9,
                          logits=True)
        torch.testing.assert_close(got, ref[:9], atol=1e-4, rtol=1e-4)
        # a tree after the 9 cached tokens: root, then two children of the root (the second is ids[10] again)
        tree = ids[:, 9:12].clone()
        tree[0, 2] = ids[0, 10]
        bits = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
        depth = torch.tensor([0, 1, 1])
        got = dec.forward(tree, 9 + depth, torch.arange(9, 12), dec.tree_mask(bits, 9), 12, logits=True)
        torch.testing.assert_close(got[:2], ref[9:11], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[2], ref[10], atol=1e-4, rtol=1e-4)
        one = dec.forward(ids[:, 9:10], torch.tensor([9]), torch.tensor([9]), None, 10, logits=True)
        torch.testing.assert_close(one[0], ref[9], atol=1e-4, rtol=1e-4)


def test_lean_decoder_kernel_counts_per_layer():
    """On CPU (OpCounter): 14 kernels per layer at T=1, 16 for a tree, 6 per forward (see the module docstring)."""
    lean = lean_decoder
    for t in (1, 16):
        counts = {}
        for layers in (1, 2):
            cfg = dict(model_type="qwen2", vocab_size=128, hidden_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, rms_norm_eps=1e-6,
                       rope_theta=1e6, tie_word_embeddings=True)
            dec = lean.LeanDecoder(cfg, torch.float32, "cpu", max_len=64)
            counts[layers] = dec.kernels_per_forward(t, prefix_len=20)
            assert counts[layers] == lean.expected_kernels(layers, t)
        assert counts[2] - counts[1] == lean.KERNELS_PER_LAYER[1 if t == 1 else "tree"]
        assert dec.step_ms(t, 20, iters=2) > 0
    with pytest.raises(ValueError, match="max_len"):
        dec.step_ms(16, 60)
    with pytest.raises(ValueError, match="model_type"):
        lean.LeanDecoder(dict(cfg, model_type="gpt2"))


def test_hf_llama_kernels_per_layer_against_the_floor(capsys):
    """A plain HF tiny Llama decode step (T=1, dynamic cache, sdpa), counted per layer as layers(2) - layers(1):
    fp32 36 kernels (bf16 40: four casts in the RMSNorms) against the lean decoder's 14 (see the report)."""
    lean = lean_decoder
    per_layer = {}
    for dtype in (torch.float32, torch.bfloat16):
        totals = {}
        for layers in (1, 2):
            model = _llama(layers, dtype)
            ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(1))
            with torch.inference_mode():
                out = model(ids[:, :8], use_cache=True)
                with OpCounter() as counter:
                    model(ids[:, 8:], use_cache=True, **{cache_kwarg(model): out.past_key_values})
            totals[layers] = counter.total
        per_layer[dtype] = totals[2] - totals[1]
    with capsys.disabled():
        print(f"\nHF tiny llama decode step, kernels per layer: fp32 {per_layer[torch.float32]}, bf16 "
              f"{per_layer[torch.bfloat16]}; lean decoder {lean.KERNELS_PER_LAYER[1]}")
    assert per_layer[torch.float32] >= 2 * lean.KERNELS_PER_LAYER[1]
    assert per_layer[torch.bfloat16] > per_layer[torch.float32]
