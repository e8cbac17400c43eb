"""Turns a pytest-benchmark JSON file into ratio tables (markdown) and a speed-up plot (PNG).

    python benchmarks/report.py benchmarks/results/cpu-YYYYmmdd-HHMMSS.json
writes <same name>.md and <same name>.png beside the JSON and prints the markdown.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def load(path):
    data = json.loads(Path(path).read_text())
    rows = []
    for b in data["benchmarks"]:
        e = dict(b["extra_info"])
        e["median_ms"] = b["stats"]["median"] * 1e3
        rows.append(e)
    return data["machine_info"], rows


def linear_tables(rows):
    by = defaultdict(dict)
    for r in rows:
        if r["op"] == "masked_linear":
            by[(tuple(r["shape"]), r["mode"], r["sparsity"])][r["provider"]] = r
    out = []
    for shape in sorted({k[0] for k in by}):
        for mode in ("fwd", "fwd_bwd"):
            out.append(f"\n**{shape[0]} rows x {shape[1]} -> {shape[2]}, {mode.replace('_', '+')}** "
                       "(median ms; speed-up of sparseops over each; peak MiB of a step)\n")
            out.append("| sparsity | dense ms | prune ms | torch CSR ms | sparseops ms | vs dense | vs prune "
                       "| vs CSR | peak MiB dense / prune / CSR / sparseops |")
            out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for sp in sorted({k[2] for k in by if k[0] == shape and k[1] == mode}):
                p = by[(shape, mode, sp)]
                t = {k: v["median_ms"] for k, v in p.items()}
                mem = " / ".join(f"{p[k]['peak_bytes'] / 2**20:.1f}" if k in p else "-"
                                 for k in ("dense", "prune", "torch_sparse_csr", "sparseops"))
                ratio = lambda k: f"{t[k] / t['sparseops']:.2f}x" if k in t and "sparseops" in t else "-"  # noqa
                out.append(f"| {sp:.0%} | {t.get('dense', 0):.2f} | {t.get('prune', 0):.2f} | "
                           f"{t.get('torch_sparse_csr', 0):.2f} | {t.get('sparseops', 0):.2f} | {ratio('dense')} | "
                           f"{ratio('prune')} | {ratio('torch_sparse_csr')} | {mem} |")
    return out


def soft_mask_tables(rows):
    by = defaultdict(dict)
    for r in rows:
        if r["op"].startswith("soft_mask"):
            by[r["op"]][r["provider"]] = r
    if not by:
        return []
    out = ["\n**Soft mask, 3072x768, forward+backward** (median ms; peak MiB)\n",
           "| op | eager ms | sparseops ms | speed-up | peak MiB eager / sparseops |", "|---|---:|---:|---:|---:|"]
    for op, p in sorted(by.items()):
        for provider, name in (("sparseops", op), ("sparseops_with_l1", f"{op} (soft_mask_with_l1)")):
            if provider not in p:
                continue
            e, s = p["eager"], p[provider]
            out.append(f"| {name} | {e['median_ms']:.2f} | {s['median_ms']:.2f} | {e['median_ms'] / s['median_ms']:.2f}x | "
                       f"{e['peak_bytes'] / 2**20:.1f} / {s['peak_bytes'] / 2**20:.1f} |")
    return out


def plot(rows, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from plot import speedup_axes

    lin = [r for r in rows if r["op"] == "masked_linear"]
    shapes = sorted({tuple(r["shape"]) for r in lin})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        for mode, style in (("fwd", "--"), ("fwd_bwd", "-")):
            pts = defaultdict(dict)
            for r in lin:
                if tuple(r["shape"]) == shape and r["mode"] == mode:
                    pts[r["sparsity"]][r["provider"]] = r["median_ms"]
            sps = sorted(pts)
            for prov, color in (("sparseops", "C0"), ("torch_sparse_csr", "C1"), ("prune", "C2")):
                ys = [pts[s]["dense"] / pts[s][prov] for s in sps]
                ax.plot([100 * s for s in sps], ys, style, color=color, marker="o", label=f"{prov} {mode}")
        speedup_axes(ax, "sparsity (%)", "speed-up over dense nn.Linear", f"{shape[0]} rows x {shape[1]} -> {shape[2]}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(path):
    machine, rows = load(path)
    cpu = machine.get("cpu", {}).get("brand_raw", "unknown CPU")
    threads = sorted({r.get("threads") for r in rows})
    lines = [f"Machine: {cpu}, {threads} threads; source: `{Path(path).name}`"]
    lines += linear_tables(rows) + soft_mask_tables(rows)
    text = "\n".join(lines) + "\n"
    Path(path).with_suffix(".md").write_text(text)
    if any(r["op"] == "masked_linear" for r in rows):
        plot(rows, Path(path).with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main(sys.argv[1])
