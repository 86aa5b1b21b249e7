"""The GPU benchmark's step costs: what one piece of a cycle costs on the engine's static runners, with the prompt
in the cache (target verify per bucket, device and host interface; draft forwards and the full device draft step of
the GPU layout; bookkeeping pieces; kernels and ms per forward against the lean decoder; the live cycle's probes)."""
from __future__ import annotations

import time

import torch

from bench.clock import Clock, ms
from bench.e2e_gpu_columns import engine_runners
from bench.e2e_gpu_probes import (
    DRAFT_BUCKETS,
    VERIFY_BUCKETS,
    chain_inputs,
    cycle_probe,
    kernel_method,
    kernel_table,
    lean_probe,
    runner_probe,
    section,
)


def chain_tree(t: int, vocab: int, start: int = 3):
    from ouroboros.core.tokentree import TokenTree

    tree = TokenTree()
    tree.add_path(-1, [(start + i) % vocab for i in range(t)])
    return tree


@torch.inference_mode()
def step_costs(target, draft, prompt: list[int], cfg, clock: Clock, iters: int, vocab: int, new_tokens: int) -> dict:
    from ouroboros.drafting.device_drafter import DeviceDrafter
    from ouroboros.drafting.gpu_pool import GpuPhrasePool

    device = target.device
    gen = torch.Generator().manual_seed(1)
    out: dict = {"timing": clock.kind, "units": "ms per call", "context_tokens": len(prompt) - 1}
    # the engine's static cache sizes for this prompt and new_tokens (attention spans the whole static cache)
    max_len = len(prompt) + new_tokens + cfg.gamma + cfg.ngram
    tgt, drf = engine_runners(target, draft, max_len, cfg)
    out["static_cache_slots"] = {"target": tgt.cache.max_len, "draft": drf.cache.max_len}
    n = len(prompt) - 1
    out["prefill_ms"] = {"target": ms(clock.wall(lambda: tgt.prefill(prompt[:-1]))[0]),
                         "draft": ms(clock.wall(lambda: drf.prefill(prompt[:-1]))[0])}
    verify_costs(out, tgt, drf, vocab, clock, iters, gen)

    # the ouroboros draft layout (GPU defaults) and the full device draft step
    pool = GpuPhrasePool(ngram=cfg.ngram, guess_set=cfg.guess_set, vocab_size=vocab, device=device)
    pool.seed_from(prompt)
    drafter = DeviceDrafter(drf, pool, cfg.ngram, cfg.window, cfg.guess_set, prompt, topk=cfg.topk)
    reset_draft = draft_layout_costs(out, drf, drafter, prompt, cfg, clock, iters, vocab, gen)
    out["bookkeeping"] = bookkeeping_costs(tgt, drf, pool, prompt, cfg, clock, iters, vocab, gen, reset_draft)
    forward_probes(out, target, draft, tgt, drf, n, vocab, clock, iters)
    # host reads and eager ops per cycle of the live path (last: generate resets the engine's runners)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    section(out, "cycle_probe", lambda: cycle_probe(target, draft, ids, new_tokens, device))
    return out                    # the runners (and their graphs) are freed when this frame ends


def verify_costs(out: dict, tgt, drf, vocab: int, clock: Clock, iters: int, gen: torch.Generator) -> None:
    """Target verify of a chain per bucket, on the device and through the host interface (``forward_tree``: tree
    upload + argmax download), and the draft's forward at DRAFT_BUCKETS."""
    verify, verify_host, draft_v = {}, {}, {}
    for t in VERIFY_BUCKETS:            # DRAFT_BUCKETS are among them
        args = chain_inputs(t, vocab, tgt.device, gen)
        verify[str(t)] = ms(clock.per_call(lambda: tgt.forward_device(*args), iters))
        tree = chain_tree(t, vocab)
        verify_host[str(t)] = ms(clock.per_call(lambda: tgt.forward_tree(tree), iters))
        if t in DRAFT_BUCKETS:
            draft_v[str(t)] = ms(clock.per_call(lambda: drf.forward_device(*args), iters))
    out["target_verify_device"] = verify
    out["decode_T1_ms"] = verify["1"]
    out["graphs"] = bool(tgt.use_graphs and tgt._graphs)
    out["target_verify_host_interface"] = verify_host
    out["draft_forward_device"] = draft_v


def draft_layout_costs(out: dict, drf, drafter, prompt: list[int], cfg, clock: Clock, iters: int, vocab: int,
                       gen: torch.Generator):
    """The draft forward of the ouroboros layout 1 + (W+G)*(N-1) tokens and the full device draft step
    (``DeviceDrafter._forward``); returns the function that puts the draft back at the prompt."""
    device = drf.device
    n = len(prompt) - 1
    lay = drafter._layout(1)
    logical = 1 + (cfg.window + cfg.guess_set) * (cfg.ngram - 1)
    ids = torch.randint(0, vocab, (1, lay.size), generator=gen).to(device)
    depths, bits = lay.inputs(torch.zeros((), dtype=torch.long, device=device))    # one valid pending token
    layout_fwd = clock.per_call(lambda: drf.forward_device(ids, depths, bits), iters)
    phase = drafter._begin(prompt, cfg.gamma, 1)        # one pending token (the prompt's last)

    def reset_draft():
        drf.cache.length.fill_(n)
        phase.dlen.zero_()
        phase.live.fill_(True)

    step = clock.per_call(lambda: drafter._forward(phase), iters, after=reset_draft)
    reset_draft()
    drf._n = n
    out["draft_layout"] = {"params": cfg.as_dict(), "tokens_logical": logical, "tokens_bucket": lay.size,
                           "forward_ms": ms(layout_fwd), "full_step_ms": ms(step),
                           "step_overhead_ms": ms(step - layout_fwd),
                           "what": "full step = pool lookup + forward + acceptance + window slide + pool insert + "
                                   "KV commit (DeviceDrafter._forward), no host sync"}
    return reset_draft


