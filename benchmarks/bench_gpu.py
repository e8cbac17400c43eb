"""GPU kernel benchmarks: sparseops' Triton and CUDA C++ kernels against dense cuBLAS/cuDNN
(float32 and bfloat16), torch.nn.utils.prune's mask multiply and torch's BSR matmul, in one run,
timed with triton.testing.do_bench (median of warm runs, L2 flushed between them).

    python benchmarks/bench_gpu.py                       # everything: results/gpu-<device>.{json,md}
    python benchmarks/bench_gpu.py --quick               # fewer shapes and sparsities
    python benchmarks/bench_gpu.py --write-thresholds    # also rewrite thresholds.json "cuda"
    python benchmarks/bench_gpu.py --budget-s 150 --out-dir OUT   # what fits in 150 s, most wanted first
    python benchmarks/bench_gpu.py --tiny                # tiny shapes; without a GPU on CPU tensors under
                                                         # TRITON_INTERPRET=1 (checks the script, measures nothing)

--budget-s (scripts/gpu_check.sh) measures the issue's targets first (768->3072 and 3072->768 with
8192 rows in bfloat16 at 90/95/99%, the soft masks, VGG's convolutions, then float32), then the
rest of the full set, stops before a group that would not fit, and rewrites the JSON and md after
every group, so an interrupted run keeps what it measured; meta says what was skipped. A
provider that raises is recorded in meta.errors and the run goes on.

--write-thresholds turns the measurements into the `auto` backend's data: the density below which
each sparse path beats the dense fallback (by layer width, or output plane for convolutions),
which of the CUDA and Triton kernels wins per shape, and whether the fused soft-mask GEMM beats
soft_mask + cuBLAS. Until that has run on a GPU, `auto` runs the dense fallback on CUDA.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sparseops
from sparseops.backend import has_kernel

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
# the issue's targets: GPT-2's MLP layers at 8192 rows (768->3072, 3072->768), VGG's 3x3 layers
TARGET_LINEAR = [(8192, 3072, 768), (8192, 768, 3072)]
TARGET_SPARSITIES = [0.9, 0.95, 0.99]
# --tiny: the whole script on small shapes (without a GPU: CPU tensors, Triton's interpreter)
TINY_LINEAR = [(16, 64, 32)]
TINY_CONV = [(2, 8, 8, 6)]
TINY_SOFT = [4096]

DEVICE = "cuda"  # "cpu" for --tiny without a GPU
SOFT_DTYPE = torch.bfloat16  # the fused soft-mask GEMMs' dtype (float32 under the interpreter)
WARMUP_MS, REP_MS = 25, 100  # do_bench's defaults; --rep-ms shortens both


class _Run:
    """The rows measured so far, the budget, and what was skipped or failed: rows are saved after
    every group (a shape, dtype and sparsity), so a run stopped by its budget or a signal keeps them."""

    def __init__(self):
        self.rows: list = []
        self.deadline: float | None = None
        self.done: set = set()
        self.skipped: list = []
        self.errors: list = []
        self.last_group_s = 0.0
        self._group_start = None
        self.save = lambda: None

    def begin(self, *key) -> bool:
        """Whether to measure the group `key`: not if measured already, or if it would not fit."""
        key = tuple(str(k) for k in key)
        if key in self.done:
            return False
        if self.deadline is not None and time.monotonic() + self.last_group_s > self.deadline:
            self.skipped.append(" ".join(key))
            return False
        self.done.add(key)
        self._group_start = time.monotonic()
        return True

    def end(self, rows):
        self.rows += rows
        if self._group_start is not None:
            self.last_group_s = time.monotonic() - self._group_start
        self.save()

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def error(self, label, exc):
        message = f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        print("  " + message)
        self.errors.append(message)


RUN = _Run()


def bench(fn, grad_to=()) -> float:
    if DEVICE != "cuda":  # --tiny without a GPU: a host clock, one warm-up and the median of 3
        times = []
        for _ in range(4):
            for t in grad_to:
                t.grad = None
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times[1:])
    from triton.testing import do_bench

    return do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, grad_to_none=list(grad_to), return_mode="median")


def _timed(label, forward, inputs, mode):
    """bench() of `forward` in `mode`, or None with the error recorded: one failing provider does
    not end the run."""
    try:
        return bench(_step(forward, inputs, mode), inputs)
    except Exception as exc:  # noqa: BLE001  (e.g. a kernel that fails to compile or launch on this GPU)
        RUN.error(label, exc)
        return None


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
    tiles = torch.rand(-(-n // block), -(-k // block), device=DEVICE) < density
    return tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k].contiguous()


def linear_rows(shapes, sparsities, modes=("fwd", "fwd+bwd"), dtypes=(torch.float32, torch.bfloat16)):
    rows = []
    for m, n, k in shapes:
        for dtype in dtypes:
            if RUN.expired():
                break
            x = torch.randn(m, k, device=DEVICE, dtype=dtype, requires_grad=True)
            w = torch.randn(n, k, device=DEVICE, dtype=dtype, requires_grad=True)
            for sp in sparsities:
                if not RUN.begin("masked_linear", (m, n, k), dtype, sp):
                    continue
                mask = torch.rand(n, k, device=DEVICE) >= sp
                bmask = _block_mask(n, k, 1 - sp)
                blk = sparseops.block_layout(bmask, 32)
                providers = {
                    "dense": lambda: F.linear(x, w),
                    "prune": lambda: F.linear(x, w * mask),
                    "triton": lambda: _forced("triton", lambda: sparseops.masked_linear(x, w, mask)),
                    "triton_block32": lambda: _forced("triton", lambda: sparseops.masked_linear(x, w, blk)),
                }
                if DEVICE == "cuda" and has_kernel("masked_linear", "cuda"):
                    providers["cuda"] = lambda: _forced("cuda", lambda: sparseops.masked_linear(x, w, mask))
                try:
                    wb = (w.detach() * bmask).to_sparse_bsr(32)
                    providers["torch_bsr"] = lambda: F.linear(x.detach(), wb)  # forward only: no BSR autograd
                except Exception as exc:  # noqa: BLE001  (BSR conversion missing for a dtype: say so, go on)
                    RUN.error(f"torch_bsr {dtype} {(m, n, k)} {sp}", exc)
                current = []
                for mode in modes:
                    for name, fwd in providers.items():
                        if name == "torch_bsr" and mode != "fwd":
                            continue
                        try:
                            ms = bench(_step(fwd, (x, w), mode), (x, w))
                        except Exception as exc:  # e.g. BSR kernels missing for a dtype: say so, go on
                            RUN.error(f"{name} {mode} {dtype} {(m, n, k)} {sp}", exc)
                            continue
                        current.append(dict(op="masked_linear", provider=name, shape=[m, n, k],
                                            dtype=str(dtype)[6:], sparsity=sp, mode=mode, ms=ms,
                                            tile_density=blk.tile_density if "block" in name else None))
                print(f"linear {(m, n, k)} {dtype} {sp}: "
                      + ", ".join(f"{r['provider']} {r['mode']} {r['ms']:.3f}" for r in current), flush=True)
                rows += current
                RUN.end(current)
    return rows


def _forced(name, fn):
    with sparseops.backend(name):
        return fn()


def conv_rows(shapes, sparsities, dtypes=(torch.float32, torch.bfloat16)):
    rows = []
    for nb, ci, co, side in shapes:
        for dtype in dtypes:
            if RUN.expired():
                break
            x = torch.randn(nb, ci, side, side, device=DEVICE, dtype=dtype, requires_grad=True)
            w = torch.randn(co, ci, 3, 3, device=DEVICE, dtype=dtype, requires_grad=True)
            for sp in sparsities:
                if not RUN.begin("masked_conv2d", (nb, ci, co, side), dtype, sp):
                    continue
                mask = torch.rand(w.shape, device=DEVICE) >= sp
                providers = {
                    "dense": lambda: F.conv2d(x, w, None, 1, 1),
                    "prune": lambda: F.conv2d(x, w * mask, None, 1, 1),
                    "triton": lambda: _forced("triton", lambda: sparseops.masked_conv2d(x, w, mask, None, 1, 1)),
                }
                if DEVICE == "cuda" and has_kernel("masked_conv2d", "cuda"):
                    providers["cuda"] = lambda: _forced("cuda", lambda: sparseops.masked_conv2d(x, w, mask, None, 1, 1))
                current = []
                for name, fwd in providers.items():
                    ms = _timed(f"conv {name} {dtype} {(nb, ci, co, side)} {sp}", fwd, (x, w), "fwd+bwd")
                    if ms is None:
                        continue
                    current.append(dict(op="masked_conv2d", provider=name, shape=[nb, ci, co, side],
                                        dtype=str(dtype)[6:], sparsity=sp, mode="fwd+bwd", ms=ms))
                print(f"conv {(nb, ci, co, side)} {dtype} {sp}: "
                      + ", ".join(f"{r['provider']} {r['ms']:.3f}" for r in current), flush=True)
                rows += current
                RUN.end(current)
    return rows


def soft_rows(sizes, linear_shapes, conv_shapes):
    return soft_mask_rows(sizes) + soft_linear_rows(linear_shapes) + soft_conv_rows(conv_shapes)


def soft_mask_rows(sizes, dtypes=(torch.float32, torch.bfloat16)):
    rows = []
    peak = peak_bandwidth(torch.cuda.get_device_name()) if DEVICE == "cuda" else None
    kernels = ["triton"] + (["cuda"] if DEVICE == "cuda" and has_kernel("soft_mask", "cuda") else [])
    for n in sizes:
        for dtype in dtypes:
            if not RUN.begin("soft_mask", n, dtype):
                continue
            w = torch.randn(n, device=DEVICE, dtype=dtype, requires_grad=True)
            s = torch.randn(n, device=DEVICE, dtype=dtype, requires_grad=True)
            item = w.element_size()
            current = []
            for mode, traffic in (("fwd", 3), ("fwd+bwd", 3 + 5)):  # fwd reads w, s, writes out; bwd 3 in, 2 out
                for name in kernels + ["eager"]:
                    if name == "eager":
                        fwd = lambda: w * torch.sigmoid(4.0 * s)  # noqa: E731
                    else:
                        fwd = (lambda b: lambda: _forced(b, lambda: sparseops.soft_mask(w, s, 4.0)))(name)
                    ms = _timed(f"soft_mask {name} {mode} {dtype} {n}", fwd, (w, s), mode)
                    if ms is None:
                        continue
                    gbs = traffic * n * item / (ms * 1e-3)
                    current.append(dict(op="soft_mask", provider=name, shape=[n], dtype=str(dtype)[6:], mode=mode,
                                        ms=ms, bandwidth=gbs, of_peak=gbs / peak if peak else None))
            rows += current
            RUN.end(current)
    return rows


def soft_linear_rows(linear_shapes):
    rows = []
    dtype = SOFT_DTYPE
    for m, n, k in linear_shapes:
        if RUN.expired():
            break
        x = torch.randn(m, k, device=DEVICE, dtype=dtype, requires_grad=True)
        w = torch.randn(n, k, device=DEVICE, dtype=dtype, requires_grad=True)
        for zero in (0.0, 0.5, 0.9):  # fraction of the mask exactly 0 (late CS), in whole 64-wide column bands
            if not RUN.begin("soft_masked_linear", (m, n, k), dtype, zero):
                continue
            s = torch.randn(n, k, device=DEVICE, dtype=dtype)
            s[:, : int(k * zero)] = -1e4
            s.requires_grad_()
            providers = {
                "dense": lambda: F.linear(x, w),
                "unfused": lambda: F.linear(x, sparseops.soft_mask(w, s, 4.0)),
                "fused": lambda: _forced("triton", lambda: sparseops.soft_masked_linear(x, w, s, 4.0)),
            }
            current = []
            for mode in ("fwd", "fwd+bwd"):
                for name, fwd in providers.items():
                    ms = _timed(f"soft_masked_linear {name} {mode} {(m, n, k)} {zero}", fwd, (x, w, s), mode)
                    if ms is not None:
                        current.append(dict(op="soft_masked_linear", provider=name, shape=[m, n, k],
                                            dtype=str(dtype)[6:], sparsity=zero, mode=mode, ms=ms))
            rows += current
            RUN.end(current)
    return rows


def soft_conv_rows(conv_shapes):
    rows = []
    dtype = SOFT_DTYPE
    for nb, ci, co, side in conv_shapes:
        if RUN.expired():
            break
        x = torch.randn(nb, ci, side, side, device=DEVICE, dtype=dtype, requires_grad=True)
        w = torch.randn(co, ci, 3, 3, device=DEVICE, dtype=dtype, requires_grad=True)
        for zero in (0.0, 0.5, 0.9):  # fraction of output channels whose mask is exactly 0 (late CS)
            if not RUN.begin("soft_masked_conv2d", (nb, ci, co, side), dtype, zero):
                continue
            s = torch.randn(co, ci, 3, 3, device=DEVICE, dtype=dtype)
            s[: int(co * zero)] = -1e4
            s.requires_grad_()
            providers = {
                "dense": lambda: F.conv2d(x, w, None, 1, 1),
                "unfused": lambda: F.conv2d(x, sparseops.soft_mask(w, s, 4.0), None, 1, 1),
                "fused": lambda: _forced("triton", lambda: sparseops.soft_masked_conv2d(x, w, s, 4.0, 1.0, None, 1, 1)),
            }
            current = []
            for name, fwd in providers.items():
                ms = _timed(f"soft_masked_conv2d {name} {(nb, ci, co, side)} {zero}", fwd, (x, w, s), "fwd+bwd")
                if ms is not None:
                    current.append(dict(op="soft_masked_conv2d", provider=name, shape=[nb, ci, co, side],
                                        dtype=str(dtype)[6:], sparsity=zero, mode="fwd+bwd", ms=ms))
            rows += current
            RUN.end(current)
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


def _plan(args):
    """[(function, args...)] in the order they run; with --budget-s the targets first, then the rest
    (groups measured already are not measured again)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    if args.tiny:
        dtypes = (fp32,) if DEVICE == "cpu" else (fp32, bf16)
        return [(linear_rows, TINY_LINEAR, [0.9], ("fwd", "fwd+bwd"), dtypes),
                (conv_rows, TINY_CONV, [0.9], dtypes), (soft_mask_rows, TINY_SOFT, dtypes),
                (soft_linear_rows, TINY_LINEAR), (soft_conv_rows, TINY_CONV)]
    sparsities = [0.0, 0.9, 0.99, 0.999] if args.quick else SPARSITIES
    linear, conv, soft = (LINEAR[:2], CONV[:2], SOFT_SIZES[:2]) if args.quick else (LINEAR, CONV, SOFT_SIZES)
    full = [(linear_rows, linear, sparsities), (conv_rows, conv, [s for s in sparsities if s >= 0.9] + [0.5]),
            (soft_mask_rows, soft), (soft_linear_rows, LINEAR[:2]), (soft_conv_rows, CONV[:2])]
    if args.budget_s is None:
        return full
    vgg = [c for c in CONV if c[1] >= 64][:2 if args.quick else 4]
    first = [(linear_rows, TARGET_LINEAR, TARGET_SPARSITIES, ("fwd", "fwd+bwd"), (bf16,)),
             (soft_mask_rows, SOFT_SIZES[1:2], (bf16,)), (soft_linear_rows, TARGET_LINEAR),
             (conv_rows, vgg, TARGET_SPARSITIES, (bf16,)), (soft_conv_rows, vgg[:2]),
             (linear_rows, TARGET_LINEAR, TARGET_SPARSITIES, ("fwd", "fwd+bwd"), (fp32,)),
             (conv_rows, vgg, TARGET_SPARSITIES, (fp32,))]
    return first + full


