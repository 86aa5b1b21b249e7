"""Tree-attention microbenchmark (SPEC §4, issues 3 and 16): ours vs SDPA vs flex_attention vs the byte floor.

For every head layout (Hq, Hkv, D) — the real pair's (12/2, 128) target and (14/2, 64) draft beside (32/8, 128) and
(32/32, 128) — cache length L (tree entries come after it: S = L + T keys) and tree size T, bf16, batch 1, a random
token tree of T nodes:

  ours_<backend>      ouroboros_kernels.tree_attention(..., backend=...) with prefix_len = L as an int, for each
                      available GPU backend (cuda, triton)
  ours_<backend>_dev  the same with prefix_len as a device tensor over a static buffer twice as long (what the fast
                      path runs: one CUDA graph for every length; only the live L + T keys are read)
  sdpa_nomask         torch SDPA over the same S keys without any mask (a lower bound for any masked SDPA)
  sdpa_mask           torch SDPA with the dense boolean (1, 1, T, S) tree mask
  flex                flex_attention (torch.compile'd) with a BlockMask of the tree, if available (full grid only)
  floor               bytes of Q + K + V + O / measured device-to-device copy bandwidth

Times are medians of ``triton.testing.do_bench`` (which flushes L2 between runs), in microseconds. Prints a line per
shape as it is measured and the issue-16 targets, writes JSON (card, versions, settings, rows, targets) to ``--out``
and draws the PNG next to it through the report step (``bench.report.attention``; matplotlib needed).

    python -m bench.attention            # full grid (adds L=8192, T=128/256, flex)
    python -m bench.attention --quick    # the issue-16 grid: 4 layouts x L 512..4096 x T 1/16/64 (~1 min on an H200)
    python -m bench.attention --tune     # also sweep the Triton kernel's split/block choices per shape
    python -m bench.report bench/results/gpu_h200_run1/attention.json   # the table and PNG of a result
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from bench.common import RESULTS, slug, write_json
from bench.report import report
from bench.report.attention import PAIR_HEADS, row_line, target_lines, targets

SCHEMA = "ouroboros.attention/1"
HEADS = PAIR_HEADS + [(32, 8, 128), (32, 32, 128)]
FULL = dict(L=[512, 1024, 2048, 4096, 8192], T=[1, 16, 64, 128, 256], heads=HEADS)
QUICK = dict(L=[512, 1024, 2048, 4096], T=[1, 16, 64], heads=HEADS)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the issue-16 grid (L 512..4096, T 1/16/64, 4 layouts)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default bench/results/attention_<card>.json); the PNG goes next to it")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--heads", nargs="*", metavar="HQ/HKV/D", help="override the head layouts, e.g. 12/2/128")
    ap.add_argument("--L", type=int, nargs="*", help="override the cache lengths")
    ap.add_argument("--T", type=int, nargs="*", help="override the tree sizes")
    ap.add_argument("--no-flex", action="store_true", help="skip flex_attention (its compile takes a while)")
    ap.add_argument("--tune", action="store_true", help="sweep Triton num_splits/block_n per shape, report the best")
    ap.add_argument("--compile-only", type=int, metavar="SM", default=None,
                    help="no GPU needed: compile the Triton kernels for CUDA compute capability SM (e.g. 90) and exit")
    ap.add_argument("--dry-run", action="store_true",
                    help="smoke test of this script on CPU (TRITON_INTERPRET=1, fp32, tiny grid, wall-clock timer); "
                         "the numbers mean nothing")
    ap.add_argument("--warmup", type=int, default=10, help="do_bench warmup (ms)")
    ap.add_argument("--rep", type=int, default=50, help="do_bench repetition time (ms)")
    return ap.parse_args(argv)



def random_tree(t: int, gen: torch.Generator) -> list[int]:
    """A speculative-decoding-like tree: a trunk of ~t/2 tokens and random branches hanging off it."""
    trunk = max(1, t // 2)
    parents = [i - 1 for i in range(min(trunk, t))]
    for i in range(len(parents), t):
        parents.append(int(torch.randint(0, i, (1,), generator=gen)))
    return parents



def compile_only(sm: int) -> int:
    """Lower every kernel variant the wrapper can launch through Triton's NVIDIA backend (TTIR -> PTX -> cubin with
    the bundled ptxas) for compute capability ``sm``; catches compile errors on machines without a GPU."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET for --compile-only", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ouroboros_kernels.triton import tree_attention as tt

    target = GPUTarget("cuda", sm, 32)
    ptr = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
    failures = 0
    combos = [  # dtype, HAS_MASK, SOFTCAP, SPLIT, BLOCK_D, BLOCK_M, BLOCK_N, WINDOW, PREFIX_PTR
        ("bf16", True, False, True, 128, 64, 64, False, False), ("bf16", False, False, False, 128, 16, 64, False, True),
        ("bf16", True, False, True, 128, 128, 64, True, True), ("fp16", True, True, True, 256, 64, 32, True, False),
        ("fp32", False, True, False, 64, 16, 64, True, True), ("fp32", True, False, True, 128, 64, 64, False, True),
        ("fp32", True, True, True, 256, 64, 16, False, False), ("bf16", True, False, True, 64, 32, 64, True, True),
        ("bf16", False, False, True, 128, 16, 64, True, True, "decode: T = 1 and unit strides specialised")]
    for dt, has_mask, softcap, split, bd, bm, bn, window, prefix_ptr, *decode in combos:
        fn = tt.tree_attn_split_kernel
        consts = dict(G=4, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, HAS_MASK=has_mask, MASK_WORDS=2 if has_mask else 1,
                      PREFIX_PTR=prefix_ptr, WINDOW=window, SOFTCAP=softcap, IEEE=dt == "fp32", SPLIT=split,
                      INTERP=False, UPCAST=False, EVEN_D=bd != 64)
        if decode:  # Triton turns integer arguments equal to 1 into constants: T = 1 (decode)
            consts.update(T=1, stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1)
        types = dict(Q=ptr[dt], K=ptr[dt], V=ptr[dt], MASK="*i32", PREFIX="*i64", O=ptr[dt], MID_O="*fp32",
                     MID_L="*fp32", qk_scale="fp32", softcap="fp32")
        sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
        warps = 8 if (bm * bd >= 128 * 128 or bd >= 256) else 4
        what = f"{dt} mask={has_mask} softcap={softcap} split={split} window={window} device_prefix={prefix_ptr} " \
               f"D={bd} M={bm} N={bn}"
        try:
            k = triton.compile(ASTSource(fn, sig, consts), target=target, options=dict(num_warps=warps, num_stages=2))
            print(f"ok   split kernel {what}: {k.metadata.shared} B shared", flush=True)
        except Exception as e:  # noqa: BLE001
            failures += 1
            print(f"FAIL split kernel {what}: {e!r}"[:2000])
    fn = tt.tree_attn_combine_kernel
    consts = dict(BLOCK_R=4, BLOCK_S=8, BLOCK_D=128)
    sig = {n: "constexpr" if n in consts else dict(MID_O="*fp32", MID_L="*fp32", O="*bf16").get(n, "i32")
           for n in fn.arg_names}
    try:
        triton.compile(ASTSource(fn, sig, consts), target=target, options=dict(num_warps=4))
        print("ok   combine kernel", flush=True)
    except Exception as e:  # noqa: BLE001
        failures += 1
        print(f"FAIL combine kernel: {e!r}"[:2000])
    return 1 if failures else 0



