"""sparseops under torch.distributed on the CPU (2 processes, gloo; issue 14 item 9): the FSDP2 flow
(patch, fully_shard, train, prune, rewind, unpatch) against one process, the steps it refuses (and
that they change nothing), and masks that differ between ranks (FSDP2 and DDP)."""
import copy
import datetime
import inspect
import os
import traceback

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import sparseops
from sparseops import tickets

fsdp = pytest.importorskip("torch.distributed.fsdp")


def _model():
    # float64, so FSDP2's gradient reduction (another summation order) cannot move a pruning tie;
    # 3 outputs shard unevenly over 2 ranks
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)


def _shard(model):
    for layer in model:
        if isinstance(layer, nn.Linear):
            fsdp.fully_shard(layer)
    fsdp.fully_shard(model)
    return model


def _full(t):
    return t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t


def _train_fn(rank, world):
    """Two SGD steps on this rank's half of the batch (all of it when world is 1): FSDP2 averages
    the halves' gradients, which is the full batch's mean loss."""
    x, y = _data()
    part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)

    def train(model, level):
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[part]), y[part]).backward()
            opt.step()
        return {}

    return train


def _spawn(worker, tmp_path, *args):
    """Runs worker(rank, *args) on 2 gloo processes; a failure on any rank fails the test with its traceback."""
    mp.spawn(_run, args=(worker, str(tmp_path / "init"), str(tmp_path), args), nprocs=2)
    errors = sorted(p.read_text() for p in tmp_path.glob("error-*"))
    assert not errors, "\n".join(errors)


def _run(rank, worker, init_file, out_dir, args):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        worker(rank, *args)
    except BaseException:
        with open(os.path.join(out_dir, f"error-{rank}"), "w") as f:
            f.write(f"rank {rank}:\n{traceback.format_exc()}")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # as in test_patch's DDP test: gloo's teardown at interpreter exit sometimes aborts


# ---- the FSDP2 flow ---------------------------------------------------------------------------------


