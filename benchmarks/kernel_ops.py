"""Kernel benchmark: `python -m benchmarks.kernel_ops [--quick] [--T 4096 16384] [--out docs/bench]`.

Times forward and forward+backward (triton.testing.do_bench medians, random inputs) of:
  tttla            our Triton chunk kernels (kernels.ttt_la.chunk_ttt_la), bf16 operands, fp32 states;
                   at the layer shapes with the fused Triton SwiGLU features (kernels.features)
  tttla_torch_features  the same with the torch features (cuBLAS GEMM + compiled gate/product)
  eager            the reference parallel form (kernels.reference) in eager bf16 torch
  fla_simple_gla   fla.ops.simple_gla.chunk_simple_gla (per-head decay g_gamma), K = V = 128, core shape
  fla_linear_attn  fla.ops.linear_attn.chunk_linear_attn, likewise (equal heads = equal state size)
  sdpa             causal flash attention (torch SDPA), head dim 128, same model width
at three shapes (B * T = 131072 tokens each):
  layer  the full layer op (SwiGLU features of q and k included), 4 heads, d = 384, dh = 768, C = 2048
  lact   the same at LaCT's default shape, 4 heads, d = dh = 512, C = 2048
  core   the linear-attention core (features given), 16 heads, K = V = 128, token-causal, vs fla
FLOP model (per token per head, forward; backward counted as 2x forward) in docs/kernels.md.
Writes kernels.json and kernels.md under --out; also measures the bf16 matmul peak (8192^3).
`--variants` instead times the design choices and tile shapes docs/kernels.md reports (variants.json).
"""

from __future__ import annotations

import argparse
import json
import os
import traceback

import torch
import torch.nn.functional as F

from kernels import features as feature_kernels
from kernels.features import compiled_swiglu_features, pack_swiglu_weights
from kernels.lact import ScanOptions, swiglu_features
from kernels.reference import ttt_la_parallel_reference
from kernels.ttt_la import chunk_ttt_la

TOKENS = 131072
FLA_DIM = 128
SDPA_HEAD_DIM = 128
SHAPES = {
    "layer": dict(H=4, d=384, dh=768, C=2048, token_causal=False, features=True),
    "lact": dict(H=4, d=512, dh=512, C=2048, token_causal=False, features=True),
    "core": dict(H=16, d=128, dh=128, C=64, token_causal=True, features=False),
}
# fla autotunes per head count, minutes per shape on the device; it runs at the core shape, where
# equal state size means equal heads (its cost scales linearly in heads at equal K = V).
IMPLS = {
    "layer": ("tttla", "tttla_torch_features", "eager", "sdpa"),
    "lact": ("tttla", "tttla_torch_features", "eager", "sdpa"),
    "core": ("tttla", "fla_simple_gla", "fla_linear_attn", "sdpa"),
}


def do_bench(fn, grads=None) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=200, grad_to_none=grads, return_mode="median")


def matmul_peak_tflops(device) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b)
    return 2 * 8192**3 / ms / 1e9


def flops_per_token(impl: str, shape: dict, T: int) -> float:
    """Forward FLOPs per token summed over heads (the model in docs/kernels.md)."""
    H, d, dh, C = shape["H"], shape["d"], shape["dh"], shape["C"]
    if impl.startswith("tttla") or impl == "eager":
        per_head = (8 * d * dh if shape["features"] else 0) + 4 * d * dh
        if shape["token_causal"]:
            per_head += C * (d + dh)  # the causal half of each C x C block: scores and values
        return H * per_head
    if impl.startswith("fla"):
        heads = fla_heads(shape)
        return heads * (4 * FLA_DIM * FLA_DIM + 64 * 2 * FLA_DIM)  # fla's 64-token sub-chunks, causal half
    if impl == "sdpa":
        heads = sdpa_heads(shape)
        return heads * 2 * T * SDPA_HEAD_DIM  # causal half of 4 * T * head_dim
    raise ValueError(impl)


def fla_heads(shape: dict) -> int:
    return max(1, round(shape["H"] * shape["d"] * shape["dh"] / FLA_DIM**2))


