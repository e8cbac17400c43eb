"""torch.compile of patched layers (issue 14 item 2): masks are graph inputs read at run time, so a
compiled layer sees every mask edit (forward and backward) without recompiling, `fullgraph=True`
works, and training under torch.compile gives eager's gradients. Whole torchvision / transformers
models and torch.export: tests/test_export.py."""
import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import sparseops
from sparseops import MaskedConv2d, MaskedLinear, SoftMaskedConv2d, SoftMaskedLinear

from conftest import HAS_TRITON, TRITON_DEVICE, random_mask


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _layer(kind, dtype=torch.float32):
    if kind == "linear":
        return MaskedLinear(256, 192, dtype=dtype), torch.randn(8, 256, dtype=dtype)
    return MaskedConv2d(64, 32, 3, padding=1, dtype=dtype), torch.randn(2, 64, 8, 8, dtype=dtype)


def _outputs(f, layer, x):
    """Output and the gradients of x, weight and bias for a fixed random output gradient."""
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = f(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    y.backward(g)
    return [y.detach(), x.grad, layer.weight.grad, layer.bias.grad]


def _close(got, want, dtype):
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


# (layer, densities the mask is set to in turn): full -> pruned (IMP's first level), sparse ->
# sparser, and back to denser, so each route (unmasked, dense, sparse kernel) is left and entered.
EDITS = [("linear", (1.0, 0.5, 0.05, 0.5)), ("linear", (1.0, 0.02)), ("conv", (1.0, 0.5, 0.05, 0.5)),
         ("conv", (1.0, 0.03))]


@pytest.mark.parametrize("backend_name", ["auto", "cpu"])
@pytest.mark.parametrize("kind,densities", EDITS)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_layer_sees_every_mask_edit(kind, densities, backend_name, compiler):
    """compile, call, set_mask, call: the outputs and grads are eager's for every mask, and no edit
    recompiles (a mask edit changes values, not shapes)."""
    if backend_name == "cpu" and densities[0] == 1.0 and kind == "conv" and compiler == "inductor":
        densities = densities[1:]  # (one inductor conv case less: inductor compiles slowly on 2 cores)
    dtype = torch.float64 if compiler == "aot_eager" else torch.float32
    layer, x = _layer(kind, dtype)
    counter = CompileCounterWithBackend(compiler)
    with sparseops.backend(backend_name):
        f = torch.compile(layer, backend=counter)
        for i, density in enumerate(densities):
            layer.set_mask(random_mask(layer.weight.shape, 1 - density, torch.Generator().manual_seed(i)))
            _close(_outputs(f, layer, x), _outputs(layer, layer, x), dtype)
    assert counter.frame_count == 1


def test_in_place_mask_edits_are_seen():
    """Writes into the buffer itself (no set_mask) and a new buffer tensor are seen too."""
    layer, x = _layer("linear")
    f = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(x), layer(x))
    with torch.no_grad():
        layer.weight_mask[:, ::2] = False
    torch.testing.assert_close(f(x), torch.nn.functional.linear(x, layer.weight * layer.weight_mask, layer.bias))
    layer.weight_mask = random_mask(layer.weight.shape, 0.97)
    torch.testing.assert_close(f(x), torch.nn.functional.linear(x, layer.weight * layer.weight_mask, layer.bias))


def _conv1d_layer():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    model = torch.nn.Sequential(Conv1D(48, 32))
    sparseops.patch(model)
    assert type(model[0]).__name__ == "MaskedConv1D"
    return model[0], torch.randn(4, 5, 32)


def test_conv1d_sees_mask_edits():
    """transformers' Conv1D (GPT-2) passes its mask transposed, a view the graph makes every call: the
    layout is cached on the buffer, and edits are still seen."""
    layer, x = _conv1d_layer()
    counter = CompileCounterWithBackend("aot_eager")
    f = torch.compile(layer, backend=counter, fullgraph=True)
    for i, density in enumerate((1.0, 0.05, 0.5)):
        layer.set_mask(random_mask(layer.weight.shape, 1 - density, torch.Generator().manual_seed(i)))
        got = _outputs(f, layer, x)
        _close(got, _outputs(layer, layer, x), torch.float32)
        torch.testing.assert_close(got[0], (x @ (layer.weight * layer.weight_mask) + layer.bias).detach())
    assert counter.frame_count == 1


LAYERS = {
    "MaskedLinear": lambda: (MaskedLinear(64, 48), torch.randn(5, 64)),
    "MaskedConv2d": lambda: (MaskedConv2d(16, 8, 3, padding=1), torch.randn(2, 16, 6, 6)),
    "MaskedConv2d-grouped": lambda: (MaskedConv2d(16, 8, 3, padding="same", groups=2), torch.randn(2, 16, 6, 6)),
    "MaskedConv1D": _conv1d_layer,
    "SoftMaskedLinear": lambda: (SoftMaskedLinear(64, 48, s0=0.5), torch.randn(5, 64)),
    "SoftMaskedConv2d": lambda: (SoftMaskedConv2d(16, 8, 3, padding=1, s0=0.5), torch.randn(2, 16, 6, 6)),
}


