"""``ouroboros.generate``: lossless greedy or sampled generation with a chosen proposal method, one prompt or a batch.

A batch is a (B, L) tensor, left-padded as Hugging Face expects of decoder-only models (with ``attention_mask``), or a
list of prompts of different lengths; the result is (B, L + n) with rows that stopped early right-padded with the pad
id (the generation config's ``pad_token_id``, else its EOS), as HF's batched ``generate`` returns it."""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from transformers import LogitsProcessorList

from ouroboros.core.config import DRAFT_METHODS, METHODS, default_draft_sampling, resolve_config
from ouroboros.core.guard import acquire
from ouroboros.core.sampling import make_sampler
from ouroboros.decoding.batch import (
    BatchStats,
    decode_batch,
    decode_batch_on_device,
    runs_on_device,
)
from ouroboros.decoding.loop import decode
from ouroboros.decoding.stats import GenerationStats
from ouroboros.drafting.gpu_pool import GpuPhrasePool
from ouroboros.drafting.pool import PhrasePool
from ouroboros.hf.support import check_model as _check_model
from ouroboros.tuning.batch_plan import default_batch_plan

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


def is_batch(input_ids) -> bool:
    """True for more than one prompt (or none): a (B, L) tensor with B != 1, or a list of B != 1 token lists."""
    if isinstance(input_ids, torch.Tensor):
        return input_ids.dim() == 2 and input_ids.shape[0] != 1
    items = list(input_ids) if input_ids is not None else []
    return bool(items) and isinstance(items[0], (list, tuple, torch.Tensor)) and len(items) != 1


def batch_prompts(input_ids, attention_mask=None) -> tuple[list[list[int]], list[list[int]]]:
    """The prompts of a batch, padding stripped, and each row's padding (kept in the result).

    ``input_ids``: (B, L) integer tensor, left-padded when ``attention_mask`` (B, L) has zeros, or a list of B token
    lists of any lengths. Raises ValueError for B = 0, a mask of another shape, right padding (a zero after a one), an
    all-padding row or an empty prompt."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2 or input_ids.shape[0] == 0:
            raise ValueError(f"a batch of input_ids must be (B, L) with B >= 1, got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        mask = torch.ones_like(input_ids) if attention_mask is None else torch.as_tensor(attention_mask)
        if tuple(mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(input_ids.shape)}")
        rows, pads = [], []
        for i, (ids, m) in enumerate(zip(input_ids.tolist(), mask.tolist())):
            n_pad = len(m) - sum(1 for v in m if v)
            if any(m[:n_pad]) or not all(m[n_pad:]):
                raise ValueError(f"row {i} of attention_mask is not left-padded (decoder-only models need the "
                                 f"padding on the left: zeros first, then ones), got {m}")
            if n_pad == len(m):
                raise ValueError(f"row {i} is all padding: every prompt needs at least one token")
            rows.append(ids[n_pad:])
            pads.append(ids[:n_pad])
        return rows, pads
    if attention_mask is not None:
        raise ValueError("attention_mask goes with a (B, L) tensor; a list of prompts needs no padding")
    rows = [list(p.tolist() if isinstance(p, torch.Tensor) else p) for p in input_ids]
    if not rows:
        raise ValueError("the batch is empty: input_ids needs at least one prompt")
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
    width = max(len(r) for r in rows)
    return [[int(t) for t in r] for r in rows], [[None] * (width - len(r)) for r in rows]


def pad_token(target, eos_token_id) -> int:
    """The id a batch pads with: the generation config's ``pad_token_id``, else the (first) EOS (``eos_token_id`` if
    given, else the generation config's); ValueError if neither is set."""
    gen = getattr(target, "generation_config", None)
    pad = getattr(gen, "pad_token_id", None)
    if pad is None:
        eos = eos_token_id if eos_token_id is not None else getattr(gen, "eos_token_id", None)
        pad = (eos[0] if eos else None) if isinstance(eos, (list, tuple)) else eos
    if pad is None:
        raise ValueError("a batch needs a pad id to pad its rows with: set generation_config.pad_token_id or pass "
                         "eos_token_id")
    return int(pad)


