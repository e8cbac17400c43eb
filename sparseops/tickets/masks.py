"""Masks of a patched model, as {layer name: bool tensor}: read and apply them, combine two tickets,
report sparsity, and save a ticket compactly (bit-packed) in a file `torch.load(weights_only=True)` reads.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import nn as snn
from ..layout import as_bool_mask
from ..patch import check_model, patch, patch_report, patched_layers
from .files import TicketFileError, checksum, load_file, verify

FORMAT = "sparseops.ticket"
FORMAT_VERSION = 2  # 2: a checksum over masks and metadata (version 1 files, without it, still load)


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{layer name: bool mask} of every sparseops layer (soft layers give their ticket mask, s > 0).
    The tensors are copies: later pruning does not change them."""
    check_model(model, "tickets.get_masks")
    out = {}
    for name, m in patched_layers(model):
        mask = m.ticket_mask() if isinstance(m, snn._SoftMaskedMixin) else m.weight_mask
        out[name] = mask.detach().clone()
    return out


def _as_masks(masks, fn: str) -> dict[str, torch.Tensor]:
    if isinstance(masks, Ticket):
        masks = masks.masks
    if not isinstance(masks, Mapping):
        raise TypeError(f"sparseops.tickets.{fn}: masks must be a mapping of layer name to mask or a Ticket, "
                        f"got {type(masks).__name__}")
    return {str(k): as_bool_mask(v, name=f"masks[{k!r}]") for k, v in masks.items()}


def set_masks(model: nn.Module, masks, *, strict: bool = True) -> nn.Module:
    """Applies {layer name: mask} to `model` (patching the named layers first if they are plain).

    Unknown names and shape mismatches are errors. With `strict`, every sparseops layer of the model
    must get a mask, as with `load_state_dict`. Soft (CS) layers cannot take a hard mask.
    """
    check_model(model, "tickets.set_masks")
    masks = _as_masks(masks, "set_masks")
    # Everything is checked before anything changes: a bad entry leaves the model as it was.
    modules = dict(model.named_modules())
    unknown = sorted(set(masks) - set(modules))
    if unknown:
        raise ValueError(f"sparseops.tickets.set_masks: no layer named {unknown} in the model")
    plain = [n for n in masks if not isinstance(modules[n], (snn._MaskedMixin, snn._SoftMaskedMixin))]
    if plain:
        report = patch_report(model, filter_fn=lambda m, n: n in plain)
        bad = sorted(set(plain) - set(report.patched))
        if bad:
            raise ValueError(f"sparseops.tickets.set_masks: layers {bad} cannot be masked by sparseops "
                             f"({'; '.join(report.unsupported.get(b, type(modules[b]).__name__) for b in bad)})")
    if strict:
        missing = sorted(set(dict(patched_layers(model))) - set(masks))
        if missing:
            raise ValueError(f"sparseops.tickets.set_masks: no mask given for layers {missing} (strict=True)")
    for name, mask in masks.items():
        m = modules[name]
        if isinstance(m, snn._SoftMaskedMixin):
            raise TypeError(f"sparseops.tickets.set_masks: {name} is a soft (CS) layer; unpatch it first")
        if tuple(mask.shape) != tuple(m.weight.shape):
            raise ValueError(f"sparseops.tickets.set_masks: the mask for {name} has shape {tuple(mask.shape)}, "
                             f"the layer's weight {tuple(m.weight.shape)}")
    if plain:
        patch(model, filter_fn=lambda m, n: n in plain, on_unsupported="ignore")
    for name, mask in masks.items():
        modules[name].set_mask(mask)
    return model


def _pair(a, b, fn):
    a, b = _as_masks(a, fn), _as_masks(b, fn)
    if set(a) != set(b):
        raise ValueError(f"sparseops.tickets.{fn}: the tickets cover different layers: "
                         f"only in the first {sorted(set(a) - set(b))}, only in the second {sorted(set(b) - set(a))}")
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"sparseops.tickets.{fn}: layer {k} has shape {tuple(a[k].shape)} in the first ticket "
                             f"and {tuple(b[k].shape)} in the second")
    return a, b


def union(a, b) -> dict[str, torch.Tensor]:
    """Weights kept by either ticket."""
    a, b = _pair(a, b, "union")
    return {k: a[k] | b[k] for k in a}


def intersection(a, b) -> dict[str, torch.Tensor]:
    """Weights kept by both tickets."""
    a, b = _pair(a, b, "intersection")
    return {k: a[k] & b[k] for k in a}


def difference(a, b) -> dict[str, torch.Tensor]:
    """Weights kept by `a` and not by `b`."""
    a, b = _pair(a, b, "difference")
    return {k: a[k] & ~b[k] for k in a}


def overlap(a, b) -> dict:
    """Intersection over union of the kept weights, per layer and in total (1.0 where both keep nothing)."""
    a, b = _pair(a, b, "overlap")
    layers, inter_all, union_all = {}, 0, 0
    for k in a:
        inter, uni = int((a[k] & b[k]).sum()), int((a[k] | b[k]).sum())
        layers[k] = inter / uni if uni else 1.0
        inter_all, union_all = inter_all + inter, union_all + uni
    return {"layers": layers, "total": inter_all / union_all if union_all else 1.0}