def sdpa_heads(shape: dict) -> int:
    return max(1, shape["H"] * shape["d"] // SDPA_HEAD_DIM)


def randn(*shape, device, dtype=torch.bfloat16, scale=1.0, grad=True):
    x = (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)
    return x.requires_grad_(grad)


def make_case(impl: str, shape: dict, T: int, device):
    """Returns (forward closure returning the tensor to backprop, leaf tensors)."""
    B = max(1, TOKENS // T)
    if impl.startswith("tttla") or impl == "eager":
        return _ttt_case(impl, shape, B, T, device)
    if impl.startswith("fla"):
        return _fla_case(impl, shape, B, T, device)
    if impl == "sdpa":
        heads = sdpa_heads(shape)
        q, k, v = (randn(B, heads, T, SDPA_HEAD_DIM, device=device) for _ in range(3))

        def fwd():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return fwd, [q, k, v]
    raise ValueError(impl)


def _ttt_case(impl: str, shape: dict, B: int, T: int, device):
    """Our layer: the Triton ops (`tttla`, `tttla_torch_features`: compiled torch features) or the
    eager reference (`eager`), with or without the SwiGLU features in the timed region."""
    H, d, dh, C = shape["H"], shape["d"], shape["dh"], shape["C"]
    v = randn(B, T, H, d, device=device)
    e = (torch.rand(B, T, H, device=device) * 0.1 + 0.01).to(torch.bfloat16).requires_grad_()
    if shape["features"]:
        xq, xk = randn(B, T, H, d, device=device), randn(B, T, H, d, device=device)
        w0 = randn(H, dh, d, device=device, scale=d**-0.5)
        w2 = randn(H, dh, d, device=device, scale=d**-0.5)
        leaves = [xq, xk, v, e, w0, w2]
    else:
        hq = randn(B, T, H, dh, device=device, scale=dh**-0.5)
        hk = randn(B, T, H, dh, device=device, scale=dh**-0.5)
        leaves = [hq, hk, v, e]
    if impl.startswith("tttla"):
        state = randn(B, H, d, dh, device=device, dtype=torch.float32, scale=0.02)
        compiled = compiled_swiglu_features()

        def fwd():
            if shape["features"] and impl == "tttla_torch_features":
                w02 = pack_swiglu_weights(w0, w2)
                hq_, hk_ = compiled(xq, w02), compiled(xk, w02)
            elif shape["features"]:
                hq_, hk_ = feature_kernels.swiglu_features(xq, w0, w2), feature_kernels.swiglu_features(xk, w0, w2)
            else:
                hq_, hk_ = hq, hk
            return chunk_ttt_la(hq_, hk_, v, e, state, ScanOptions(C, token_causal=shape["token_causal"]))[0]
    else:
        state = randn(B, H, d, dh, device=device, scale=0.02)

        def fwd():
            if shape["features"]:
                hq_, hk_ = swiglu_features(xq, w0, w2), swiglu_features(xk, w0, w2)
            else:
                hq_, hk_ = hq, hk
            return ttt_la_parallel_reference(hq_, hk_, v, e, state, ScanOptions(C, token_causal=shape["token_causal"]))[0]
    return fwd, leaves + [state]


def _fla_case(impl: str, shape: dict, B: int, T: int, device):
    """flash-linear-attention's chunk kernels at our layer's state size (`fla_heads`)."""
    heads = fla_heads(shape)
    q, k, v = (randn(B, T, heads, FLA_DIM, device=device) for _ in range(3))
    if impl == "fla_simple_gla":
        from fla.ops.simple_gla import chunk_simple_gla

        # per-head constant decay (g_gamma): fla refuses the per-token-gated backward on Triton < 3.7.1 on Hopper
        g_gamma = F.logsigmoid(torch.randn(heads, device=device) + 4)

        def fwd():
            return chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=FLA_DIM**-0.5)[0]
        return fwd, [q, k, v]
    from fla.ops.linear_attn import chunk_linear_attn

    def fwd():
        return chunk_linear_attn(q, k, v, scale=FLA_DIM**-0.5, normalize=False)[0]
    return fwd, [q, k, v]


def measure(impl: str, name: str, shape: dict, T: int, device, peak: float) -> dict:
    B = max(1, TOKENS // T)
    row = dict(impl=impl, op=name, device=torch.cuda.get_device_name(device), B=B, T=T, H=shape["H"],
               d=shape["d"], dh=shape["dh"], C=shape["C"] if impl.startswith("tttla") or impl == "eager" else None)
    try:
        fwd, leaves = make_case(impl, shape, T, device)
        with torch.no_grad():
            fwd_ms = do_bench(fwd)
        out = fwd()
        grad_out = torch.randn_like(out)
        del out

        def fwdbwd():
            fwd().backward(grad_out)
        fwdbwd_ms = do_bench(fwdbwd, grads=leaves)
    except Exception as error:  # a row that failed still says why (e.g. out of memory)
        traceback.print_exc()
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        torch.cuda.empty_cache()
        return row
    tokens = B * T
    flops = flops_per_token(impl, shape, T) * tokens
    row.update(
        fwd_ms=fwd_ms, fwdbwd_ms=fwdbwd_ms,
        fwd_tok_s=tokens / fwd_ms * 1e3, fwdbwd_tok_s=tokens / fwdbwd_ms * 1e3,
        fwd_tflops=flops / fwd_ms / 1e9, fwdbwd_tflops=3 * flops / fwdbwd_ms / 1e9,
    )
    row["fwd_peak_frac"] = row["fwd_tflops"] / peak
    row["fwdbwd_peak_frac"] = row["fwdbwd_tflops"] / peak
    del fwd, leaves
    torch.cuda.empty_cache()
    return row


def profile_kernels(shape: dict, T: int, device) -> None:
    """CUDA time per kernel of one tttla forward+backward (after a warm-up)."""
    fwd, leaves = make_case("tttla", shape, T, device)
    out = fwd()
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fwd().backward(grad_out)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20), flush=True)


