"""Reading sparseops' files (tickets, IMP level and structured CS round checkpoints): a checksum over
their content, loading that names the file and its problem whatever is wrong with it, and the
checkpoints' atomic writes and checked reads."""
from __future__ import annotations

import glob
import hashlib
import os
import random
import struct

import torch


class TicketFileError(ValueError):
    """A file that is not a readable sparseops ticket (or IMP checkpoint): the message names the file
    and what is wrong with it."""


def checksum(obj) -> str:
    """SHA-256 of `obj` (dicts, lists, str, numbers, bools, None, tensors), stable across processes:
    a file keeps it beside its content, so bytes changed on disk (which torch.load does not notice
    inside a tensor's data) are found when it is read."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"D%d" % len(obj))
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d" % len(obj))
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, float):
        h.update(b"F" + struct.pack("<d", obj))
    elif obj is None or isinstance(obj, (str, int, bool)):
        h.update(f"{type(obj).__name__}:{obj!r}".encode())
    else:
        raise TypeError(f"sparseops.tickets: cannot checksum a {type(obj).__name__}")


def load_file(path, who: str, what: str, **kwargs):
    """torch.load(path, weights_only=True), with any failure but a missing file as a TicketFileError
    naming `path` (`what` is the kind of file, `who` the function reading it)."""
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as exc:  # truncated, random bytes, another format: torch's many ways of failing
        raise TicketFileError(f"sparseops.tickets.{who}: {os.fspath(path)} is not a readable {what} "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'it ends early'})"
                              ) from exc


def verify(payload: dict, path, who: str) -> None:
    """TicketFileError naming `path` unless the payload's "checksum" matches the rest of it."""
    saved = payload.get("checksum")
    if not isinstance(saved, str) or saved != checksum({k: v for k, v in payload.items() if k != "checksum"}):
        raise TicketFileError(f"sparseops.tickets.{who}: {os.fspath(path)} is corrupt: its content does not "
                              f"match its checksum (the file changed after it was written)")


def save_checkpoint(obj: dict, path) -> None:
    """torch.save of `obj` with its checksum (finds bytes changed on disk, which torch.load does not),
    written to a temporary file and renamed: the file is either whole or absent, even if the process
    dies while writing."""
    obj = {**obj, "checksum": checksum(obj)}
    tmp = os.fspath(path) + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_checkpoints(checkpoint_dir, unit: str, config: dict, who: str, what: str, keys) -> list[dict]:
    """The search's checkpoints `<unit>_NNN.pt` in `checkpoint_dir`, in order (a level or round each),
    checked: numbered 0, 1, ... without a gap, written with the same `config`, readable, holding `keys`,
    matching their checksum. A bad file is a RuntimeError naming it and what to delete to resume from
    the last good one; another config a ValueError."""
    files = sorted(glob.glob(os.path.join(checkpoint_dir, f"{unit}_*.pt")))
    out = []
    for i, path in enumerate(files):
        ck = _load_checkpoint(path, i, files, unit, who, what, keys)
        if ck[unit] != i:
            raise RuntimeError(f"sparseops.tickets.{who}: {checkpoint_dir} lacks {unit} {i}; it holds {files}")
        if ck["config"] != config:
            diff = {k: (ck["config"].get(k), v) for k, v in config.items() if ck["config"].get(k) != v}
            raise ValueError(f"sparseops.tickets.{who}: {checkpoint_dir} holds a search with other settings "
                             f"(saved, now): {diff}; use another checkpoint_dir")
        out.append(ck)
    return out


def resume_rounds(checkpoint_dir, config: dict, who: str, what: str, keys, model, optimizers) -> list[dict]:
    """A round-based search's (CS, structured CS) saved rounds, in order; the model, the optimisers
    and torch's and Python's RNGs restored from the last one (`state`, `optimizers`, `torch_rng`,
    `python_rng`)."""
    checkpoints = read_checkpoints(checkpoint_dir, "round", config, who, what, keys)
    if checkpoints:
        last = checkpoints[-1]
        model.load_state_dict(last["state"])
        for opt, saved in zip(optimizers, last["optimizers"], strict=True):
            opt.load_state_dict(saved)
        torch.set_rng_state(last["torch_rng"])
        random.setstate(python_rng_state(last["python_rng"]))
    return checkpoints


def save_round(checkpoint_dir, config: dict, result, state: dict, optimizers, rewind) -> None:
    """What resume_rounds reads back: a round-based search's round `result` (a LevelResult), the
    model's `state`, the optimisers, the rewind point (round 0's) and torch's and Python's RNGs."""
    save_checkpoint({"config": config, "round": result.level, "sparsity": result.sparsity,
                     "metrics": result.metrics, "wall_time": result.wall_time, "masks": result.masks,
                     "state": state, "optimizers": [opt.state_dict() for opt in optimizers],
                     "rewind": rewind if result.level == 0 else None,
                     "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()},
                    os.path.join(checkpoint_dir, f"round_{result.level:03d}.pt"))


def python_rng_state(state):
    """random.getstate() as a checkpoint gives it back (its tuple loaded as a list) -> random.setstate's."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


def _load_checkpoint(path, i, files, unit, who, what, keys):
    try:
        ck = load_file(path, who, what)
        if not isinstance(ck, dict) or any(k not in ck for k in keys):
            problem = f"lacks the keys {[k for k in keys if k not in ck]}" if isinstance(ck, dict) else "is not a dict"
            raise TicketFileError(f"sparseops.tickets.{who}: {path} {problem}")
        if "checksum" in ck:  # checkpoints written before checksums load as they are
            verify(ck, path, who)
    except TicketFileError as exc:
        later = [os.path.basename(f) for f in files[i:]]
        how = (f"delete {later[0] if len(later) == 1 else later} to resume after {unit} {i - 1}, the last good one"
               if i else f"delete the checkpoint directory's {unit} files to start over")
        raise RuntimeError(f"{exc}; {how}") from exc
    return ck
