"""The channels a mask keeps (ChannelLayout): a mask whose pruned entries fill whole output or input
channels (a channel mask, ln_structured) runs as one dense product of the kept size. Cached per
mask version like the layouts of sparseops.layout."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from .layout import EXTRA_CACHES, IdCache, _alias, _get, _key, _put, as_bool_mask


@dataclass(frozen=True, eq=False)
class ChannelLayout:
    """The whole channels a mask keeps: the output channels (dim 0) with any kept entry, `out_idx`,
    and the input channels (dim 1) with any kept entry, `in_idx` (sorted int64). Where the mask is
    exactly those channels (mask == outer(rows, cols), over every tap of a conv), `inner` is None
    and the product is one dense GEMM of the kept size; else `in_idx` is every input channel and
    `inner` the mask at the kept rows (bool, [len(out_idx), ...]: elementwise inside), for the
    masked op on the smaller problem. Same staleness rule as CsrLayout."""

    out_idx: torch.Tensor
    in_idx: torch.Tensor
    inner: torch.Tensor | None
    shape: tuple[int, ...]  # the mask's own shape
    source: torch.Tensor
    built_version: int

    @property
    def stale(self) -> bool:
        return self.source._version != self.built_version

    @property
    def work(self) -> float:
        """The kept product's size over the dense one's: len(out_idx) * len(in_idx) / (N * K)."""
        total = self.shape[0] * self.shape[1]
        return self.out_idx.numel() * self.in_idx.numel() / total if total else 1.0

    def __repr__(self):
        return (f"ChannelLayout(shape={self.shape}, out={self.out_idx.numel()}/{self.shape[0]}, "
                f"in={self.in_idx.numel()}/{self.shape[1]}, elementwise_inside={self.inner is not None})")


def build_channel_layout(mask: torch.Tensor) -> ChannelLayout:
    """Builds a ChannelLayout of a 2-D or 4-D mask without caching."""
    m = as_bool_mask(mask).detach()
    if m.dim() < 2:
        raise ValueError(f"sparseops: mask must be at least 2-D [out_features, ...], got shape {tuple(m.shape)}")
    rows = m.flatten(1).any(1)
    cols = m.transpose(0, 1).flatten(1).any(1)
    out_idx, in_idx = rows.nonzero().flatten(), cols.nonzero().flatten()
    if bool(m.index_select(0, out_idx).index_select(1, in_idx).all()):
        return ChannelLayout(out_idx, in_idx, None, tuple(m.shape), _alias(mask), mask._version)
    # Elementwise inside: only the pruned rows count. (A sparse unstructured mask on a narrow layer has
    # many empty columns by chance; the masked op's own kernels skip those.)
    in_idx = torch.arange(m.shape[1], device=m.device)
    return ChannelLayout(out_idx, in_idx, m.index_select(0, out_idx).contiguous(), tuple(m.shape), _alias(mask),
                         mask._version)


_channel_cache = IdCache()
EXTRA_CACHES.append(_channel_cache)  # layout.invalidate forgets these too


def channel_layout(mask: torch.Tensor) -> ChannelLayout:
    """The ChannelLayout of `mask` (a linear [N, K] or conv [C_out, C_in, kh, kw] mask), cached
    like csr_layout: the mask's structure is read once per mask version."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"sparseops: mask must be a torch.Tensor, got {type(mask).__name__}")
    key = _key(mask)
    hit = _get(_channel_cache, mask, key)
    if hit is not None and not hit.stale and hit.built_version == mask._version:
        return hit
    layout = build_channel_layout(mask)
    _put(_channel_cache, mask, key, layout)
    return layout
