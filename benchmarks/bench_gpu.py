"""GPU kernel benchmarks: sparseops' Triton and CUDA C++ kernels against dense cuBLAS/cuDNN
(float32 and bfloat16), torch.nn.utils.prune's mask multiply and torch's BSR matmul, in one run,
timed with triton.testing.do_bench (median of warm runs, L2 flushed between them).

    python benchmarks/bench_gpu.py                       # everything: results/gpu-<device>.{json,md}
    python benchmarks/bench_gpu.py --quick               # fewer shapes and sparsities
    python benchmarks/bench_gpu.py --write-thresholds    # also rewrite thresholds.json "cuda"

--write-thresholds turns the measurements into the `auto` backend's data: the density below which
each sparse path beats the dense fallback (by layer width, or output plane for convolutions),
which of the CUDA and Triton kernels wins per shape, and whether the fused soft-mask GEMM beats
soft_mask + cuBLAS. Until that has run on a GPU, `auto` runs the dense fallback on CUDA.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sparseops
from sparseops._library import has_kernel

RESULTS = Path(__file__).with_name("results")
THRESHOLDS = Path(sparseops.__file__).with_name("thresholds.json")

# (M, N, K): a square GEMM, GPT-2's layers at 8 sequences of 1024 tokens, VGG's classifier
LINEAR = [(4096, 4096, 4096), (8192, 2304, 768), (8192, 768, 768), (8192, 3072, 768), (8192, 768, 3072),
          (128, 512, 512)]
# (batch, C_in, C_out, side), 3x3 stride 1 padding 1: CIFAR VGG-16 and ResNet-20 layers
CONV = [(128, 64, 64, 32), (128, 128, 128, 16), (128, 256, 256, 8), (128, 512, 512, 4), (128, 16, 16, 32),
        (128, 32, 32, 16), (128, 64, 64, 8)]
SPARSITIES = [0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999]
SOFT_SIZES = [768 * 3072, 4096 * 4096, 16384 * 16384]
PEAK_BANDWIDTH = {"H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s, by name


def bench(fn, grad_to=()) -> float:
    from triton.testing import do_bench

    return do_bench(fn, grad_to_none=list(grad_to), return_mode="median")


def peak_bandwidth(name: str) -> float | None:
    for key, value in PEAK_BANDWIDTH.items():  # most specific names first
        if key in name:
            return value
    return None


def _step(forward, inputs, mode):
    """A closure timing the forward, or forward + backward with a fixed output gradient."""
    if mode == "fwd":
        return lambda: forward()
    g = torch.randn_like(forward())

    def step():
        forward().backward(g)
    return step


def _block_mask(n, k, density, block=32):
    tiles = torch.rand(-(-n // block), -(-k // block), device="cuda") < density
    return tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k].contiguous()


def linear_rows(shapes, sparsities, modes=("fwd", "fwd+bwd")):
    rows = []
    for m, n, k in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
            w = torch.randn(n, k, device="cuda", dtype=dtype, requires_grad=True)
            for sp in sparsities:
                mask = torch.rand(n, k, device="cuda") >= sp
                bmask = _block_mask(n, k, 1 - sp)
                blk = sparseops.block_layout(bmask, 32)
                providers = {
                    "dense": lambda: F.linear(x, w),
                    "prune": lambda: F.linear(x, w * mask),
                    "triton": lambda: _forced("triton", lambda: sparseops.masked_linear(x, w, mask)),
                    "triton_block32": lambda: _forced("triton", lambda: sparseops.masked_linear(x, w, blk)),
                }
                if has_kernel("masked_linear", "cuda"):
                    providers["cuda"] = lambda: _forced("cuda", lambda: sparseops.masked_linear(x, w, mask))
                wb = (w.detach() * bmask).to_sparse_bsr(32)
                providers["torch_bsr"] = lambda: F.linear(x.detach(), wb)  # forward only: no BSR autograd
                current = []
                for mode in modes:
                    for name, fwd in providers.items():
                        if name == "torch_bsr" and mode != "fwd":
                            continue
                        try:
                            ms = bench(_step(fwd, (x, w), mode), (x, w))
                        except Exception as exc:  # e.g. BSR kernels missing for a dtype: say so, go on
                            print(f"  {name} {dtype} {(m, n, k)} {sp}: {type(exc).__name__}: {exc}")
                            continue
                        current.append(dict(op="masked_linear", provider=name, shape=[m, n, k],
                                            dtype=str(dtype)[6:], sparsity=sp, mode=mode, ms=ms,
                                            tile_density=blk.tile_density if "block" in name else None))
                print(f"linear {(m, n, k)} {dtype} {sp}: "
                      + ", ".join(f"{r['provider']} {r['mode']} {r['ms']:.3f}" for r in current))
                rows += current
    return rows


def _forced(name, fn):
    with sparseops.backend(name):
        return fn()


def conv_rows(shapes, sparsities):
    rows = []
    for nb, ci, co, side in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(nb, ci, side, side, device="cuda", dtype=dtype, requires_grad=True)
            w = torch.randn(co, ci, 3, 3, device="cuda", dtype=dtype, requires_grad=True)
            for sp in sparsities:
                mask = torch.rand(w.shape, device="cuda") >= sp
                providers = {
                    "dense": lambda: F.conv2d(x, w, None, 1, 1),
                    "prune": lambda: F.conv2d(x, w * mask, None, 1, 1),
                    "triton": lambda: _forced("triton", lambda: sparseops.masked_conv2d(x, w, mask, None, 1, 1)),
                }
                if has_kernel("masked_conv2d", "cuda"):
                    providers["cuda"] = lambda: _forced("cuda", lambda: sparseops.masked_conv2d(x, w, mask, None, 1, 1))
                for name, fwd in providers.items():
                    ms = bench(_step(fwd, (x, w), "fwd+bwd"), (x, w))
                    rows.append(dict(op="masked_conv2d", provider=name, shape=[nb, ci, co, side],
                                     dtype=str(dtype)[6:], sparsity=sp, mode="fwd+bwd", ms=ms))
                print(f"conv {(nb, ci, co, side)} {dtype} {sp}: "
                      + ", ".join(f"{r['provider']} {r['ms']:.3f}" for r in rows[-len(providers):]))
    return rows


def soft_rows(sizes, linear_shapes, conv_shapes):
    rows = []
    peak = peak_bandwidth(torch.cuda.get_device_name())
    for n in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            w = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
            s = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
            item = w.element_size()
            for mode, traffic in (("fwd", 3), ("fwd+bwd", 3 + 5)):  # fwd reads w, s, writes out; bwd 3 in, 2 out
                for name in ("triton", "cuda", "eager"):
                    if name == "eager":
                        fwd = lambda: w * torch.sigmoid(4.0 * s)  # noqa: E731
                    else:
                        fwd = (lambda b: lambda: _forced(b, lambda: sparseops.soft_mask(w, s, 4.0)))(name)
                    ms = bench(_step(fwd, (w, s), mode), (w, s))
                    gbs = traffic * n * item / (ms * 1e-3)
                    rows.append(dict(op="soft_mask", provider=name, shape=[n], dtype=str(dtype)[6:], mode=mode,
                                     ms=ms, bandwidth=gbs, of_peak=gbs / peak if peak else None))
    for m, n, k in linear_shapes:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for zero in (0.0, 0.5, 0.9):  # fraction of the mask exactly 0 (late CS), in whole 64-wide column bands
            s = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            s[:, : int(k * zero)] = -1e4
            s.requires_grad_()
            providers = {
                "dense": lambda: F.linear(x, w),
                "unfused": lambda: F.linear(x, sparseops.soft_mask(w, s, 4.0)),
                "fused": lambda: _forced("triton", lambda: sparseops.soft_masked_linear(x, w, s, 4.0)),
            }
            for mode in ("fwd", "fwd+bwd"):
                for name, fwd in providers.items():
                    ms = bench(_step(fwd, (x, w, s), mode), (x, w, s))
                    rows.append(dict(op="soft_masked_linear", provider=name, shape=[m, n, k], dtype="bfloat16",
                                     sparsity=zero, mode=mode, ms=ms))
    for nb, ci, co, side in conv_shapes:
        x = torch.randn(nb, ci, side, side, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(co, ci, 3, 3, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for zero in (0.0, 0.5, 0.9):  # fraction of output channels whose mask is exactly 0 (late CS)
            s = torch.randn(co, ci, 3, 3, device="cuda", dtype=torch.bfloat16)
            s[: int(co * zero)] = -1e4
            s.requires_grad_()
            providers = {
                "dense": lambda: F.conv2d(x, w, None, 1, 1),
                "unfused": lambda: F.conv2d(x, sparseops.soft_mask(w, s, 4.0), None, 1, 1),
                "fused": lambda: _forced("triton", lambda: sparseops.soft_masked_conv2d(x, w, s, 4.0, 1.0, None, 1, 1)),
            }
            for name, fwd in providers.items():
                ms = bench(_step(fwd, (x, w, s), "fwd+bwd"), (x, w, s))
                rows.append(dict(op="soft_masked_conv2d", provider=name, shape=[nb, ci, co, side], dtype="bfloat16",
                                 sparsity=zero, mode="fwd+bwd", ms=ms))
    return rows


# ---------------------------------------------------------------------------------------------
# Measurements -> thresholds.json "cuda" (pure functions: tested without a GPU)


def _times(rows, op, mode="fwd+bwd"):
    """{(shape, dtype, sparsity): {provider: ms}}."""
    out: dict = {}
    for r in rows:
        if r["op"] == op and r["mode"] == mode:
            out.setdefault((tuple(r["shape"]), r["dtype"], r.get("sparsity")), {})[r["provider"]] = r["ms"]
    return out


def _width(n, k):
    return round(n * k / (n + k))


def _break_even(points):
    """The largest density up to which the sparse path beats the fallback at every measured density
    (walking up from the sparsest and stopping at the first loss, so a noisy win at a dense point
    cannot open a window where the sparse path is slower)."""
    best = 0.0
    for density, sparse_ms, fallback_ms in sorted(points):
        if sparse_ms >= fallback_ms:
            break
        best = density
    return best


def derive_thresholds(rows) -> dict:
    """The `cuda` section of thresholds.json from benchmark rows (float32 and bfloat16 alike: the
    break-even must hold for both, so the smaller density is kept)."""
    section: dict = {"kernels": {}, "fused": {}}
    lin = _times(rows, "masked_linear")
    by_width: dict = {}
    block: list = []
    for (shape, dtype, sp), t in lin.items():
        kernels = {p: t[p] for p in ("triton", "cuda") if p in t}
        if "prune" not in t or not kernels:
            continue
        winner = min(kernels, key=kernels.get)
        m, n, k = shape
        by_width.setdefault((_width(n, k), dtype), []).append((round(1 - sp, 6), kernels[winner], t["prune"]))
        if len(kernels) > 1:
            section["kernels"].setdefault("masked_linear", []).append([_width(n, k), round(1 - sp, 6), winner])
        if "triton_block32" in t:
            tile = next(r["tile_density"] for r in rows if r["op"] == "masked_linear" and r["shape"] == list(shape)
                        and r["provider"] == "triton_block32" and r.get("sparsity") == sp and r["dtype"] == dtype)
            block.append((round(tile, 6), t["triton_block32"], t["prune"]))
    widths: dict = {}
    for (h, _dtype), points in by_width.items():
        widths[h] = min(widths.get(h, 1.0), _break_even(points))
    if widths:
        section["masked_linear_by_width"] = [[h, d] for h, d in sorted(widths.items())]
        section["masked_linear"] = max(widths.values())
    if block:
        section["masked_linear_block"] = _break_even(block)
    conv = _times(rows, "masked_conv2d")
    planes: dict = {}
    for (shape, dtype, sp), t in conv.items():
        kernels = {p: t[p] for p in ("triton", "cuda") if p in t}
        if "prune" not in t or not kernels:
            continue
        winner = min(kernels, key=kernels.get)
        nb, ci, co, side = shape
        planes.setdefault((side * side, dtype), []).append((round(1 - sp, 6), kernels[winner], t["prune"]))
        if len(kernels) > 1:
            section["kernels"].setdefault("masked_conv2d", []).append([_width(co, ci * 9), round(1 - sp, 6), winner])
    by_plane: dict = {}
    for (plane, _dtype), points in planes.items():
        by_plane[plane] = min(by_plane.get(plane, 1.0), _break_even(points))
    if by_plane:
        section["masked_conv2d_by_plane"] = [[p, d] for p, d in sorted(by_plane.items())]
        section["masked_conv2d"] = max(by_plane.values())
    for op in ("soft_masked_linear", "soft_masked_conv2d"):
        soft = _times(rows, op)
        if soft:  # the fused kernels only where they never lose to soft_mask + cuBLAS/cuDNN
            section["fused"][op] = all(t["fused"] <= t["unfused"] for t in soft.values()
                                       if "fused" in t and "unfused" in t)
    return section


def markdown(rows, device) -> str:
    lines = [f"# GPU kernels on {device}", "",
             "Median ms (triton.testing.do_bench); speed-up = dense time / provider time, same dtype.", ""]
    for op in ("masked_linear", "masked_conv2d", "soft_masked_linear", "soft_masked_conv2d"):
        table = _times(rows, op)
        if not table:
            continue
        providers = sorted({p for t in table.values() for p in t} - {"dense"})
        lines += [f"## {op} (fwd+bwd)", "", "| shape | dtype | sparsity | dense ms | "
                  + " | ".join(providers) + " |", "|---|---|---:|---:|" + "---:|" * len(providers)]
        for (shape, dtype, sp), t in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0)):
            cells = [f"{t['dense'] / t[p]:.2f}x" if p in t and "dense" in t else "-" for p in providers]
            lines.append(f"| {'x'.join(map(str, shape))} | {dtype} | {sp:g} | {t.get('dense', math.nan):.3f} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    soft = [r for r in rows if r["op"] == "soft_mask"]
    if soft:
        lines += ["## soft_mask bandwidth", "", "| n | dtype | mode | provider | ms | GB/s | of peak |",
                  "|---:|---|---|---|---:|---:|---:|"]
        for r in soft:
            peak = f"{r['of_peak']:.0%}" if r.get("of_peak") else "-"
            lines.append(f"| {r['shape'][0]} | {r['dtype']} | {r['mode']} | {r['provider']} | {r['ms']:.3f} | "
                         f"{r['bandwidth'] / 1e9:.0f} | {peak} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two shapes per op, four sparsities")
    parser.add_argument("--write-thresholds", action="store_true", help="rewrite thresholds.json's cuda section")
    parser.add_argument("--out", type=Path, help="results path (.json; .md beside it)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU")
    device = torch.cuda.get_device_name()
    sparsities = [0.0, 0.9, 0.99, 0.999] if args.quick else SPARSITIES
    start = time.time()
    rows = linear_rows(LINEAR[:2] if args.quick else LINEAR, sparsities)
    rows += conv_rows(CONV[:2] if args.quick else CONV, [s for s in sparsities if s >= 0.9] + [0.5])
    rows += soft_rows(SOFT_SIZES[:2] if args.quick else SOFT_SIZES, LINEAR[:2], CONV[:2])
    slug = device.lower().replace("nvidia ", "").replace(" ", "-")
    out = args.out or RESULTS / f"gpu-{slug}.json"
    meta = dict(device=device, torch=torch.__version__, cuda=torch.version.cuda, seconds=time.time() - start,
                date=time.strftime("%Y-%m-%d"))
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, device))
    print(f"wrote {out} and {out.with_suffix('.md')} ({statistics.fmean(r['ms'] for r in rows):.3f} ms mean)")
    if args.write_thresholds:
        data = json.loads(THRESHOLDS.read_text())
        data["cuda"] = derive_thresholds(rows) | {"_measured_on": device}
        THRESHOLDS.write_text(json.dumps(data, indent=2) + "\n")
        print(f"rewrote {THRESHOLDS} (cuda): {json.dumps(data['cuda'])[:400]}")


if __name__ == "__main__":
    main()