@pytest.mark.parametrize("density", [1.0, 0.05])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_fullgraph(name, density):
    """fullgraph=True compiles every patched layer (no graph break), values and grads as eager."""
    layer, x = LAYERS[name]()
    if hasattr(layer, "set_mask"):
        layer.set_mask(random_mask(layer.weight.shape, 1 - density))
    else:
        with torch.no_grad():
            layer.weight_score.normal_()
    f = torch.compile(layer, backend="aot_eager", fullgraph=True)
    want = _outputs(layer, layer, x)
    _close(_outputs(f, layer, x), want, torch.float32)


def test_soft_layer_beta_and_ticket_mode_under_compile():
    """CS raises beta every epoch and ends in ticket mode: the compiled layer follows both, as
    eager, also late in CS when most of the soft mask underflows to exactly 0 (where eager runs the
    masked op over the rest)."""
    layer = SoftMaskedConv2d(16, 8, 3, padding=1)
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        layer.weight_score.normal_().sub_(1.5)
    f = torch.compile(layer, backend="aot_eager", fullgraph=True)
    for beta in (1.0, 10.0, 300.0):
        layer.beta = beta
        _close(_outputs(f, layer, x), _outputs(layer, layer, x), torch.float32)
    layer.set_ticket(True)
    want = _outputs(layer, layer, x)
    _close(_outputs(f, layer, x), want, torch.float32)
    with torch.no_grad():
        layer.weight_score.neg_()  # a new ticket: set_ticket again rebuilds the hard mask
    layer.set_ticket(True)
    want2 = _outputs(layer, layer, x)
    assert not torch.allclose(want2[0], want[0])
    _close(_outputs(f, layer, x), want2, torch.float32)


