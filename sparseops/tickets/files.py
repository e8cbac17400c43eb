"""Reading sparseops' files (tickets, IMP level checkpoints): a checksum over their content, and
loading that names the file and its problem whatever is wrong with it."""
from __future__ import annotations

import hashlib
import os
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
