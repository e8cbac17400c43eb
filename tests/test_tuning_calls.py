"""auto measuring in the calls themselves (sparseops.tuning, tuning_sample) under the ways training
runs them: many calls of a key before a backward, activation checkpointing, failing candidates,
threads, and what a call keeps alive."""
import gc
import importlib
import threading
import warnings
import weakref

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import sparseops
from sparseops import tuning, tuning_infer

ml = importlib.import_module("sparseops.ops.masked_linear")


@pytest.fixture
def fresh(tuning_on):
    return tuning_on  # (conftest: an empty private cache, measuring on)


def _layer(n=96, k=80, density=0.05, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=dtype, requires_grad=True), torch.rand(n, k, generator=g) < density


def _close_to_float64(x, w, mask, y, loss=lambda y: y.sum()):
    """y and the gradients x, w got from loss(y), against plain torch in float64."""
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = x64 @ (w64 * mask).t()
    loss(y64).backward()
    torch.testing.assert_close(y.double(), y64)
    torch.testing.assert_close(w.grad.double(), w64.grad)
    if x.requires_grad:
        torch.testing.assert_close(x.grad.double(), x64.grad)


def test_many_calls_of_a_key_before_one_backward_are_timed(fresh):
    """30 layers of one key in one forward (a transformer's blocks, gradient accumulation): the calls
    wait for their backward, so measuring must not run out of calls and cache an untimed prior."""
    ws = [_layer(seed=i)[0] for i in range(30)]
    mask = _layer()[1]
    for step in range(4):
        x = torch.randn(16, 80, dtype=torch.float64)
        ys = [sparseops.masked_linear(x, w, mask) for w in ws]
        sum(y.sum() for y in ys).backward()
        for w, y in zip(ws, ys):
            _close_to_float64(x, w, mask, y.detach())
            w.grad = None
    (entry,) = tuning.entries().values()
    assert entry["times_ms"] and entry["winner"] in entry["times_ms"] and entry["calls"] > 0


def test_a_forward_never_backpropagated_ends_measuring(fresh):
    """Samples whose graph is freed without a backward count as lost: measuring still ends."""
    w, mask = _layer()
    for _ in range(60):
        sparseops.masked_linear(torch.randn(16, 80, dtype=torch.float64), w, mask)
    assert not tuning._cache.exploring and len(tuning.entries()) == 1


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(fresh, reentrant):
    """A non-reentrant checkpoint runs the call again in the backward and compares what it saved:
    the recomputation must run the same implementation, and the guard's runs must not be saved."""
    w, mask = _layer()
    for i in range(25):
        x = torch.randn(16, 80, dtype=torch.float64, requires_grad=True)
        y = checkpoint(lambda a, b: sparseops.masked_linear(a, b, mask), x, w, use_reentrant=reentrant)
        y.square().sum().backward()
        _close_to_float64(x, w, mask, y.detach(), lambda y: y.square().sum())
        w.grad = None


def test_checkpointing_when_measuring_is_off(fresh):
    """The guard alone (measuring off, the prior a sparse kernel) must not break a checkpoint."""
    w, mask = _layer()
    x = torch.randn(16, 80, dtype=torch.float64, requires_grad=True)
    with tuning.measuring(False):
        y = checkpoint(lambda a, b: sparseops.masked_linear(a, b, mask), x, w, use_reentrant=False)
        y.sum().backward()
    _close_to_float64(x, w, mask, y.detach())


def test_a_call_keeps_no_tensor_alive_after_it(fresh):
    """Nothing of a call (its trial, Sample, graph) keeps its inputs alive once they are dropped,
    without waiting for the cyclic garbage collector (which training loops may turn off)."""
    w, mask = _layer()
    gc.disable()
    try:
        for i in range(12):
            x = torch.randn(16, 80, dtype=torch.float64, requires_grad=True)
            y = sparseops.masked_linear(x, w, mask)
            refs = [weakref.ref(x), weakref.ref(y)]
            if i % 2:
                y.sum().backward()
            del x, y
            assert [r() for r in refs] == [None, None], f"call {i}"
    finally:
        gc.enable()


def _broken(monkeypatch, bad, how):
    real = ml._run

    def run(impl, x, *a):
        if impl == bad and how == "raises":
            raise RuntimeError("kernel failed")
        y = real(impl, x, *a)
        return y + 1.0 if impl == bad else y

    monkeypatch.setattr(ml, "_run", run)


