"""Plain-torch implementations of every sparseops op: the ground truth the kernels are tested
against (in float64 on the CPU), and the path for devices without a compiled kernel.

A pruned weight contributes exactly nothing, as in a sparse product: the masked weight is
`where(mask, w, 0)`, not `w * mask` (an inf or NaN weight at a pruned entry would make NaN), and
its gradient is exactly 0 at pruned entries whatever x and grad hold. Every implementation keeps
this (tests/test_robustness.py)."""
import math

import torch
import torch.nn.functional as F

from .layout import mask_as


_F32_MAX = 3.4028234663852886e38

# A soft mask or gate is exactly 0, with gradient 0, where sigmoid(z) < 2^-63, i.e. z < -63 ln 2 = -43.7,
# not only where fp32's sigmoid underflows (-103.3): a smaller value makes the weights, activations and
# gradients it multiplies subnormal (2^-63 is the square root of fp32's smallest normal number, so its
# product with anything above 2^-63 is normal), which x86 computes up to 100x slower; and it contributes
# nothing: it is 1e-12 of fp32's resolution at 1, and its gradient to s (beta * sigmoid) cannot bring
# s back. One cut for every dtype, so that float64 runs are the same search. Every kernel applies it.
SIGMOID_OFF_BELOW = -63 * math.log(2)


def cut_sigmoid(z: torch.Tensor) -> torch.Tensor:
    """sigmoid(z), exactly 0 (gradient 0) where z < SIGMOID_OFF_BELOW."""
    return torch.sigmoid(z).masked_fill(z < SIGMOID_OFF_BELOW, 0)


def _scaled(s: torch.Tensor, beta: float, scale: float) -> torch.Tensor:
    """beta * s. Where beta (or beta * scale) is past float32's range, as a product of k equal
    factors of at most 1e30: the same values, but autograd's ds is 0 * factor * ... = 0 where the
    mask is flat, not 0 * inf = NaN (what every kernel gives, too)."""
    if s.dtype == torch.float64 or abs(beta) * max(abs(scale), 1.0) < _F32_MAX:
        return beta * s
    k = math.ceil(math.log10(abs(beta)) / 30)
    root = abs(beta) ** (1.0 / k)
    z = s * math.copysign(root, beta)
    for _ in range(k - 1):
        z = z * root
    return z


def soft_mask(w: torch.Tensor, s: torch.Tensor, beta: float, scale: float = 1.0) -> torch.Tensor:
    """Continuous Sparsification's soft mask: w * scale * sigmoid(beta * s) (0 below the cut, cut_sigmoid)."""
    return w * scale * cut_sigmoid(_scaled(s, beta, scale))


def soft_mask_l1(s: torch.Tensor, beta: float, scale: float = 1.0) -> torch.Tensor:
    """CS's L0 surrogate penalty: scale * sum(sigmoid(beta * s))."""
    return scale * cut_sigmoid(_scaled(s, beta, scale)).sum()


def masked_weight(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """w at kept entries, exactly 0 at pruned ones (whatever w holds there); its gradient is the
    incoming one at kept entries and exactly 0 at pruned ones. That is `torch.where(mask, w, 0)`;
    on the CPU, where w is finite, the same values come from a multiply by the 0/1 mask (what
    torch.nn.utils.prune computes), which costs several times less there."""
    mask = mask if mask.dtype == torch.bool else mask != 0
    if _fast(w):
        return _MaskMultiply.apply(w, mask)
    return torch.where(mask, w, 0)


def mask_grad_(dw: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """dw zeroed at pruned entries, in place (masked_fill_, or a multiply where dw is finite)."""
    if _fast(dw):
        return dw.mul_(mask_as(mask, dw.dtype))
    return dw.masked_fill_(~mask, 0)


def _fast(t: torch.Tensor) -> bool:
    """Whether the multiply may stand for where: a real CPU tensor (not traced: fake, functional,
    compiled) whose values are all finite (a sum is finite only if every term is, or it overflows)."""
    return (t.device.type == "cpu" and type(t) in (torch.Tensor, torch.nn.Parameter)
            and not torch.compiler.is_compiling() and bool(torch.isfinite(t.detach().sum())))


class _MaskMultiply(torch.autograd.Function):
    """w * mask, the mask as w's numbers (cached per mask version); the backward checks the gradient
    too (inf * 0 would be NaN: there it zeroes with masked_fill)."""

    @staticmethod
    def forward(ctx, w, mask):
        ctx.save_for_backward(mask)
        return w * mask_as(mask, w.dtype)

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return (g * mask_as(mask, g.dtype) if _fast(g) else g.masked_fill(~mask, 0)), None


def masked_linear(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None):
    """x @ (w * mask)^T + bias, a pruned weight contributing exactly nothing (masked_weight)."""
    return F.linear(x, masked_weight(w, mask), bias)


def soft_masked_linear(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, beta: float, scale: float = 1.0,
                       bias: torch.Tensor | None = None):
    """x @ (w * scale * sigmoid(beta * s))^T + bias: a linear layer under CS's soft mask."""
    return F.linear(x, soft_mask(w, s, beta, scale), bias)


def masked_conv2d(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None,
                  stride=1, padding=0, dilation=1, groups: int = 1):
    """conv2d(x, w * mask) + bias, a pruned weight contributing exactly nothing (masked_weight)."""
    return F.conv2d(x, masked_weight(w, mask), bias, stride, padding, dilation, groups)


def soft_masked_conv2d(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, beta: float, scale: float = 1.0,
                       bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1, groups: int = 1):
    """conv2d(x, w * scale * sigmoid(beta * s)) + bias: a convolution under CS's soft mask."""
    return F.conv2d(x, soft_mask(w, s, beta, scale), bias, stride, padding, dilation, groups)


def channel_mask(w: torch.Tensor, out_idx: torch.Tensor, in_idx: torch.Tensor) -> torch.Tensor:
    """The full-shape bool mask that keeps output channels `out_idx` x input channels `in_idx` of w."""
    m = torch.zeros(w.shape[:2], dtype=torch.bool, device=w.device)
    m[out_idx[:, None], in_idx[None, :]] = True
    return m.view(*m.shape, *([1] * (w.dim() - 2))).expand(w.shape)


def channel_masked_linear(x: torch.Tensor, w: torch.Tensor, out_idx: torch.Tensor, in_idx: torch.Tensor,
                          bias: torch.Tensor | None = None):
    """masked_linear under the mask of kept channels (channel_mask): pruned outputs get the bias."""
    return masked_linear(x, w, channel_mask(w, out_idx, in_idx), bias)


def channel_masked_conv2d(x: torch.Tensor, w: torch.Tensor, out_idx: torch.Tensor, in_idx: torch.Tensor,
                          bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1):
    """masked_conv2d under the mask of kept channels (channel_mask): pruned outputs get the bias."""
    return masked_conv2d(x, w, channel_mask(w, out_idx, in_idx), bias, stride, padding, dilation)
