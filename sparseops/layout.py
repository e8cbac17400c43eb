"""Mask -> compressed index structures for the sparse kernels.

A `CsrLayout` holds the CSR structure of W (row_ptr, col_idx) and of W^T (t_row_ptr, t_col_idx)
for one boolean mask, with int32 indices where they fit. It holds no weight values: kernels read
them from the dense weight through the indices on every call, because weights change every
optimiser step while masks change only when pruning.

`csr_layout(mask)` caches the layout per mask tensor and rebuilds it when the mask's version
counter moves, so a mask edited in place (`mask[...] = 0`, `mask.copy_(...)`, `mask.mul_(...)`)
is never served stale. Writes that bypass the version counter (through `mask.data`, or from
outside torch, e.g. a numpy view) are caught by `refresh(mask)`, which the ops call on every mask
they are given: it compares the mask with a copy of what the caches were built from (CPU tensors;
on CUDA it would cost a device sync per call, so there call `invalidate(mask)` after such writes).
"""
from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass

import torch

from ._library import _PLAIN, lib

_INT32_MAX = 2**31 - 1


class _MaskView:
    """What CsrLayout and MaskStats share: derived from `mask`, `nnz`, `source` and `built_version`."""

    @property
    def stale(self) -> bool:
        return self.source._version != self.built_version

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mask.shape)

    @property
    def density(self) -> float:
        n = self.mask.numel()
        return self.nnz / n if n else 1.0


@dataclass(frozen=True, eq=False)
class CsrLayout(_MaskView):
    mask: torch.Tensor  # bool, [out_features, in_features]
    row_ptr: torch.Tensor  # [N + 1]
    col_idx: torch.Tensor  # [nnz]
    t_row_ptr: torch.Tensor  # [K + 1], CSR of W^T
    t_col_idx: torch.Tensor  # [nnz]
    nnz: int
    # A detached alias of the mask it was built from: it shares that tensor's version counter,
    # so an in-place edit of the mask makes the layout stale (and never silently used).
    source: torch.Tensor
    built_version: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def tensors(self):
        """The index tensors in the order the ops take them."""
        return self.row_ptr, self.col_idx, self.t_row_ptr, self.t_col_idx

    def t(self) -> "CsrLayout":
        """The layout of the transposed mask (no work: the two CSR structures swap roles)."""
        return CsrLayout(self.mask.t(), self.t_row_ptr, self.t_col_idx, self.row_ptr, self.col_idx, self.nnz,
                         self.source, self.built_version)

    def __repr__(self):
        return (f"CsrLayout(shape={self.shape}, nnz={self.nnz}, density={self.density:.4f}, "
                f"index_dtype={self.row_ptr.dtype}, device={self.mask.device})")


def _alias(mask: torch.Tensor) -> torch.Tensor:
    """`mask.detach()`, sharing mask's version counter also inside a custom op's kernel: autograd runs
    those with ADInplaceOrView excluded, where detach makes a tensor with a counter of its own (and a
    layout built there would never turn stale)."""
    key = torch._C.DispatchKey.ADInplaceOrView
    excluded = torch._C._dispatch_tls_is_dispatch_key_excluded(key)
    torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
    try:
        return mask.detach()
    finally:
        torch._C._dispatch_tls_set_dispatch_key_excluded(key, excluded)


