"""Robustness (issue 14): what must hold on every implementation of an op, whichever path a call
takes: fresh outputs (in-place ops after a layer), every dtype at every density, one answer for
non-finite values at pruned entries, the same errors on every path.

Implementations are called by name (the ops under torch.ops.sparseops, and through the public
functions under a forced backend); the Triton ones run under TRITON_INTERPRET=1 on CPU tensors."""
import pytest
import torch
from torch import nn

import sparseops
from sparseops.layout import block_layout, csr_layout

from conftest import random_mask

lib = torch.ops.sparseops
# numpy, under the interpreter, warns where the kernels compute exp(-z) = inf and then select 0
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore:Sparse CSR tensor support")


def _triton():
    try:
        import sparseops.triton  # noqa: F401
    except ImportError:
        return False
    return sparseops.backend.triton_unavailable(torch.device("cpu")) is None


HAVE_TRITON = _triton()
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="Triton (interpreter) unavailable")


# ---- item 1: every op output is a fresh tensor ------------------------------------------------


def _linear_case(lead=(2, 3)):
    x = torch.randn(*lead, 16, dtype=torch.float64)
    w = torch.randn(6, 16, dtype=torch.float64)
    mask = random_mask((6, 16), 0.7)
    return x, w, mask, torch.randn(6, dtype=torch.float64)


def _conv_case():
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    w = torch.randn(3, 16, 3, 3, dtype=torch.float64)
    return x, w, random_mask(w.shape, 0.7), torch.randn(3, dtype=torch.float64)


def _op_calls():
    """(name, forward thunk, backward thunk) for every op implementation that runs here."""
    calls = []
    for lead in ((4,), (2, 3)):
        x, w, mask, b = _linear_case(lead)
        csr, blk = csr_layout(mask).tensors(), block_layout(mask, 16)
        g = torch.randn(*lead, 6, dtype=torch.float64)
        names = ["masked_linear", "torch_sparse_masked_linear"] + (["triton_masked_linear"] if HAVE_TRITON else [])
        for name in names:
            calls.append((f"{name}{lead}", lambda n=name, x=x, w=w, csr=csr, b=b: getattr(lib, n)(x, w, *csr, b),
                          lambda n=name, x=x, w=w, csr=csr, g=g: getattr(lib, n + "_backward")(
                              g, x, w, *csr, [True, True, True])))
        calls.append((f"masked_linear_dense{lead}", lambda x=x, w=w, m=mask, b=b: lib.masked_linear_dense(x, w, m, b),
                      None))
        for name in ["masked_linear_block"] + (["triton_masked_linear_block"] if HAVE_TRITON else []):
            calls.append((f"{name}{lead}",
                          lambda n=name, x=x, w=w, m=mask, blk=blk, b=b: getattr(lib, n)(
                              x, w, m, *blk.tensors(), 16, b),
                          lambda n=name, x=x, w=w, m=mask, blk=blk, g=g: getattr(lib, n + "_backward")(
                              g, x, w, m, *blk.tensors(), 16, [True, True, True])))
        s = torch.randn(6, 16, dtype=torch.float64)
        for name in ["soft_masked_linear"] + (["triton_soft_masked_linear"] if HAVE_TRITON else []):
            calls.append((f"{name}{lead}", lambda n=name, x=x, w=w, s=s, b=b: getattr(lib, n)(x, w, s, 2.0, 1.5, b),
                          lambda n=name, x=x, w=w, s=s, g=g: getattr(lib, n + "_backward")(
                              g, x, w, s, 2.0, 1.5, [True, True, True, True])))
    x, w, mask, b = _conv_case()
    csr, blk = csr_layout(mask).tensors(), block_layout(mask, 16)
    g = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    geo = ([1, 1], [1, 1], [1, 1])
    for name in ["masked_conv2d"] + (["triton_masked_conv2d"] if HAVE_TRITON else []):
        calls.append((name, lambda n=name: getattr(lib, n)(x, w, *csr, b, *geo),
                      lambda n=name: getattr(lib, n + "_backward")(g, x, w, *csr, *geo, [True, True, True])))
    for name in ["masked_conv2d_block"] + (["triton_masked_conv2d_block"] if HAVE_TRITON else []):
        calls.append((name, lambda n=name: getattr(lib, n)(x, w, mask, *blk.tensors(), 16, b, *geo),
                      lambda n=name: getattr(lib, n + "_backward")(g, x, w, mask, *blk.tensors(), 16, *geo,
                                                                   [True, True, True])))
    s = torch.randn_like(w)
    for name in ["soft_masked_conv2d"] + (["triton_soft_masked_conv2d"] if HAVE_TRITON else []):
        calls.append((name, lambda n=name: getattr(lib, n)(x, w, s, 2.0, 1.5, b, *geo),
                      lambda n=name: getattr(lib, n + "_backward")(g, x, w, s, 2.0, 1.5, *geo,
                                                                   [True, True, True, True])))
    for name in ["soft_mask"] + (["triton_soft_mask"] if HAVE_TRITON else []):
        calls.append((name, lambda n=name: getattr(lib, n)(w, s, 2.0, 1.5),
                      lambda n=name: getattr(lib, n + "_backward")(torch.randn_like(w), w, s, 2.0, 1.5)))
    return calls


