"""`python -m sparseops info|demo|ticket`."""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys

import torch


def _no_gpu_reason() -> str:
    """Why torch sees no GPU, in torch's words where it has them (e.g. no NVIDIA driver)."""
    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} hides every GPU"
    try:
        torch.cuda.init()
    except Exception as exc:  # torch's message says what is missing
        return str(exc).split(". ")[0]
    return "torch.cuda.is_available() is False"


def info() -> str:
    import sparseops
    from sparseops import backend
    from sparseops.backend import CUDA_EXTENSION_ERROR

    lines = [f"sparseops {sparseops.__version__}",
             f"python {platform.python_version()} on {platform.machine()} ({platform.system()})",
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"]
    isa = torch.ops.sparseops._cpu_isa()
    supported = ", ".join(torch.ops.sparseops._cpu_isa_supported())
    lines.append(f"CPU backend: compiled; kernels in use: {isa} (this CPU runs: {supported}; "
                 f"SPARSEOPS_CPU_ISA caps it); L2 {torch.ops.sparseops._cpu_l2_bytes() // 1024} KiB per core, "
                 f"what the conv kernels' channel blocks are sized to")
    lines.append(f"threads: {torch.get_num_threads()} (torch.set_num_threads / OMP_NUM_THREADS)")
    if CUDA_EXTENSION_ERROR is None:
        archs = torch.ops.sparseops._cuda_arch_list()
        gpu = (f"GPU: {torch.cuda.get_device_name()}" if torch.cuda.is_available()
               else f"CUDA kernels cannot run here: {_no_gpu_reason()}")
        lines.append(f"CUDA backend: compiled for TORCH_CUDA_ARCH_LIST={archs}; {gpu}")
        lines.append("  CUDA kernels: soft_mask, soft_mask_l1, masked_linear, masked_conv2d (SPARSEOPS_BACKEND=cuda)")
    elif importlib.util.find_spec("sparseops._cuda") is None:
        why = ("torch is a CPU-only build" if torch.version.cuda is None else
               "built with SPARSEOPS_NO_CUDA=1 or without nvcc; a +cu wheel or a source build with nvcc has it")
        lines.append(f"CUDA backend: not built (this install has no sparseops._cuda: {why})")
    else:
        lines.append(f"CUDA backend: built but cannot be loaded: {CUDA_EXTENSION_ERROR}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    why = backend.triton_unavailable(device)
    if why is None or "not installed" not in why:
        import triton

        state = "kernels usable" + (" under TRITON_INTERPRET=1 (testing only)" if device.type == "cpu" else "")
        lines.append(f"Triton: {triton.__version__}; {state if why is None else why}")
        lines.append("  Triton kernels: soft_mask, soft_mask_l1, masked_linear and masked_conv2d (CSR and block "
                     "16/32/64), soft_masked_linear and soft_masked_conv2d (fused); SPARSEOPS_BACKEND=triton")
        gpu = backend.thresholds().get("cuda")
        lines.append("  auto on CUDA: " + ("measured thresholds in thresholds.json" if gpu else
                                           "no GPU measurements in thresholds.json yet, so masked ops run their "
                                           "dense fallback; benchmarks/bench_gpu.py --write-thresholds measures them"))
    else:
        lines.append(f"Triton: {why}")
    density = backend.max_density("masked_linear", "cpu")
    widths = backend.thresholds().get("cpu", {}).get("masked_linear_by_width", [])
    narrow = f", lower for narrow layers: {', '.join(f'width {h}: {d:g}' for h, d in widths)}" if widths else ""
    lines.append(f"backend: {backend.get_backend()} (SPARSEOPS_BACKEND); masked_linear on CPU runs dense above "
                 f"density {density:g}{narrow} (thresholds.json; SPARSEOPS_MAX_DENSITY overrides)")
    from . import tuning

    cached = tuning.entries()
    lines.append(f"auto measures on first use: {'on' if tuning.measuring_allowed(torch.device('cpu')) else 'off'} "
                 f"(SPARSEOPS_TUNE); cache {tuning.cache_file()}: {len(cached)} measured keys"
                 + "".join(f"\n  {k}: {v['winner']}" for k, v in sorted(cached.items())[:20])
                 + (f"\n  ... ({len(cached) - 20} more: python -m sparseops tune --show)" if len(cached) > 20 else ""))
    planes = backend.thresholds().get("cpu", {}).get("masked_conv2d_by_plane", [])
    lines.append("masked_conv2d on CPU: sparse kernel for groups=1, stride 1, C_in*kh*kw >= 64, up to density "
                 + (", ".join(f"{d:g} at {p} output positions" for p, d in planes) or "-")
                 + "; grouped and strided convolutions and denser masks run the reference (one mask multiply)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparseops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, compiled backends, CPU features, threads")
    demo = sub.add_parser("demo", help="a short IMP search (an open_lth preset scaled down) on scikit-learn's digits "
                                        "or synthetic CIFAR, timed with sparseops and with plain mask multiplication")
    demo.add_argument("--data", choices=("digits", "synthetic-cifar"), default="digits",
                      help="digits: mnist_lenet_300_100's recipe on a wide MLP; synthetic-cifar: cifar_resnet_20")
    demo.add_argument("--levels", type=int, default=10)
    demo.add_argument("--epochs", type=int, default=3)
    demo.add_argument("--hidden", type=int, default=2048)
    demo.add_argument("--batch-size", type=int, default=128)
    demo.add_argument("--seed", type=int, default=0)
    from .tickets.command import add_arguments

    ticket = sub.add_parser("ticket", help="lottery-ticket search (IMP, CS, random pruning) on a built-in model")
    add_arguments(ticket)
    from .cli_tune import add_arguments as add_tune_arguments

    add_tune_arguments(sub.add_parser("tune", help="measure auto's choices on this machine ahead of time "
                                                   "(the README's shapes), or --show the cache"))
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
    elif args.command == "demo":
        from .demo import run

        run(levels=args.levels, epochs=args.epochs, hidden=args.hidden, batch_size=args.batch_size, seed=args.seed,
            data=args.data)
    elif args.command == "ticket":
        from .tickets.command import run

        return run(args)
    elif args.command == "tune":
        from .cli_tune import run

        return run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
