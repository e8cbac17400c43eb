"""Robustness of state (issue 14): masks and tickets applied all-or-nothing, checkpoints that refuse
corrupt masks and keep a soft model's state, soft masks at extreme beta."""
import re

import pytest
import torch
from torch import nn

import sparseops
from sparseops import tickets
from sparseops.tickets import Ticket

from conftest import random_mask


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


# ---- item 13: set_masks / Ticket.apply validate everything before changing anything -------------


def _bad_masks(model):
    good = {"0": random_mask((16, 8), 0.5), "2": random_mask((16, 16), 0.5)}
    return [
        ("shape", {**good, "4": torch.ones(3, 3, dtype=torch.bool)}, ValueError),
        ("unknown", {**good, "9": torch.ones(4, 16, dtype=torch.bool)}, ValueError),
    ]


@pytest.mark.parametrize("via", ["set_masks", "Ticket.apply"])
@pytest.mark.parametrize("patched", [True, False], ids=["patched", "plain"])
@pytest.mark.parametrize("case", range(2))
def test_bad_mask_changes_nothing(via, patched, case):
    model = _model()
    if patched:
        sparseops.patch(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model]
    _, masks, exc = _bad_masks(model)[case]
    with pytest.raises(exc):
        if via == "set_masks":
            tickets.set_masks(model, masks, strict=False)
        else:
            Ticket(masks).apply(model, strict=False)
    assert [type(m) for m in model] == types, "layers were patched before the error"
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed before the error"


def test_soft_layer_among_masks_changes_nothing():
    model = _model()
    sparseops.patch(model)
    model[4] = sparseops.nn.SoftMaskedLinear(16, 4)
    before = model[0].weight_mask.clone()
    masks = {"0": torch.zeros(16, 8, dtype=torch.bool), "4": torch.ones(4, 16, dtype=torch.bool)}
    with pytest.raises(TypeError, match="soft"):
        tickets.set_masks(model, masks, strict=False)
    assert torch.equal(model[0].weight_mask, before)


def test_good_masks_still_apply():
    model = _model()
    masks = {"0": random_mask((16, 8), 0.5), "2": random_mask((16, 16), 0.5), "4": random_mask((4, 16), 0.5)}
    tickets.set_masks(model, masks)
    for k, m in masks.items():
        assert torch.equal(model.get_submodule(k).weight_mask, m)


# ---- item 12: load_state_dict refuses masks that are not 0/1 --------------------------------------


@pytest.mark.parametrize("bad", [2.0, float("nan"), -1.0, 0.5])
def test_load_state_dict_refuses_non_binary_masks(bad):
    model = sparseops.patch(_model())
    state = model.state_dict()
    mask = state["2.weight_mask"].float()
    mask[0, 0] = bad
    state["2.weight_mask"] = mask
    before = model[2].weight_mask.clone()
    with pytest.raises(RuntimeError, match=r"2\.weight_mask.*0 and 1"):
        model.load_state_dict(state)
    assert torch.equal(model[2].weight_mask, before)


def test_load_state_dict_takes_numeric_binary_masks():
    model = sparseops.patch(_model())
    state = model.state_dict()
    m = random_mask((16, 16), 0.5)
    state["2.weight_mask"] = m.float()
    model.load_state_dict(state)
    assert torch.equal(model[2].weight_mask, m) and model[2].weight_mask.dtype == torch.bool


# ---- item 10: a soft model's state dict keeps beta, ticket mode and s0 -----------------------------


def _soft(s0=0.0):
    return sparseops.patch(_model(), mode="soft", s0=s0)


@pytest.mark.parametrize("ticket", [False, True])
def test_soft_state_dict_round_trip(tmp_path, ticket):
    model = _soft(s0=-0.3)
    with torch.no_grad():
        for m in model:
            if hasattr(m, "weight_score"):
                m.weight_score.normal_()
                m.beta = 50.0
                m.set_ticket(ticket)
    torch.save(model.state_dict(), tmp_path / "ck.pt")
    fresh = _soft()
    fresh.load_state_dict(torch.load(tmp_path / "ck.pt", weights_only=True))
    x = torch.randn(5, 8)
    for a, b in zip(model, fresh):
        if hasattr(a, "weight_score"):
            assert (b.beta, b.ticket, b.s0) == (50.0, ticket, -0.3)
            if ticket:
                assert torch.equal(b._hard_mask, a._hard_mask)
    torch.testing.assert_close(fresh(x), model(x))


