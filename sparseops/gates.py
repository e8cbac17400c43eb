"""Gates on whole units of a network: one per residual block (layer gates) and one per output channel
(channel gates), as Structured Continuous Sparsification searches them (sparseops.tickets.structured_cs).

Layer gates. A gated residual block computes `post(shortcut(x) + g * F(x))` (torchvision's BasicBlock
and Bottleneck, the zoo's ResNet-20 blocks: `post` is their final ReLU), and where `g` is exactly 0 it
computes `post(shortcut(x))`: F is not run, in forward or backward. Any other module a filter picks is
taken as a residual *branch* F whose parent adds its input back: it returns `g * F(x)`, and zeros of
x's shape when `g` is 0, so its output must keep its input's shape. The block's attribute `gate` (a
0-dim float buffer, 1 after gating) is the hard gate; 0 means off. A soft gate (`attach_gate_score`)
is `sigmoid(gate_beta * gate_score) / sigmoid(gate_s0)`, CS's scaled mask, until `set_gate_ticket`,
and exactly 0 where `gate_beta * gate_score < -43.7` (`soft_gate`).

Channel gates. `ChannelGate(C)` holds one score per channel; `gate_channels(module, C)` multiplies the
module's output channel c (dim 1) by the gate's value (soft as above, or its hard buffer).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .reference import cut_sigmoid


def _relu(block, out):
    return block.relu(out)


def _tv_basic(block, x):
    out = block.relu(block.bn1(block.conv1(x)))
    return block.bn2(block.conv2(out))


def _tv_bottleneck(block, x):
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.relu(block.bn2(block.conv2(out)))
    return block.bn3(block.conv3(out))


def _tv_shortcut(block, x):
    return x if block.downsample is None else block.downsample(x)


def _zoo_residual(block, x):
    return block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))


def _cs_residual(block, x):
    return block.bn_b(block.conv_b(torch.relu(block.bn_a(block.conv_a(x)))))


# (module, class name) -> (F, shortcut, post): the residual blocks gated without a filter. Named, not
# imported: torchvision is optional, and the zoo lives in sparseops.tickets, which imports this module.
BLOCKS: dict[tuple[str, str], tuple[Callable, Callable, Callable]] = {
    ("torchvision.models.resnet", "BasicBlock"): (_tv_basic, _tv_shortcut, _relu),
    ("torchvision.models.resnet", "Bottleneck"): (_tv_bottleneck, _tv_shortcut, _relu),
    ("sparseops.tickets.zoo", "_Block"): (_zoo_residual, lambda b, x: b.shortcut(x), lambda b, out: torch.relu(out)),
    ("sparseops.tickets.zoo", "_CSBlock"): (_cs_residual, lambda b, x: x if b.downsample is None else b.downsample(x),
                                            lambda b, out: torch.relu(out)),
}


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def soft_gate(beta, score: torch.Tensor, s0: float) -> torch.Tensor:
    """`sigmoid(beta * score) / sigmoid(s0)`, exactly 0 (gradient 0) where `beta * score` is below
    sparseops.reference.SIGMOID_OFF_BELOW (-43.7): a smaller gate would make what it multiplies
    subnormal, slow on x86 (reference.py says why the cut is there)."""
    return cut_sigmoid(beta * score) / _sigmoid(s0)


def _known(module: nn.Module):
    cls = type(module)
    return BLOCKS.get((cls.__module__, cls.__qualname__))


def is_gated(module: nn.Module) -> bool:
    return isinstance(module, _GatedMixin)


class _GatedMixin:
    """The gate of a block: `gate` (hard), or a soft score while `gate_soft` is set."""

    gate: torch.Tensor

    def gate_value(self) -> torch.Tensor:
        if self.gate_soft:
            return soft_gate(self.gate_beta, self.gate_score, self.gate_s0)
        return self.gate

    def _gate_off(self, g: torch.Tensor) -> bool:
        return bool(g.detach() == 0)


# The children of each known block that its shortcut and post use (what is left when F is skipped).
_OFF_CHILDREN = {("torchvision.models.resnet", "BasicBlock"): ("downsample", "relu"),
                 ("torchvision.models.resnet", "Bottleneck"): ("downsample", "relu"),
                 ("sparseops.tickets.zoo", "_Block"): ("shortcut",), ("sparseops.tickets.zoo", "_CSBlock"): ("downsample",)}


class GatedOff(nn.Module):
    """What a gated block computes with its gate at 0, post(shortcut(x)), holding only the modules
    that needs: sparseops.shrink puts it in the block's place."""

    def __init__(self, block: nn.Module):
        super().__init__()
        base = block._gate_base
        _, self._shortcut, self._post = block._gate_parts
        for name in _OFF_CHILDREN[(base.__module__, base.__qualname__)]:
            setattr(self, name, getattr(block, name))

    def forward(self, x):
        return self._post(self, self._shortcut(self, x))


