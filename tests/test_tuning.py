"""auto's measured choice (sparseops.tuning): the cache and its file, the correctness guard,
reproducibility, and tune() / `python -m sparseops tune`."""
import importlib
import json

import pytest
import torch

import sparseops
from sparseops import tuning, tuning_sample

ml = importlib.import_module("sparseops.ops.masked_linear")


@pytest.fixture
def fresh(tuning_on):
    return tuning_on  # (conftest: an empty private cache, measuring on)


def _call(n=96, k=80, rows=16, density=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, requires_grad=True)
    x = torch.randn(rows, k, generator=g, requires_grad=True)
    mask = torch.rand(n, k, generator=g) < density
    y = sparseops.masked_linear(x, w, mask)
    y.sum().backward()
    return x, w, mask, y


def _measure(calls=40, **kw):
    """Calls of one key until auto has measured it (each call checked against the reference);
    returns how many it took."""
    for i in range(calls):
        x, w, mask, y = _call(**kw)  # (the same mask: one key)
        torch.testing.assert_close(y, x @ (w * mask).t())
        if not tuning._cache.exploring:
            return i + 1
    pytest.fail(f"not measured in {calls} calls")


def _spy_on_samples(monkeypatch):
    """The implementations whose calls are timed from now on, in order."""
    timed = []
    real = tuning.Sample

    def spy(m, impl, *a):
        timed.append(impl)
        return real(m, impl, *a)

    monkeypatch.setattr(tuning, "Sample", spy)
    return timed


def test_the_first_calls_measure_caches_and_write_the_file(fresh, monkeypatch):
    timed = _spy_on_samples(monkeypatch)
    calls = _measure()
    (key, entry), = tuning.entries().items()
    assert key.startswith("masked_linear|cpu:") and "float32" in key and "16x96x80" in key
    assert entry["winner"] in entry["times_ms"] and entry["calls"] == calls == len(timed)
    assert {"mask_multiply", "dense", "cpu", "torch_sparse"} == set(entry["times_ms"]) == set(timed)
    assert timed[0] == "cpu"  # the prior runs first (a key met once runs the best guess)
    files = list(fresh.glob("tuning-*.json"))
    assert files == [tuning.cache_file()]
    data = json.loads(files[0].read_text())
    assert data["entries"] == {key: entry} and data["machine"]["isa"] == torch.ops.sparseops._cpu_isa()
    assert not list(fresh.glob(".tuning-*"))  # the temporary file was renamed into place
    assert calls <= 4 * (tuning_sample.CLOSE_SAMPLES + 1)


def test_measuring_runs_nothing_but_the_calls_and_a_few_row_check(fresh, monkeypatch):
    """No extra full runs: besides the calls, only the guard's copies of CHECK_ROWS rows run."""
    rows = []
    real = ml._run
    monkeypatch.setattr(ml, "_run", lambda impl, x, *a: rows.append(x.shape[0]) or real(impl, x, *a))
    calls = _measure(rows=200)
    assert rows.count(200) == calls and set(rows) == {200, tuning.CHECK_ROWS}, rows


def test_the_backward_is_timed_too(fresh, monkeypatch):
    """A candidate fast forward but slow backward loses."""
    import time

    class SlowBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.view_as(y)

        @staticmethod
        def backward(ctx, g):
            time.sleep(0.05)
            return g

    real = ml._run
    monkeypatch.setattr(ml, "_run", lambda impl, *a: SlowBackward.apply(real(impl, *a)) if impl == "cpu"
                        else real(impl, *a))
    _measure()
    entry = next(iter(tuning.entries().values()))
    assert entry["times_ms"]["cpu"] >= 50 and entry["winner"] != "cpu"


def test_measured_calls_allow_in_place_edits_and_give_the_right_gradients(fresh):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 80, generator=g, requires_grad=True)
    mask = torch.rand(96, 80, generator=g) < 0.05
    for i in range(30):
        x = torch.randn(16, 80, generator=g, requires_grad=True)
        torch.relu_(sparseops.masked_linear(x, w, mask)).square().sum().backward()
        w64, x64 = w.detach().double().requires_grad_(), x.detach().double().requires_grad_()
        torch.relu(x64 @ (w64 * mask).t()).square().sum().backward()
        torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(w.grad, w64.grad.float(), rtol=1e-4, atol=1e-4)
        w.grad = None
    assert not tuning._cache.exploring and len(tuning.entries()) == 1