def sweep_tiles(device) -> list[dict]:
    """Forward+backward time of tttla at the layer shape (T = 16384) for a few tile shapes; keeps the best."""
    from kernels import chunk

    outer = [dict(BT=64, BX=128, BY=128, num_warps=8, num_stages=3), dict(BT=32, BX=128, BY=128, num_warps=8, num_stages=4),
             dict(BT=64, BX=64, BY=128, num_warps=4, num_stages=3)]
    apply = [dict(BT=128, BM=64, BN=128, num_warps=8, num_stages=3), dict(BT=64, BM=64, BN=128, num_warps=4, num_stages=3),
             dict(BT=128, BM=32, BN=128, num_warps=8, num_stages=4)]
    results = []
    best = (float("inf"), chunk.OUTER_TILES, chunk.APPLY_TILES)
    fwd, leaves = make_case("tttla", SHAPES["layer"], 16384, device)
    grad_out = torch.randn_like(fwd())
    for o in outer:
        for a in apply:
            chunk.OUTER_TILES, chunk.APPLY_TILES = o, a
            try:
                ms = do_bench(lambda: fwd().backward(grad_out), grads=leaves)
            except Exception as error:
                ms = float("nan")
                print("sweep", o, a, type(error).__name__, str(error)[:200], flush=True)
            results.append(dict(outer=o, apply=a, fwdbwd_ms=ms))
            print("sweep", o, a, f"{ms:.3f} ms", flush=True)
            if ms < best[0]:
                best = (ms, o, a)
    chunk.OUTER_TILES, chunk.APPLY_TILES = best[1], best[2]
    print("best tiles", best, flush=True)
    return results


def time_fwd_fwdbwd(fwd, leaves) -> tuple[float, float]:
    with torch.no_grad():
        fwd_ms = do_bench(fwd)
    grad_out = torch.randn_like(fwd())
    return fwd_ms, do_bench(lambda: fwd().backward(grad_out), grads=leaves)


class VariantTimer:
    """Times one design variant with module attributes set for it only, and collects the rows."""

    def __init__(self) -> None:
        self.results: list[dict] = []

    def record(self, name, make, settings=None) -> None:
        """settings: {(module, attribute): value} set for this variant only."""
        settings = settings or {}
        saved = {key: getattr(*key) for key in settings}
        for (module, k), value in settings.items():
            setattr(module, k, value)
        try:
            fwd_ms, fwdbwd_ms = time_fwd_fwdbwd(*make())
        except Exception as error:
            fwd_ms = fwdbwd_ms = float("nan")
            print("variant", name, type(error).__name__, str(error)[:300], flush=True)
        finally:
            for (module, k), value in saved.items():
                setattr(module, k, value)
            torch.cuda.empty_cache()
        self.results.append(dict(variant=name, fwd_ms=fwd_ms, fwdbwd_ms=fwdbwd_ms))
        print(f"variant {name:60s} fwd {fwd_ms:8.3f} ms  fwd+bwd {fwdbwd_ms:8.3f} ms", flush=True)


