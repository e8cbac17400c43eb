"""Layers built on the sparseops ops: hard-masked (`Masked*`) and soft-masked (`SoftMasked*`,
Continuous Sparsification) twins of nn.Linear, nn.Conv2d and transformers' Conv1D.

Each twin is a subclass of the layer it replaces and keeps its parameters (`weight`, `bias`), so
optimisers, `state_dict()` keys and `isinstance` checks keep working. `sparseops.patch` turns
existing layers into twins in place (by switching their class), so hooks and module identity stay.

- Hard mask: the boolean buffer `weight_mask` (the name torch.nn.utils.prune uses). The weight keeps
  its values at pruned entries; they get zero gradient and do not affect outputs. Editing the mask in
  place (`layer.weight_mask[...] = False`) takes effect at the next call.
- Soft mask: the parameter `weight_score` (s), mask `sigmoid(beta * s) / sigmoid(s0)` as in the
  official CS code; `beta` is a plain attribute the search raises every epoch. With `ticket = True`
  the mask is `(s > 0) / sigmoid(s0)` and runs on the sparse kernels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import reference
from .layout import as_bool_mask, same_content
from .ops.masked_conv2d import masked_conv2d
from .ops.masked_linear import masked_linear
from .ops.soft_mask import penalty_after_forward
from .ops.soft_masked_conv2d import soft_masked_conv2d
from .ops.soft_masked_linear import soft_masked_linear


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _refuse_torch_prune(layer, name: str) -> None:
    """torch.nn.utils.prune starts by registering `<name>_orig`: refuse there, before it changes anything.
    On a patched layer it would compute its mask over all the weights (the pruned ones come back) and
    replace `weight_mask` with it; sparseops.as_torch_prune composes instead."""
    if name == "weight_orig":
        kind = "soft layer (its mask is its scores)" if isinstance(layer, _SoftMaskedMixin) else "patched layer"
        raise NotImplementedError(
            f"sparseops: torch.nn.utils.prune on a {kind} {type(layer).__name__} would replace its mask by one over "
            f"all the weights; prune inside `with sparseops.as_torch_prune(model):` (composes like torch: the new "
            f"mask over the remaining weights), or use sparseops.tickets (magnitude_masks, set_masks)")


class _MaskedMixin:
    """A boolean `weight_mask` buffer the layer's forward applies through the sparse kernels."""

    weight_mask: torch.Tensor

    def register_parameter(self, name, param) -> None:
        _refuse_torch_prune(self, name)
        super().register_parameter(name, param)

    def _as_mask(self, mask, copy: bool = True) -> torch.Tensor:
        """The mask at the weight's full shape. A channel mask ([N, 1] / [1, K] for a linear
        layer, [C_out, 1, 1, 1] / [1, C_in, 1, 1] for a convolution: any shape with the weight's
        dimensions, each 1 or the weight's size) is expanded to it: `weight_mask` stays full-shape."""
        m = as_bool_mask(mask, name="mask")
        shape = tuple(self.weight.shape)
        if m.shape != shape:
            if m.dim() != len(shape) or any(a not in (1, b) for a, b in zip(m.shape, shape)):
                raise ValueError(f"{type(self).__name__}: mask must have the weight's shape {shape} or broadcast "
                                 f"to it along whole channels (each dimension 1 or the weight's), got {tuple(m.shape)}")
            m = m.expand(shape)
        m = m.to(self.weight.device)
        return m.clone(memory_format=torch.contiguous_format) if copy else m

    def _attach_mask(self, mask=None) -> None:
        if mask is None:
            mask = torch.ones_like(self.weight, dtype=torch.bool)
        self.register_buffer("weight_mask", self._as_mask(mask))

    @torch.no_grad()
    def set_mask(self, mask) -> None:
        """Replaces the mask's values in place (the buffer stays the same tensor)."""
        m = self._as_mask(mask, copy=False)  # (a channel mask is copied from its expanded view: one pass)
        if m.untyped_storage().data_ptr() == self.weight_mask.untyped_storage().data_ptr():
            m = m.clone()  # the buffer itself or a view of it: copy_ may not read what it writes
        self.weight_mask.copy_(m)

    @property
    def sparsity(self) -> float:
        m = self.weight_mask
        return 1.0 - m.sum().item() / m.numel() if m.numel() else 0.0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Checkpoints of the unpatched model (no mask: keep the current one, which is what
        # rewinding needs) and of torch.nn.utils.prune (`weight_orig`) load as they are.
        orig = prefix + "weight_orig"
        if orig in state_dict and prefix + "weight" not in state_dict:
            state_dict[prefix + "weight"] = state_dict.pop(orig)
        key = prefix + "weight_mask"
        # No mask but the weight: the unpatched model's checkpoint, whose mask is not missing. Neither:
        # the weight is not in this state dict (a tied copy that safetensors saved once), so the mask
        # is missing like the weight, as safetensors.torch.load_model expects of a tied duplicate.
        no_mask = key not in state_dict and prefix + "weight" in state_dict
        mask = state_dict.get(key)
        if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
            # A copy into the bool buffer would make any non-zero value (2, NaN) True: refuse what
            # is not a mask, keep the current one, and let load_state_dict report it by key.
            try:
                state_dict[key] = as_bool_mask(mask, name=key)
            except (TypeError, ValueError) as exc:
                error_msgs.append(f"{exc}")
                state_dict[key] = self.weight_mask
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if no_mask and key in missing_keys:
            missing_keys.remove(key)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparsity={self.sparsity:.3f}"


class MaskedLinear(_MaskedMixin, nn.Linear):
    """nn.Linear with a fixed boolean mask on the weight, computed by the sparse kernels."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 mask: torch.Tensor | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._attach_mask(mask)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor | None = None) -> MaskedLinear:
        """A MaskedLinear sharing `linear`'s parameters (`linear` itself is left as it is)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"MaskedLinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new._attach_mask(mask)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_linear(x, self.weight, self.weight_mask, self.bias)


def _conv2d_input(conv: nn.Conv2d, x: torch.Tensor):
    """x padded as nn.Conv2d pads for non-zero padding modes, and the padding left for the conv."""
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), 0
    return x, conv.padding


