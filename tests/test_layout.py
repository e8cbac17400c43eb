import pytest
import torch

from sparseops.layout import BlockLayout, block_layout, build_csr_layout, csr_layout, invalidate

from conftest import block_mask


def dense_from_csr(row_ptr, col, shape):
    out = torch.zeros(shape, dtype=torch.bool)
    for r in range(shape[0]):
        out[r, col[row_ptr[r]:row_ptr[r + 1]].long()] = True
    return out


@pytest.mark.parametrize("shape,p", [((1, 1), 1.0), ((1, 1), 0.0), ((7, 13), 0.5), ((40, 3), 0.1), ((3, 40), 0.9)])
def test_csr_and_transpose_describe_the_mask(shape, p):
    mask = torch.rand(shape) < p
    lay = build_csr_layout(mask)
    assert lay.row_ptr.dtype == torch.int32 and lay.col_idx.dtype == torch.int32
    assert lay.nnz == int(mask.sum()) == lay.col_idx.numel() == lay.t_col_idx.numel()
    assert torch.equal(dense_from_csr(lay.row_ptr, lay.col_idx, shape), mask)
    assert torch.equal(dense_from_csr(lay.t_row_ptr, lay.t_col_idx, shape[::-1]), mask.t())
    assert lay.density == pytest.approx(mask.float().mean().item())
    assert lay.mask.dtype == torch.bool


def test_zero_one_masks_of_any_dtype():
    mask = (torch.rand(5, 6) < 0.5)
    for m in (mask.float(), mask.double(), mask.to(torch.uint8), mask.long()):
        assert torch.equal(build_csr_layout(m).mask, mask)


def test_cache_hits_until_the_mask_changes():
    mask = torch.rand(8, 9) < 0.5
    a = csr_layout(mask)
    assert csr_layout(mask) is a
    mask[0] = True  # in-place edit bumps the version counter
    b = csr_layout(mask)
    assert b is not a and b.nnz == int(mask.sum())
    mask.mul_(False)
    assert csr_layout(mask).nnz == 0
    # writes through .data bypass the version counter: invalidate() is the way out
    mask.data.fill_(True)
    invalidate(mask)
    assert csr_layout(mask).nnz == mask.numel()


def test_float_mask_edits_are_seen():
    mask = torch.ones(4, 4)
    assert csr_layout(mask).nnz == 16
    mask[1, 1] = 0
    assert csr_layout(mask).nnz == 15


@pytest.mark.parametrize("bad,exc,match", [
    ([[1, 0]], TypeError, "torch.Tensor"),
    (torch.tensor([[0.0, 0.5]]), ValueError, "0 and 1"),
    (torch.tensor([[2, 1]]), ValueError, "0 and 1"),
    (torch.ones(3, dtype=torch.bool), ValueError, "at least 2-D"),
    (torch.ones(2, 2, dtype=torch.complex64), TypeError, "complex"),
])
def test_bad_masks(bad, exc, match):
    with pytest.raises(exc, match=match):
        csr_layout(bad)


def test_conv_masks_are_laid_out_as_2d_and_transpose():
    mask = torch.rand(4, 3, 3, 3) > 0.5
    layout = csr_layout(mask)
    assert layout.shape == (4, 27) and layout.nnz == int(mask.sum())
    flat = mask.reshape(4, 27)
    t = layout.t()
    assert t.shape == (27, 4) and torch.equal(t.row_ptr, layout.t_row_ptr) and torch.equal(t.mask, flat.t())
    assert torch.equal(t.t().col_idx, layout.col_idx)


def test_dense_fallback_does_not_build_the_csr(monkeypatch):
    import sparseops
    from sparseops import layout as L

    builds = []
    real = L.build_csr_layout
    monkeypatch.setattr(L, "build_csr_layout", lambda m: builds.append(1) or real(m))
    mask = torch.rand(64, 32) > 0.1  # dense enough for the fallback
    x, w = torch.randn(3, 32), torch.randn(64, 32)
    sparseops.masked_linear(x, w, mask)
    assert builds == [] and L.mask_stats(mask).nnz == int(mask.sum())
    mask[:] = False  # an in-place edit: the stats follow it; the sparse path builds the CSR once
    assert L.mask_stats(mask).nnz == 0
    for _ in range(3):
        torch.testing.assert_close(sparseops.masked_linear(x, w, mask), torch.zeros(3, 64))
    assert builds == [1]


def test_block_layout():
    mask = block_mask(40, 50, 16, 0.5, partial=True).cpu()
    mask[:16, :16] = False
    mask[0, 0] = True  # a tile with a single kept entry is kept
    lay = block_layout(mask, 16)
    tiles = torch.zeros(3, 4, dtype=torch.bool)
    for r in range(3):
        for c in range(4):
            tiles[r, c] = mask[16 * r:16 * r + 16, 16 * c:16 * c + 16].any()
    assert isinstance(lay, BlockLayout) and lay.tiles == int(tiles.sum()) and lay.nnz == int(mask.sum())
    assert lay.col_idx.tolist() == tiles.nonzero()[:, 1].tolist()
    assert lay.t_col_idx.tolist() == tiles.t().nonzero()[:, 1].tolist()
    assert lay.tile_density == pytest.approx(tiles.float().mean().item())
    assert block_layout(mask, 16) is lay and block_layout(mask, 32) is not lay  # cached per block size
    mask[39, 49] = not mask[39, 49]
    assert lay.stale and block_layout(mask, 16) is not lay
    with pytest.raises(ValueError, match="block must be one of"):
        block_layout(mask, 8)