def bookkeeping_costs(tgt, drf, pool, prompt: list[int], cfg, clock: Clock, iters: int, vocab: int,
                      gen: torch.Generator, reset_draft) -> dict:
    """KV gather, keep + rollback (host), GPU-pool lookup and insert, host-adapter pool updates, draft KV commit and
    the host tree build (mask + walk) of the engine's speculative tree."""
    from ouroboros.core.buckets import bucket as _bucket
    from ouroboros.core.tokentree import TokenTree

    from ouroboros_kernels import ancestor_mask

    device = tgt.device
    n = len(prompt) - 1
    book: dict = {}
    src = torch.tensor(list(range(8)) + list(range(20, 26)), dtype=torch.long, device=device)
    book["kv_gather_14_slots"] = ms(clock.per_call(lambda: tgt.cache.gather(tgt.cache.length, src), iters))
    nodes = list(range(8)) + list(range(20, 26))
    book["keep_gather_plus_rollback_host"] = ms(clock.per_call(lambda: (tgt.keep(n, nodes), tgt.rollback(n)),
                                                               iters))
    key = torch.tensor([prompt[-1]], dtype=torch.long, device=device)
    book["gpu_pool_lookup"] = ms(clock.per_call(lambda: pool.lookup(key, cfg.guess_set), iters))
    keys = torch.randint(0, vocab, (cfg.window,), generator=gen).to(device)
    phrases = torch.randint(0, vocab, (cfg.window, cfg.ngram - 1), generator=gen).to(device)
    book["gpu_pool_insert_window"] = ms(clock.per_call(lambda: pool.insert_many(keys, phrases), iters))
    host_items = [(int(k), [int(t) for t in p]) for k, p in zip(keys[:4].tolist(), phrases[:4].tolist())]
    book["host_adapter_pool_insert_4"] = ms(clock.per_call(lambda: pool.host.insert_many(host_items), iters))
    repl = [(k, p, p[::-1]) for k, p in host_items[:cfg.topk]]
    book["host_adapter_pool_replace_topk"] = ms(clock.per_call(lambda: pool.host.replace_many(repl), iters))
    commit_src = torch.arange(1 + cfg.ngram - 1, device=device)
    commit_n = torch.tensor(3, device=device)
    book["draft_commit_device"] = ms(clock.per_call(lambda: drf.commit_device(commit_src, commit_n), iters,
                                                    after=reset_draft))
    reset_draft()
    drf._n = n

    def build_tree():
        tree = TokenTree()
        given = tree.add_path(-1, [5])
        trunk = tree.add_path(given[0], [(7 + i) % vocab for i in range(cfg.gamma)])
        for b in range(cfg.topk):
            tree.add_path(trunk[-1], [(100 + 10 * b + i) % vocab for i in range(cfg.ngram - 1)])
        ancestor_mask(tree.parents)
        return tree.walk(given[0], list(range(len(tree))))

    t0 = time.perf_counter()
    for _ in range(max(iters, 20)):
        build_tree()
    book["host_tree_build_mask_walk"] = ms((time.perf_counter() - t0) / max(iters, 20))
    book["tree_nodes"] = 1 + cfg.gamma + cfg.topk * (cfg.ngram - 1)
    book["verify_bucket_of_that_tree"] = _bucket(book["tree_nodes"])
    return book


def forward_probes(out: dict, target, draft, tgt, drf, n: int, vocab: int, clock: Clock, iters: int) -> None:
    """Kernels and ms per forward: the engine's runners as they ship ("default": fused glue on CUDA) against the lean
    decoder floor with the same weights."""
    ours: dict = {}
    section(ours, "target", lambda: runner_probe(tgt, (), vocab, clock, iters))
    section(ours, "draft", lambda: runner_probe(drf, (), vocab, clock, iters))
    lean: dict = {}
    section(lean, "target", lambda: lean_probe(target, n, VERIFY_BUCKETS, clock, iters))
    section(lean, "draft", lambda: lean_probe(draft, n, DRAFT_BUCKETS, clock, iters))
    out["lean"] = lean
    out["kernels_per_forward"] = {"method": kernel_method(tgt.device),
                                  "target": kernel_table(lean["target"], {"default": ours["target"]}),
                                  "draft": kernel_table(lean["draft"], {"default": ours["draft"]}),
                                  "ours_detail": ours,
                                  "note": "ours = StaticRunner.forward_device as it is (input copies, graph replay, "
                                          "output clone); lean = one graph replay (bench/lean_decoder.py)"}
    out["ms_per_forward"] = {"target": {"lean": lean["target"].get("ms"), "default": out["target_verify_device"]},
                             "draft": {"lean": lean["draft"].get("ms"), "default": out["draft_forward_device"]}}