def test_calls_without_a_backward_do_not_keep_it_measuring(fresh):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 80, generator=g, requires_grad=True)
    mask = torch.rand(96, 80, generator=g) < 0.05
    for _ in range(40):
        sparseops.masked_linear(torch.randn(16, 80, generator=g), w, mask)  # (a forward whose loss is never formed)
    assert not tuning._cache.exploring and len(tuning.entries()) == 1


def test_a_new_process_reads_the_file_instead_of_measuring(fresh, monkeypatch):
    _measure()
    winner = next(iter(tuning.entries().values()))["winner"]
    tuning.clear(memory_only=True)  # as a new process: nothing in memory, the file on disk
    timed = _spy_on_samples(monkeypatch)
    chosen = []
    real = ml._run
    monkeypatch.setattr(ml, "_run", lambda impl, *a: chosen.append(impl) or real(impl, *a))
    _call(seed=1)  # same key (shape, density bucket)
    assert chosen[-1] == winner and timed == []


def test_a_corrupt_cache_file_is_ignored_with_a_warning(fresh):
    tuning.cache_file().parent.mkdir(parents=True, exist_ok=True)
    tuning.cache_file().write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring the tuning cache"):
        _measure()
    assert len(tuning.entries()) == 1  # measured afresh, and the file rewritten
    json.loads(tuning.cache_file().read_text())


def test_a_wrong_implementation_is_excluded_with_one_warning(fresh, monkeypatch):
    real = ml._run

    def broken(impl, x, w, info, bias):
        y = real(impl, x, w, info, bias)
        return y + 1.0 if impl == "torch_sparse" else y

    monkeypatch.setattr(ml, "_run", broken)
    with pytest.warns(RuntimeWarning, match="'torch_sparse' implementation disagrees") as caught:
        _measure()  # (every call's result is checked: the wrong one never ran for real)
        _call(seed=1)
    assert sum("disagrees" in str(c.message) for c in caught) == 1
    entry = next(iter(tuning.entries().values()))
    assert "torch_sparse" not in entry["times_ms"] and entry["winner"] != "torch_sparse"


def test_the_guard_checks_a_cached_winner_once_per_process(fresh, monkeypatch):
    _measure()
    key = next(iter(tuning.entries()))
    tuning.clear(memory_only=True)
    tuning._cache.load()[key] = {"winner": "torch_sparse", "times_ms": {}}
    real = ml._run
    monkeypatch.setattr(ml, "_run", lambda impl, *a: real(impl, *a) * (2.0 if impl == "torch_sparse" else 1.0))
    with tuning.measuring(False), pytest.warns(RuntimeWarning, match="disagrees"):
        x, w, mask, y = _call(seed=2)
    torch.testing.assert_close(y, x @ (w * mask).t())  # the dense path ran instead


def test_measuring_leaves_the_rng_and_results_alone(fresh):
    torch.manual_seed(5)
    state = torch.get_rng_state()
    for seed in range(12):
        x, w, mask, y = _call(seed=seed)
        with tuning.measuring(False), sparseops.backend("reference"):
            ref = sparseops.masked_linear(x, w, mask)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.get_rng_state(), state)


def test_deterministic_mode_and_the_setting_only_read_cache_and_prior(fresh, monkeypatch):
    timed = _spy_on_samples(monkeypatch)
    torch.use_deterministic_algorithms(True)
    try:
        _call()
    finally:
        torch.use_deterministic_algorithms(False)
    with tuning.measuring(False):
        _call(seed=3)
    assert tuning.entries() == {} and timed == []


def test_keys_follow_shape_density_bucket_dtype_and_isa():
    dev = torch.device("cpu")
    assert tuning.key("masked_linear", dev, torch.float32, (16, 96, 80), 0.049) == \
        tuning.key("masked_linear", dev, torch.float32, (16, 96, 80), 0.03)
    assert tuning.key("masked_linear", dev, torch.float32, (16, 96, 80), 0.049) != \
        tuning.key("masked_linear", dev, torch.float32, (16, 96, 80), 0.06)
    assert tuning.key("m", dev, torch.float32, (1,), 0.1) != tuning.key("m", dev, torch.float64, (1,), 0.1)
    assert tuning.rows_bucket(100) == 128 and tuning.rows_bucket(1) == 1
    assert {"cpu", "isa", "threads", "gpu", "torch", "sparseops"} == set(tuning.machine())