def as_bool_mask(mask, *, name: str = "mask") -> torch.Tensor:
    """Validates a mask (bool, or numbers that are all 0 or 1) and returns it as bool."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"sparseops: {name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.layout != torch.strided:
        raise ValueError(f"sparseops: {name} must be a dense tensor, got layout {mask.layout}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise TypeError(f"sparseops: {name} must be bool or real 0/1 values, got {mask.dtype}")
    binary = (mask == 0) | (mask == 1)
    if not bool(binary.all()):
        bad = mask[~binary].flatten()[:3].tolist()
        raise ValueError(f"sparseops: {name} must hold only 0 and 1 (or be bool); found values such as {bad}")
    return mask != 0


def _csr_indices(mask: torch.Tensor, index_dtype: torch.dtype):
    rows = mask.shape[0]
    nz = mask.nonzero()  # row-major order: rows ascending, columns ascending within a row
    counts = torch.bincount(nz[:, 0], minlength=rows)
    row_ptr = torch.zeros(rows + 1, dtype=torch.int64, device=mask.device)
    torch.cumsum(counts, 0, out=row_ptr[1:])
    return row_ptr.to(index_dtype), nz[:, 1].to(index_dtype).contiguous()


def build_csr_layout(mask: torch.Tensor) -> CsrLayout:
    """Builds a CsrLayout from a mask without caching. A mask of more than 2 dimensions (a conv
    weight's [C_out, C_in, kh, kw]) is laid out as the 2-D [C_out, C_in * kh * kw] the kernels use."""
    m = _bool_2d(mask)
    nnz = int(torch.count_nonzero(m))  # (a bool sum is ~20x slower on the CPU)
    index_dtype = torch.int32 if max(nnz, *m.shape) <= _INT32_MAX else torch.int64
    if m.device.type == "cpu" and type(m) is torch.Tensor:  # one C++ pass per index (csrc/cpu/csr_from_mask.cpp)
        row_ptr, col_idx, t_row_ptr, t_col_idx = lib._csr_from_mask(m, index_dtype == torch.int64)
    else:
        row_ptr, col_idx = _csr_indices(m, index_dtype)
        t_row_ptr, t_col_idx = _csr_indices(m.t(), index_dtype)
    return CsrLayout(m.detach(), row_ptr, col_idx, t_row_ptr, t_col_idx, nnz, _alias(mask), mask._version)


@dataclass(frozen=True, eq=False)
class MaskStats(_MaskView):
    """What the backend choice needs to know of a mask, without building its CSR: the bool mask
    (as [rows, -1], like CsrLayout.mask) and its number of kept entries. Same staleness rule."""

    mask: torch.Tensor
    nnz: int
    source: torch.Tensor
    built_version: int


def _bool_2d(mask: torch.Tensor) -> torch.Tensor:
    m = as_bool_mask(mask)
    if m.dim() < 2:
        raise ValueError(f"sparseops: mask must be at least 2-D [out_features, ...], got shape {tuple(m.shape)}")
    return m.reshape(m.shape[0], math.prod(m.shape[1:]))


class IdCache:
    """A dict keyed by a tensor's identity that does not keep the tensor alive, as torch's
    WeakIdKeyDictionary, whose lookup builds a weak reference each time (~1 us, several per call)."""

    def __init__(self):
        self._entries: dict[int, tuple[weakref.ref, object]] = {}

    def get(self, key, default=None):
        hit = self._entries.get(id(key))
        return default if hit is None or hit[0]() is not key else hit[1]

    def __setitem__(self, key, value) -> None:
        ident, entries = id(key), self._entries

        def forget(ref):  # the tensor died: drop its entry, unless its id was reused since
            if entries.get(ident, (None,))[0] is ref:
                entries.pop(ident, None)

        entries[ident] = (weakref.ref(key, forget), value)

    def pop(self, key, default=None):
        if self.get(key, self) is self:
            return default
        return self._entries.pop(id(key))[1]


_cache = IdCache()
_stats_cache = IdCache()


def _key(mask: torch.Tensor):
    return (mask.data_ptr(), mask.shape, mask.stride(), mask.dtype, mask.device)


# Each cache maps the tensor that owns the memory (a view's base: Conv1D's `weight_mask.t()`, a view a
# compiled graph makes of its input, is a new tensor every call) to {the view's _key: entry}. A view
# shares its base's version counter, so the staleness rule holds for views too.
def _get(cache: IdCache, mask: torch.Tensor, key):
    hits = cache.get(mask if mask._base is None else mask._base)
    return None if hits is None else hits.get(key)


def _put(cache: IdCache, mask: torch.Tensor, key, value) -> None:
    owner = mask if mask._base is None else mask._base
    hits = cache.get(owner)
    if hits is None:
        hits = cache[owner] = {}
    hits[key] = value


def _current(cache, mask, key):
    hit = _get(cache, mask, key)
    return hit if hit is not None and not hit.stale and hit.built_version == mask._version else None


def csr_layout(mask: torch.Tensor) -> CsrLayout:
    """The CsrLayout of `mask`, from the cache when the mask has not changed since it was built."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"sparseops: mask must be a torch.Tensor, got {type(mask).__name__}")
    key = _key(mask)
    layout = _current(_cache, mask, key)
    if layout is None:
        layout = build_csr_layout(mask)
        _put(_cache, mask, key, layout)
    return layout


def mask_stats(mask: torch.Tensor) -> CsrLayout | MaskStats:
    """The mask's cached CsrLayout if it is current, else its (cached) MaskStats: enough to pick a
    backend without building the CSR, which the dense fallback never needs."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"sparseops: mask must be a torch.Tensor, got {type(mask).__name__}")
    key = _key(mask)
    hit = _current(_cache, mask, key) or _current(_stats_cache, mask, key)
    if hit is not None:
        return hit
    m = _bool_2d(mask)
    stats = MaskStats(m.detach(), int(torch.count_nonzero(m)), _alias(mask), mask._version)
    _put(_stats_cache, mask, key, stats)
    return stats


BLOCK_SIZES = (16, 32, 64)


@dataclass(frozen=True, eq=False)
class BlockLayout(_MaskView):
    """The kept tiles of a mask cut into `block` x `block` tiles: CSR over the tile grid of W
    (row_ptr, col_idx) and of W^T (t_row_ptr, t_col_idx). Tiles with no kept entry are skipped by
    the block kernels, kept ones run on tensor cores with the mask applied inside the tile (so a
    partly kept tile is still exact).

    A conv mask [C_out, C_in, kh, kw] is tiled as [C_out, kh*kw*C_in] (tap-major): each tile is one
    tap (r, s) and `block` input channels, so the kernels' tiles are plain shifted GEMMs; C_in must
    be a multiple of `block`. `taps` is kh*kw (1 for a linear mask)."""

    mask: torch.Tensor  # bool [N, K] (a conv mask as [C_out, C_in*kh*kw], like CsrLayout)
    block: int
    taps: int
    row_ptr: torch.Tensor  # [ceil(N/block) + 1]
    col_idx: torch.Tensor  # [kept tiles]
    t_row_ptr: torch.Tensor  # [tile columns + 1]
    t_col_idx: torch.Tensor
    nnz: int  # kept entries
    tiles: int  # kept tiles
    source: torch.Tensor
    built_version: int

    @property
    def tile_density(self) -> float:
        """Kept tiles over all tiles: the work the block kernels do, relative to dense."""
        total = (self.row_ptr.numel() - 1) * (self.t_row_ptr.numel() - 1)
        return self.tiles / total if total else 1.0

    def tensors(self):
        return self.row_ptr, self.col_idx, self.t_row_ptr, self.t_col_idx

    def __repr__(self):
        return (f"BlockLayout(shape={self.shape}, block={self.block}, taps={self.taps}, tiles={self.tiles}, "
                f"tile_density={self.tile_density:.4f}, density={self.density:.4f})")


def build_block_layout(mask: torch.Tensor, block: int) -> BlockLayout:
    """Builds a BlockLayout of a 2-D mask, or of a 4-D conv mask (tap-major tiles), without caching."""
    if block not in BLOCK_SIZES:
        raise ValueError(f"sparseops: block must be one of {BLOCK_SIZES}, got {block!r}")
    m = _bool_2d(mask)
    taps = 1
    tiled = m
    if mask.dim() == 4:
        c_in, taps = mask.shape[1], mask.shape[2] * mask.shape[3]
        if c_in % block:
            raise ValueError(f"sparseops: a conv block layout needs C_in to be a multiple of block; got C_in={c_in}, "
                             f"block={block} (use a CSR layout, or block 16 if C_in allows)")
        tiled = m.view(mask.shape).permute(0, 2, 3, 1).reshape(mask.shape[0], -1)  # [C_out, taps*C_in]
    elif mask.dim() != 2:
        raise ValueError(f"sparseops: a block layout needs a 2-D or 4-D mask, got shape {tuple(mask.shape)}")
    n, k = tiled.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = torch.zeros((nb * block, kb * block), dtype=torch.int32, device=m.device)
    padded[:n, :k] = tiled
    counts = padded.view(nb, block, kb, block).sum((1, 3))  # kept entries per tile
    kept = counts > 0
    row_ptr, col_idx = _csr_indices(kept, torch.int32)
    t_row_ptr, t_col_idx = _csr_indices(kept.t(), torch.int32)
    return BlockLayout(m.detach(), block, taps, row_ptr, col_idx, t_row_ptr, t_col_idx, int(counts.sum()),
                       int(kept.sum()), _alias(mask), mask._version)


_block_cache = IdCache()


def block_layout(mask: torch.Tensor, block: int = 32) -> BlockLayout:
    """The BlockLayout of `mask` (a linear [N, K] or conv [C_out, C_in, kh, kw] mask) with
    `block` x `block` tiles (16, 32 or 64), cached like csr_layout."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"sparseops: mask must be a torch.Tensor, got {type(mask).__name__}")
    key = (_key(mask), block)
    layout = _current(_block_cache, mask, key)
    if layout is None:
        layout = build_block_layout(mask, block)
        _put(_block_cache, mask, key, layout)
    return layout


_float_cache = IdCache()


def mask_as(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bool mask as 0/1 numbers of `dtype` (a multiply by it is several times faster than
    torch.where on the CPU), cached per mask version like the layouts."""
    key = (_key(mask), dtype)
    hit = _get(_float_cache, mask, key)
    if hit is not None and hit[0] == mask._version:
        return hit[1]
    out = mask.detach().to(dtype)
    _put(_float_cache, mask, key, (mask._version, out))  # one entry per mask and dtype, the newest
    return out


def as_csr(info: CsrLayout | BlockLayout | MaskStats) -> CsrLayout:
    """The CsrLayout behind a layout or MaskStats (built from its mask and cached, if need be)."""
    return info if isinstance(info, CsrLayout) else csr_layout(info.source)


def _words(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as int64 words where they divide evenly (torch.equal on them runs
    about 8x faster than on bool), else the tensor itself."""
    if t.is_contiguous() and t.numel() and (t.numel() * t.element_size()) % 8 == 0:
        return t.reshape(-1).view(torch.uint8).view(torch.int64)
    return t


def same_content(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one shape and dtype hold the same bytes (as int64 words from 64K
    entries on, where that pays for the views' dispatch)."""
    if a.numel() < 65536:
        return torch.equal(a, b)
    return torch.equal(_words(a), _words(b))


_snapshots = IdCache()
EXTRA_CACHES: list[IdCache] = []  # other modules' caches of layouts (layout_channels)
# SPARSEOPS_CHECK_WRITES=0 turns the content checks off, for code that never writes masks (or ticket
# scores) behind the version counter: they cost a pass over the mask per call (docs/integrations.md).
CHECK_WRITES = os.environ.get("SPARSEOPS_CHECK_WRITES", "1") != "0"


def checks_writes(t: torch.Tensor) -> bool:
    """Whether writes to `t` that bypass its version counter are looked for (CPU tensors, outside
    torch.compile tracing, unless SPARSEOPS_CHECK_WRITES=0)."""
    return CHECK_WRITES and t.device.type == "cpu" and not torch.compiler.is_compiling()


def refresh(mask: torch.Tensor) -> None:
    """Forgets the cached layouts of a CPU `mask` whose content changed while its version counter did
    not (writes through `mask.data` or a numpy view): a copy of the content at each version is
    compared with the mask, one pass over its bytes (docs/integrations.md gives the cost)."""
    if not checks_writes(mask):
        return
    key = _key(mask)  # (keyed on the base, as every cache: a view is a new tensor every call)
    hit = _get(_snapshots, mask, key)
    if hit is not None and hit[0] == mask._version:
        if hit[1](hit[2], hit[3]):
            return
        invalidate(mask)
    _put(_snapshots, mask, key, (mask._version, *_snapshot(mask)))


def _snapshot(mask: torch.Tensor):
    """(same, a, b): `same(a, b)` says whether `mask` still holds what it holds now: a large contiguous
    bool mask against a one-bit copy (csrc/cpu/mask_snapshot.cpp: reads an eighth more, not twice the
    mask), any other against a copy, as int64 words where it can be. `a` views an alias, which does
    not keep `mask` alive; the key holds its data_ptr: a mask given other memory gets its own entry."""
    alias = mask.detach()
    if alias.dtype == torch.bool and alias.numel() >= 65536 and alias.is_contiguous() and type(mask) in _PLAIN:
        return lib._same_as_packed.default, alias, lib._pack_mask(alias)
    copy = alias.clone(memory_format=torch.preserve_format)
    if alias.is_contiguous() and copy.is_contiguous():
        return torch.equal, _words(alias), _words(copy)
    return torch.equal, alias, copy


def invalidate(mask: torch.Tensor) -> None:
    """Forgets the cached layouts of `mask` and of its views (after writes the version counter does
    not see)."""
    owner = mask if mask._base is None else mask._base
    for cache in (_cache, _stats_cache, _block_cache, _float_cache, _snapshots, *EXTRA_CACHES):
        cache.pop(owner, None)