class MaskedConv2d(_MaskedMixin, nn.Conv2d):
    """nn.Conv2d with a fixed boolean mask on the weight (same constructor, plus `mask`)."""

    def __init__(self, *args, mask: torch.Tensor | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._attach_mask(mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, padding = _conv2d_input(self, x)
        return masked_conv2d(x, self.weight, self.weight_mask, self.bias, self.stride, padding, self.dilation,
                             self.groups)


class _SoftMaskedMixin:
    """Continuous Sparsification's soft mask on the weight, fused by sparseops.soft_mask."""

    weight_score: nn.Parameter

    def register_parameter(self, name, param) -> None:
        _refuse_torch_prune(self, name)
        super().register_parameter(name, param)

    def _attach_score(self, s0: float = 0.0) -> None:
        s0 = float(s0)
        if not math.isfinite(s0):
            raise ValueError(f"{type(self).__name__}: s0 must be finite, got {s0}")
        self.s0, self.beta, self.ticket = s0, 1.0, False
        self.weight_score = nn.Parameter(torch.full_like(self.weight, s0, requires_grad=False),
                                         requires_grad=True)
        self.register_buffer("_hard_mask", None, persistent=False)  # s > 0, kept while `ticket` is set

    @property
    def scale(self) -> float:
        """1 / sigmoid(s0): the official CS code's scaling, so the initial mask is 1."""
        return 1.0 / _sigmoid(self.s0)

    def soft_mask(self) -> torch.Tensor:
        """The mask as the forward applies it (soft, or the hard ticket mask), times `scale`."""
        if self.ticket:
            return self.ticket_mask().to(self.weight.dtype) * self.scale
        return reference.cut_sigmoid(self.beta * self.weight_score) * self.scale

    def ticket_mask(self) -> torch.Tensor:
        """The hard mask CS keeps: s > 0 (in ticket mode, the one the forward computes with)."""
        return self._current_hard_mask() if self.ticket else self.weight_score.detach() > 0

    def penalty(self) -> torch.Tensor:
        """CS's L0 surrogate for this layer: sum of the soft mask (with its scale), fused; after a
        forward on the CPU, the sum that forward's soft mask computed in its pass (one backward
        pass then gives both gradients)."""
        return penalty_after_forward(self.weight_score, self.beta, self.scale)

    @property
    def sparsity(self) -> float:
        m = self.ticket_mask()
        return 1.0 - m.sum().item() / m.numel() if m.numel() else 0.0

    @torch.no_grad()
    def set_ticket(self, ticket: bool = True) -> None:
        """Hard mask `s > 0` (on the sparse kernels) or back to the soft mask."""
        self.ticket = bool(ticket)
        self._hard_mask = self.weight_score.detach() > 0 if self.ticket else None
        self._hard_key = self._score_key()

    def _score_key(self):
        s = self.weight_score
        return s._version, s.data_ptr()

    @torch.no_grad()
    def _current_hard_mask(self) -> torch.Tensor:
        """`s > 0` of the scores at their current version, in one tensor updated in place only when it
        changes (so its cached layout lives while the scores keep their signs). Every torch write to
        the scores moves their version (optimizer steps, in-place ops under no_grad); writes through
        `.data` or numpy do not, and are taken at the next one or at set_ticket: comparing s > 0 on
        every call would cost more than the sparse op it guards (docs/integrations.md)."""
        hard = self._hard_mask
        if hard is None or hard.shape != self.weight_score.shape or hard.device != self.weight_score.device:
            self.set_ticket(True)
            return self._hard_mask
        if torch.compiler.is_compiling():  # version counters and data pointers are not traceable
            return hard
        key = self._score_key()
        if key != getattr(self, "_hard_key", None):
            new = self.weight_score.detach() > 0
            if not same_content(new, hard):
                hard.copy_(new)
            self._hard_key = key
        return hard

    # beta, ticket mode and s0 travel in the state dict's per-module metadata (state_dict._metadata,
    # beside torch's "version"), not as a key: the keys stay those of the layer's parameters. torch.save
    # (weights_only loading included) keeps it; formats that store only tensors (safetensors) do not,
    # and checkpoints without it load and keep the current values.
    _META = "sparseops_soft"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        meta = getattr(destination, "_metadata", None)
        if meta is not None:
            meta.setdefault(prefix[:-1], {})[self._META] = {"beta": float(self.beta), "ticket": bool(self.ticket),
                                                            "s0": float(self.s0)}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        saved = (local_metadata or {}).get(self._META)
        if saved is None:
            return
        try:
            beta, ticket, s0 = float(saved["beta"]), bool(saved["ticket"]), float(saved["s0"])
        except (TypeError, KeyError, ValueError):
            error_msgs.append(f"{type(self).__name__} {prefix[:-1]}: bad saved soft-mask state {saved!r}")
            return
        if not (math.isfinite(beta) and math.isfinite(s0)):
            error_msgs.append(f"{type(self).__name__} {prefix[:-1]}: saved beta and s0 must be finite, got {saved!r}")
            return
        self.s0, self.beta = s0, beta
        self.set_ticket(ticket)  # the hard mask from the loaded scores

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ticket:
            # Official CS: weight * (s > 0) / sigmoid(s0). The scale goes on the output so the sparse
            # kernel reads the weight itself and dw is scale * (the masked gradient), as there.
            y = self._masked_by(x, self._current_hard_mask()) * self.scale
            return y if self.bias is None else y + self._bias_view()
        # The op chooses: the mask fused into the GEMM (Triton), soft_mask then the dense op, or, once
        # most of the mask is exactly 0, the masked op over the rest (exact).
        return self._soft(x)

    def extra_repr(self) -> str:
        state = "ticket" if self.ticket else f"beta={self.beta:.4g}"
        return f"{super().extra_repr()}, s0={self.s0:g}, {state}"


class SoftMaskedLinear(_SoftMaskedMixin, nn.Linear):
    """nn.Linear under Continuous Sparsification's soft mask (same constructor, plus `s0`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 s0: float = 0.0):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._attach_score(s0)

    def _masked_by(self, x, mask):
        return masked_linear(x, self.weight, mask)

    def _soft(self, x):
        return soft_masked_linear(x, self.weight, self.weight_score, self.beta, self.scale, self.bias)

    def _bias_view(self):
        return self.bias


class SoftMaskedConv2d(_SoftMaskedMixin, nn.Conv2d):
    """nn.Conv2d under Continuous Sparsification's soft mask (same constructor, plus `s0`)."""

    def __init__(self, *args, s0: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self._attach_score(s0)

    def _masked_by(self, x, mask):
        x, padding = _conv2d_input(self, x)
        return masked_conv2d(x, self.weight, mask, None, self.stride, padding, self.dilation, self.groups)

    def _soft(self, x):
        x, padding = _conv2d_input(self, x)
        return soft_masked_conv2d(x, self.weight, self.weight_score, self.beta, self.scale, self.bias,
                                  self.stride, padding, self.dilation, self.groups)

    def _bias_view(self):
        return self.bias.view(1, -1, 1, 1)


# transformers' Conv1D (GPT-2 and relatives): y = x @ W + b with W stored [in, out]. Its twins are
# built on first use so that importing sparseops does not import transformers.


def _conv1d_masked(self, x, bias, mask):
    # W^T and its mask [out, in] as views: the layout is cached on the mask buffer (layout.py), and
    # under torch.compile / export the mask stays a graph input.
    return masked_linear(x, self.weight.t(), mask.t(), bias)


def _make_conv1d_twins():
    from transformers.pytorch_utils import Conv1D

    def masked_forward(self, x):
        return _conv1d_masked(self, x, self.bias, self.weight_mask)

    masked = type("MaskedConv1D", (_MaskedMixin, Conv1D), {
        "__doc__": "transformers' Conv1D with a fixed boolean mask on the weight ([in, out], as the weight).",
        "__module__": __name__,
        "forward": masked_forward,
    })
    soft = type("SoftMaskedConv1D", (_SoftMaskedMixin, Conv1D), {
        "__doc__": "transformers' Conv1D under Continuous Sparsification's soft mask.",
        "__module__": __name__,
        "_masked_by": lambda self, x, mask: _conv1d_masked(self, x, None, mask),
        "_soft": lambda self, x: soft_masked_linear(x, self.weight.t(), self.weight_score.t(), self.beta,
                                                    self.scale, self.bias),
        "_bias_view": lambda self: self.bias,
    })
    return masked, soft


def __getattr__(name):  # PEP 562: MaskedConv1D / SoftMaskedConv1D exist once transformers imports
    if name in ("MaskedConv1D", "SoftMaskedConv1D"):
        g = globals()
        g["MaskedConv1D"], g["SoftMaskedConv1D"] = _make_conv1d_twins()
        return g[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