def variants(device) -> list[dict]:
    """Times the design choices of docs/kernels.md: fused vs torch features (and the fused backward's
    recompute vs saved projections, tile shapes), the update fused into the scan vs stored updates
    (and scan / apply tiles) at the core and layer shapes. T = 16384 unless named."""
    timer = VariantTimer()
    _feature_variants(timer, device)
    _scan_variants(timer, device)
    return timer.results


def _feature_variants(timer: VariantTimer, device) -> None:
    def features_case(shape, torch_form):
        def make():
            B, T, H, d, dh = TOKENS // 16384, 16384, shape["H"], shape["d"], shape["dh"]
            x = randn(B, T, H, d, device=device)
            w0 = randn(H, dh, d, device=device, scale=d**-0.5)
            w2 = randn(H, dh, d, device=device, scale=d**-0.5)
            compiled = compiled_swiglu_features()
            if torch_form:
                return (lambda: compiled(x, pack_swiglu_weights(w0, w2))), [x, w0, w2]
            return (lambda: feature_kernels.swiglu_features(x, w0, w2)), [x, w0, w2]
        return make

    record, F_ = timer.record, feature_kernels
    for name in ("layer", "lact"):
        shape = SHAPES[name]
        record(f"{name} features torch (cuBLAS + compiled)", features_case(shape, True))
        record(f"{name} features fused, recompute a,b", features_case(shape, False), {(F_, "SAVE_PROJECTIONS"): False})
        record(f"{name} features fused, saved a,b", features_case(shape, False), {(F_, "SAVE_PROJECTIONS"): True})
    for tiles in (dict(BM=128, BN=64, BK=64, num_warps=4, num_stages=4), dict(BM=64, BN=128, BK=64, num_warps=4, num_stages=3),
                  dict(BM=128, BN=128, BK=32, num_warps=8, num_stages=4), dict(BM=256, BN=64, BK=64, num_warps=8, num_stages=3)):
        record(f"layer features fused, projection {tiles}", features_case(SHAPES["layer"], False),
               {(F_, "PROJECTION_TILES"): tiles})
    for tiles in (dict(BM=128, BN=256, BK=64, num_warps=8, num_stages=3), dict(BM=128, BN=64, BK=64, num_warps=4, num_stages=4),
                  dict(BM=128, BN=128, BK=64, num_warps=4, num_stages=4)):
        record(f"layer features fused, matmul {tiles}", features_case(SHAPES["layer"], False),
               {(F_, "MATMUL_TILES"): tiles})


def _scan_variants(timer: VariantTimer, device) -> None:
    from kernels import chunk

    def chunk_case(name, T=16384):
        return lambda: make_case("tttla", SHAPES[name], T, device)

    record = timer.record
    for T in (16384, 65536):
        record(f"core T={T} stored updates", chunk_case("core", T), {(chunk, "FUSED_SCAN_MAX_CHUNK"): 0})
        record(f"core T={T} fused scan", chunk_case("core", T))
        record(f"core T={T} fused scan 32x64", chunk_case("core", T),
               {(chunk, "FUSED_SCAN_TILES"): dict(B1=32, B2=64, BT=64, num_warps=4, num_stages=2)})
    for tiles in (dict(B1=64, B2=64, BT=64, num_warps=4, num_stages=3), dict(B1=64, B2=64, BT=64, num_warps=8, num_stages=2),
                  dict(B1=128, B2=64, BT=64, num_warps=8, num_stages=2), dict(B1=64, B2=128, BT=64, num_warps=8, num_stages=2),
                  dict(B1=64, B2=64, BT=32, num_warps=4, num_stages=3)):
        record(f"core fused scan {tiles}", chunk_case("core"), {(chunk, "FUSED_SCAN_TILES"): tiles})
    for tiles in (dict(BT=64, BM=128, BN=128, num_warps=8, num_stages=2), dict(BT=64, BM=64, BN=64, num_warps=4, num_stages=2),
                  dict(BT=32, BM=64, BN=128, num_warps=4, num_stages=2), dict(BT=64, BM=64, BN=128, num_warps=4, num_stages=3)):
        record(f"core apply {tiles}", chunk_case("core"), {(chunk, "APPLY_INTRA_TILES"): tiles})
    record("layer stored updates (chunk_outer)", chunk_case("layer"))
    record("layer fused scan 64x64", chunk_case("layer"), {(chunk, "FUSED_SCAN_MAX_CHUNK"): 1 << 30})
    record("layer fused scan 128x128", chunk_case("layer"), {(chunk, "FUSED_SCAN_MAX_CHUNK"): 1 << 30,
           (chunk, "FUSED_SCAN_TILES"): dict(B1=128, B2=128, BT=64, num_warps=8, num_stages=2)})
    record("layer torch features", lambda: make_case("tttla_torch_features", SHAPES["layer"], 16384, device))


