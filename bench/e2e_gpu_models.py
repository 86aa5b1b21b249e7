"""The model shapes of the GPU benchmark: the real checkpoints' configs written out (no network, no checkpoints),
tiny stand-ins for a CPU smoke run, and random-weight models built from them."""
from __future__ import annotations

import torch

# SPEC §4 anchors (one H200, torch 2.11, transformers 5.17, prompt 512): tok/s, and ms per step of a minimal
# CUDA-graph decoder at T=1 / T=64; copied into the JSON for comparison, never used in a ratio.
SPEC_ANCHORS_H200 = {
    "Qwen2.5-Coder-1.5B": {"hf_eager_tok_s": 29.9, "hf_static_compile_tok_s": 204.6, "graph_decoder_ms": [2.00, 2.38]},
    "Qwen2.5-Coder-0.5B": {"hf_eager_tok_s": 34.8, "hf_static_compile_tok_s": 312.8, "graph_decoder_ms": [1.23, 1.51]},
    "Llama-2-7B": {"hf_eager_tok_s": 44.6, "hf_static_compile_tok_s": 121.9, "graph_decoder_ms": [4.87, 5.33]},
}

# Real configs (HF config.json of each checkpoint), written out so the run needs no network.
QWEN_COMMON = dict(model_type="qwen2", vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0,
                   rms_norm_eps=1e-6, max_position_embeddings=32768, use_sliding_window=False, hidden_act="silu",
                   bos_token_id=151643, eos_token_id=151643)
LLAMA_COMMON = dict(model_type="llama", vocab_size=32000, tie_word_embeddings=False, rope_theta=10_000.0,
                    rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=1, eos_token_id=2)
REAL_PAIRS = {
    "qwen": {
        "target": ("Qwen2.5-Coder-1.5B", dict(QWEN_COMMON, hidden_size=1536, num_hidden_layers=28,
                                              num_attention_heads=12, num_key_value_heads=2,
                                              intermediate_size=8960)),
        "draft": ("Qwen2.5-Coder-0.5B", dict(QWEN_COMMON, hidden_size=896, num_hidden_layers=24,
                                             num_attention_heads=14, num_key_value_heads=2,
                                             intermediate_size=4864)),
    },
    "llama": {
        "target": ("Llama-2-7B", dict(LLAMA_COMMON, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                      num_key_value_heads=32, intermediate_size=11008,
                                      max_position_embeddings=4096)),
        "draft": ("TinyLlama-1.1B", dict(LLAMA_COMMON, hidden_size=2048, num_hidden_layers=22,
                                         num_attention_heads=32, num_key_value_heads=4, intermediate_size=5632,
                                         max_position_embeddings=2048)),
    },
}
TINY_VOCAB = 512
TINY_PAIRS = {
    "qwen": {
        "target": ("tiny-qwen2-target", dict(QWEN_COMMON, vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                             bos_token_id=1, eos_token_id=2)),
        "draft": ("tiny-qwen2-draft", dict(QWEN_COMMON, vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                           bos_token_id=1, eos_token_id=2)),
    },
    "llama": {
        "target": ("tiny-llama-target", dict(LLAMA_COMMON, vocab_size=TINY_VOCAB, hidden_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                             intermediate_size=128, max_position_embeddings=4096)),
        "draft": ("tiny-llama-draft", dict(LLAMA_COMMON, vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                           max_position_embeddings=4096)),
    },
}


def build_model(spec: dict, dtype: torch.dtype, device: torch.device, seed: int):
    """A random-weight causal LM of ``spec`` (a config.json as a dict), on ``device`` in ``dtype``, EOS off."""
    import transformers

    kw = dict(spec)
    model_type = kw.pop("model_type")
    rope_theta = kw.pop("rope_theta")
    cfg_cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}[model_type]
    try:            # transformers 5.x keeps RoPE settings in rope_parameters
        cfg = cfg_cls(**kw, rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    except TypeError:
        cfg = cfg_cls(**kw, rope_theta=rope_theta)
    torch.manual_seed(seed)
    with torch.device(device):
        try:
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        except TypeError:
            model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    model = model.to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def model_info(name: str, spec: dict, model) -> dict:
    return {"name": name, "config": spec, "params": sum(p.numel() for p in model.parameters()),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "dtype": str(next(model.parameters()).dtype)}

