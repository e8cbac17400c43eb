"""Compiles every Triton kernel of sparseops, with every autotune config, for real GPU targets
(sm_80 and sm_90) on a machine without a GPU: `triton.compile(ASTSource(...), target=GPUTarget(...))`
runs Triton's whole pipeline down to a cubin (ptxas included), so a kernel that the interpreter
accepts but the GPU compiler rejects fails here, in CI.

    python tests/triton_aot.py [--all-dtypes]     # run by tests/test_triton.py in a subprocess

It must run without TRITON_INTERPRET (under it the kernels are interpreter functions).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import sys

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import sparseops  # noqa: F401  (registers the C++ ops the Triton variants are defined against)
from sparseops.triton import (masked_conv2d, masked_conv2d_block, masked_linear, masked_linear_block, soft_mask,
                              soft_masked_conv2d, soft_masked_linear)

INDEX = {"order_ptr", "row_ptr", "col_idx", "t_row_ptr", "t_col_idx", "tile_rows"}
FLOAT_ARGS = {"beta", "scale"}
# call-site constexprs (the launchers pass these); a 3x3 stride-1 convolution for the conv kernels
EXTRA = dict(HAS_BIAS=True, SPLIT=2, B=32, KH=3, KW=3, SH=1, SW=1, PH=1, PW=1, DH=1, DW=1)
KERNELS = [(soft_mask, "_fwd"), (soft_mask, "_bwd"), (soft_mask, "_l1_bwd"), (soft_mask, "_l1_partial"),
           (masked_linear, "_spmm"), (masked_linear, "_sddmm"),
           (masked_conv2d, "_fwd"), (masked_conv2d, "_dx"), (masked_conv2d, "_dw"),
           (masked_linear_block, "_fwd"), (masked_linear_block, "_dx"), (masked_linear_block, "_dw"),
           (masked_conv2d_block, "_fwd"), (masked_conv2d_block, "_dx"), (masked_conv2d_block, "_dw"),
           (soft_masked_linear, "_fwd"), (soft_masked_linear, "_dx"), (soft_masked_linear, "_dws"),
           (soft_masked_conv2d, "_fwd"), (soft_masked_conv2d, "_dx"), (soft_masked_conv2d, "_dws")]
DOT_MODULES = (masked_linear_block, masked_conv2d_block, soft_masked_linear, soft_masked_conv2d)  # tl.dot kernels
DTYPES = {"fp32": tl.float32, "bf16": tl.float32, "fp16": tl.float32, "fp64": tl.float64}  # storage -> accumulator


def jobs(all_dtypes: bool):
    """(label, module name, kernel name, storage dtype, constexprs, options, arch) for each compile."""
    for module, name in KERNELS:
        kernel = getattr(module, name)
        configs = kernel.configs if isinstance(kernel, triton.runtime.Autotuner) else [
            triton.Config({"BLOCK": soft_mask._L1_BLOCK}, num_warps=8)]
        for i, cfg in enumerate(configs):
            # every config for sm_90 in bf16; the first also in the other dtypes (tf32 for fp32 dots) and on sm_80
            variants = [("bf16", 90)]
            if i == 0 or all_dtypes:
                variants += [("fp32", 90), ("fp64", 90), ("fp16", 80), ("fp32", 80)]
            if module in DOT_MODULES:  # tl.dot kernels: float64 is refused on GPUs (checks.dot_dtype)
                variants = [v for v in variants if v[0] != "fp64"]
            for dtype, arch in variants:
                yield (f"{module.__name__.split('.')[-1]}.{name} {cfg.kwargs} {dtype} sm_{arch}", module.__name__,
                       name, dtype, dict(cfg.kwargs), dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages), arch)


def compile_one(job):
    label, module_name, name, dtype, config, options, arch = job
    kernel = getattr(sys.modules[module_name], name)
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    signature, constexprs = {}, {}
    for param in fn.params:
        arg = param.name
        if param.is_constexpr:
            signature[arg] = "constexpr"
            if arg in config:
                constexprs[arg] = config[arg]
            elif arg == "ACC":
                constexprs[arg] = DTYPES[dtype]
            elif arg == "PREC":
                constexprs[arg] = "tf32" if dtype == "fp32" else "ieee"
            else:
                constexprs[arg] = EXTRA[arg]
        elif arg in INDEX:
            signature[arg] = "*i32"
        elif arg == "mask_ptr":
            signature[arg] = "*u8"
        elif arg == "part_ptr":
            signature[arg] = "*fp32"
        elif arg.endswith("_ptr"):
            signature[arg] = f"*{dtype}"
        elif arg in FLOAT_ARGS:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # report every failure, not just the first
        return label, f"{type(exc).__name__}: {str(exc)[-1500:]}"
    return label, None if compiled.asm.get("cubin") else "no cubin produced"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--all-dtypes", action="store_true", help="every config in every dtype and arch")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run without TRITON_INTERPRET")
    todo = list(jobs(args.all_dtypes))
    with cf.ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        results = list(pool.map(compile_one, todo))
    failed = [(label, err) for label, err in results if err]
    for label, err in failed:
        print(f"FAILED {label}\n  {err}")
    print(f"compiled {len(results) - len(failed)} of {len(results)} kernel variants for sm_80/sm_90 "
          f"(torch {torch.__version__}, triton {triton.__version__})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