def test_a_view_is_cached_on_its_base_and_follows_its_edits():
    """Conv1D passes `weight_mask.t()`, a new view every call (in a compiled graph too): one layout,
    cached on the base, stale once the base is edited, freed with it."""
    import gc
    import weakref

    mask = torch.rand(6, 9) < 0.5
    first = csr_layout(mask.t())
    assert csr_layout(mask.t()) is first
    assert torch.equal(dense_from_csr(first.row_ptr, first.col_idx, (9, 6)), mask.t())
    mask[0, :] = False
    again = csr_layout(mask.t())
    assert again is not first and again.nnz == int(mask.sum())
    ref = weakref.ref(mask)
    del mask, first, again
    gc.collect()
    assert ref() is None


def test_a_layout_built_inside_a_kernel_turns_stale():
    """A compiled graph runs the runtime op's kernel below ADInplaceOrView, where a plain detach() has
    a version counter of its own: the layout it caches must still go stale when the mask is edited,
    or the eager calls after it would use the old mask."""
    import sparseops

    mask = torch.ones(8, 5, dtype=torch.bool)
    x, w = torch.randn(3, 5, requires_grad=True), torch.randn(8, 5, requires_grad=True)
    f = torch.compile(lambda x, w, mask: sparseops.masked_linear(x, w, mask), backend="aot_eager", fullgraph=True)
    f(x, w, mask).sum().backward()
    with torch.no_grad():
        mask[:, 1:] = False
    torch.testing.assert_close(sparseops.masked_linear(x, w, mask), x @ (w * mask).t())
    assert sparseops.layout.mask_stats(mask).nnz == csr_layout(mask).nnz == 8


@pytest.mark.parametrize("shape,density", [((2048, 300), 0.3), ((7, 130), 0.5), ((0, 5), 0.5), ((5, 0), 0.5),
                                           ((64, 1), 0.5), ((300, 257), 0.0), ((300, 257), 1.0), ((3, 2, 3, 3), 0.4)])
def test_the_cpu_builder_equals_the_torch_one(shape, density):
    """csr_layout's C++ builder (csrc/cpu/csr_from_mask.cpp) against the torch path it replaced on the CPU:
    both index dtypes, empty rows and columns, an empty mask, a full one, a conv mask."""
    from sparseops import layout as layout_module

    m = layout_module._bool_2d(torch.rand(shape) < density)
    got = layout_module.build_csr_layout(m)
    for index_dtype in (torch.int32, torch.int64):
        want = (*layout_module._csr_indices(m, index_dtype), *layout_module._csr_indices(m.t(), index_dtype))
        fast = torch.ops.sparseops._csr_from_mask(m, index_dtype == torch.int64)
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(fast, want, strict=True))
    assert torch.equal(got.row_ptr, want[0].int()) and got.nnz == int(m.sum())
    with pytest.raises(ValueError, match="sparseops._csr_from_mask: mask must be 2-D"):
        torch.ops.sparseops._csr_from_mask(m.view(-1), False)
    with pytest.raises(TypeError, match="sparseops._csr_from_mask: mask must be bool"):
        torch.ops.sparseops._csr_from_mask(m.float(), False)


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 64, 65536 + 5])
def test_packed_mask_copy_sees_every_byte(numel):
    """layout.refresh's one-bit copy of a large bool mask (csrc/cpu/mask_snapshot.cpp): equal to the
    mask it was packed from, unequal after any entry flips or any byte stops being 0/1 (a numpy
    write), including the last, partial word."""
    lib = torch.ops.sparseops
    mask = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) < 0.5
    packed = lib._pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-numel // 8)
    assert lib._same_as_packed(mask, packed)
    raw = mask.numpy().view("uint8")
    for i in sorted({0, numel // 2, numel - 1}):
        for value in (1 - raw[i], 2):
            old, raw[i] = raw[i], value
            assert not lib._same_as_packed(mask, packed)
            raw[i] = old
    assert lib._same_as_packed(mask, packed)
    with pytest.raises(ValueError, match="sparseops._same_as_packed: packed must be"):
        lib._same_as_packed(mask, packed[:-1])
    with pytest.raises(ValueError, match="sparseops._pack_mask: mask must be a contiguous CPU bool"):
        lib._pack_mask(mask.float())


@pytest.mark.parametrize("shape", [(6, 9), (300, 256)])
def test_the_caches_of_a_call_free_the_mask_with_it(shape):
    """What an op call caches for a mask (its stats, the copy refresh checks it with: one bit per entry
    from 64K entries, views of an alias of the mask) neither keeps the mask alive nor outlives it."""
    import gc
    import weakref

    import sparseops
    from sparseops import layout

    mask = torch.rand(*shape) < 0.5
    x, w = torch.randn(3, shape[1], requires_grad=True), torch.randn(*shape, requires_grad=True)
    sparseops.masked_linear(x, w, mask).sum().backward()
    caches = (layout._snapshots, layout._stats_cache)
    ident, ref = id(mask), weakref.ref(mask)
    keys = [c._entries[ident][0] for c in caches]
    del mask
    gc.collect()
    assert ref() is None
    assert all(c._entries.get(ident, (None,))[0] is not key for c, key in zip(caches, keys))
