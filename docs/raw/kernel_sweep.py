"""Issue 25 sweep: old vs new triangle / vertical-slash kernels, breakdowns, correctness, in one GPU call.
(The row of bands next to the diagonal was added on 2026-12-07; the 12-04 run had the rest.)

Setup (as run on 2026-12-04): a folder holding this script and ``oldk/``, a copy of ``kernels/*.py`` of
the commit before the change (main 32caaa6) with an empty ``__init__.py``; PYTHONPATH = the checkout
and that folder. Env: SEQS (K, default 32,64,128), TILES (vertical-slash tiles timed, default 128,64),
SKIP (oldtri, p2, bw, flex), FLEX_BY (seconds after which the FlexAttention anchor is skipped),
MODE=ncu (one launch per kernel inside an NVTX range "prof", for ncu --nvtx --nvtx-include "prof/"),
TRITON_INTERPRET=1 (a dry run on CPU at toy sizes), EXTRA_BAND / EXTRA_VS (more autotune configs,
below). Writes $OUT/sweep.json and prints the tables.
Output of the recorded run: bench-kernels-h200-2026-12-04.{txt,json}. The run of
2026-12-07 (second session): oldk/ = kernels/*.py of 34d266c, SEQS=32,64,128 TILES=64
SKIP=oldtri,p2,bw FLEX_BY=150; output: h100-2026-12-07b/sweep.{log,json}."""
import os, sys, time, json, statistics
T0 = time.time()
sys.path.insert(0, os.path.dirname(__file__))
import torch, triton
import torch.nn.functional as F
from trimix_probe.bench.common import time_ms, env, heads_of
from trimix_probe.config import DynamicSpec
import trimix_probe.dynamic as D
from trimix_probe.reference import triangle_attention_ref
from trimix_probe.kernels import triangle as NT, vertical_slash as NV, blockwise as NB
from oldk import triangle as OT, vertical_slash as OV

TILES = [int(t) for t in os.environ.get("TILES", "128,64").split(",")]
SKIP = set(os.environ.get("SKIP", "").split(","))
SEQS = [int(s) * 1024 for s in os.environ.get("SEQS", "32,64,128").split(",")]
MODE = os.environ.get("MODE", "sweep")
# more configs for the autotuners to time (their tables land in sweep.json: cfg_band_p4, cfg_vs_t64):
# EXTRA_BAND="256x64x8x2,128x128x8x2" (BLOCK_M x BLOCK_N x warps x stages), EXTRA_VS="4x4,2x3" (warps x stages)
for env_name, kern, make in (
        ("EXTRA_BAND", NT._band_kernel, lambda m, n, w, s: triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)),
        ("EXTRA_VS", NV._vertical_slash_kernel, lambda w, s: triton.Config({}, num_warps=w, num_stages=s))):
    if os.environ.get(env_name) and os.environ.get("TRITON_INTERPRET") != "1":
        kern.configs.extend(make(*map(int, e.split("x"))) for e in os.environ[env_name].split(","))
DRY = os.environ.get("TRITON_INTERPRET") == "1"
dev = torch.device("cpu" if DRY else "cuda")
info = {} if DRY else env(dev); print(json.dumps(info), flush=True)
h, hk, d = heads_of("llama-3.1-8b").values()
if DRY:
    SEQS, h, hk, d = [300], 4, 1, 64
    def time_ms(fn):
        t = time.time(); fn(); return (time.time() - t) * 1e3
res = {}
def el(): return f"[{time.time() - T0:.0f}s]"
def rel(a, b): return ((a.float() - b.float()).norm() / b.float().norm()).item()

def timings(kern):
    t = getattr(kern, "configs_timings", None) or {}
    return {str(c).replace("num_ctas: 1, ", "").replace("maxnreg: None, ", ""): round(float(v[0] if isinstance(v, (list, tuple)) else v), 3) for c, v in t.items()}

def cudnn(q, k, v):
    if DRY:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