def test_tune_measures_a_model_and_leaves_it_as_it_was(fresh):
    model = torch.nn.Sequential(torch.nn.Linear(80, 96), torch.nn.BatchNorm1d(96), torch.nn.Linear(96, 10))
    sparseops.patch(model)
    with torch.no_grad():
        model[0].weight_mask.copy_(torch.rand(96, 80) < 0.05)
        model[2].weight_mask.copy_(torch.rand(10, 96) < 0.1)
    stats = model[1].running_mean.clone()
    measured = sparseops.tune(model, torch.randn(16, 80))
    assert len(measured) == 2 and all(k.startswith("masked_linear|") for k in measured)
    assert torch.equal(model[1].running_mean, stats) and model[0].weight.grad is None
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        sparseops.tune("model", torch.randn(1))


def test_soft_mask_measures_against_eager_torch(fresh):
    w, s = torch.randn(300, 70, requires_grad=True), torch.randn(300, 70, requires_grad=True)
    for _ in range(20):
        out = sparseops.soft_mask(w, s, 2.0, 1.5)
        torch.testing.assert_close(out, w * 1.5 * torch.sigmoid(2.0 * s))
        out.sum().backward()
    (key, entry), = tuning.entries().items()
    assert key.startswith("soft_mask|") and set(entry["times_ms"]) == {"reference", "cpu"}


def _spy_on_timing(key, monkeypatch):
    """(key's prefix without its density bucket, the list of implementations timed from now on, the
    cache's entries, emptied for the test to fill)."""
    timed = _spy_on_samples(monkeypatch)
    entries = tuning._cache.load()
    entries.clear()
    return key.rsplit("|", 1)[0], timed, entries


def test_other_densities_of_the_same_call_spare_measurements(fresh, monkeypatch):
    """IMP walks densities down: where a sparse path beat dense clearly at a denser mask, dense is not
    timed again; where dense won at a sparser mask, nothing is timed."""
    _measure(density=0.05)
    key = next(iter(tuning.entries()))
    prefix, timed, entries = _spy_on_timing(key, monkeypatch)
    entries[f"{prefix}|d<=0.2"] = {"winner": "cpu", "times_ms": {"mask_multiply": 10.0, "dense": 11.0, "cpu": 1.0}}
    _measure(density=0.05)
    assert timed and not set(timed) & tuning.DENSE_PATHS, timed
    timed.clear()
    entries.clear()
    entries[f"{prefix}|d<=0.01"] = {"winner": "mask_multiply", "times_ms": {"mask_multiply": 1.0, "cpu": 3.0}}
    chosen = []
    real_run = ml._run
    monkeypatch.setattr(ml, "_run", lambda impl, *a: chosen.append(impl) or real_run(impl, *a))
    _call(density=0.05, seed=5)
    assert timed == [] and chosen[-1] == "mask_multiply"
    assert tuning.entries()[key]["inferred"]


def test_other_batch_sizes_of_a_layer_reuse_its_measurement(fresh, monkeypatch):
    _measure(rows=16)
    x, w, mask, _ = _call(rows=16)
    winner = next(iter(tuning.entries().values()))["winner"]
    timed = _spy_on_samples(monkeypatch)
    chosen = []
    real = ml._run
    monkeypatch.setattr(ml, "_run", lambda impl, *a: chosen.append(impl) or real(impl, *a))
    sparseops.masked_linear(x[:5], w, mask).sum().backward()  # a last, partial batch
    with torch.no_grad():  # an evaluation pass
        sparseops.masked_linear(torch.randn(40, 80), w, mask)
    assert chosen[-2:] == [winner, winner] and timed == []


def test_one_kind_loser_at_a_nearby_density_is_not_timed_again(fresh, monkeypatch):
    """The dense paths keep their order at every density, and so do the sparse ones: the one of a
    kind that lost by a wide margin at the nearest measured density is dropped."""
    _measure(density=0.03)
    key = next(iter(tuning.entries()))
    prefix, timed, entries = _spy_on_timing(key, monkeypatch)
    entries[f"{prefix}|d<=0.1"] = {"winner": "cpu", "times_ms": {"mask_multiply": 4.0, "dense": 9.0, "cpu": 3.5,
                                                                 "torch_sparse": 8.0}}
    entries[f"{prefix}|d<=0.8"] = {"winner": "dense", "times_ms": {"mask_multiply": 9.0, "dense": 4.0}}
    _measure(density=0.03)
    assert set(timed) == {"mask_multiply", "cpu"}, timed  # the nearest (0.1) decides, not 0.8
    timed.clear()
    entries.clear()  # the dense paths' race is the same at every density: a close one is not run again
    entries[f"{prefix}|d<=0.1"] = {"winner": "cpu", "times_ms": {"mask_multiply": 4.0, "dense": 4.1, "cpu": 3.5}}
    _measure(density=0.03)
    assert "mask_multiply" in timed and "dense" not in timed, timed