def test_soft_checkpoint_without_saved_state_still_loads():
    model = _soft()
    model[0].beta = 7.0
    old = {k: v for k, v in _soft().state_dict().items()}  # a plain dict: no metadata, as old checkpoints
    model.load_state_dict(old)
    assert model[0].beta == 7.0


def test_soft_state_dict_keys_are_the_parameters():
    assert set(_soft().state_dict()) == {f"{i}.{n}" for i in (0, 2, 4) for n in ("weight", "bias", "weight_score")}


# ---- item 6: beta beyond the float32 range ---------------------------------------------------------


def _soft_backends():
    out = ["cpu", "reference"]
    try:
        import sparseops.triton  # noqa: F401
        if sparseops.backend.triton_unavailable(torch.device("cpu")) is None:
            out.append("triton")
    except ImportError:
        pass
    return out


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("name", _soft_backends())
@pytest.mark.parametrize("beta,scale", [(1e39, 1.0), (3e38, 2.0), (1e300, 1.5)])
def test_soft_mask_gradients_past_float32_range(name, beta, scale):
    """float32 scores with beta (or beta*scale) past float32's range: the mask is exactly 0 or 1
    and its derivative exactly 0, so ds is 0 (it was NaN: inf * 0); float64 math agrees."""
    torch.manual_seed(0)
    w = torch.randn(64).requires_grad_()
    s = (torch.rand(64) + 0.01).mul(torch.randn(64).sign()).requires_grad_()  # no exact 0
    with sparseops.backend(name):
        y = sparseops.soft_mask(w, s, beta, scale)
        dw, ds = torch.autograd.grad(y.sum(), (w, s))
        (ds_l1,) = torch.autograd.grad(sparseops.soft_mask_l1(s, beta, scale), (s,))
    assert torch.equal(ds, torch.zeros_like(ds)) and torch.equal(ds_l1, torch.zeros_like(ds_l1))
    torch.testing.assert_close(y, w.detach() * scale * (s.detach() > 0))
    torch.testing.assert_close(dw, scale * (s.detach() > 0).float())


# ---- item 11: random pruning resumes with the generator's state -------------------------------------


def _random_search(checkpoint_dir, fail_at=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=g)
    data = (x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())
    trainer = tickets.Trainer(data, data, epochs=1, batch_size=16, lr=0.1)

    def train_fn(m, level):
        if level.index == fail_at:
            raise KeyboardInterrupt
        return trainer(m, level)

    g = torch.Generator().manual_seed(1)
    return tickets.imp(_model(), train_fn, levels=3, rate=0.5, pruning="random", generator=g,
                       checkpoint_dir=checkpoint_dir, progress=False)


def test_random_pruning_resumes_with_the_same_masks(tmp_path):
    full = _random_search(None)
    with pytest.raises(KeyboardInterrupt):
        _random_search(tmp_path, fail_at=2)
    resumed = _random_search(tmp_path)
    for a, b in zip(full.levels, resumed.levels, strict=True):
        assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks), f"level {a.level}"
        assert (a.metrics["accuracy"], a.metrics["train_loss"]) == (b.metrics["accuracy"], b.metrics["train_loss"])


# ---- items 12 and 14: ticket files carry a checksum; every bad file is named with its problem --------


def _ticket(tmp_path):
    model = sparseops.patch(_model())
    tickets.set_masks(model, tickets.random_masks(model, 0.5, generator=torch.Generator().manual_seed(0)))
    ticket = Ticket.from_model(model, method="test", level=3)
    path = tmp_path / "t.pt"
    ticket.save(path)
    return ticket, path