CALLS = _op_calls()


@pytest.mark.parametrize("name,forward,backward", CALLS, ids=[c[0] for c in CALLS])
def test_op_outputs_are_fresh_tensors(name, forward, backward):
    """No op returns a view (of an internal buffer or of an input): autograd refuses in-place
    edits of a custom op's view outputs, and a backward's view would pin its whole buffer."""
    outs = [forward()] + (list(backward()) if backward is not None else [])
    for i, t in enumerate(outs):
        assert not t._is_view(), f"{name}: output {i} is a view"


BACKENDS = ["cpu", "dense", "reference"] + (["triton"] if HAVE_TRITON else [])


@pytest.mark.parametrize("act", [nn.ReLU, nn.Hardswish])
@pytest.mark.parametrize("lead", [(4,), (2, 3)])
@pytest.mark.parametrize("name", BACKENDS + ["auto"])
def test_inplace_activation_after_masked_linear(name, lead, act):
    """MaskedLinear -> ReLU(inplace=True) (torchvision's VGG/AlexNet/MobileNetV3 classifiers) trains
    on every backend, and at 5% kept in `auto` (past the dense fallback)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 600), act(inplace=True), nn.Linear(600, 5))
    sparseops.patch(model)
    for layer in (model[0], model[2]):
        layer.set_mask(random_mask(layer.weight.shape, 0.95))
    ref = nn.Sequential(nn.Linear(16, 600), act(), nn.Linear(600, 5))
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("mask")})
    with torch.no_grad():
        ref[0].weight.mul_(model[0].weight_mask)
        ref[2].weight.mul_(model[2].weight_mask)
    x = torch.randn(*lead, 16)
    with sparseops.backend(name):
        y = model(x)
        y.square().sum().backward()
    ref(x).square().sum().backward()
    torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model[0].weight.grad, ref[0].weight.grad * model[0].weight_mask,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", BACKENDS)
def test_inplace_activation_after_masked_conv2d(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 4, 3),
                          nn.Hardswish(inplace=True))
    sparseops.patch(model)
    for layer in (model[0], model[2]):
        layer.set_mask(random_mask(layer.weight.shape, 0.9))
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    with sparseops.backend(name):
        y = model(x)
        y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ---- item 3: every dtype works at every density; autocast as on unpatched layers ----------------

HALF = [torch.bfloat16, torch.float16]
DENSITIES = [1.0, 0.5, 0.05]


def _pair(kind, dtype, density):
    """A patched layer of `kind` in `dtype` at `density`, and its unpatched twin holding the
    masked weight."""
    torch.manual_seed(0)
    dense = nn.Linear(256, 256) if kind == "linear" else nn.Conv2d(64, 32, 3, padding=1)
    layer = nn.Linear(256, 256) if kind == "linear" else nn.Conv2d(64, 32, 3, padding=1)
    layer.load_state_dict(dense.state_dict())
    layer = sparseops.patch(nn.Sequential(layer))[0].to(dtype)
    layer.set_mask(random_mask(layer.weight.shape, 1.0 - density))
    with torch.no_grad():
        dense.weight.mul_(layer.weight_mask)
    x = torch.randn((8, 256) if kind == "linear" else (2, 64, 8, 8))
    return layer, dense.to(dtype), x


def _train_step(layer, x):
    layer.zero_grad()
    y = layer(x)
    y.float().square().mean().backward()
    return y, layer.weight.grad


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("sparse_first", [False, True], ids=["auto", "max_density=1"])
def test_half_precision_at_every_density(kind, dtype, density, sparse_first):
    """bf16/fp16 layers train at every density (the kernel where it takes the dtype, else the
    dispatcher's dense path), with the unpatched layer's dtype and values."""
    layer, dense, x = _pair(kind, dtype, density)
    x = x.to(dtype)
    with sparseops.backend(max_density=1.0 if sparse_first else None):
        y, dw = _train_step(layer, x)
    y_ref, dw_ref = _train_step(dense, x)
    assert y.dtype == y_ref.dtype == dtype and dw.dtype == dtype
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dw.float(), (dw_ref * layer.weight_mask).float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("sparse_first", [False, True], ids=["auto", "max_density=1"])
def test_cpu_autocast_at_every_density(kind, density, sparse_first):
    """Under torch.autocast("cpu", bfloat16) a patched layer computes in bfloat16, as the unpatched
    one does, at every density; its fp32 parameters get fp32 gradients."""
    layer, dense, x = _pair(kind, torch.float32, density)
    with torch.autocast("cpu", dtype=torch.bfloat16), sparseops.backend(max_density=1.0 if sparse_first else None):
        y, dw = _train_step(layer, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, dw_ref = _train_step(dense, x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert dw.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dw, dw_ref * layer.weight_mask, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", HALF)
def test_soft_layers_in_half_precision(dtype):
    torch.manual_seed(0)
    layer = sparseops.patch(nn.Sequential(nn.Linear(64, 32)), mode="soft")[0].to(dtype)
    with torch.no_grad():
        layer.weight_score.normal_()
    layer.beta = 200.0  # most of the mask underflows to 0: the CPU's skip_zeros path
    x = torch.randn(4, 64, dtype=dtype)
    y = layer(x)
    y.float().sum().backward()
    ref = torch.nn.functional.linear(x.float(), (layer.weight * layer.soft_mask()).float(), layer.bias.float())
    assert y.dtype == dtype and layer.weight.grad.dtype == dtype
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)
    assert sparseops.soft_mask(layer.weight, layer.weight_score, 2.0).dtype == dtype
    assert sparseops.soft_mask_l1(layer.weight_score, 2.0).dtype == dtype


@pytest.mark.parametrize("op", ["masked_linear", "masked_conv2d", "soft_mask"])
def test_forced_backend_names_the_dtype_it_lacks(op):
    """A forced backend whose kernel lacks the dtype says so before running anything."""
    w = torch.randn(4, 8, dtype=torch.bfloat16) if op != "masked_conv2d" else torch.randn(4, 8, 3, 3,
                                                                                          dtype=torch.bfloat16)
    mask = random_mask(w.shape, 0.9)
    with sparseops.backend("cpu"), pytest.raises(TypeError, match=r"sparseops\.%s: .*bfloat16" % op):
        if op == "masked_linear":
            sparseops.masked_linear(torch.randn(2, 8, dtype=torch.bfloat16), w, mask)
        elif op == "masked_conv2d":
            sparseops.masked_conv2d(torch.randn(1, 8, 5, 5, dtype=torch.bfloat16), w, mask)
        else:
            sparseops.soft_mask(w, torch.randn_like(w), 1.0)


# ---- item 4: a pruned weight contributes exactly nothing, on every path --------------------------


def _poisoned(shape, sparsity=0.7):
    """A weight with inf, -inf and NaN at pruned entries, its mask, and the clean weight."""
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.float64)
    mask = random_mask(shape, sparsity)
    bad = w.clone()
    pruned = (~mask).nonzero()
    for i, v in zip(range(3), (float("inf"), float("-inf"), float("nan"))):
        bad[tuple(pruned[i])] = v
    return bad, mask, torch.where(mask, w, 0)


def _linear_impls():
    def forced(name, **kw):
        def run(x, w, mask, b):
            with sparseops.backend(name, **kw):
                return sparseops.masked_linear(x, w, mask, b)
        return run

    def direct(op, block=False):
        def run(x, w, mask, b):
            if block:
                return getattr(lib, op)(x, w, mask, *block_layout(mask, 16).tensors(), 16, b)
            return getattr(lib, op)(x, w, *csr_layout(mask).tensors(), b)
        return run

    impls = {"cpu": forced("cpu"), "dense": forced("dense"), "reference": forced("reference"),
             "mask_multiply": forced("auto", max_density=0.0), "torch_sparse": direct("torch_sparse_masked_linear"),
             "block_cpu": direct("masked_linear_block", block=True)}
    if HAVE_TRITON:
        impls.update(triton=forced("triton"), triton_block=direct("triton_masked_linear_block", block=True))
    return impls


def _conv_impls():
    def forced(name):
        def run(x, w, mask, b):
            with sparseops.backend(name):
                return sparseops.masked_conv2d(x, w, mask, b, padding=1)
        return run

    def block(op):
        def run(x, w, mask, b):
            return getattr(lib, op)(x, w, mask, *block_layout(mask, 16).tensors(), 16, b, [1, 1], [1, 1], [1, 1])
        return run

    impls = {"cpu": forced("cpu"), "reference": forced("reference"), "block_cpu": block("masked_conv2d_block")}
    if HAVE_TRITON:
        impls.update(triton=forced("triton"), triton_block=block("triton_masked_conv2d_block"))
    return impls


def _grads(run, x, w, mask, b, g):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = run(x, w, mask, b)
    return (y, *torch.autograd.grad(y, (x, w, b), g))


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_non_finite_pruned_weights_contribute_nothing(kind):
    """inf/NaN weights at pruned entries: every implementation gives the result of the clean
    (zeroed) weight, forward and backward; dw at pruned entries is exactly 0."""
    impls = _linear_impls() if kind == "linear" else _conv_impls()
    shape = (6, 16) if kind == "linear" else (3, 16, 3, 3)
    w, mask, clean = _poisoned(shape)
    x = torch.randn((2, 3, 16) if kind == "linear" else (2, 16, 5, 5), dtype=torch.float64)
    b = torch.randn(shape[0], dtype=torch.float64)
    want = _grads(lambda x, w, m, b: sparseops.reference.masked_linear(x, w, torch.ones_like(m), b) if kind == "linear"
                  else torch.nn.functional.conv2d(x, w, b, padding=1), x, clean, mask, b,
                  g := torch.randn((2, 3, 6) if kind == "linear" else (2, 3, 5, 5), dtype=torch.float64))
    for name, run in impls.items():
        got = _grads(run, x, w, mask, b, g)
        for what, a, r in zip(("y", "dx", "dw", "db"), got, want, strict=True):
            r = r * mask if what == "dw" else r
            assert torch.isfinite(a).all(), f"{name}: {what} is not finite"
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name} {what}: {m}")


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_dw_is_exactly_zero_at_pruned_entries_for_non_finite_input(kind):
    """NaN/inf in x or grad: on every path dw stays exactly 0 at pruned entries (kept entries
    may be NaN, as in any product with NaN)."""
    impls = _linear_impls() if kind == "linear" else _conv_impls()
    shape = (6, 16) if kind == "linear" else (3, 16, 3, 3)
    _, mask, w = _poisoned(shape)
    x = torch.randn((2, 3, 16) if kind == "linear" else (2, 16, 5, 5), dtype=torch.float64)
    x.view(-1)[::17] = float("nan")
    x.view(-1)[5] = float("inf")
    b = torch.randn(shape[0], dtype=torch.float64)
    g = torch.randn((2, 3, 6) if kind == "linear" else (2, 3, 5, 5), dtype=torch.float64)
    for name, run in impls.items():
        _, _, dw, _ = _grads(run, x, w, mask, b, g)
        assert (dw[~mask] == 0).all(), f"{name}: dw at pruned entries is {dw[~mask].unique()}"


def test_reference_defines_the_contract():
    w, mask, clean = _poisoned((4, 8))
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(sparseops.reference.masked_linear(x, w, mask), x @ clean.t())
    wc, maskc, cleanc = _poisoned((2, 3, 3, 3))
    xc = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(sparseops.reference.masked_conv2d(xc, wc, maskc),
                               torch.nn.functional.conv2d(xc, cleanc))


# ---- item 14: one set of errors, whichever path a call would take -------------------------------

PATHS = {  # how a call reaches each path: (backend, mask sparsity)
    "unmasked": ("auto", 0.0), "dense": ("dense", 0.5), "kernel": ("auto", 0.95), "reference": ("reference", 0.95),
    "cpu": ("cpu", 0.95),
}


def _linear_bad():
    x, w, b = torch.randn(3, 16), torch.randn(8, 16), torch.randn(8)
    return [
        ("bias [1]", (x, w, torch.randn(1)), ValueError, "bias"),
        ("bias 0-d", (x, w, torch.tensor(1.0)), ValueError, "bias"),
        ("bias [2, 8]", (x, w, torch.randn(2, 8)), ValueError, "bias"),
        ("float16 x", (x.half(), w, b), TypeError, "x"),
        ("int64", (x.long(), w.long(), None), TypeError, "float32"),
        ("bias dtype", (x, w, b.double()), TypeError, "bias"),
        ("x features", (torch.randn(3, 15), w, b), ValueError, "x"),
        ("0-d x", (torch.tensor(1.0), w, b), ValueError, "x"),
        ("3-D w", (x, torch.randn(2, 8, 16), None), ValueError, "w must be 2-D"),
    ]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", _linear_bad(), ids=[c[0] for c in _linear_bad()])
def test_masked_linear_errors_on_every_path(case, path):
    _, (x, w, b), exc, words = case
    name, sparsity = PATHS[path]
    mask = random_mask(w.shape[-2:], sparsity)
    with sparseops.backend(name), pytest.raises(exc, match=r"^sparseops\.masked_linear: .*" + words):
        sparseops.masked_linear(x, w, mask if w.dim() == 2 else torch.ones(w.shape, dtype=torch.bool), b)


def _conv_bad():
    x, w, b = torch.randn(2, 16, 6, 6), torch.randn(4, 16, 3, 3), torch.randn(4)
    return [
        ("bias [1]", (x, w, torch.randn(1)), ValueError, "bias"),
        ("bias 0-d", (x, w, torch.tensor(1.0)), ValueError, "bias"),
        ("float16 x", (x.half(), w, b), TypeError, "x"),
        ("int64", (x.long(), w.long(), None), TypeError, "float32"),
        ("C_in", (torch.randn(2, 8, 6, 6), w, b), ValueError, "x"),
        ("2-D x", (torch.randn(16, 6), w, b), ValueError, "x"),
    ]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", _conv_bad(), ids=[c[0] for c in _conv_bad()])
def test_masked_conv2d_errors_on_every_path(case, path):
    _, (x, w, b), exc, words = case
    name, sparsity = PATHS[path]
    with sparseops.backend(name), pytest.raises(exc, match=r"^sparseops\.masked_conv2d: .*" + words):
        sparseops.masked_conv2d(x, w, random_mask(w.shape, sparsity), b, padding=1)


@pytest.mark.parametrize("op", ["soft_masked_linear", "soft_masked_conv2d"])
def test_soft_masked_errors_on_every_path(op):
    conv = op.endswith("conv2d")
    x = torch.randn(2, 16, 6, 6) if conv else torch.randn(3, 16)
    w = torch.randn(4, 16, 3, 3) if conv else torch.randn(4, 16)
    fn = getattr(sparseops, op)
    for name in ("auto", "reference"):
        with sparseops.backend(name):
            with pytest.raises(ValueError, match=rf"^sparseops\.{op}: .*bias"):
                fn(x, w, torch.randn_like(w), 1.0, 1.0, torch.randn(1))
            with pytest.raises(TypeError, match=rf"^sparseops\.{op}: .*s"):
                fn(x, w, torch.randn_like(w).double(), 1.0, 1.0)
            with pytest.raises(TypeError, match=rf"^sparseops\.{op}: .*float32"):
                fn(x.long(), w.long(), torch.randn_like(w).long(), 1.0, 1.0)


@pytest.mark.parametrize("name", ["auto", "reference", "cpu"])
def test_masked_conv2d_with_no_output_channels(name):
    """torch's conv2d refuses C_out = 0; sparseops says so on every path (it raised IndexError)."""
    x, w = torch.randn(2, 16, 6, 6), torch.randn(0, 16, 3, 3)
    with sparseops.backend(name), pytest.raises(ValueError, match=r"^sparseops\.masked_conv2d: w has 0 output"):
        sparseops.masked_conv2d(x, w, torch.zeros(w.shape, dtype=torch.bool), torch.randn(0), padding=1)


def test_bad_max_density_variable_is_named(monkeypatch):
    from sparseops import backend
    monkeypatch.setenv("SPARSEOPS_MAX_DENSITY", "abc")
    with pytest.raises(ValueError, match="SPARSEOPS_MAX_DENSITY.*'abc'"):
        backend._env_max_density()


@pytest.mark.parametrize("op", ["linear", "conv"])
def test_double_backward_through_a_kernel_raises_instead_of_going_wrong(op):
    g = torch.Generator().manual_seed(0)
    if op == "linear":
        x, w = torch.randn(4, 8, generator=g, requires_grad=True), torch.randn(6, 8, generator=g, requires_grad=True)
        mask = torch.rand(6, 8, generator=g) < 0.3
        run = lambda: sparseops.masked_linear(x, w, mask)  # noqa: E731
    else:
        x, w = torch.randn(2, 3, 5, 5, generator=g, requires_grad=True), torch.randn(4, 3, 3, 3, generator=g,
                                                                                     requires_grad=True)
        mask = torch.rand(4, 3, 3, 3, generator=g) < 0.3
        run = lambda: sparseops.masked_conv2d(x, w, mask, None, 1, 1)  # noqa: E731
    for name in ("cpu", "dense") if op == "linear" else ("cpu",):  # (conv's dense path is plain autograd)
        with sparseops.backend(name):
            (dw,) = torch.autograd.grad(run().square().sum(), w)  # a first derivative is fine
            with pytest.raises(NotImplementedError, match="double backward"):
                torch.autograd.grad(run().square().sum(), w, create_graph=True)
    with sparseops.backend("reference"):
        (ref,) = torch.autograd.grad(run().square().sum(), w, create_graph=True)
    torch.testing.assert_close(dw, ref.detach())