def test_the_correctness_check_runs_a_few_rows(fresh, monkeypatch):
    calls = []
    real = tuning.agrees
    monkeypatch.setattr(tuning, "agrees", lambda got, want, dtype: calls.append((got, want)) or real(got, want, dtype))
    x, w, mask, _ = _call(rows=200)
    assert calls
    for got, want in calls:
        assert got[0].shape == (tuning.CHECK_ROWS, 96) and want[0].dtype == torch.float32
        assert got[2].shape == w.shape  # dw: every kept weight is checked


@pytest.mark.parametrize("density, timed", [(0.2, {"torch_sparse", "cpu"}), (0.4, {"cpu"}), (0.55, set())])
def test_sparse_candidates_are_timed_only_where_they_can_win(fresh, monkeypatch, density, timed):
    """torch.sparse up to density 0.25, the C++ kernel up to 0.5 (backend.TORCH_SPARSE_MAX_DENSITY,
    MEASURE_MAX_DENSITY); the dense paths race at every density."""
    seen = _spy_on_samples(monkeypatch)
    _measure(density=density)
    assert set(seen) - tuning.DENSE_PATHS == timed and set(seen) & tuning.DENSE_PATHS, seen


def test_the_tune_command_measures_each_case_over_its_calls(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "tuned.json"
    env = {**__import__("os").environ, "SPARSEOPS_CACHE_DIR": str(tmp_path), "SPARSEOPS_TUNE": "1"}
    run = subprocess.run([sys.executable, "-m", "sparseops", "tune", "--tiny", "--device", "cpu", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    done = json.loads(out.read_text())["entries"]
    assert len(done) == 4 and all(len(e["times_ms"]) >= 2 and e["winner"] in e["times_ms"] for e in done.values())


def test_tensor_subclasses_run_the_prior_untimed(fresh, monkeypatch):
    """(DTensor under FSDP2, say: its calls are not timed.)"""

    class Tagged(torch.Tensor):
        pass

    timed = _spy_on_samples(monkeypatch)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 80, generator=g).as_subclass(Tagged).requires_grad_()
    mask = torch.rand(96, 80, generator=g) < 0.05
    for _ in range(3):
        x = torch.randn(16, 80, generator=g)
        y = sparseops.masked_linear(x, w, mask)
        torch.testing.assert_close(y.as_subclass(torch.Tensor), (x @ (w * mask).t()).as_subclass(torch.Tensor))
        y.sum().backward()
    assert timed == [] and tuning.entries() == {}


def test_the_checks_reference_widens_half_precision_only():
    common = importlib.import_module("sparseops.ops._common")
    seen = []
    for dtype, want in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float32),
                        (torch.float64, torch.float64)):
        run = common.trial(lambda impl, x, w: seen.append((x.dtype, w.dtype)) or x @ w.t(),
                           torch.randn(4, 3, dtype=dtype), torch.randn(2, 3, dtype=dtype))
        run("dense", exact=True)
        run("dense")
        assert seen[-2:] == [(want, want), (dtype, dtype)]


def test_a_new_mask_of_a_measured_layer_gets_its_layout_before_its_first_timed_call(fresh, monkeypatch):
    """No 16-row run at the layer's later masks: the kernel's calls there are all timed, the layout
    built before the first one."""
    _measure(density=0.05)
    events = []
    real_sample, real_csr, real_run = tuning.Sample, ml.as_csr, ml._run
    monkeypatch.setattr(tuning, "Sample", lambda m, impl, *a: events.append(("sample", impl)) or real_sample(m, impl, *a))
    monkeypatch.setattr(ml, "as_csr", lambda info: events.append(("layout", info.nnz)) or real_csr(info))
    monkeypatch.setattr(ml, "_run", lambda impl, x, *a: events.append(("run", impl, x.shape[0])) or real_run(impl, x, *a))
    _measure(density=0.15, rows=64)
    first = events.index(("sample", "cpu"))
    assert any(e[0] == "layout" for e in events[:first]), events
    assert ("run", "cpu", tuning.CHECK_ROWS) not in events, events
