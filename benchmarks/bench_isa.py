"""The headline ratios per CPU instruction set, interleaved in one process per ISA: masked linear,
the fused soft mask and masked conv2d, each against dense torch, torch.nn.utils.prune's mask
multiply and torch.sparse CSR (MKL), with sparseops' kernel forced and with `auto` (measured).

    python benchmarks/bench_isa.py [--isa avx2 avx512] [--rounds 7] [--out results/isa-<cpu>.md]

Each ISA runs in a child process. For avx2, torch itself is capped to AVX2 as well
(ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA), so that on an AVX-512 machine the
dense and CSR baselines are what an AVX2-only machine's torch runs. The VMs this runs on are noisy:
rounds are interleaved (every provider once per round) and medians reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

TORCH_CAPS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}
LINEAR = (512, 768, 3072)  # rows, in, out
LINEAR_SPARSITIES = (0.5, 0.9, 0.95, 0.99)
CONV = (128, 256, 8, 256)  # batch, C_in, H=W, C_out (3x3, padding 1)
CONV_SPARSITIES = (0.95, 0.98)


def _cases():
    import sparseops
    from common import make_linear

    g = torch.Generator().manual_seed(0)
    rows, k, n = LINEAR
    for sp in LINEAR_SPARSITIES:
        mask = torch.rand(n, k, generator=g) >= sp
        x = torch.randn(rows, k, generator=g, requires_grad=True)
        grad = torch.randn(rows, n, generator=g)
        layers = {p: make_linear(p, k, n, mask) for p in ("dense", "prune", "torch_sparse_csr", "sparseops")}

        def step(layer, backend=None):
            def run():
                x.grad = None
                for prm in layer.parameters():
                    prm.grad = None
                with sparseops.backend(backend):
                    layer(x).backward(grad)
            return run

        yield (f"linear {k}->{n}, {rows} rows, fwd+bwd, {sp:.0%} sparse",
               {"dense": step(layers["dense"]), "prune": step(layers["prune"]),
                "torch CSR": step(layers["torch_sparse_csr"]), "sparseops kernel": step(layers["sparseops"], "cpu"),
                "sparseops auto": step(layers["sparseops"])})
    w, s = torch.randn(3072, 768, requires_grad=True), torch.randn(3072, 768, requires_grad=True)
    gw = torch.randn(3072, 768)

    def soft(how):
        def run():
            w.grad = s.grad = None
            if how == "eager":
                m = torch.sigmoid(4.0 * s)
                out, pen = w * 2.0 * m, 2.0 * m.sum()
            else:
                with sparseops.backend("cpu"):
                    out, pen = (sparseops.soft_mask_with_l1(w, s, 4.0, 2.0) if how == "pair" else
                                (sparseops.soft_mask(w, s, 4.0, 2.0), sparseops.soft_mask_l1(s, 4.0, 2.0)))
            torch.autograd.backward([out, pen], [gw, torch.tensor(1e-3)])
        return run

    yield "soft mask fwd+bwd+L1, 3072x768", {"eager torch": soft("eager"), "sparseops kernels": soft("two"),
                                             "sparseops soft_mask_with_l1": soft("pair")}
    b, c, hw, co = CONV
    xc = torch.randn(b, c, hw, hw, generator=g, requires_grad=True)
    for sp in CONV_SPARSITIES:
        wc = torch.randn(co, c, 3, 3, generator=g, requires_grad=True)
        mc = torch.rand(co, c, 3, 3, generator=g) >= sp
        gc = torch.randn(b, co, hw, hw, generator=g)

        def conv(backend):
            def run():
                xc.grad = wc.grad = None
                if backend == "dense":
                    torch.nn.functional.conv2d(xc, wc * mc, None, 1, 1).backward(gc)
                else:
                    with sparseops.backend(backend):
                        sparseops.masked_conv2d(xc, wc, mc, None, 1, 1).backward(gc)
            return run

        yield (f"conv {c}->{co} 3x3 @{hw}x{hw}, batch {b}, fwd+bwd, {sp:.0%} sparse",
               {"dense": conv("dense"), "sparseops kernel": conv("cpu"), "sparseops auto": conv(None)})


def interleaved(cases: list, rounds: int) -> dict:
    """Median ms per (case label, provider): each case's providers once per round, after untimed runs
    (common.warm_up: one each, `auto` as many as it measures for)."""
    from common import warm_up

    for _, fns in cases:
        for fn in fns.values():
            warm_up(fn)
    times = {label: {p: [] for p in fns} for label, fns in cases}
    for _ in range(rounds):
        for label, fns in cases:
            for p, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[label][p].append(time.perf_counter() - t0)
    return {label: {p: statistics.median(t) * 1e3 for p, t in ps.items()} for label, ps in times.items()}


def child(isa: str, rounds: int, cases=None) -> dict:
    import sparseops
    from sparseops import tuning

    torch.set_num_threads(2)
    torch.ops.sparseops._set_cpu_isa(isa)
    medians = interleaved(list(cases() if cases else _cases()), rounds)
    winners = {k: v["winner"] for k, v in tuning.entries().items()}
    return {"isa": isa, "threads": torch.get_num_threads(), "cpu": tuning.machine()["cpu"],
            "medians_ms": medians,
            "auto_choices": winners, "measured_s": tuning.measured_seconds(),
            "sparseops": sparseops.__version__, "torch": torch.__version__}


def table(results: list[dict]) -> str:
    out = [f"CPU: {results[0]['cpu']}, {results[0]['threads']} threads, torch {results[0]['torch']}. "
           "Times are medians of interleaved rounds (ms); ratios are baseline time / sparseops time (>1: faster). "
           "For avx2, torch is capped to AVX2 too.", ""]
    for r in results:
        out += [f"### {r['isa']}", "", "| case | times (ms) | kernel vs dense | kernel vs CSR | auto vs dense | auto vs best other |",
                "|---|---|---|---|---|---|"]
        for label, t in r["medians_ms"].items():
            base = t.get("dense", t.get("eager torch"))
            ours = t.get("sparseops kernel", t.get("sparseops soft_mask_with_l1"))
            others = [v for p, v in t.items() if not p.startswith("sparseops")]
            auto = t.get("sparseops auto")
            csr = t.get("torch CSR")
            csr_txt = f"{csr / ours:.2f}x" if csr else "-"
            auto_txt = (f"{base / auto:.2f}x", f"{min(others) / auto:.2f}x") if auto else ("-", "-")
            shown = ", ".join(f"{p} {v:.1f}" for p, v in t.items())
            out.append(f"| {label} | {shown} | {base / ours:.2f}x | {csr_txt} | {auto_txt[0]} | {auto_txt[1]} |")
        out += ["", f"auto measured for {r['measured_s']:.2f} s in all; its choices: "
                + ", ".join(f"`{k.split('|')[0]} {k.split('|')[3]} {k.split('|')[4]}`: {v}"
                            for k, v in r["auto_choices"].items()), ""]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--isa", nargs="+", default=None)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rounds)))
        return 0
    results = per_isa(__file__, args.isa, args.rounds)
    if results is None:
        return 1
    write(table(results), results, args.out)
    return 0


def write(text: str, results: list[dict], out: str | None) -> None:
    """Prints the table; with `out`, writes it there and the results beside it as .json."""
    print(text)
    if out:
        Path(out).write_text(text + "\n")
        Path(out).with_suffix(".json").write_text(json.dumps(results, indent=1))


def per_isa(script: str, isas: list[str] | None, rounds: int, extra: tuple[str, ...] = ()) -> list[dict] | None:
    """`script --child ISA` per ISA this CPU runs (torch capped alike), each result its last stdout line."""
    import sparseops  # noqa: F401

    results = []
    for isa in isas or [i for i in torch.ops.sparseops._cpu_isa_supported() if i != "default"]:
        env = {**os.environ, **TORCH_CAPS.get(isa, {}), "SPARSEOPS_CPU_ISA": isa}
        run = subprocess.run([sys.executable, script, "--child", isa, "--rounds", str(rounds), *extra], env=env,
                             capture_output=True, text=True, cwd=Path(__file__).parent)
        if run.returncode:
            print(run.stderr[-3000:], file=sys.stderr)
            return None
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    return results


if __name__ == "__main__":
    sys.exit(main())