def _fsdp_flow(rank):
    ref = sparseops.patch(_model())
    ref_result = tickets.imp(ref, _train_fn(0, 1), levels=2, rate=0.5, progress=False)
    model = _shard(sparseops.patch(_model()))
    result = tickets.imp(model, _train_fn(rank, 2), levels=2, rate=0.5, progress=False)  # train, prune, rewind
    for a, b in zip(ref_result.levels, result.levels, strict=True):
        assert a.sparsity == b.sparsity
        for k in a.masks:
            assert torch.equal(a.masks[k], b.masks[k]), f"level {a.level} layer {k}"
    for (k, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(_full(p.detach()), q.detach(), msg=k)
    masks = tickets.magnitude_masks(model, 0.5)  # on DTensor weights: the threshold over all ranks' shards
    ref_masks = tickets.magnitude_masks(ref, 0.5)
    assert all(torch.equal(masks[k], ref_masks[k]) for k in masks)
    x, _ = _data()
    want = ref(x)
    torch.testing.assert_close(model(x), want)
    sparseops.unpatch(model)
    sparseops.unpatch(ref)
    assert not any(n.endswith("weight_mask") for n, _ in model.named_buffers())
    assert [type(m).__name__ for m in model] == ["FSDPLinear", "ReLU", "FSDPLinear", "ReLU", "FSDPLinear"]
    for (k, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(_full(p.detach()), q.detach(), msg=k)
    torch.testing.assert_close(model(x), want)
    _train_fn(rank, 2)(model, None)  # the unpatched sharded model still trains
    # only the root sharded, right after a forward (FSDP2 keeps the root's parameters unsharded then)
    root = fsdp.fully_shard(tickets.set_masks(sparseops.patch(_model()), masks))
    plain = tickets.set_masks(sparseops.patch(_model()), masks)
    torch.testing.assert_close(root(x), plain(x))
    sparseops.unpatch(root)
    sparseops.unpatch(plain)
    assert [type(m).__name__ for m in root] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    root.reshard()  # the shards themselves hold the folded masks
    torch.testing.assert_close(root(x), plain(x))
    for (k, p), q in zip(root.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(_full(p.detach()), q.detach(), msg=k)


@pytest.mark.slow
def test_fsdp2_patch_shard_train_prune_rewind_unpatch(tmp_path):
    _spawn(_fsdp_flow, tmp_path)


# ---- steps refused before anything changes ------------------------------------------------------------


def _buffers_and_types(model):
    return [type(m).__name__ for m in model.modules()], sorted(n for n, _ in model.named_buffers())


def _fsdp_refusals(rank, out_dir):
    for per_layer in (True, False):  # patch after fully_shard: each layer sharded, or only the root
        model = _model()
        if per_layer:
            _shard(model)
        else:
            fsdp.fully_shard(model)
        before = _buffers_and_types(model)
        with pytest.raises(TypeError, match="before fully_shard"):
            sparseops.patch(model)
        assert _buffers_and_types(model) == before
    # patching again after fully_shard (imp does) is fine where patch would change nothing: layers
    # left out by filter_fn, and subclasses it never patches
    model = _model()
    model[4] = type("Sub", (nn.Linear,), {})(16, 3).double()
    sparseops.patch(model, filter_fn=lambda m, name: name != "2", on_unsupported="ignore")
    _shard(model)
    before = _buffers_and_types(model)
    sparseops.patch(model, filter_fn=lambda m, name: name != "2", on_unsupported="ignore")
    assert _buffers_and_types(model) == before
    with pytest.raises(TypeError, match=r"\['2'\].*before fully_shard"):
        sparseops.patch(model, on_unsupported="ignore")
    model = _shard(sparseops.patch(_model()))
    before = _buffers_and_types(model)
    with pytest.raises(NotImplementedError, match="as_prune"):
        sparseops.unpatch(model, as_prune=True)
    assert _buffers_and_types(model) == before
    with pytest.raises(NotImplementedError, match="checkpoint_dir"):
        tickets.imp(model, _train_fn(rank, 2), levels=1, checkpoint_dir=out_dir, progress=False)
    soft = _shard(sparseops.patch(_model(), mode="soft"))
    before = _buffers_and_types(soft)
    with pytest.raises(NotImplementedError, match="soft"):
        sparseops.unpatch(soft)
    assert _buffers_and_types(soft) == before


@pytest.mark.slow
def test_fsdp2_refused_steps_change_nothing(tmp_path):
    _spawn(_fsdp_refusals, tmp_path, str(tmp_path / "ck"))


# ---- masks that differ between ranks ----------------------------------------------------------------


def _ddp(model):
    """DDP that syncs buffers once, when it wraps (torch >= 2.14's forward_sync_buffers=False; before
    it broadcast_buffers=False, which skips that too): as docs/integrations.md advises for masks."""
    ddp = nn.parallel.DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(ddp).parameters:
        return ddp(model, forward_sync_buffers=False)
    return ddp(model, broadcast_buffers=False)


def _drift(rank, wrap):
    model = sparseops.patch(_model())
    model = _shard(model) if wrap == "fsdp" else _ddp(model)
    inner = model if wrap == "fsdp" else model.module
    if rank == 1:
        inner[2].weight_mask[0, 0] = False  # this rank's mask drifted
    with pytest.raises(RuntimeError, match=r"differ between ranks.*'2'.*\[1\]"):
        sparseops.sync_masks(inner)
    with pytest.raises(RuntimeError, match="differ between ranks"):  # the pruning step checks too
        tickets.imp(inner, _train_fn(rank, 2), levels=1, progress=False)
    sparseops.sync_masks(inner, src=0)  # rank 0's masks on every rank
    assert bool(inner[2].weight_mask[0, 0])
    sparseops.sync_masks(inner)
    # random pruning with a generator seeded differently per rank: refused at the pruning step
    g = torch.Generator().manual_seed(rank)
    before = tickets.get_masks(inner)
    with pytest.raises(RuntimeError, match="differ between ranks"):
        tickets.imp(inner, _train_fn(rank, 2), levels=1, pruning="random", generator=g, progress=False)
    after = tickets.get_masks(inner)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
@pytest.mark.parametrize("wrap", ["fsdp", "ddp"])
def test_masks_that_differ_between_ranks_are_detected(tmp_path, wrap):
    _spawn(_drift, tmp_path, wrap)


def test_sync_masks_without_a_process_group_is_a_no_op():
    model = sparseops.patch(_model())
    masks = copy.deepcopy(tickets.get_masks(model))
    assert sparseops.sync_masks(model) is model
    assert all(torch.equal(masks[k], v) for k, v in tickets.get_masks(model).items())
