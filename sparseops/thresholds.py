"""The prior of `auto`'s choice: the measured break-even densities in thresholds.json (written by
benchmarks/tune_thresholds.py and benchmarks/bench_gpu.py --write-thresholds), read once."""
from __future__ import annotations

import json
from importlib import resources

from ._library import cpu_isa


def _load_thresholds() -> dict:
    with resources.files(__package__).joinpath("thresholds.json").open() as f:
        return json.load(f)


_THRESHOLDS = _load_thresholds()


def thresholds() -> dict:
    """The measured break-even table (thresholds.json), as loaded (tests patch entries of it)."""
    return _THRESHOLDS


def table(device_type: str) -> dict:
    """The thresholds of a device; on the CPU those measured for the kernel variant in use
    ("cpu-avx2", ...) where they differ, else "cpu"."""
    if device_type == "cpu":
        return _THRESHOLDS.get(f"cpu-{cpu_isa()}") or _THRESHOLDS.get("cpu", {})
    return _THRESHOLDS.get(device_type, {})


def interpolate(points, h: float) -> float:
    if h <= points[0][0]:
        return float(points[0][1])
    for (h0, d0), (h1, d1) in zip(points, points[1:]):
        if h <= h1:
            return float(d0 + (d1 - d0) * (h - h0) / (h1 - h0))
    return float(points[-1][1])


def measured_faster(op: str, device_type: str) -> bool:
    """Whether a fused GPU op was measured faster than its unfused torch equivalent ("fused" in
    thresholds.json, written by benchmarks/bench_gpu.py); `auto` uses it only then."""
    return bool(_THRESHOLDS.get(device_type, {}).get("fused", {}).get(op, False))


# Channel masks (channel_masked_*, one dense product of the kept size): in `auto` taken without measuring
# up to CHANNEL_MAX_WORK of the dense product, a measured candidate (tuning, and its guard) above it up to
# CHANNEL_MEASURE_MAX_WORK: benchmarks/bench_structured.py measured it slower than the full dense layer
# with 2-10% of the channels removed, 1.2-1.9x faster with 50% removed, more beyond (every VGG-16 conv
# and the 768->3072 linear layer, both ISAs), so measuring there only costs a search its first calls at
# every new bucket. A sparse mask with a few empty rows (work above 0.9) stays on the paths it had.
CHANNEL_MAX_WORK, CHANNEL_MEASURE_MAX_WORK = 0.5, 0.9


def break_even(op: str, device_type: str, shape: tuple[int, int] | None = None, *,
               plane: int | None = None) -> float:
    """The measured density above which `op`'s sparse kernel loses to its dense fallback.

    For a weight of `shape` [N, K] it also follows the break-even by layer width h = N*K/(N+K)
    ("<op>_by_width": [[h, density], ...], interpolated): the sparse kernels' fixed cost grows like
    M*(N+K) while the dense GEMM's grows like M*N*K, so narrow layers need sparser masks before the
    sparse path pays, and the narrowest never do. For a convolution, `plane` (output positions)
    selects "<op>_by_plane" the same way: its fixed cost (transposing the input, writing the output)
    weighs more against small planes.
    """
    points_table = table(device_type)
    cap = float(points_table.get(op, 0.0))  # not measured on this device: the dense fallback (never slower)
    if plane is not None:
        points = points_table.get(f"{op}_by_plane")
        return min(cap, interpolate(points, plane)) if points else cap
    points = points_table.get(f"{op}_by_width")
    if shape is None or not points:
        return cap
    n, k = shape
    h = n * k / (n + k) if n + k else 0.0
    return min(cap, interpolate(points, h))