@dataclass
class SparsityReport:
    """Kept and total weights per layer and in all; `str()` is a table, `to_dict()` plain numbers."""

    layers: dict[str, dict] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return sum(v["kept"] for v in self.layers.values())

    @property
    def total(self) -> int:
        return sum(v["total"] for v in self.layers.values())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {"layers": {k: dict(v) for k, v in self.layers.items()}, "kept": self.kept, "total": self.total,
                "sparsity": self.sparsity}

    def __str__(self):
        width = max([len(k) for k in self.layers] + [5])
        lines = [f"{'layer':<{width}} | {'shape':<18} | {'kept':>10} | {'total':>10} | sparsity"]
        for k, v in self.layers.items():
            shape = "x".join(map(str, v["shape"]))
            lines.append(f"{k:<{width}} | {shape:<18} | {v['kept']:>10} | {v['total']:>10} | {v['sparsity']:>7.2%}")
        lines.append(f"{'total':<{width}} | {'':<18} | {self.kept:>10} | {self.total:>10} | {self.sparsity:>7.2%}")
        return "\n".join(lines)


def sparsity_report(model_or_masks) -> SparsityReport:
    """Per-layer and total sparsity of a patched model, a {name: mask} mapping or a Ticket."""
    masks = get_masks(model_or_masks) if isinstance(model_or_masks, nn.Module) else _as_masks(
        model_or_masks, "sparsity_report")
    report = SparsityReport()
    for k, m in masks.items():
        kept, total = int(m.sum()), m.numel()
        report.layers[k] = {"shape": list(m.shape), "kept": kept, "total": total,
                            "sparsity": 1.0 - kept / total if total else 0.0}
    return report


_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, 8 entries per byte (numpy.packbits' order), zero-padded."""
    flat = mask.detach().reshape(-1).cpu()
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return (flat.view(-1, 8).to(torch.uint8) * _BITS).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    if packed.dtype != torch.uint8 or packed.numel() != (n + 7) // 8:
        raise ValueError(f"sparseops.tickets: packed mask of {packed.numel()} bytes does not fit shape {tuple(shape)}")
    return ((packed.view(-1, 1) & _BITS) != 0).view(-1)[:n].view(*shape)


@dataclass
class Ticket:
    """A ticket: {layer name: bool mask} and metadata (plain values: str, numbers, lists, dicts)."""

    masks: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: nn.Module, **metadata) -> Ticket:
        return cls(get_masks(model), dict(metadata))

    @property
    def sparsity(self) -> float:
        return sparsity_report(self.masks).sparsity

    def report(self) -> SparsityReport:
        return sparsity_report(self.masks)

    def apply(self, model: nn.Module, *, strict: bool = True) -> nn.Module:
        """Puts this ticket's masks on a model of the same architecture (patching it as needed)."""
        return set_masks(model, self.masks, strict=strict)

    def save(self, path) -> None:
        """Writes the masks bit-packed (1 bit per weight) with the metadata; atomic (temp file + rename)."""
        masks = _as_masks(self.masks, "Ticket.save")
        payload = {"format": FORMAT, "version": FORMAT_VERSION, "metadata": self.metadata,
                   "masks": {k: {"shape": list(m.shape), "bits": pack_bits(m)} for k, m in masks.items()}}
        try:
            payload["checksum"] = checksum(payload)
        except TypeError as exc:
            raise TypeError(f"sparseops.tickets.Ticket.save: metadata must hold plain values "
                            f"(str, numbers, lists, dicts, tensors): {exc}") from None
        tmp = f"{os.fspath(path)}.tmp"
        torch.save(payload, tmp)
        try:  # fail now on metadata that weights_only loading would refuse, not when loading later
            torch.load(tmp, weights_only=True)
        except Exception as exc:
            os.remove(tmp)
            raise TypeError(f"sparseops.tickets.Ticket.save: metadata must hold plain values "
                            f"(str, numbers, lists, dicts, tensors): {exc}") from None
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, *, map_location=None) -> Ticket:
        """Reads a file `save` wrote. A file that is not a whole, unchanged ticket raises TicketFileError
        (a ValueError) naming it and the problem; files of format version 1 (no checksum) load."""
        payload = load_file(path, "Ticket.load", "torch file", map_location=map_location)

        def bad(problem):
            return TicketFileError(f"sparseops.tickets.Ticket.load: {os.fspath(path)} {problem}")

        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise bad("is not a sparseops ticket (no 'format': 'sparseops.ticket')")
        version = payload.get("version", 0)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise bad(f"has ticket format version {version!r}; this sparseops reads up to {FORMAT_VERSION}")
        if version >= 2 or "checksum" in payload:
            verify(payload, path, "Ticket.load")
        masks, metadata = payload.get("masks"), payload.get("metadata", {})
        if not isinstance(masks, dict) or not isinstance(metadata, dict):
            raise bad("lacks its masks or metadata (a dict each)")
        out = {}
        for k, v in masks.items():
            shape = v.get("shape") if isinstance(v, dict) else None
            bits = v.get("bits") if isinstance(v, dict) else None
            if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)
                    and isinstance(bits, torch.Tensor)):
                raise bad(f"has a bad entry for layer {k!r} (want {{'shape': [ints], 'bits': uint8 tensor}})")
            try:
                out[k] = unpack_bits(bits, shape)
            except ValueError as exc:
                raise bad(f"has a bad entry for layer {k!r}: {exc}") from None
        return cls(out, metadata)
