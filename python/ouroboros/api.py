"""``ouroboros.generate``: lossless greedy or sampled generation with a chosen proposal method (batch size 1)."""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from transformers import LogitsProcessorList

from ouroboros.core.config import DRAFT_METHODS, METHODS, resolve_config
from ouroboros.core.guard import acquire
from ouroboros.core.sampling import make_sampler
from ouroboros.decoding.loop import decode
from ouroboros.decoding.stats import GenerationStats
from ouroboros.drafting.gpu_pool import GpuPhrasePool
from ouroboros.drafting.pool import PhrasePool
from ouroboros.hf.support import check_model as _check_model

__all__ = ["generate", "stream"]


def _vocab_size(model) -> int:
    emb = model.get_output_embeddings()
    if emb is None:
        return model.config.get_text_config().vocab_size
    return getattr(emb, "out_features", None) or emb.weight.shape[0]   # also a quantized draft's lm_head


def _prompt_list(input_ids) -> list[int]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise ValueError(f"batch size must be 1, got input_ids of shape {tuple(input_ids.shape)}")
            input_ids = input_ids[0]
        elif input_ids.dim() != 1:
            raise ValueError(f"input_ids must be (1, L) or (L,), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        tokens = input_ids.tolist()
    else:
        tokens = list(input_ids)
        if tokens and isinstance(tokens[0], (list, tuple)):
            if len(tokens) != 1:
                raise ValueError(f"batch size must be 1, got {len(tokens)} sequences")
            tokens = list(tokens[0])
    if not tokens:
        raise ValueError("the prompt is empty: input_ids needs at least one token")
    return [int(t) for t in tokens]


def _eos_set(target, eos_token_id) -> frozenset[int]:
    if eos_token_id is None:
        gen = getattr(target, "generation_config", None)
        eos_token_id = getattr(gen, "eos_token_id", None)
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset([eos_token_id])
    return frozenset(int(t) for t in eos_token_id)


def _prepare(target, draft, input_ids, max_new_tokens, method, pool, params, pool_device=None):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    _check_model(target, "target")
    prompt = _prompt_list(input_ids)
    vocab = _vocab_size(target)
    if max(prompt) >= vocab or min(prompt) < 0:
        raise ValueError(f"input_ids hold token ids outside the target vocabulary [0, {vocab})")
    if method in DRAFT_METHODS:
        if draft is None:
            raise ValueError(f"method {method!r} needs a draft model")
        _check_model(draft, "draft")
        if _vocab_size(draft) != vocab:
            raise ValueError(f"draft and target vocabularies differ: draft has {_vocab_size(draft)} tokens, "
                             f"target has {vocab}; they must share one tokenizer")
        if draft.device != target.device:
            raise ValueError(f"draft is on {draft.device} but target is on {target.device}; put both on one device")
    if pool is not None and params.get("ngram") is None:
        params["ngram"] = pool.ngram
    cfg = resolve_config(target.device, method, **params)
    uses_pool = method in ("lookahead", "prompt_lookup", "ouroboros")
    if method == "ouroboros" and pool is None and pool_device is None and target.device.type == "cuda":
        pool_device = target.device              # the CUDA default: drafting and the pool on the device
    if uses_pool:
        if pool is None and pool_device is not None:
            pool = GpuPhrasePool(ngram=cfg.ngram, guess_set=cfg.pool_capacity, vocab_size=vocab, device=pool_device)
        elif pool is None:
            pool = PhrasePool(ngram=cfg.ngram, guess_set=cfg.pool_capacity)
        elif pool.ngram != cfg.ngram:
            raise ValueError(f"the pool holds {pool.ngram}-grams but ngram={cfg.ngram} was asked for")
    return prompt, cfg, (pool if uses_pool else None)


def stream(target, draft=None, input_ids=None, *, max_new_tokens: int, method: str = "ouroboros",
           pool: PhrasePool | None = None, gamma: int | None = None, ngram: int | None = None,
           window: int | None = None, guess_set: int | None = None, topk: int | None = None,
           eos_token_id: int | Sequence[int] | None = None, fast: bool | None = None,
           pool_device: str | torch.device | None = None, adaptive: bool | None = None,
           compile: bool | None = None, stats: GenerationStats | None = None, do_sample: bool = False,
           temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
           min_p: float | None = None, repetition_penalty: float | None = None,
           generator: torch.Generator | None = None, logits_processor: LogitsProcessorList | None = None,
           draft_sampling: bool = False, scores_out: list | None = None) -> Iterator[list[int]]:
    """Like :func:`generate`, but yield the new tokens as each cycle emits them (fills ``stats`` if given)."""
    params = dict(gamma=gamma, ngram=ngram, window=window, guess_set=guess_set, topk=topk, adaptive=adaptive)
    prompt, cfg, pool = _prepare(target, draft, input_ids, max_new_tokens, method, pool, params, pool_device)
    if scores_out is not None and not isinstance(scores_out, list):
        raise ValueError(f"scores_out must be a list or None, got {type(scores_out).__name__}")
    sampler = make_sampler(do_sample, temperature, top_k, top_p, min_p, repetition_penalty, logits_processor,
                           generator, keep_scores=scores_out is not None)
    stats = stats if stats is not None else GenerationStats()
    stats.method, stats.config = method, cfg.as_dict()
    # one call per model/pool at a time (ouroboros.core.guard)
    with acquire(target, draft if method in DRAFT_METHODS else None, pool), torch.inference_mode():
        yield from decode(target, draft, prompt, method=method, cfg=cfg, max_new_tokens=max_new_tokens,
                          eos=_eos_set(target, eos_token_id), pool=pool, stats=stats,
                          fast=(target.device.type == "cuda") if fast is None else fast, compile=compile,
                          sampler=sampler, draft_sampling=draft_sampling, scores_out=scores_out)


def generate(target, draft=None, input_ids=None, *, max_new_tokens: int, method: str = "ouroboros",
             pool: PhrasePool | None = None, gamma: int | None = None, ngram: int | None = None,
             window: int | None = None, guess_set: int | None = None, topk: int | None = None,
             eos_token_id: int | Sequence[int] | None = None, return_stats: bool = False,
             on_tokens: Callable[[list[int]], None] | None = None, fast: bool | None = None,
             pool_device: str | torch.device | None = None, adaptive: bool | None = None,
             compile: bool | None = None, do_sample: bool = False, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             repetition_penalty: float | None = None, generator: torch.Generator | None = None,
             logits_processor: LogitsProcessorList | None = None, draft_sampling: bool = False,
             scores_out: list | None = None):
    """Generation that is lossless (batch size 1): greedy returns exactly the target's own greedy tokens; sampling
    (``do_sample=True``) returns text distributed exactly as plain sampling from the target with the same processors.

    Parameters
    ----------
    target, draft : HF causal LMs sharing one tokenizer (``draft`` needed for "speculative" and "ouroboros").
    input_ids : (1, L) or (L,) token ids, L >= 1.
    method : "greedy" | "speculative" | "lookahead" | "prompt_lookup" | "ouroboros".
    pool : a :class:`PhrasePool` to use and keep warm across calls (history reuse); a fresh one if None.
    gamma, ngram, window, guess_set, topk : SPEC §2 parameters; None picks the device default (``ouroboros.core.config``).
    adaptive : draft length follows acceptance, starting at ``gamma`` (default True; False keeps it fixed).
    eos_token_id : stop after this token (or any of these); default: the target's ``generation_config``.
    on_tokens : called with each cycle's new tokens (streaming).
    fast : the static-cache step path with CUDA graphs per tree-size bucket (default: on for CUDA models).
    compile : with ``fast``, run the tree forwards through ``torch.compile`` inside the graphs (default: the
        ``OUROBOROS_COMPILE`` environment variable, off unless it is 1). The first call per tree size compiles.
    pool_device : keep a fresh pool on this device (a :class:`GpuPhrasePool`; default for "ouroboros" on a CUDA
        model without ``pool``); "ouroboros" then drafts on the device, and with ``fast`` and greedy decoding runs
        whole cycles there (:class:`ouroboros.decoding.device_cycle.DeviceCycle`: one CUDA graph and one small read per
        cycle). Passing a ``GpuPhrasePool`` as ``pool`` does the same (and its cycles' graphs are reused by later
        calls with the same pool).
    do_sample, temperature, top_k, top_p, min_p, repetition_penalty : HF's names and meaning. None takes HF's
        default (temperature 1.0, top_k 50, top_p 1.0, min_p None, repetition_penalty 1.0), except when
        ``logits_processor`` is given: then a None argument adds no processor (pass HF's prepared list with the
        sampling arguments left None and nothing is applied twice). ``do_sample=False`` or ``temperature=0``:
        greedy, with the processors (repetition penalty, ``logits_processor``) applied before the argmax; the
        sampling-only arguments are then ignored with a warning, as HF does. Processors run per verified node on
        that node's own token history, in HF's order: repetition penalty, ``logits_processor``, the warpers.
    generator : draws come from it (same seed, same output); default: torch's global RNG.
    logits_processor : a ``LogitsProcessorList`` applied to every step's scores (history-dependent ones included).
    draft_sampling : method "speculative" only: the draft samples its tokens from its own processed distribution q
        (accepted with min(1, r/q)) instead of proposing its greedy tokens. Ignored when greedy.
    scores_out : a list that receives, per emitted token, ``(processed_scores, raw_logits)``, each (1, V) float32
        (what HF's ``output_scores`` / ``output_logits`` return).

    Returns
    -------
    LongTensor (1, L + n) on the target's device, n <= max_new_tokens, ending at the first EOS if one was produced;
    with ``return_stats=True`` a tuple ``(ids, GenerationStats)``.
    Raises ``ValueError`` naming the problem for bad input (batch > 1, empty prompt, vocab mismatch, top_p outside
    (0, 1], temperature < 0, ...).
    """
    prompt = _prompt_list(input_ids)      # validated once; stream takes the plain list
    stats = GenerationStats()
    out: list[int] = []
    for new in stream(target, draft, prompt, max_new_tokens=max_new_tokens, method=method, pool=pool,
                      gamma=gamma, ngram=ngram, window=window, guess_set=guess_set, topk=topk,
                      eos_token_id=eos_token_id, fast=fast, pool_device=pool_device, adaptive=adaptive,
                      compile=compile, stats=stats, do_sample=do_sample, temperature=temperature, top_k=top_k,
                      top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, generator=generator,
                      logits_processor=logits_processor, draft_sampling=draft_sampling, scores_out=scores_out):
        out.extend(new)
        if on_tokens is not None:
            on_tokens(new)
    ids = torch.tensor([prompt + out], dtype=torch.long, device=target.device)
    return (ids, stats) if return_stats else ids