def _net():
    return torch.nn.Sequential(MaskedConv2d(3, 16, 3, padding=1), torch.nn.ReLU(inplace=True),
                               MaskedConv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               MaskedLinear(16 * 8 * 8, 200), torch.nn.ReLU(inplace=True), MaskedLinear(200, 10))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_training_under_compile_matches_eager(compiler):
    """SGD steps on a compiled model and on its eager copy, pruning half-way (IMP's step): the same
    weights at the end, and the compiled model compiled once."""
    torch.manual_seed(0)
    eager = _net().double()
    compiled_model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend(compiler)
    f = torch.compile(compiled_model, backend=counter)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (eager, compiled_model)]
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        x, target = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 10, (4,), generator=gen)
        if step == 3:  # prune: 90% of each layer by magnitude, in both models
            for a, b in zip(eager.modules(), compiled_model.modules()):
                if isinstance(a, (MaskedLinear, MaskedConv2d)):
                    keep = a.weight.abs() >= a.weight.abs().flatten().kthvalue(int(0.9 * a.weight.numel())).values
                    a.set_mask(keep)
                    b.set_mask(keep)
        for model, fn, opt in ((eager, eager, opts[0]), (compiled_model, f, opts[1])):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(fn(x), target).backward()
            opt.step()
    for a, b in zip(eager.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
    assert counter.frame_count == 1


# ---- the runtime ops themselves (what a graph holds) -----------------------------------------

def _f64(*shape, channels_last=False):
    t = torch.randn(*shape, dtype=torch.float64)
    return (t.to(memory_format=torch.channels_last) if channels_last else t).requires_grad_()


def test_runtime_ops_opcheck():
    """The runtime ops pass opcheck (schema, fake, autograd registration, aot dispatch)."""
    ops = torch.ops.sparseops
    torch.library.opcheck(ops.masked_linear_runtime.default, (_f64(3, 2, 20), _f64(12, 20),
                                                               random_mask((12, 20), 0.5), _f64(12)))
    torch.library.opcheck(ops.masked_conv2d_runtime.default, (_f64(2, 3, 6, 5, channels_last=True), _f64(4, 3, 3, 3),
                                                               random_mask((4, 3, 3, 3), 0.5), _f64(4), [1, 2],
                                                               [1, 0], [1, 1], 1))


@pytest.mark.parametrize("density,backend_name", [(1.0, "auto"), (0.5, "auto"), (0.05, "auto"), (0.5, "cpu")])
def test_runtime_ops_gradcheck(density, backend_name):
    """gradcheck in float64 of the runtime ops' forward and backward kernels, on masks that take each
    route when they run (unmasked, the dense paths, the sparse kernels), grouped convolutions too."""
    ops = torch.ops.sparseops
    mask, cmask, gmask = (random_mask(s, 1 - density) for s in ((12, 20), (4, 3, 3, 3), (4, 1, 3, 3)))
    with sparseops.backend(backend_name):
        torch.autograd.gradcheck(lambda x, w, b: ops.masked_linear_runtime(x, w, mask, b),
                                 (_f64(3, 2, 20), _f64(12, 20), _f64(12)))
        torch.autograd.gradcheck(lambda x, w, b: ops.masked_conv2d_runtime(x, w, cmask, b, [1, 2], [1, 0], [1, 1], 1),
                                 (_f64(1, 3, 5, 4), _f64(4, 3, 3, 3), _f64(4)))  # (channels_last: opcheck)
    torch.autograd.gradcheck(lambda x, w: ops.masked_conv2d_runtime(x, w, gmask, None, [1, 1], [1, 1], [1, 1], 4),
                             (_f64(1, 4, 4, 4), _f64(4, 1, 3, 3)))


def test_the_sparse_kernel_runs_inside_the_graph(monkeypatch):
    """The graph does not give up the sparse kernels: at 2% density in `auto` the run-time choice
    (made by the runtime op's kernels when the compiled call runs, forward and backward) is the CPU
    kernel. (The spy is on the kernels' chooser: dynamo replays a traced function's list appends.)"""
    from sparseops.ops import masked_linear as module

    seen = []
    choose = module._choose
    layer = MaskedLinear(1024, 1024)
    layer.set_mask(random_mask(layer.weight.shape, 0.98))
    f = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(64, 1024)
    want = _outputs(layer, layer, x)
    monkeypatch.setattr(module, "_choose", lambda *args: seen.append(choose(*args)) or seen[-1])
    _close(_outputs(f, layer, x), want, torch.float32)
    assert seen == ["cpu", "cpu"]


def test_errors_under_compile():
    """Bad masks get sparseops' errors under torch.compile too: a shape while tracing, values (not
    0/1) when the graph runs, a forced kernel that cannot take the call while tracing."""
    w, x = torch.randn(6, 8), torch.randn(2, 8)
    f = torch.compile(sparseops.masked_linear, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match=r"sparseops.masked_linear: the mask has shape \(8, 6\)"):
        f(x, w, torch.ones(8, 6, dtype=torch.bool))
    with pytest.raises(Exception, match="must hold only 0 and 1"):
        f(x, w, torch.full((6, 8), 2.0))
    torch.testing.assert_close(f(x, w, (torch.arange(48).view(6, 8) % 2).float()),
                               x @ (w * (torch.arange(48).view(6, 8) % 2)).t())
    conv = torch.compile(sparseops.masked_conv2d, backend="aot_eager", fullgraph=True)
    cw = torch.randn(4, 1, 3, 3)
    with sparseops.backend("cpu"), pytest.raises(Exception, match="the cpu kernel covers groups=1"):
        conv(torch.randn(1, 4, 5, 5), cw, torch.ones_like(cw, dtype=torch.bool), None, 1, 1, 1, 4)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_forced_triton_under_compile():
    """backend("triton") (Triton's interpreter on CPU tensors without a GPU): the run-time op runs
    the Triton kernels, forward and backward, and follows mask edits."""
    device = TRITON_DEVICE
    layer = MaskedLinear(24, 16, device=device, dtype=torch.float64)
    x = torch.randn(3, 24, device=device, dtype=torch.float64)
    with sparseops.backend("triton"):
        f = torch.compile(layer, backend="aot_eager", fullgraph=True)
        for density in (1.0, 0.3):
            layer.set_mask(random_mask(layer.weight.shape, 1 - density).to(device))
            _close(_outputs(f, layer, x), _outputs(layer, layer, x), torch.float64)


def _imp(compiled: bool):
    """Two IMP levels on a small MLP whose training runs through torch.compile(model) (one compiled
    function for the whole search) or eagerly."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5)).double()
    sparseops.patch(model)
    fn = torch.compile(model, backend="aot_eager") if compiled else model
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 20, generator=gen, dtype=torch.float64), torch.randint(0, 5, (32,), generator=gen)

    def train(m, level):
        opt = torch.optim.SGD(m.parameters(), lr=0.2)
        for _ in range(4):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(fn(x), y).backward()
            opt.step()
        with torch.no_grad():
            return {"loss": float(torch.nn.functional.cross_entropy(fn(x), y))}

    return sparseops.tickets.imp(model, train, levels=2, rate=0.5, progress=False), model


def test_imp_on_a_compiled_model_prunes():
    """The issue's symptom: IMP whose training calls a compiled model trains the pruned network at
    every level, as eager IMP does (same losses, masks and weights)."""
    (want, eager), (got, compiled) = _imp(False), _imp(True)
    assert [r.sparsity for r in got.levels] == [r.sparsity for r in want.levels]
    assert got.levels[-1].sparsity > 0.7
    for a, b in zip(want.levels, got.levels, strict=True):
        assert a.metrics["loss"] == pytest.approx(b.metrics["loss"], rel=1e-9)
        for name in a.masks:
            assert torch.equal(a.masks[name], b.masks[name])
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