class Zeros(nn.Module):
    """A gated-off branch: zeros of its input's shape (sparseops.shrink puts it in the branch's place)."""

    def forward(self, x):
        return torch.zeros_like(x)


class _GatedBlock(_GatedMixin):
    def forward(self, x):
        residual, shortcut, post = self._gate_parts
        g = self.gate_value()
        out = shortcut(self, x)
        if not self._gate_off(g):
            out = out + g * residual(self, x)
        return post(self, out)

    def gated_off(self) -> nn.Module:
        return GatedOff(self)


class _GatedBranch(_GatedMixin):
    def gated_off(self) -> nn.Module:
        return Zeros()

    def forward(self, x):
        g = self.gate_value()
        if self._gate_off(g):
            return torch.zeros_like(x)
        out = self._gate_base.forward(self, x)
        if out.shape != x.shape:
            raise ValueError(f"sparseops.gates: a gated branch ({self._gate_base.__name__}) must keep its input's "
                             f"shape so that skipping it leaves x; it maps {tuple(x.shape)} to {tuple(out.shape)}")
        return g * out


_CLASSES: dict[type, type] = {}


def _gated_class(base: type) -> type:
    """The gated twin of a block class: a subclass whose forward applies the gate (one per class)."""
    if base not in _CLASSES:
        mixin = _GatedBlock if _known_type(base) else _GatedBranch
        name = f"Gated{base.__name__}"
        cls = type(name, (mixin, base), {"__module__": __name__, "_gate_base": base,
                                         "_gate_parts": BLOCKS.get((base.__module__, base.__qualname__)),
                                         "__doc__": f"{base.__name__} with a layer gate (sparseops.gates)."})
        _CLASSES[base] = cls
        globals().setdefault(name, cls)  # a module-level name, so that pickle finds it
    return _CLASSES[base]


def _known_type(cls: type) -> bool:
    return (cls.__module__, cls.__qualname__) in BLOCKS


def _check_skippable(name: str, module: nn.Module) -> None:
    """Refuses, before anything changes, a branch whose output shape cannot equal its input's."""
    why = None
    if isinstance(module, nn.Linear) and module.in_features != module.out_features:
        why = f"maps {module.in_features} to {module.out_features} features"
    elif isinstance(module, nn.Conv2d) and (module.in_channels != module.out_channels
                                            or any(s != 1 for s in module.stride)):
        why = f"maps {module.in_channels} to {module.out_channels} channels at stride {tuple(module.stride)}"
    if why is not None:
        raise ValueError(f"sparseops.patch: layer_gates: {name or 'model'} ({type(module).__name__}) {why}; a gate "
                         "skips a residual branch F of x + g * F(x), whose output keeps x's shape")


def find_blocks(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None) -> list:
    """(name, module) of the blocks `add_gates` would gate; raises for a bad pick, changing nothing."""
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError("sparseops.patch: layer_gates must be True or callable as filter_fn(module, fqn)")
    picked = []
    for name, m in model.named_modules():
        if is_gated(m):
            continue
        if (filter_fn is None and _known(m) is not None) or (filter_fn is not None and filter_fn(m, name)):
            if _known(m) is None:
                _check_skippable(name, m)
            picked.append((name, m))
    if not picked and not gated_blocks(model):
        raise ValueError("sparseops.patch: layer_gates' filter picked no module" if filter_fn is not None else
                         "sparseops.patch: layer_gates=True found no residual block it knows (torchvision BasicBlock/"
                         "Bottleneck, the zoo's ResNet-20); pass a filter_fn(module, fqn) to pick them")
    return picked


def gate(picked) -> list[str]:
    """Gates the (name, module) pairs of `find_blocks`, in place; returns their names."""
    for _, m in picked:
        p = next(iter(m.parameters()), None)
        m.__class__ = _gated_class(type(m))
        float_p = p is not None and p.is_floating_point()
        m.register_buffer("gate", torch.ones((), device=None if p is None else p.device,
                                             dtype=p.dtype if float_p else None))
        m.gate_soft, m.gate_beta, m.gate_s0 = False, 1.0, 0.0
    return [n for n, _ in picked]