# ---- small fresh-random fp64 checks (odd lengths, GQA) -------------------------------------------
def small_checks():
    out = []
    for seq, heads, kvh, pack in (((301, 4, 1, None),) if DRY else ((3001, 8, 2, None), (2777, 4, 1, None), (3001, 8, 2, 1))):
        g = torch.Generator(device=dev).manual_seed(seq + heads)
        q = torch.randn(1, heads, seq, d, generator=g, device=dev).bfloat16()
        k, v = (torch.randn(1, kvh, seq, d, generator=g, device=dev).bfloat16() for _ in range(2))
        kw = dict(n_init=8, n_local=512, last_n=128)
        o = NT.triangle_attention(q, k, v, pack=pack, **kw)
        ref = triangle_attention_ref(q.double(), k.double(), v.double(), compute_dtype=torch.float64, **kw)
        pt = triangle_attention_ref(q, k, v, compute_dtype=None, **kw)
        e, ept = (o.double() - ref).abs().max().item(), (pt.double() - ref).abs().max().item()
        out.append(("triangle", seq, heads, kvh, pack, e, ept, e <= 2 * ept + 1e-5))
    for seq, heads, kvh, tile in (((301, 2, 1, 64),) if DRY else ((3001, 8, 2, 64), (2777, 4, 1, 64), (4099, 8, 2, 64))):
        g = torch.Generator(device=dev).manual_seed(seq + 7 * heads)
        q = torch.randn(1, heads, seq, d, generator=g, device=dev).bfloat16()
        k, v = (torch.randn(1, kvh, seq, d, generator=g, device=dev).bfloat16() for _ in range(2))
        nb = -(-seq // 128)
        gc = torch.Generator().manual_seed(seq)
        cols = torch.stack([torch.randperm(seq, generator=gc)[:40] for _ in range(heads)]).sort(-1).values
        bands = torch.stack([torch.randperm(nb, generator=gc)[:5] for _ in range(heads)]).sort(-1).values
        sel = D.VerticalSlash(cols.view(1, heads, -1).to(dev), bands.view(1, heads, -1).to(dev), 128)
        o = NV.vertical_slash_attention(q, k, v, sel.columns, sel.bands, block_size=128, tile=tile)
        ref = D.vertical_slash_attention_ref(q.double(), k.double(), v.double(), sel, compute_dtype=torch.float64)
        pt = D.vertical_slash_attention_ref(q, k, v, sel, compute_dtype=None)
        e, ept = rel(o.double(), ref), rel(pt.double(), ref)
        out.append(("vslash", seq, heads, kvh, tile, e, ept, e <= 2 * ept + 1e-6))
    print("small fp64 checks (kernel, seq, heads, kv, pack/tile, err, torch-bf16 err, ok):", flush=True)
    for r in out:
        print("  ", r, flush=True)
    assert all(r[-1] for r in out), "a small check failed"
    return out

if MODE == "ncu":  # one profiled launch of each kernel at the last length, after warm-up/autotune
    seq = SEQS[-1]
    g = torch.Generator(device=dev).manual_seed(seq)
    q = torch.randn(1, h, seq, d, generator=g, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(1, hk, seq, d, generator=g, device=dev, dtype=torch.bfloat16) for _ in range(2))
    spec = DynamicSpec(method="vertical_slash", vertical=1000, slash=6096, block_size=128, last_q=64)
    sel = D.select_vertical_slash(q, k, spec)
    kb = dict(n_init=8, n_local=512, last_n=0)
    runs = {"band_p4": lambda: NT.triangle_attention(q, k, v, **kb),
            "band_p1": lambda: NT.triangle_attention(q, k, v, pack=1, **kb),
            "vs_t128": lambda: NV.vertical_slash_attention(q, k, v, sel.columns, sel.bands, block_size=128, tile=128),
            "vs_t64": lambda: NV.vertical_slash_attention(q, k, v, sel.columns, sel.bands, block_size=128, tile=64)}
    for name in os.environ.get("NCU_RUNS", ",".join(runs)).split(","):
        runs[name](); runs[name](); torch.cuda.synchronize()
        torch.cuda.nvtx.range_push("prof")
        runs[name](); torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
        print(el(), "profiled", name, flush=True)
    sys.exit(0)

res["small"] = small_checks(); print(el(), flush=True)

rows = []
for seq in SEQS:
    g = torch.Generator(device=dev).manual_seed(seq)
    q = torch.randn(1, h, seq, d, generator=g, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(1, hk, seq, d, generator=g, device=dev, dtype=torch.bfloat16) for _ in range(2))
    r = {"seq": seq}
    kw = dict(n_init=8, n_local=512, last_n=128)
    # triangle
    a_new = NT.triangle_attention(q, k, v, **kw)
    r["cfg_band_p4"], r["cfg_last"] = timings(NT._band_kernel), timings(NT._last_kernel)
    a_p1 = NT.triangle_attention(q, k, v, pack=1, **kw)
    r["cfg_band_p1"] = timings(NT._band_kernel)
    a_old = a_p1 if "oldtri" in SKIP else OT.triangle_attention(q, k, v, **kw)
    r["tri_rel_new_vs_old"] = rel(a_new, a_old); r["tri_rel_p1_vs_old"] = rel(a_p1, a_old)
    r["tri_old"] = float("nan") if "oldtri" in SKIP else time_ms(lambda: OT.triangle_attention(q, k, v, **kw))
    r["tri_new"] = time_ms(lambda: NT.triangle_attention(q, k, v, **kw))
    r["tri_new_p1"] = time_ms(lambda: NT.triangle_attention(q, k, v, pack=1, **kw))
    r["tri_new_p2"] = float("nan") if "p2" in SKIP else time_ms(lambda: NT.triangle_attention(q, k, v, pack=2, **kw))
    kb = dict(n_init=8, n_local=512, last_n=0)
    r["band_old"] = float("nan") if "oldtri" in SKIP else time_ms(lambda: OT.triangle_attention(q, k, v, **kb))
    r["band_new"] = time_ms(lambda: NT.triangle_attention(q, k, v, **kb))
    r["band_new_p1"] = time_ms(lambda: NT.triangle_attention(q, k, v, pack=1, **kb))
    del a_old, a_new, a_p1
    print(el(), "triangle", {k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in r.items()}, flush=True)
    # vertical-slash
    spec = DynamicSpec(method="vertical_slash", vertical=1000, slash=6096, block_size=128, last_q=64)
    sel = D.select_vertical_slash(q, k, spec)
    r["vs_estimate"] = time_ms(lambda: D.select_vertical_slash(q, k, spec))
    _, tile_cnt, _, _, col_cnt = NV.vertical_slash_indices(sel.columns.sort(-1).values, sel.bands, seq, 128, 128)
    nq = tile_cnt.shape[1]
    r["vs_tile_share"] = (tile_cnt.sum().item() + col_cnt.sum().item() / 128) / h / (nq * (nq + 1) / 2)
    r["vs_slash_tile_share"] = tile_cnt.sum().item() / h / (nq * (nq + 1) / 2)
    _, tc64, _, _, _ = NV.vertical_slash_indices(sel.columns.sort(-1).values, sel.bands, seq, 128, 64)
    r["vs_slash_area_64_over_128"] = tc64.sum().item() / 4 / tile_cnt.sum().item()
    r["vs_indices"] = time_ms(lambda: NV.vertical_slash_indices(sel.columns.sort(-1).values, sel.bands, seq, 128, 128))
    o_old = OV.vertical_slash_attention(q, k, v, sel.columns, sel.bands, block_size=128)
    r["cfg_vs_old"] = timings(OV._vertical_slash_kernel)
    from trimix_probe.bench.dynamic import _check_against_reference
    for tile in TILES:
        o = NV.vertical_slash_attention(q, k, v, sel.columns, sel.bands, block_size=128, tile=tile)
        r[f"cfg_vs_t{tile}"] = timings(NV._vertical_slash_kernel)
        r[f"vs_rel_t{tile}_vs_old"] = rel(o, o_old)
        r[f"vs_rel_t{tile}_vs_ref"] = _check_against_reference("vs", o, q, k, v, lambda head: D.vertical_slash_mask_fn(sel, 0, head, seq))
        del o
    del o_old
    r["vs_old"] = time_ms(lambda: OV.vertical_slash_attention(q, k, v, sel.columns, sel.bands, block_size=128))
    for tile in TILES:
        r[f"vs_t{tile}"] = time_ms(lambda: NV.vertical_slash_attention(q, k, v, sel.columns, sel.bands, block_size=128, tile=tile))
    # a trained model's shape: bands next to the diagonal, columns at the start (sinks), same counts
    nb_ = sel.bands.shape[-1]; nc_ = sel.columns.shape[-1]
    loc_b = torch.arange(nb_, device=dev, dtype=sel.bands.dtype).expand_as(sel.bands).contiguous()
    loc_c = torch.arange(nc_, device=dev, dtype=sel.columns.dtype).expand_as(sel.columns).contiguous()
    o1 = OV.vertical_slash_attention(q, k, v, loc_c, loc_b, block_size=128)
    o2 = NV.vertical_slash_attention(q, k, v, loc_c, loc_b, block_size=128)
    r["vs_rel_local_new_vs_old"] = rel(o2, o1); del o1, o2
    r["vs_old_local"] = time_ms(lambda: OV.vertical_slash_attention(q, k, v, loc_c, loc_b, block_size=128))
    r["vs_new_local"] = time_ms(lambda: NV.vertical_slash_attention(q, k, v, loc_c, loc_b, block_size=128))
    # breakdown: slash part only (one column: 0), columns part only (band 0 only)
    one_col = sel.columns[..., :1].sort(-1).values.clone(); one_col.zero_()
    band0 = torch.zeros_like(sel.bands[..., :1])
    for tile in TILES:
        r[f"vs_t{tile}_slash_only"] = time_ms(lambda: NV.vertical_slash_attention(q, k, v, one_col, sel.bands, block_size=128, tile=tile))
        r[f"vs_t{tile}_cols_only"] = time_ms(lambda: NV.vertical_slash_attention(q, k, v, sel.columns, band0, block_size=128, tile=tile))
    # blockwise kernel on a random pattern at the same tile share (whole tiles, causal mask only)
    n = nq
    gk = torch.Generator(device=dev).manual_seed(seq + 2)
    keep = torch.rand(1, h, n, n, generator=gk, device=dev) < r["vs_tile_share"]
    keep |= torch.eye(n, dtype=torch.bool, device=dev); keep[..., 0] = True
    keep &= torch.ones(n, n, dtype=torch.bool, device=dev).tril()
    r["bw_share"] = keep.sum().item() / (h * n * (n + 1) / 2)
    r["bw_kernel"] = float("nan") if "bw" in SKIP else time_ms(lambda: NB.blockwise_attention(q, k, v, keep, block_size=128))
    del keep
    r["vs_default"] = time_ms(lambda: NV.vertical_slash_attention(q, k, v, sel.columns, sel.bands, block_size=128))
    spec_dl = DynamicSpec(method="vertical_slash", vertical=1000, slash=6096, block_size=128, last_q=64, dense_last=128)
    r["vs_runs"] = "dense (fallback)" if D.work_share(spec_dl, seq) > D.dense_above_limit() else "sparse"
    r["vs_as_run"] = time_ms(lambda: D.dynamic_attention(q, k, v, spec_dl))
    r["cudnn"] = time_ms(lambda: cudnn(q, k, v))
    if seq == SEQS[-1] and time.time() - T0 < float(os.environ.get("FLEX_BY", "1e9")) and "flex" not in SKIP:
        from trimix_probe import ops
        b = ops.triangle_flex(q, k, v, **kw)
        r["tri_rel_new_vs_flex"] = rel(NT.triangle_attention(q, k, v, **kw), b); del b
        r["flex"] = time_ms(lambda: ops.triangle_flex(q, k, v, **kw))
    print(el(), "vslash", {k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in r.items() if k_.startswith(("vs", "bw", "cudnn", "flex", "tri_rel", "cfg_vs"))}, flush=True)
    rows.append(r)
    del q, k, v, sel
    torch.cuda.empty_cache()

print("\n| seq | cuDNN dense | flex triangle | tri old | tri new | tri new pack=1 | band old | band new | band new pack=1 | tri rel new/old |")
print("|---:|" + "---:|" * 9)
for r in rows:
    print(f"| {r['seq']//1024}K | {r['cudnn']:.2f} | {r.get('flex', float('nan')):.3f} | {r['tri_old']:.3f} | {r['tri_new']:.3f} | {r['tri_new_p1']:.3f} "
          f"| {r['band_old']:.3f} | {r['band_new']:.3f} | {r['band_new_p1']:.3f} | {r['tri_rel_new_vs_old']:.1e} |")
print("\n| seq | VS estimate | VS tables | VS old | VS new t128 | VS new t64 | VS new default | t64 slash-only / cols-only | t128 slash-only / cols-only | layer as run (dense_last 128) | runs | tiles kept | rel new/ref |")
print("|---:|" + "---:|" * 9 + "---|---:|---:|")
for r in rows:
    print(f"| {r['seq']//1024}K | {r['vs_estimate']:.2f} | {r['vs_indices']:.2f} | {r['vs_old']:.2f} | {r.get('vs_t128', float('nan')):.2f} | {r['vs_t64']:.2f} | {r['vs_default']:.2f} "
          f"| {r['vs_t64_slash_only']:.2f} / {r['vs_t64_cols_only']:.2f} | {r.get('vs_t128_slash_only', float('nan')):.2f} / {r.get('vs_t128_cols_only', float('nan')):.2f} | {r['vs_as_run']:.2f} | {r['vs_runs']} "
          f"| {100*r['vs_tile_share']:.1f}% (slash {100*r['vs_slash_tile_share']:.1f}%, t64 area x{r['vs_slash_area_64_over_128']:.2f}) | {r['vs_rel_t64_vs_ref']:.1e} |")
out = os.environ.get("OUT", "/tmp")
json.dump({"env": info, "rows": rows, "small": res["small"]}, open(f"{out}/sweep.json", "w"), indent=1, default=str)
print("\n| seq | VS old (scattered) | VS new (scattered) | VS old (bands at the diagonal) | VS new (bands at the diagonal) | rel new/old |")
print("|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['seq']//1024}K | {r['vs_old']:.2f} | {r['vs_default']:.2f} | {r['vs_old_local']:.2f} | {r['vs_new_local']:.2f} | {r['vs_rel_local_new_vs_old']:.1e} |")
print(el(), "done", flush=True)
