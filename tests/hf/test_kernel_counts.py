"""Kernels per forward of the fast path vs the lean decoder floor (issue 17 item 1), counted on CPU.

On a GPU the profiler counts kernels (bench.e2e_gpu); here :func:`ouroboros.tuning.probes.count_kernels` counts the aten
ops that would each launch one (our kernels' reference twins once per call), on models with the real pair's layer
and head counts but a tiny width. The target: a fused fast-path forward launches at most 1.3x the kernels of a
hand-written decoder (bench.lean_decoder: static KV, fused q/k/v and gate/up, one attention call per layer), and
the unfused HF glue 2.4-2.6x. Measured here (T=1 / T=64): target fused 363 / 391 kernels vs lean 398 / 454 vs
unfused 1040 / 1068; draft fused 315 / 339 vs lean 342 / 390 vs unfused 896 / 920.
"""
from __future__ import annotations

import pytest
import torch
from ouroboros.hf.static_runner import StaticRunner
from ouroboros.tuning.probes import count_kernels
from transformers import Qwen2Config, Qwen2ForCausalLM

from bench.lean_decoder import LeanDecoder

# the real pair's depth and heads (Qwen2.5-Coder-1.5B / -0.5B), head_dim 8
PAIR = {"target": dict(num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, hidden_size=96),
        "draft": dict(num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, hidden_size=112)}


def _model(shape: dict):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, intermediate_size=64, max_position_embeddings=512, rope_theta=1e6,
                      tie_word_embeddings=True, **shape)
    return Qwen2ForCausalLM(cfg).eval()


def _runner_kernels(runner: StaticRunner, t: int) -> int:
    ids = torch.randint(3, 128, (1, t))
    depths = torch.arange(t)
    bits = torch.ones(t, t, dtype=torch.bool).tril()
    with torch.inference_mode():
        runner.prefill(list(range(3, 67)))
        runner.forward_device(ids, depths, bits)
        return count_kernels(lambda: runner.forward_device(ids, depths, bits), runner.device)["total"]


@pytest.mark.parametrize("role", ["target", "draft"])
def test_fused_fast_path_is_within_1_3x_of_the_lean_decoder(role):
    model = _model(PAIR[role])
    lean = LeanDecoder.from_hf(model, max_len=512)
    fused = StaticRunner(model, 512, use_graphs=False, glue=True)
    assert fused.glue
    for t in (1, 64):
        floor = lean.kernels_per_forward(t, prefix_len=64)
        ours = _runner_kernels(fused, t)
        fused.reset()
        assert ours <= 1.3 * floor, (role, t, ours, floor)


def test_unfused_glue_is_what_the_fusion_removes():
    """The same forward without the fused glue launches far more kernels (HF's RMSNorm, rotate_half RoPE, SiLU*up,
    separate q/k/v and gate/up GEMMs): the count the fusion is for."""
    model = _model(PAIR["draft"])
    lean = LeanDecoder.from_hf(model, max_len=512)
    plain = StaticRunner(model, 512, use_graphs=False, glue=False)
    ours = _runner_kernels(plain, 1)
    assert ours >= 2 * lean.kernels_per_forward(1, prefix_len=64)