def _bad_ticket_files(tmp_path, good):
    data = good.read_bytes()
    raw = torch.load(good, weights_only=True)
    out = {"empty": b"", "truncated": data[: len(data) // 2], "random": bytes(range(256)) * 8,
           "text": b'{"format": "sparseops.ticket"}'}
    payloads = {
        "not a ticket": {"something": 1},
        "a state dict": _model().state_dict(),
        "no masks": {k: v for k, v in raw.items() if k != "masks"},
        "no bits": {**raw, "masks": {"0": {"shape": [16, 8]}}},
        "bits too short": {**raw, "masks": {"0": {"shape": [16, 8], "bits": torch.zeros(3, dtype=torch.uint8)}}},
        "bad shape": {**raw, "masks": {"0": {"shape": "16x8", "bits": raw["masks"]["0"]["bits"]}}},
        "masks not a dict": {**raw, "masks": [1, 2]},
    }
    for name, payload in payloads.items():
        torch.save(payload, tmp_path / "p.pt")
        out[name] = (tmp_path / "p.pt").read_bytes()
    return out


@pytest.mark.parametrize("case", ["empty", "truncated", "random", "text", "not a ticket", "a state dict",
                                  "no masks", "no bits", "bits too short", "bad shape", "masks not a dict"])
def test_bad_ticket_files_raise_one_error_naming_the_file(tmp_path, case):
    _, good = _ticket(tmp_path)
    path = tmp_path / f"bad {case}.pt"
    path.write_bytes(_bad_ticket_files(tmp_path, good)[case])
    with pytest.raises(tickets.TicketFileError, match=re.escape(str(path))) as info:
        Ticket.load(path)
    assert isinstance(info.value, ValueError)


def test_flipped_bytes_in_a_ticket_are_detected(tmp_path):
    ticket, path = _ticket(tmp_path)
    data = bytearray(path.read_bytes())
    bits = bytes(tickets.masks.pack_bits(ticket.masks["2"]).tolist())
    start = data.find(bits)
    assert start > 0
    for i in range(start, start + 32):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(tickets.TicketFileError, match="checksum"):
        Ticket.load(path)


@pytest.mark.parametrize("seed", range(8))
def test_random_byte_flips_load_the_same_ticket_or_raise(tmp_path, seed):
    ticket, path = _ticket(tmp_path)
    data = bytearray(path.read_bytes())
    g = torch.Generator().manual_seed(seed)
    for i in torch.randperm(len(data), generator=g)[:32].tolist():
        data[i] ^= 1 + int(torch.randint(255, (), generator=g))
    path.write_bytes(bytes(data))
    try:
        loaded = Ticket.load(path)
    except tickets.TicketFileError:
        return
    assert loaded.metadata == ticket.metadata
    assert set(loaded.masks) == set(ticket.masks)
    assert all(torch.equal(loaded.masks[k], ticket.masks[k]) for k in ticket.masks)


def test_ticket_files_without_a_checksum_still_load(tmp_path):
    ticket, path = _ticket(tmp_path)
    old = torch.load(path, weights_only=True)
    old.pop("checksum", None)
    old["version"] = 1
    torch.save(old, path)
    loaded = Ticket.load(path)
    assert all(torch.equal(loaded.masks[k], ticket.masks[k]) for k in ticket.masks)


def _search(checkpoint_dir, fail_at=None):
    def train_fn(m, level):
        if level.index == fail_at:
            raise KeyboardInterrupt
        with torch.no_grad():  # a deterministic "training" step that moves the weights
            for p in m.parameters():
                p.mul_(1.1).add_(0.01)
        return {"accuracy": float(level.index)}

    torch.manual_seed(0)
    return tickets.imp(_model(), train_fn, levels=3, checkpoint_dir=checkpoint_dir, progress=False)


def test_corrupt_imp_checkpoint_is_named_and_the_previous_level_resumes(tmp_path):
    full = _search(None)
    with pytest.raises(KeyboardInterrupt):
        _search(tmp_path, fail_at=3)
    latest = tmp_path / "level_002.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match=re.escape(str(latest)) + r".*level 1") as info:
        _search(tmp_path)
    assert "delete" in str(info.value)
    latest.unlink()  # as the error says: the search resumes after level 1
    resumed = _search(tmp_path)
    for a, b in zip(full.levels, resumed.levels, strict=True):
        assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks) and a.metrics == b.metrics


def test_readme_example_loads_digits_in_a_fresh_interpreter():
    """The README's example up to `tickets.zoo.load_digits()`, in a process that imported nothing
    else first (the zoo is reached as an attribute of sparseops.tickets)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(sparseops.__file__)))
    with open(os.path.join(root, "README.md")) as f:
        block = re.search(r"```python\n(.*?)```", f.read(), re.S).group(1)
    head = block[: block.index("load_digits()")] + "load_digits()\nassert len(train[0]) > len(test[0]) > 0\n"
    env = {**os.environ, "PYTHONPATH": root, "SPARSEOPS_TUNE": "0"}
    done = subprocess.run([sys.executable, "-c", head], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
