"""The shape and geometry cases the op tests share (one copy; the per-op files import them).

Conv cases are ConvCase tuples (N, C_in, C_out, H, W, kernel, stride, padding, dilation) with every
geometry argument a pair. `small` cases are the ones cheap enough for Triton's interpreter.
"""
from typing import NamedTuple


class ConvCase(NamedTuple):
    n: int
    cin: int
    cout: int
    h: int
    w: int
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple


def conv_id(case) -> str:
    return "x".join(map(str, case[:5])) + f"-k{case.kernel[0]}{case.kernel[1]}-s{case.stride[0]}{case.stride[1]}" \
        f"-p{case.padding[0]}{case.padding[1]}-d{case.dilation[0]}{case.dilation[1]}"


# ---------------------------------------------------------------------------------------------
# masked_conv2d / soft_masked_conv2d geometries

CONV_CASES = [ConvCase(*c) for c in [
    (2, 3, 4, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1)),
    (3, 4, 5, 9, 8, (3, 3), (2, 2), (1, 1), (1, 1)),  # stride 2
    (2, 3, 4, 9, 8, (3, 2), (2, 1), (0, 2), (2, 1)),  # asymmetric kernel, stride, padding, dilation
    (1, 2, 3, 5, 5, (1, 1), (1, 1), (0, 0), (1, 1)),
    (70, 3, 6, 5, 4, (3, 3), (1, 1), (2, 2), (2, 2)),  # dilation 2; more than one SpMM batch block / 256-position tile
    (2, 5, 33, 3, 11, (2, 3), (1, 3), (1, 0), (1, 1)),  # tiles that end inside a plane
    (1, 1, 1, 1, 1, (1, 1), (1, 1), (0, 0), (1, 1)),
    (2, 40, 3, 6, 5, (3, 3), (1, 1), (1, 1), (1, 1)),  # rows of W longer than one 256-entry chunk (CUDA)
    (2, 3, 300, 5, 4, (1, 1), (1, 1), (0, 0), (1, 1)),  # rows of W^T longer than one chunk (CUDA)
    (8, 1, 1, 32, 32, (3, 3), (1, 1), (1, 1), (1, 1)),  # few kept entries, many positions (dw splits)
    (70, 4, 3, 5, 6, (3, 3), (2, 2), (1, 1), (1, 1)),  # stride 2 over more than one pass of the batch (CPU)
]]
CPU_CONV_CASES = CONV_CASES[:7]  # the CPU kernel's cases (formerly tests/test_conv.py)
CUDA_CONV_CASES = CONV_CASES[:10]  # the CUDA kernel's cases (formerly tests/test_cuda.py)

# small enough for Triton's interpreter (formerly tests/test_triton.py's CONV_CASES)
SMALL_CONV_CASES = [ConvCase(*c) for c in [
    (2, 3, 5, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 3, 4, 9, 8, (2, 3), (2, 2), (1, 0), (2, 2)),
    (1, 4, 3, 5, 5, (1, 1), (1, 1), (0, 0), (1, 1)),
    (2, 2, 1, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1)),  # one output channel: dw's reduction is split over positions
    (0, 3, 2, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1)),  # empty batch
]]
ALL_CONV_CASES = CONV_CASES + SMALL_CONV_CASES

CONV_SPARSITIES = [0.0, 0.5, 0.6, 1.0]

# (N, C_in, H, W, C_out, kernel, stride, padding, dilation, block): the block (tap-major tile) layout
CONV_BLOCK_CASES = [
    (2, 32, 6, 5, 20, (3, 3), 1, 1, 1, 16),  # C_out not a multiple of the block: a partial tile row
    (1, 16, 9, 8, 16, (2, 3), 2, (1, 0), 2, 16),
    (2, 32, 4, 4, 40, (1, 1), 1, 0, 1, 32),
    (1, 16, 12, 12, 2, (3, 3), 1, 1, 1, 16),  # one tile row: dw's reduction split over positions
]

# nn.Conv2d layer configurations: (in, out, kernel, stride, padding, dilation, groups, padding_mode)
LAYER_CONV_CASES = [
    (3, 8, 3, 1, 1, 1, 1, "zeros"),
    (4, 6, (3, 1), 2, (1, 0), 1, 1, "zeros"),
    (4, 8, 3, 1, 2, 2, 2, "zeros"),
    (3, 5, 3, 1, 1, 1, 1, "reflect"),
    (2, 4, 1, 1, 0, 1, 1, "circular"),
    (3, 4, 3, 1, "same", 1, 1, "zeros"),
]

# ---------------------------------------------------------------------------------------------
# masked_linear shapes

# (leading dims of x, in_features K, out_features N, sparsity): the CPU kernel's float64 sweep
LINEAR_CASES = [
    ((1,), 1, 1, 0.0),
    ((1,), 1, 1, 1.0),
    ((5,), 7, 3, 0.5),
    ((1,), 64, 33, 0.5),  # one row
    ((63,), 65, 17, 0.5),  # odd sizes around the 64-wide M block
    ((64,), 31, 129, 0.99),
    ((65,), 31, 129, 0.0),
    ((2, 3), 17, 33, 0.5),  # leading batch dims
    ((2, 1, 5), 40, 9, 0.9),
    ((130,), 50, 70, 1.0),
    ((33,), 100, 200, 0.99),
]

# (M, N, K), small enough for every implementation, the interpreter included; the last splits dw over M
SMALL_LINEAR_SHAPES = [(1, 1, 1), (3, 5, 7), (37, 29, 45), (300, 3, 20)]

# (leading dims of x = M, in_features K, out_features N): the CUDA kernels' sweep
CUDA_LINEAR_SHAPES = [((1,), 1, 1), ((1,), 64, 33), ((7,), 1, 5), ((6,), 9, 1), ((3,), 5, 7), ((129,), 257, 63),
                      ((2, 3), 17, 33), ((4099,), 3, 2)]  # the last: few kept entries, long rows (SDDMM splits)

LINEAR_SPARSITIES = [0.0, 0.6, 1.0]

# ((M, N, K), block) for the block (tile) layout
LINEAR_BLOCK_CASES = [((37, 40, 50), 16), ((300, 70, 33), 32), ((5, 64, 64), 64)]

# (M, N, K) of the fused soft-masked GEMM; the last splits dw over M
SOFT_LINEAR_SHAPES = [(1, 1, 1), (37, 29, 45), (70, 80, 90), (1100, 20, 30)]

# ---------------------------------------------------------------------------------------------
# soft_mask sizes

SOFT_MASK_SHAPES = [(1,), (7,), (15,), (16,), (17,), (3, 5), (64, 33), (2, 3, 129), (70001,)]  # CPU, per ISA
SOFT_MASK_L1_SHAPES = [(1,), (5, 7), (1000,), (3, 70001)]
SOFT_MASK_SIZES = [0, 1, 1000, 5000]  # every implementation (the interpreter included)
CUDA_SOFT_MASK_SIZES = [1, 1000, 3072 * 768 + 5]