def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compile_only is not None:
        return compile_only(args.compile_only)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("bench.attention needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured. "
              "(--dry-run smoke-tests the script on CPU, --compile-only SM compiles the kernels without a GPU.)",
              file=sys.stderr)
        return 2
    try:
        import triton
        import triton.testing
    except ImportError:
        print("bench.attention needs triton (for triton.testing.do_bench); pip install triton", file=sys.stderr)
        return 2
    import ouroboros_kernels as ok

    grid = shape_grid(args)
    dtype = torch.float32 if args.dry_run else getattr(torch, args.dtype)
    dev = torch.device("cpu" if args.dry_run else "cuda")
    card = "dry-run-cpu" if args.dry_run else torch.cuda.get_device_name(dev)
    backends = [b for b in ("cuda", "triton") if b in ok.available_backends()]
    print(f"card: {card}; backends: {backends}; status: {ok.backend_status()}")
    bench = timer(args, triton)
    bandwidth = copy_bandwidth(bench, dev, args.dry_run)
    print(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
    flex = None if args.no_flex or args.quick else flex_attention()

    gen = torch.Generator().manual_seed(0)
    rows = []
    for h, hkv, d in grid["heads"]:
        for L in grid["L"]:
            for T in grid["T"]:
                row = measure_shape(h, hkv, d, L, T, dtype, dev, gen, backends, bench, bandwidth, flex, args)
                rows.append(row)
                print(row_line(row, backends, flex is not None), flush=True)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    checks = targets(rows, backends)
    print("\n".join(target_lines(checks)))
    default_dir = Path("/tmp") if args.dry_run else RESULTS
    out_path = args.out or default_dir / f"attention_{slug(card)}.json"
    write_json(out_path, result_record(args, card, dtype, grid, backends, bandwidth, rows, checks, triton, ok))
    print(f"wrote {out_path}")
    _, png = report(out_path)
    if png:
        print(f"wrote {png}")
    return 0


def shape_grid(args) -> dict:
    """The head layouts, cache lengths and tree sizes of this run (``--quick``, ``--dry-run`` and the overrides)."""
    grid = dict(QUICK if args.quick else FULL)
    if args.dry_run:
        grid = dict(L=[40], T=[1, 5], heads=[(4, 2, 32)])
    if args.heads:
        grid["heads"] = [tuple(int(x) for x in h.split("/")) for h in args.heads]
    grid["L"] = args.L or grid["L"]
    grid["T"] = args.T or grid["T"]
    return grid


def timer(args, triton):
    """Microseconds of a call: ``triton.testing.do_bench``'s median (L2 flushed); with ``--dry-run`` the median of
    three wall-clock calls after one."""
    def bench(fn) -> float:
        if args.dry_run:
            fn()
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return sorted(times)[1] * 1e6
        return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median") * 1e3  # us
    return bench


def copy_bandwidth(bench, dev: torch.device, dry_run: bool) -> float:
    """Device-to-device copy bandwidth (read + write, bytes/s), on a buffer much larger than L2."""
    buf = torch.empty((1 if dry_run else 512) * 2**20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(buf)
    copy_us = bench(lambda: dst.copy_(buf))
    return 2 * buf.numel() / (copy_us * 1e-6)


def flex_attention():
    """(compiled flex_attention, create_block_mask), or None (with a note) where flex_attention is unavailable."""
    try:
        import torch._dynamo as dynamo
        from torch.nn.attention.flex_attention import (
            create_block_mask,
            flex_attention,
        )

        # One compile per shape: lift the recompile limit so no shape silently falls back to eager flex.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, 1024)
        return torch.compile(flex_attention, dynamic=False), create_block_mask
    except Exception as e:  # noqa: BLE001
        print(f"flex_attention unavailable: {e!r}")
        return None


def result_record(args, card: str, dtype, grid: dict, backends, bandwidth: float, rows, checks, triton, ok) -> dict:
    """The JSON: card, versions, settings, a row per shape and the issue-16 targets."""
    versions = dict(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                    ouroboros=ok.__version__, python=platform.python_version())
    try:
        import transformers
        versions["transformers"] = transformers.__version__
    except ImportError:
        versions["transformers"] = None
    return dict(schema=SCHEMA, card=card, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), versions=versions,
                settings=dict(dtype=str(dtype).replace("torch.", ""), batch=1, L=grid["L"], T=grid["T"],
                              heads=[dict(Hq=h, Hkv=hkv, D=d) for h, hkv, d in grid["heads"]], backends=backends,
                              timer="triton.testing.do_bench median (L2 flushed)", warmup_ms=args.warmup,
                              rep_ms=args.rep, copy_bandwidth_GBps=bandwidth / 1e9,
                              L_meaning="cached entries before the tree; S = L + T keys",
                              dev_meaning="ours_<b>_dev: prefix_len as a device tensor over a 2x longer buffer"),
                rows=rows, targets=checks)


def measure_shape(h, hkv, d, L, T, dtype, dev, gen, backends, bench, bandwidth, flex, args) -> dict:
    """One row of the table: every column for the layout (h, hkv, d), cache length L and a random tree of T nodes."""
    import torch.nn.functional as F

    import ouroboros_kernels as ok
    from ouroboros_kernels import reference, tree

    S = L + T
    q = torch.randn(1, h, T, d, dtype=dtype, device=dev)
    k = torch.randn(1, hkv, S, d, dtype=dtype, device=dev)
    v = torch.randn(1, hkv, S, d, dtype=dtype, device=dev)
    # The fast path's layout: a static buffer longer than the live part, and the length on the device.
    k_buf = torch.cat([k, torch.full_like(k, float("nan"))], dim=2)
    v_buf = torch.cat([v, torch.full_like(v, float("nan"))], dim=2)
    length = torch.tensor(L, device=dev)
    parents = random_tree(T, gen)
    anc = tree.ancestor_mask(parents)
    packed = tree.pack_mask(anc).to(dev)
    dense = torch.cat([torch.ones(T, L, dtype=torch.bool), anc], 1).to(dev)
    want = reference.tree_attention(q, k, v, L, packed).float()
    row = dict(L=L, T=T, H=h, Hkv=hkv, D=d)
    for b in backends:
        for suffix, kk, vv, p in (("", k, v, L), ("_dev", k_buf, v_buf, length)):
            try:
                out = ok.tree_attention(q, kk, vv, p, packed, backend=b)
                row[f"err_{b}{suffix}"] = (out.float() - want).abs().max().item()
                row[f"ours_{b}{suffix}"] = bench(lambda b=b, kk=kk, vv=vv, p=p: ok.tree_attention(q, kk, vv, p, packed,
                                                                                                  backend=b))
            except Exception as e:  # noqa: BLE001
                row[f"ours_{b}{suffix}"] = None
                row[f"error_{b}{suffix}"] = repr(e)[:300]
    gqa = dict(enable_gqa=True) if h != hkv else {}
    row["sdpa_nomask"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, **gqa))
    mask4 = dense[None, None]
    row["sdpa_mask"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask4, **gqa))
    if flex is not None:
        try:
            flex_fn, create_block_mask = flex

            def mask_mod(b_, h_, q_idx, kv_idx, dense=dense):
                return dense[q_idx, kv_idx]

            bm = create_block_mask(mask_mod, None, None, T, S, device=dev)
            out = flex_fn(q, k, v, block_mask=bm, **gqa)
            row["err_flex"] = (out.float() - want).abs().max().item()
            row["flex"] = bench(lambda: flex_fn(q, k, v, block_mask=bm, **gqa))
        except Exception as e:  # noqa: BLE001
            row["flex"] = None
            row["error_flex"] = repr(e)[:300]
    nbytes = (2 * hkv * S * d + 2 * h * T * d) * q.element_size()
    row["floor"] = nbytes / bandwidth * 1e6
    if args.tune and "triton" in backends:
        from ouroboros_kernels.triton.tree_attention import tree_attention as tri
        best = None
        for splits in (1, 2, 4, 8, 16, 32):
            for bn in (32, 64, 128):
                for bmk in (16, 32, 64, 128):
                    try:
                        us = bench(lambda: tri(q, k, v, L, packed, num_splits=splits, block_n=bn, block_m=bmk))
                    except Exception:  # noqa: BLE001 (too many registers / shared memory)
                        continue
                    if best is None or us < best[0]:
                        best = (us, dict(num_splits=splits, block_n=bn, block_m=bmk))
        if best:
            row["triton_tuned"], row["triton_tuned_config"] = best
    return row



if __name__ == "__main__":
    sys.exit(main())