def test_a_candidate_that_raises_is_excluded_not_raised(fresh, monkeypatch):
    _broken(monkeypatch, "torch_sparse", "raises")
    w, mask = _layer()
    with pytest.warns(RuntimeWarning, match="'torch_sparse'.*kernel failed"):
        for _ in range(30):
            x = torch.randn(16, 80, dtype=torch.float64, requires_grad=True)
            y = sparseops.masked_linear(x, w, mask)
            y.sum().backward()
            _close_to_float64(x, w, mask, y.detach())
            w.grad = None
    assert "torch_sparse" not in next(iter(tuning.entries().values()))["times_ms"]


def test_a_wrong_kernel_stays_excluded_at_other_densities_of_the_layer(fresh, monkeypatch):
    """The guard checks once per layer; a kernel it caught must not run unchecked for the layer's next
    density bucket (IMP prunes one layer to a new density every round)."""
    _broken(monkeypatch, "cpu", "wrong")
    w, _ = _layer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for density in (0.15, 0.05, 0.01):
            mask = _layer(density=density, seed=1)[1]
            for _ in range(30):
                x = torch.randn(16, 80, dtype=torch.float64)
                y = sparseops.masked_linear(x, w, mask)
                y.sum().backward()
                _close_to_float64(x, w, mask, y.detach())
                w.grad = None
            assert "cpu" not in {e["winner"] for e in tuning.entries().values()}


def test_threads_meeting_a_new_key_share_one_measurement(fresh, monkeypatch):
    """Two threads reaching a key at once measure it together, not in two Measurings."""
    monkeypatch.setenv("SPARSEOPS_TUNE", "1")  # (each thread's setting starts from the environment)
    both = threading.Barrier(2, timeout=10)
    real = tuning_infer.inferred
    monkeypatch.setattr(tuning.infer, "inferred", lambda *a: (both.wait(), real(*a))[1])
    seen, errors = [], []
    real_sample = tuning.Sample
    monkeypatch.setattr(tuning, "Sample", lambda m, *a: seen.append(m) or real_sample(m, *a))
    w, mask = _layer()

    def one_call():
        try:
            x = torch.randn(16, 80, dtype=torch.float64)
            sparseops.masked_linear(x, w, mask).sum().backward()
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=one_call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(seen) == 2 and seen[0] is seen[1]



@pytest.mark.parametrize("kind", ["channels", "soft"])
def test_ops_called_inside_a_measured_run_measure_nothing_themselves(fresh, kind):
    """An op can run another: the channel path the element-wise op on the kept channels, a soft-masked
    layer whose mask is mostly exactly 0 the masked op over the rest. Inside a check or a timed call,
    that inner call is part of the run: were it measured as its own key, its measuring would start in
    calls that never come again (the check's few rows; a layer whose winner runs no inner op) and
    stay open for good."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1)).double()
    sparseops.patch(model, **({"mode": "soft"} if kind == "soft" else {}))
    with torch.no_grad():
        for m in (model[0], model[2]):
            if kind == "soft":
                m.weight_score.normal_(-2.0, 1.0, generator=g)
                m.beta = 94.0  # about 97% of the mask exactly 0
            else:
                mask = torch.rand(m.weight.shape, generator=g) < 0.5
                mask[::2] = False  # half the filters gone, an element-wise mask on the rest
                m.set_mask(mask)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    for _ in range(40):
        model.zero_grad()
        model(x).sum().backward()
        if not tuning._cache.exploring:
            break
    assert not tuning._cache.exploring, sorted(tuning._cache.exploring)


def test_a_correctness_check_imports_nothing_heavy(tmp_path):
    """The check's backward takes no grad_outputs: passing them makes torch import torch.fx's symbolic
    shapes and sympy (~0.4 s, once a process), which a training step never needs."""
    import subprocess
    import sys

    code = ("import sys, torch, sparseops\n"
            "from sparseops import tuning\n"
            "layer = sparseops.MaskedLinear(64, 48)\n"
            "layer.set_mask(torch.rand(48, 64, generator=torch.Generator().manual_seed(0)) < 0.1)\n"
            "x = torch.randn(40, 64, requires_grad=True)\n"
            "before = set(sys.modules)\n"
            "for _ in range(12):\n"
            "    layer(x).sum().backward()\n"
            "assert tuning._cache.guarded, 'no check ran'\n"
            "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] == 'sympy')[:5])\n")
    env = {**__import__("os").environ, "SPARSEOPS_CACHE_DIR": str(tmp_path), "SPARSEOPS_TUNE": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", run.stdout