def main():
    global DEVICE, SOFT_DTYPE, WARMUP_MS, REP_MS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two shapes per op, four sparsities")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes; without a GPU on CPU tensors under TRITON_INTERPRET=1 (host clock)")
    parser.add_argument("--budget-s", type=float, help="stop before a group that would end past this many seconds; "
                        "the issue's targets first")
    parser.add_argument("--rep-ms", type=float, help="do_bench's rep (and a quarter of it as warm-up); default 100")
    parser.add_argument("--write-thresholds", action="store_true", help="rewrite thresholds.json's cuda section")
    parser.add_argument("--out", type=Path, help="results path (.json; .md beside it)")
    parser.add_argument("--out-dir", type=Path, help="folder for gpu-<device>.{json,md} (default results/)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        if not args.tiny:
            raise SystemExit("bench_gpu.py needs a CUDA GPU (--tiny runs it on CPU tensors under Triton's interpreter)")
        if args.write_thresholds:
            raise SystemExit("--write-thresholds needs GPU measurements")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when sparseops.triton is first imported
        DEVICE, SOFT_DTYPE = "cpu", torch.float32  # the interpreter computes in numpy: no bfloat16 dots
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter)"
    if args.rep_ms:
        WARMUP_MS, REP_MS = max(1.0, args.rep_ms / 4), args.rep_ms
    slug = "dry-run" if DEVICE == "cpu" else device.lower().replace("nvidia ", "").replace(" ", "-")
    out = args.out or (args.out_dir or RESULTS) / f"gpu-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if args.budget_s is not None:
        RUN.deadline = time.monotonic() + args.budget_s

    def save(final=False):
        meta = dict(device=device, torch=torch.__version__, cuda=torch.version.cuda, seconds=time.time() - start,
                    date=time.strftime("%Y-%m-%d"), budget_s=args.budget_s, rep_ms=REP_MS, quick=args.quick,
                    tiny=args.tiny, complete=final and not RUN.skipped, skipped_count=len(RUN.skipped),
                    skipped=RUN.skipped[:50], errors=RUN.errors[:50])
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dict(meta=meta, rows=RUN.rows), indent=1) + "\n")
        tmp.replace(out)
        note = (f"\n{len(RUN.skipped)} groups not measured (budget {args.budget_s:g} s), "
                f"{len(RUN.errors)} errors (meta in the JSON).\n" if RUN.skipped or RUN.errors else "")
        out.with_suffix(".md").write_text(markdown(RUN.rows, device) + note)

    RUN.save = save
    try:
        for fn, *fn_args in _plan(args):
            fn(*fn_args)
            if RUN.expired():
                break
    except KeyboardInterrupt:  # stopped from outside (gpu_check.sh's timeout): keep what was measured
        RUN.skipped.append("interrupted")
        print("bench_gpu.py: interrupted; saving what was measured", flush=True)
    # what a budget left out of the remaining plan (for the record)
    if RUN.expired() and args.budget_s is not None:
        RUN.skipped.append("budget spent")
    save(final=True)
    rows = RUN.rows
    mean = f"{statistics.fmean(r['ms'] for r in rows):.3f} ms mean" if rows else "no rows"
    print(f"wrote {out} and {out.with_suffix('.md')} ({len(rows)} rows, {mean}, {time.time() - start:.0f} s; "
          f"{len(RUN.skipped)} groups skipped, {len(RUN.errors)} errors)")
    if args.write_thresholds:
        if RUN.skipped or RUN.errors:
            print("warning: thresholds from an incomplete run (see meta.skipped / meta.errors)")
        data = json.loads(THRESHOLDS.read_text())
        data["cuda"] = derive_thresholds(rows) | {"_measured_on": device}
        THRESHOLDS.write_text(json.dumps(data, indent=2) + "\n")
        print(f"rewrote {THRESHOLDS} (cuda): {json.dumps(data['cuda'])[:400]}")


if __name__ == "__main__":
    main()