def add_gates(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None) -> list[str]:
    """Gates, in place, every residual block `filter_fn(module, name)` picks (None: every known block:
    torchvision's BasicBlock and Bottleneck, the zoo's ResNet-20 blocks); returns the gated names. A
    picked module of another type is gated as a residual branch (its output must keep x's shape)."""
    return gate(find_blocks(model, filter_fn))


def gated_blocks(model: nn.Module):
    """(name, block) of every gated block of `model`."""
    return [(n, m) for n, m in model.named_modules() if is_gated(m)]


def remove_gates(model: nn.Module) -> nn.Module:
    """Plain blocks back, in place; a block whose gate is not 1 cannot be folded and is an error."""
    blocks = gated_blocks(model)
    for n, m in blocks:
        if m.gate_soft or float(m.gate) != 1.0:
            raise ValueError(f"sparseops.gates.remove_gates: {n} has a gate other than 1; shrink the model instead")
    for _, m in blocks:
        del m._buffers["gate"]
        m._parameters.pop("gate_score", None)
        for attr in ("gate_soft", "gate_beta", "gate_s0"):
            m.__dict__.pop(attr, None)
        m.__class__ = m._gate_base
    return model


def attach_gate_score(block: nn.Module, s0: float = 0.0) -> None:
    """A soft gate on `block`: the parameter `gate_score` (initialised to s0); `gate_beta` the temperature."""
    if not is_gated(block):
        raise TypeError(f"sparseops.gates: {type(block).__name__} has no gate; patch(model, layer_gates=...) first")
    block.gate_score = nn.Parameter(torch.full((), float(s0), device=block.gate.device, dtype=block.gate.dtype))
    block.gate_soft, block.gate_beta, block.gate_s0 = True, 1.0, float(s0)


@torch.no_grad()
def set_gate_ticket(block: nn.Module) -> None:
    """The hard gate from the score: gate = (s > 0) / sigmoid(s0), as CS's ticket mask."""
    block.gate.copy_((block.gate_score > 0).to(block.gate.dtype) / _sigmoid(block.gate_s0))
    block.gate_soft = False


class ChannelGate(nn.Module):
    """One gate per channel: soft `soft_gate(beta, score, s0)` (per-channel `beta`), or the hard
    buffer `hard` once `soft` is False. `hard` starts at 1 (every channel kept)."""

    def __init__(self, channels: int, s0: float = 0.0, device=None, dtype=None):
        super().__init__()
        if channels < 1:
            raise ValueError(f"sparseops.gates.ChannelGate: channels must be >= 1, got {channels}")
        self.s0, self.soft = float(s0), True
        self.score = nn.Parameter(torch.full((channels,), float(s0), device=device, dtype=dtype))
        self.register_buffer("beta", torch.ones(channels, device=device, dtype=dtype))
        self.register_buffer("hard", torch.ones(channels, device=device, dtype=dtype))

    def forward(self) -> torch.Tensor:
        if self.soft:
            return soft_gate(self.beta, self.score, self.s0)
        return self.hard

    @torch.no_grad()
    def off(self) -> torch.Tensor:
        """Bool [C]: channels whose gate is exactly 0 now (they contribute, and cost, nothing)."""
        return self() == 0

    @torch.no_grad()
    def set_ticket(self, keep: torch.Tensor | None = None) -> None:
        """Hard gates: `keep` (bool [C]), by default s > 0, each kept one at 1 / sigmoid(s0)."""
        keep = self.score > 0 if keep is None else keep.to(self.hard.device)
        self.hard.copy_(keep.to(self.hard.dtype) / _sigmoid(self.s0))
        self.soft = False


def _apply_channel_gate(module, inputs, output):
    g = module.channel_gate()
    return output * g.view(1, -1, *([1] * (output.dim() - 2))).to(output.dtype)


def gate_channels(module: nn.Module, channels: int, s0: float = 0.0) -> ChannelGate:
    """Puts a ChannelGate on `module`'s output (dim 1 has `channels` entries) as its submodule
    `channel_gate`, applied by a forward hook; returns it."""
    if hasattr(module, "channel_gate"):
        return module.channel_gate
    p = next(iter(module.parameters()), None)
    module.channel_gate = ChannelGate(channels, s0, device=None if p is None else p.device,
                                      dtype=p.dtype if p is not None and p.is_floating_point() else None)
    module.register_forward_hook(_apply_channel_gate)
    return module.channel_gate
