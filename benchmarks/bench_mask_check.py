"""What the per-call check for mask writes behind the version counter costs (sparseops.layout.refresh;
for a ticket-mode soft layer, its version check and the s > 0 comparison it does not make), against the layer it guards: a MaskedLinear's forward and
forward+backward with the check on and off (interleaved, median of repeats).

    python benchmarks/bench_mask_check.py [--threads 1] [--shape 3072 768] [--repeats 15]
"""
import argparse
import statistics
import time

import torch

import sparseops
from sparseops import layout


def _time(fn, repeats, inner=5):
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - start) / inner * 1e6)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shape", type=int, nargs=2, default=[3072, 768], metavar=("OUT", "IN"))
    p.add_argument("--batches", type=int, nargs="+", default=[64, 512])
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.5])
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, k = args.shape
    print(f"torch {torch.__version__}, {args.threads} thread(s), cpu ISA {torch.ops.sparseops._cpu_isa()}, "
          f"layer {n}x{k}, median of {args.repeats} (us)\n")
    print("| density | batch | refresh | forward (check off) | forward (on) | fwd+bwd (off) | fwd+bwd (on) |")
    print("|---|---|---|---|---|---|---|")
    lin = sparseops.patch(torch.nn.Linear(k, n))
    for d in args.densities:
        lin.set_mask(torch.rand(n, k) < d)
        layout.refresh(lin.weight_mask)
        check = statistics.median(_time(lambda: layout.refresh(lin.weight_mask), args.repeats, 20))
        for b in args.batches:
            x = torch.randn(b, k)

            def fwd():
                with torch.no_grad():
                    lin(x)

            def step():
                lin.zero_grad(set_to_none=True)
                lin(x).sum().backward()

            res = {}
            for _ in range(3):  # interleaved: load on the machine moves both alike
                for on in (False, True):
                    layout.CHECK_WRITES = on
                    res.setdefault(("f", on), []).extend(_time(fwd, args.repeats // 3 + 1))
                    res.setdefault(("s", on), []).extend(_time(step, args.repeats // 3 + 1))
            layout.CHECK_WRITES = True
            m = {key: statistics.median(v) for key, v in res.items()}
            print(f"| {d} | {b} | {check:.0f} | {m['f', False]:.0f} | {m['f', True]:.0f} | {m['s', False]:.0f} "
                  f"| {m['s', True]:.0f} |")
    soft = sparseops.patch(torch.nn.Linear(k, n), mode="soft")
    with torch.no_grad():
        soft.weight_score.normal_()
    soft.set_ticket(True)
    kept = statistics.median(_time(soft._current_hard_mask, args.repeats, 20))
    hard = soft._current_hard_mask()
    compare = statistics.median(_time(lambda: layout.same_content(soft.weight_score.detach() > 0, hard),
                                      args.repeats, 20))
    print(f"\nticket mode: the version check per forward {kept:.0f} us; s > 0 compared with the hard mask "
          f"(the per-call content check not taken) {compare:.0f} us")


if __name__ == "__main__":
    main()