def markdown(rows: list[dict], peak: float) -> str:
    lines = [
        f"Measured bf16 matmul peak (8192^3 torch.matmul): {peak:.0f} TFLOP/s. B * T = {TOKENS} tokens.",
        "",
        "| op | impl | T | fwd ms | fwd Mtok/s | fwd TFLOP/s | fwd peak | fwd+bwd ms | fwd+bwd Mtok/s | fwd+bwd TFLOP/s | fwd+bwd peak |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['impl']} | {r['T']} | {r['error']} |||||||||")
            continue
        lines.append(
            f"| {r['op']} | {r['impl']} | {r['T']} | {r['fwd_ms']:.2f} | {r['fwd_tok_s'] / 1e6:.1f} | "
            f"{r['fwd_tflops']:.0f} | {r['fwd_peak_frac']:.0%} | {r['fwdbwd_ms']:.2f} | "
            f"{r['fwdbwd_tok_s'] / 1e6:.1f} | {r['fwdbwd_tflops']:.0f} | {r['fwdbwd_peak_frac']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T=16384 only, no eager")
    parser.add_argument("--T", type=int, nargs="+", default=[4096, 16384, 65536], help="sequence lengths")
    parser.add_argument("--ops", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--impls", nargs="+", default=None, help="subset of impls to run")
    parser.add_argument("--out", default=None, help="folder for the results (default docs/bench; --smoke: none)")
    parser.add_argument("--profile", action="store_true", help="print tttla's per-kernel times (layer, T=16384)")
    parser.add_argument("--sweep", action="store_true", help="pick tttla's tile shapes by a short sweep first")
    parser.add_argument("--variants", action="store_true", help="time the design variants only (variants.json)")
    args = parser.parse_args()
    args.out = args.out or "docs/bench"
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.kernel_ops needs a CUDA device")
    device = torch.device("cuda")
    torch.manual_seed(0)
    seq_lens = [16384] if args.quick else args.T
    if args.profile:
        profile_kernels(SHAPES["layer"], 16384, device)
        profile_kernels(SHAPES["core"], 16384, device)
    if args.variants:
        os.makedirs(args.out, exist_ok=True)
        results = variants(device)
        with open(os.path.join(args.out, "variants.json"), "w") as f:
            json.dump(results, f, indent=1)
        return
    sweep = sweep_tiles(device) if args.sweep else []
    peak = matmul_peak_tflops(device)
    print(f"bf16 matmul peak: {peak:.0f} TFLOP/s", flush=True)
    rows = []
    os.makedirs(args.out, exist_ok=True)
    for name in args.ops:
        for T in seq_lens:
            for impl in IMPLS[name]:
                if args.impls and impl not in args.impls:
                    continue
                if args.quick and impl == "eager":
                    continue
                row = measure(impl, name, SHAPES[name], T, device, peak)
                rows.append(row)
                print(json.dumps(row), flush=True)
                write_results(args.out, rows, peak, sweep)  # after every row: a cut-off run keeps what it measured
    print(markdown(rows, peak))


def write_results(out: str, rows: list[dict], peak: float, sweep: list[dict]) -> None:
    from kernels import chunk

    tiles = dict(outer=chunk.OUTER_TILES, apply=chunk.APPLY_TILES, apply_intra=chunk.APPLY_INTRA_TILES)
    with open(os.path.join(out, "kernels.json"), "w") as f:
        json.dump(dict(matmul_peak_tflops=peak, tokens=TOKENS, tiles=tiles, sweep=sweep, rows=rows), f, indent=1)
    with open(os.path.join(out, "kernels.md"), "w") as f:
        f.write(markdown(rows, peak))


if __name__ == "__main__":
    main()
