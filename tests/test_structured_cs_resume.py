"""Structured CS's and CS's checkpoints (as IMP's): a search interrupted in a round, or in the ticket's
training, resumes from the last saved round with the same gates, masks, metrics and weights as an
uninterrupted one; a finished directory gives the result without training; a corrupt or foreign file
is a clear error naming it."""
import argparse
import functools
import io
import os
import re

import pytest
import torch
import torch.nn.functional as F

from sparseops.tickets import continuous_sparsification, structured_cs
from sparseops.tickets.command import add_arguments, search
from sparseops.tickets.zoo import build_model, load_digits

from conftest import one_thread

EPOCHS, BATCH, ROWS = 3, 64, 256
STEPS = EPOCHS * ROWS // BATCH  # training steps per round


def _search(checkpoint_dir, stop_at_step=None, method="structured_cs", **kw):
    """A 2-round search (structured CS: per-unit temperature, which reads the previous epoch's signs) on
    256 digits in float64; `stop_at_step` interrupts it at that training step (evaluation is not counted)."""
    train, test = load_digits()
    train, test = (train[0][:ROWS].double(), train[1][:ROWS]), (test[0].double(), test[1])
    steps = [0]

    def loss_fn(out, y, **kwargs):
        if torch.is_grad_enabled():
            if steps[0] == stop_at_step:
                raise KeyboardInterrupt
            steps[0] += 1
        return F.cross_entropy(out, y, **kwargs)

    with one_thread():
        torch.manual_seed(0)
        model = build_model("mlp").double()
        args = dict(rounds=2, epochs=EPOCHS, batch_size=BATCH, lr=0.05, lmbda=3e-3, final_temp=1e4, rewind_epoch=1,
                    loss_fn=loss_fn, checkpoint_dir=checkpoint_dir, progress=False)
        if method == "cs":
            return continuous_sparsification(model, train, test, **{**args, "lmbda": 1e-6, **kw}), model
        return structured_cs(model, train, test, **{**args, "temperature": "per_unit", **kw}), model


def _same(a, b):
    untimed = lambda m: {k: v for k, v in m.items() if k != "epoch_time"}  # noqa: E731
    history = lambda m: [{k: v for k, v in h.items() if k != "time"} for h in m["history"]]  # noqa: E731
    assert [r.level for r in a.levels] == [r.level for r in b.levels] == [0, 1, 2]
    for ra, rb in zip(a.levels, b.levels, strict=True):
        assert ra.sparsity == rb.sparsity
        assert {k: v for k, v in untimed(ra.metrics).items() if k != "history"} == \
            {k: v for k, v in untimed(rb.metrics).items() if k != "history"}
        assert history(ra.metrics) == history(rb.metrics)
        assert ra.masks.keys() == rb.masks.keys() and all(torch.equal(ra.masks[k], rb.masks[k]) for k in ra.masks)


# "exact zeros": gates reach exactly 0 (masks); "positive s0": round 0 ends with scores of both signs and the
# clamp keeps the positive ones, whose signs the per-unit temperature compares at the resumed round's first epoch.
SETTINGS = {"exact zeros": {}, "positive s0": dict(s0=0.5, lmbda=2e-2, final_temp=10.0, mask_lr=1.0),
            "cs": dict(method="cs")}


@functools.cache
def _full(setting="exact zeros"):
    return _search(None, **SETTINGS[setting])


@pytest.fixture(scope="module")
def full():
    return _full()


@pytest.mark.parametrize("where, stop, saved, setting", [
    ("round 1", STEPS + 5, ["round_000.pt"], "exact zeros"), ("round 1", STEPS + 5, ["round_000.pt"], "positive s0"),
    ("the ticket", 2 * STEPS + 5, ["round_000.pt", "round_001.pt"], "exact zeros"),
    ("round 1", STEPS + 5, ["round_000.pt"], "cs"), ("the ticket", 2 * STEPS + 5, ["round_000.pt", "round_001.pt"], "cs")])
def test_an_interrupted_search_resumes_with_the_same_result(tmp_path, where, stop, saved, setting):
    full_result, full_model = _full(setting)
    kw = SETTINGS[setting]
    history = [h for r in full_result.levels for h in r.metrics["history"]]
    if setting == "exact zeros":
        assert any(h["channels_off"] > 0 for h in history)
    elif setting == "positive s0":
        assert 0 < full_result.levels[0].metrics["kept_channels"] < 1
    else:
        assert 0 < full_result.levels[0].sparsity < full_result.levels[1].sparsity < 1  # the masks moved
    with pytest.raises(KeyboardInterrupt):
        _search(tmp_path, stop_at_step=stop, **kw)
    assert sorted(os.listdir(tmp_path)) == saved
    resumed, model = _search(tmp_path, **kw)
    _same(full_result, resumed)
    assert model.state_dict().keys() == full_model.state_dict().keys()
    for k, v in full_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert sorted(os.listdir(tmp_path)) == ["round_000.pt", "round_001.pt", "round_002.pt"]
    again, model = _search(tmp_path, stop_at_step=0, **kw)  # finished: nothing trains, the model is the ticket
    _same(full_result, again)
    if setting == "cs":
        assert model[0].ticket and model[0].beta == full_model[0].beta > 1
    else:
        assert not model[0].channel_gate.soft
    for k, v in full_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_a_corrupt_checkpoint_is_named_and_the_previous_round_resumes(tmp_path, full):
    with pytest.raises(KeyboardInterrupt):
        _search(tmp_path, stop_at_step=2 * STEPS + 5)
    latest = tmp_path / "round_001.pt"
    good = latest.read_bytes()
    latest.write_bytes(good[:1000])
    with pytest.raises(RuntimeError, match=re.escape(str(latest)) + r".*delete round_001.pt to resume after round 0"):
        _search(tmp_path)
    weight = torch.load(io.BytesIO(good), weights_only=True)["state"]["0.weight"]
    data = bytearray(good)
    start = data.find(weight.numpy().tobytes()[:64])
    assert start > 0
    data[start:start + 64] = bytes(64)  # bytes changed inside a tensor: torch.load does not see it
    latest.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="checksum"):
        _search(tmp_path)
    with pytest.raises(ValueError, match=r"other settings.*lmbda"):
        _search(tmp_path, lmbda=1e-3)
    latest.unlink()  # as the error says: the search resumes after round 0
    _same(full[0], _search(tmp_path)[0])


@pytest.mark.parametrize("method", ["structured-cs", "cs"])
def test_the_cli_saves_the_rounds_and_resumes(tmp_path, method):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--method", method, "--model", "mlp", "--epochs", "2", "--rounds", "1", "--rewind-epoch", "0",
            "--no-progress", "--checkpoint-dir", str(tmp_path)]
    with one_thread():
        first, _ = search(parser.parse_args(argv), out=lambda *a: None)
        assert sorted(os.listdir(tmp_path)) == ["round_000.pt", "round_001.pt"]
        again, _ = search(parser.parse_args(argv), out=lambda *a: None)
    assert again.to_dict() == first.to_dict()
