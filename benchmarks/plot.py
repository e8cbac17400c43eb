"""Speed-up vs sparsity curves (PNG) and markdown tables from benchmark results:

    python benchmarks/plot.py benchmarks/results/conv-....json     # pytest-benchmark JSON of bench_conv.py
    python benchmarks/plot.py benchmarks/results/search-....json   # bench_search.py's JSON

writes <same name>.png (and .md for the tables) beside the JSON and prints the tables.
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def speedup_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    """The styling every speed-up plot shares: log scale, a line at 1x, a small legend."""
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)


def conv(data, png: Path) -> list[str]:
    rows = [dict(b["extra_info"], ms=b["stats"]["median"] * 1e3) for b in data["benchmarks"]
            if b["extra_info"].get("op") == "masked_conv2d"]
    t = defaultdict(dict)
    for r in rows:
        t[(r["net"], tuple(r["shape"]), r["batch"], r["mode"], r["sparsity"])][r["provider"]] = r["ms"]
    nets = sorted({k[0] for k in t})
    fig, axes = plt.subplots(1, 2 * len(nets), figsize=(6.5 * 2 * len(nets), 4.4), squeeze=False)
    lines = []
    for i, net in enumerate(nets):
        for j, mode in enumerate(("fwd", "fwd_bwd")):
            ax = axes[0][2 * i + j]
            for shape in sorted({k[1] for k in t if k[0] == net and k[2] == 128}):
                pts = sorted((k[4], v) for k, v in t.items() if k[:4] == (net, shape, 128, mode))
                sp = [p for p, v in pts if "sparseops" in v and "dense" in v]
                ax.plot([p * 100 for p in sp], [dict(pts)[p]["dense"] / dict(pts)[p]["sparseops"] for p in sp],
                        marker="o", label="{}->{} @{}x{} s{}".format(shape[0], shape[1], shape[2], shape[2], shape[3]))
            speedup_axes(ax, "sparsity (%)", "speed-up over dense conv (oneDNN)",
                         f"{net}, batch 128, {mode.replace('_', '+')}")
        lines += [f"\n**{net}, batch 128, fwd+bwd: speed-up of sparseops over dense conv (and over prune)**\n",
                  "| layer (C_in->C_out @ side, stride) | " + " | ".join(
                      f"{p:.0%}" for p in sorted({k[4] for k in t if k[0] == net})) + " |",
                  "|---|" + "---:|" * len({k[4] for k in t if k[0] == net})]
        for shape in sorted({k[1] for k in t if k[0] == net and k[2] == 128}):
            cells = []
            for sp in sorted({k[4] for k in t if k[0] == net}):
                v = t.get((net, shape, 128, "fwd_bwd", sp), {})
                cells.append(f"{v['dense'] / v['sparseops']:.2f}x ({v['prune'] / v['sparseops']:.2f}x)"
                             if {"dense", "prune", "sparseops"} <= v.keys() else "-")
            lines.append(f"| {shape[0]}->{shape[1]} @{shape[2]}, s{shape[3]} | " + " | ".join(cells) + " |")
    small = sorted({(k[1], k[4]) for k in t if k[2] == 32})
    if small:
        lines += ["\n**VGG-16, batch 32, fwd+bwd: speed-up over dense conv**\n", "| layer | sparsity | speed-up |",
                  "|---|---:|---:|"]
        for shape, sp in small:
            v = t[("vgg16", shape, 32, "fwd_bwd", sp)]
            lines.append(f"| {shape[0]}->{shape[1]} @{shape[2]} | {sp:.0%} | {v['dense'] / v['sparseops']:.2f}x |")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return lines


def search(data, png: Path) -> list[str]:
    ours, ref = data["imp"]["sparseops"], data["imp"]["mask_multiply"]
    sp = [r["sparsity"] * 100 for r in ours]
    step = lambda r: statistics.median(r["step_times"])  # noqa: E731
    speed = [step(a) / step(b) for a, b in zip(ref, ours, strict=True)]
    fig, axes = plt.subplots(1, 2 if "cs" in data else 1, figsize=(13 if "cs" in data else 6.5, 4.4), squeeze=False)
    ax = axes[0][0]
    ax.plot(sp, speed, marker="o")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("sparsity at the IMP level (%)")
    ax.set_ylabel("step speed-up over mask multiplication")
    ax.set_title("IMP on CIFAR VGG-16, batch {}".format(data["args"]["batch"]))
    total_a, total_b = sum(r["level_time"] for r in ref), sum(r["level_time"] for r in ours)
    lines = [f"\n**IMP ({data['args'].get('scope', 'global')}), CIFAR VGG-16, {len(ours) - 1} levels at rate 0.2, "
             f"{data['args']['steps']} steps per level, "
             f"batch {data['args']['batch']}**: whole search {total_a:.1f} s with mask multiplication, "
             f"{total_b:.1f} s with sparseops ({total_a / total_b:.2f}x)\n",
             "| level | sparsity | step, mask mult. (ms) | step, sparseops (ms) | speed-up |", "|---:|---:|---:|---:|---:|"]
    for a, b, s in zip(ref, ours, speed, strict=True):
        lines.append(f"| {b['level']} | {b['sparsity']:.1%} | {step(a) * 1e3:.0f} | {step(b) * 1e3:.0f} | {s:.2f}x |")
    if "cs" in data:
        cs = data["cs"]
        ax = axes[0][1]
        ax.plot([r["beta"] for r in cs], [r["eager"] / r["sparseops"] for r in cs], marker="o", label="speed-up")
        ax.plot([r["beta"] for r in cs], [r["mask_exact_zero"] for r in cs], ls="--", label="mask exactly 0 (fraction)")
        ax.set_xscale("log")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("beta")
        ax.set_title("CS on CIFAR VGG-16: step vs the eager soft mask")
        ax.legend()
        lines += ["\n**CS along the beta schedule, CIFAR VGG-16** (forward+backward step)\n",
                  "| beta | mask exactly 0 | eager (ms) | sparseops (ms) | speed-up |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['beta']:.1f} | {r['mask_exact_zero']:.1%} | {r['eager'] * 1e3:.0f} | "
                  f"{r['sparseops'] * 1e3:.0f} | {r['eager'] / r['sparseops']:.2f}x |" for r in cs]
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return lines


def main(path: str) -> None:
    p = Path(path)
    data = json.loads(p.read_text())
    lines = search(data, p.with_suffix(".png")) if "imp" in data else conv(data, p.with_suffix(".png"))
    text = "\n".join(lines) + "\n"
    p.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {p.with_suffix('.png')} and {p.with_suffix('.md')}")


if __name__ == "__main__":
    main(sys.argv[1])