def _eos_set(target, eos_token_id) -> frozenset[int]:
    if eos_token_id is None:
        gen = getattr(target, "generation_config", None)
        eos_token_id = getattr(gen, "eos_token_id", None)
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset([eos_token_id])
    return frozenset(int(t) for t in eos_token_id)


def _prepare(target, draft, prompts: list[list[int]], max_new_tokens, method, pool, params, pool_device=None,
             host_drafting: bool = False):
    """The resolved config and pool for a call on ``prompts`` (ValueError naming any bad input); ``host_drafting``:
    the call needs the host pool (a sampling draft)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    _check_model(target, "target")
    vocab = _vocab_size(target)
    if any(max(p) >= vocab or min(p) < 0 for p in prompts):
        raise ValueError(f"input_ids hold token ids outside the target vocabulary [0, {vocab})")
    context = getattr(target.config.get_text_config(), "max_position_embeddings", None)
    if len(prompts) > 1 and context and max(len(p) for p in prompts) > context:
        raise ValueError(f"a prompt of {max(len(p) for p in prompts)} tokens is longer than the target's context "
                         f"of {context} positions")
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
    host_only = cfg.model_free > 0 or host_drafting             # pool features of the host loop alone
    if method == "ouroboros" and pool is None and pool_device is None and target.device.type == "cuda" \
            and not host_only:
        pool_device = target.device              # the CUDA default: drafting and the pool on the device
    if uses_pool:
        if pool is None and pool_device is not None:
            pool = GpuPhrasePool(ngram=cfg.ngram, guess_set=cfg.pool_capacity, vocab_size=vocab, device=pool_device,
                                 scored=cfg.scored)
        elif pool is None:
            pool = PhrasePool(ngram=cfg.ngram, guess_set=cfg.pool_capacity, scored=cfg.scored)
        elif pool.ngram != cfg.ngram:
            raise ValueError(f"the pool holds {pool.ngram}-grams but ngram={cfg.ngram} was asked for")
    if host_only and not isinstance(pool, PhrasePool | None):
        raise ValueError("model_free and draft_sampling need the host PhrasePool (the device cycle runs neither): "
                         "pass pool_device=None and no GpuPhrasePool")
    if cfg.recycle and len(prompts) > 1 and isinstance(pool, GpuPhrasePool):
        raise ValueError("recycle with a device pool runs on the single-prompt device cycle; a batch recycles "
                         "with the host PhrasePool: pass pool_device=None and no GpuPhrasePool")
    return cfg, (pool if uses_pool else None)


def _batch_on_device(asked: bool | None, method: str, cfg, pool, sampler, stop_rows) -> bool:
    """Whether a batch runs the batched device cycle; ValueError when ``fast=True`` was asked for a batch it cannot
    run (rather than silently running something else)."""
    ok = stop_rows is None and runs_on_device(method, cfg, pool, sampler)
    if asked and not ok:
        raise ValueError("fast=True with a batch runs the batched device cycle: greedy method='ouroboros' with a "
                         "device pool (pool_device or a GpuPhrasePool), window=0, guess_set >= 1, no processors "
                         "and no stop_rows; other batches run the host loop (fast=False)")
    return ok


def _check_stream_args(rows: int, scores_out, compile, row_logits_processors, stop_rows, logits_processor) -> None:
    """ValueError for :func:`stream` arguments that do not fit a call on ``rows`` prompts."""
    if scores_out is not None and not isinstance(scores_out, list):
        raise ValueError(f"scores_out must be a list or None, got {type(scores_out).__name__}")
    if rows > 1 and (scores_out is not None or compile):
        raise ValueError("compile=True and scores_out need one prompt (a batch runs without them)")
    if (row_logits_processors is not None or stop_rows is not None) and rows == 1:
        raise ValueError("row_logits_processors and stop_rows are for a batch of several prompts")
    if row_logits_processors is not None and (len(row_logits_processors) != rows or logits_processor):
        raise ValueError(f"row_logits_processors needs one list per row ({rows}) and no logits_processor")


def stream(target, draft=None, input_ids=None, attention_mask=None, *, max_new_tokens: int, method: str = "ouroboros",
           pool: PhrasePool | None = None, gamma: int | None = None, ngram: int | None = None,
           window: int | None = None, guess_set: int | None = None, topk: int | None = None,
           eos_token_id: int | Sequence[int] | None = None, fast: bool | None = None,
           pool_device: str | torch.device | None = None, adaptive: bool | None = None,
           scored: bool | None = None, model_free: float | None = None, recycle: int | None = None,
           compile: bool | None = None, stats: GenerationStats | None = None, do_sample: bool = False,
           temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
           min_p: float | None = None, repetition_penalty: float | None = None,
           generator: torch.Generator | None = None, logits_processor: LogitsProcessorList | None = None,
           draft_sampling: bool | None = None, scores_out: list | None = None,
           row_logits_processors: Sequence[LogitsProcessorList] | None = None,
           stop_rows: set[int] | None = None) -> Iterator[list[int]]:
    """Like :func:`generate`, but yield the new tokens as each cycle emits them (fills ``stats`` if given).

    One prompt: yields lists of new tokens. A batch (see :func:`generate`): yields ``(row, tokens)`` pairs, each
    row's pieces in order, the rows interleaved as their cycles end; ``stats`` should then be a :class:`BatchStats`.
    Batch only: ``row_logits_processors`` gives each row its own processor list (instead of ``logits_processor``);
    rows the caller adds to ``stop_rows`` while iterating end at their next forward (their tokens so far stand).
    """
    batch = is_batch(input_ids) or attention_mask is not None
    prompts = batch_prompts(input_ids, attention_mask)[0] if batch else [_prompt_list(input_ids)]
    params = dict(gamma=gamma, ngram=ngram, window=window, guess_set=guess_set, topk=topk, adaptive=adaptive,
                  scored=scored, model_free=model_free, recycle=recycle)
    if draft_sampling is None:
        device_pool = isinstance(pool, GpuPhrasePool) or pool_device is not None
        draft_sampling = do_sample and default_draft_sampling(target.device, method, device_pool)
    cfg, pool = _prepare(target, draft, prompts, max_new_tokens, method, pool, params, pool_device,
                         host_drafting=draft_sampling and do_sample and method == "ouroboros")
    _check_stream_args(len(prompts), scores_out, compile, row_logits_processors, stop_rows, logits_processor)
    many = len(prompts) > 1
    sampling = (do_sample, temperature, top_k, top_p, min_p, repetition_penalty)
    sampler = make_sampler(*sampling, logits_processor, generator, keep_scores=scores_out is not None)
    if row_logits_processors is not None:
        sampler = [make_sampler(*sampling, procs, generator) for procs in row_logits_processors]
    eos = _eos_set(target, eos_token_id)
    plan = None
    if many and method in DRAFT_METHODS and gamma is None and adaptive is None:   # the draft length for this B
        plan = default_batch_plan(target.device.type, len(prompts), cfg)
        method, cfg = (method, plan.config) if plan.speculate else ("greedy", cfg)
        draft_sampling = draft_sampling and plan.speculate
    asked, fast = fast, (target.device.type == "cuda") if fast is None else fast
    on_device = many and fast and _batch_on_device(asked, method, cfg, pool, sampler, stop_rows)
    # one call per model/pool at a time (ouroboros.core.guard)
    with acquire(target, draft if method in DRAFT_METHODS else None, pool), torch.inference_mode():
        if many:
            stats = stats if stats is not None else BatchStats()
            stats.plan = plan
        if on_device:
            yield from decode_batch_on_device(target, draft, prompts, cfg=cfg, max_new_tokens=max_new_tokens,
                                              eos=eos, pool=pool, stats=stats)
            return
        if many:
            yield from decode_batch(target, draft, prompts, method=method, cfg=cfg, max_new_tokens=max_new_tokens,
                                    eos=eos, pool=pool.host if isinstance(pool, GpuPhrasePool) else pool,
                                    stats=stats, sampler=sampler, draft_sampling=draft_sampling,
                                    stop_rows=stop_rows)
            return
        stats = stats if stats is not None else GenerationStats()
        stats.method, stats.config = method, cfg.as_dict()
        yield from decode(target, draft, prompts[0], method=method, cfg=cfg, max_new_tokens=max_new_tokens,
                          eos=eos, pool=pool, stats=stats,
                          fast=fast, compile=compile,
                          sampler=sampler, draft_sampling=draft_sampling, scores_out=scores_out)


def generate(target, draft=None, input_ids=None, attention_mask=None, *, max_new_tokens: int,
             method: str = "ouroboros",
             pool: PhrasePool | None = None, gamma: int | None = None, ngram: int | None = None,
             window: int | None = None, guess_set: int | None = None, topk: int | None = None,
             eos_token_id: int | Sequence[int] | None = None, return_stats: bool = False,
             on_tokens: Callable[[list[int]], None] | None = None, fast: bool | None = None,
             pool_device: str | torch.device | None = None, adaptive: bool | None = None,
             scored: bool | None = None, model_free: float | None = None, recycle: int | None = None,
             compile: bool | None = None, do_sample: bool = False, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             repetition_penalty: float | None = None, generator: torch.Generator | None = None,
             logits_processor: LogitsProcessorList | None = None, draft_sampling: bool | None = None,
             scores_out: list | None = None):
    """Generation that is lossless: greedy returns exactly the target's own greedy tokens; sampling
    (``do_sample=True``) returns text distributed exactly as plain sampling from the target with the same processors.
    A batch holds that for every row on its own (greedy rows equal that prompt's batch-1 greedy output, up to float
    rounding at near-ties; sampled rows are independent, one ``generator`` seed gives one batch output).

    Parameters
    ----------
    target, draft : HF causal LMs sharing one tokenizer (``draft`` needed for "speculative" and "ouroboros").
    input_ids : (1, L) or (L,) token ids, L >= 1; or a batch: (B, L) left-padded as HF expects of decoder-only
        models (``attention_mask`` 0 on the padding), or a list of B prompts of any lengths (padded for you).
    attention_mask : (B, L) 1 for tokens, 0 for the left padding (default: no padding).
    method : "greedy" | "speculative" | "lookahead" | "prompt_lookup" | "ouroboros".
    pool : a :class:`PhrasePool` to use and keep warm across calls (history reuse); a fresh one if None.
    gamma, ngram, window, guess_set, topk : SPEC §2 parameters; None picks the device default (``ouroboros.core.config``).
    adaptive : draft length follows acceptance, starting at ``gamma`` (default True; False keeps it fixed).
    scored : a fresh pool ranks phrases by their counts (:class:`PhrasePool` ``scored``, or a scored
        :class:`GpuPhrasePool` on the device); default off.
    model_free : > 0: "ouroboros" cycles skip the draft model when the pool's chain is probable enough (this floor)
        and the measured costs say it pays (:mod:`ouroboros.drafting.model_free`); default off. Host pool only.
    recycle : k > 0: "ouroboros" keeps the target's top-k alternatives at every verified position as pooled
        phrases (:mod:`ouroboros.decoding.recycle`; on the device cycle :mod:`ouroboros.decoding.device_recycle`,
        inside the captured cycle); default off. A batch with a device pool refuses it.
    eos_token_id : stop after this token (or any of these); default: the target's ``generation_config``.
    on_tokens : called with each cycle's new tokens (streaming); for a batch with ``(row, tokens)``.
    fast : the static-cache step path with CUDA graphs per tree-size bucket (default: on for CUDA models). A batch
        runs the host loop (one forward per model and step for all rows), or with ``fast`` and greedy "ouroboros"
        on a device pool (no window) the batched device cycle (:mod:`ouroboros.decoding.batch_cycle`: one graph and
        one read per cycle for all rows); ``fast=True`` on a batch that cannot run there is a ValueError.
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
    draft_sampling : methods "speculative" and "ouroboros": the draft samples its tokens from its own processed
        distribution q (accepted with min(1, r/q)) instead of proposing its greedy tokens; ouroboros' pooled guesses
        are kept where the draft's draw takes them, its suffixes stay deterministic siblings. Ignored when greedy.
        None (default): on for "ouroboros" on a CPU with the host pool, where it measured faster
        (:func:`ouroboros.core.config.default_draft_sampling`), off elsewhere.
    scores_out : a list that receives, per emitted token, ``(processed_scores, raw_logits)``, each (1, V) float32
        (what HF's ``output_scores`` / ``output_logits`` return).

    Returns
    -------
    LongTensor (1, L + n) on the target's device, n <= max_new_tokens, ending at the first EOS if one was produced;
    a batch gives (B, L + n) with rows that stopped early right-padded with the pad id (the generation config's
    ``pad_token_id``, else the EOS). With ``return_stats=True`` a tuple ``(ids, GenerationStats)`` (a batch:
    :class:`~ouroboros.decoding.batch.BatchStats`, per row and the shared forwards).
    Raises ``ValueError`` naming the problem for bad input (empty prompt, vocab mismatch, right padding, an
    all-padding row, a batch with no pad id, top_p outside (0, 1], temperature < 0, ...), before any forward.
    """
    batch = is_batch(input_ids) or attention_mask is not None
    prompts, pads = batch_prompts(input_ids, attention_mask) if batch else ([_prompt_list(input_ids)], [[]])
    pad = pad_token(target, eos_token_id) if len(prompts) > 1 else None     # checked before any forward
    stats = BatchStats() if len(prompts) > 1 else GenerationStats()
    out: list[list[int]] = [[] for _ in prompts]
    call = dict(max_new_tokens=max_new_tokens, method=method, pool=pool, gamma=gamma, ngram=ngram, window=window,
                guess_set=guess_set, topk=topk, eos_token_id=eos_token_id, fast=fast, pool_device=pool_device,
                adaptive=adaptive, scored=scored, model_free=model_free, recycle=recycle, compile=compile,
                stats=stats, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                repetition_penalty=repetition_penalty, generator=generator, logits_processor=logits_processor,
                draft_sampling=draft_sampling, scores_out=scores_out)
    for item in stream(target, draft, prompts if len(prompts) > 1 else prompts[0], **call):
        row, new = item if len(prompts) > 1 else (0, item)
        out[row].extend(new)
        if on_tokens is not None:
            on_tokens((row, new) if len(prompts) > 1 else new)
    ids = _assemble(pads, prompts, out, pad).to(target.device)
    return (ids, stats) if return_stats else ids


def _assemble(pads: list[list], prompts: list[list[int]], out: list[list[int]], pad: int | None) -> torch.Tensor:
    """(B, L + n): each row's input (the left padding of a padded tensor kept; a list's shorter prompts padded on the
    left with ``pad``, the None entries of ``pads``) and new tokens, right-padded with ``pad`` to the longest row."""
    n = max(len(o) for o in out)
    rows = []
    for left, prompt, new in zip(pads, prompts, out):
        rows.append([pad if t is None else t for t in left] + prompt + new + [pad] * (n - len(new)))
    return torch.tensor(rows, dtype=torch.long)
