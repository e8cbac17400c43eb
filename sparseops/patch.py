"""`patch(model)` / `unpatch(model)`: swap sparseops' masked layers into any PyTorch model and back.

Patching is in place: each supported layer's class becomes its sparseops twin (a subclass of it,
see sparseops.nn) and it gains the buffer `weight_mask` (or the parameter `weight_score` in soft
mode). Parameters, module identity, hooks, devices and dtypes stay, so optimisers built before
patching still hold the right tensors, and `state_dict()` keys only gain the mask.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from . import gates
from . import nn as snn
from .distributed import is_dtensor, is_sharded, like
from .layout import as_bool_mask

MODES = ("mask", "soft")
# A patched transformers model records its mode in `model.config.sparseops`: save_pretrained writes
# it to config.json, so a folder says it holds masks even to a loader that drops them (sparseops.hf).
CONFIG_KEY = "sparseops"


def _hf_config(model: nn.Module):
    """The transformers config of `model` (one that save_pretrained writes), or None."""
    config = getattr(model, "config", None)
    return config if hasattr(config, "to_json_string") and hasattr(config, "save_pretrained") else None


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional; without it there is no Conv1D to patch
        return None
    return Conv1D


def _twins() -> dict[type, dict[str, type]]:
    """Exact layer type -> its twin per mode. Subclasses are not patched: their forward may differ."""
    table = {nn.Linear: {"mask": snn.MaskedLinear, "soft": snn.SoftMaskedLinear},
             nn.Conv2d: {"mask": snn.MaskedConv2d, "soft": snn.SoftMaskedConv2d}}
    conv1d = _conv1d_type()
    if conv1d is not None:
        table[conv1d] = {"mask": snn.MaskedConv1D, "soft": snn.SoftMaskedConv1D}
    return table


def _base(module: nn.Module) -> type | None:
    """The plain layer type a patched module came from, or None for a module that is not patched."""
    if not is_patched(module):
        return None
    return next(cls for cls in type(module).__mro__ if cls.__module__ != snn.__name__)


def check_model(model, who: str) -> None:
    """TypeError naming `who` (e.g. "patch", "tickets.imp") unless `model` is an nn.Module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparseops.{who}: model must be a torch.nn.Module, got {type(model).__name__}")


def is_patched(module: nn.Module) -> bool:
    return isinstance(module, (snn._MaskedMixin, snn._SoftMaskedMixin))


def patched_layers(model: nn.Module):
    """(fully qualified name, module) of every sparseops layer in `model`, each module once."""
    seen = set()
    for name, m in model.named_modules():
        if is_patched(m) and id(m) not in seen:
            seen.add(id(m))
            yield name, m


@dataclass
class PatchReport:
    """What `patch` did: the layers it patched, those already patched, those `filter_fn` left out, and
    the layers with weights it cannot mask (with the reason)."""

    patched: list[str] = field(default_factory=list)
    already_patched: list[str] = field(default_factory=list)
    filtered_out: list[str] = field(default_factory=list)
    unsupported: dict[str, str] = field(default_factory=dict)

    def __str__(self):
        lines = [f"patched {len(self.patched)} layer(s), {len(self.already_patched)} already patched, "
                 f"{len(self.filtered_out)} left out by filter_fn, {len(self.unsupported)} unsupported"]
        lines += [f"  unsupported: {name}: {why}" for name, why in self.unsupported.items()]
        return "\n".join(lines)


def _prune_hooks(module: nn.Module):
    """torch.nn.utils.prune's forward pre-hooks on `module`, as {hook id: pruning method}."""
    return {k: h for k, h in module._forward_pre_hooks.items() if isinstance(h, torch_prune.BasePruningMethod)}


def _pruned_names(hook) -> set[str]:
    methods = hook._pruning_methods if isinstance(hook, torch_prune.PruningContainer) else (hook,)
    return {m._tensor_name for m in methods}


def _take_over_prune(module: nn.Module) -> torch.Tensor:
    """Removes torch.nn.utils.prune's reparametrisation of `weight` and returns its mask as bool.
    `weight_orig` becomes `weight` again (the same Parameter object, so optimisers keep it)."""
    # Validated before the module is touched, so a bad mask leaves the pruned layer as it was.
    mask = as_bool_mask(module._buffers["weight_mask"], name="torch.nn.utils.prune's weight_mask")
    del module._buffers["weight_mask"]
    orig = module._parameters.pop("weight_orig")
    for k in list(_prune_hooks(module)):
        del module._forward_pre_hooks[k]
    del module.__dict__["weight"]  # the plain tensor prune's hook recomputed before each forward
    params = OrderedDict([("weight", orig)])
    params.update(module._parameters)  # `weight` first again, as in the unpatched layer
    module._parameters.clear()
    module._parameters.update(params)
    return mask


def _unsupported_reason(module: nn.Module, twins) -> str | None:
    """Why a module holding a >= 2-D weight-like parameter of its own cannot be patched, else None."""
    big = [n for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]
    hooks = _prune_hooks(module)
    if not big and not hooks:
        return None
    if isinstance(module, nn.MultiheadAttention) or (type(module).__name__ == "NonDynamicallyQuantizableLinear"):
        return "nn.MultiheadAttention reads its weights directly, not through its layers' forward"
    if type(module) not in twins:
        if any(issubclass(type(module), t) for t in twins):
            return f"{type(module).__name__} subclasses a supported layer but may have its own forward"
        return f"{type(module).__name__} has no sparseops twin"
    names = set().union(*(_pruned_names(h) for h in hooks.values())) if hooks else set()
    if names - {"weight"}:
        return f"torch.nn.utils.prune prunes {sorted(names - {'weight'})}, which sparseops cannot take over"
    return None


def patch(model: nn.Module, *, mode: str = "mask", filter_fn: Callable[[nn.Module, str], bool] | None = None,
          s0: float = 0.0, on_unsupported: str = "warn", layer_gates=None) -> nn.Module:
    """Swaps every supported layer of `model` for its sparseops twin, in place, and returns `model`.

    Supported: nn.Linear, nn.Conv2d, transformers' Conv1D (when transformers is installed), and
    those layers already pruned with torch.nn.utils.prune (their `weight_orig` and mask are taken
    over and the prune hooks removed). `mode="mask"` gives Masked* layers with an all-ones (or the
    prune) mask; `mode="soft"` gives SoftMasked* layers for Continuous Sparsification with scores
    initialised to `s0`. `filter_fn(module, fqn)` picks layers. Patching twice is harmless.

    Layers holding weights that cannot be masked (other layer types, subclasses, nn.MultiheadAttention,
    a weight tied to such a layer) are left as they are and reported: `on_unsupported` is "warn",
    "raise" or "ignore"; `patch_report(model)` returns the same information.

    `layer_gates=True` also gates every residual block it knows (torchvision's BasicBlock and
    Bottleneck, the zoo's ResNet-20 blocks; a callable `layer_gates(module, fqn)` picks blocks, or
    residual branches of other models): `post(shortcut(x) + gate * F(x))`, F skipped where the
    block's `gate` is 0 (sparseops.gates).
    """
    config = _hf_config(model) if isinstance(model, nn.Module) else None
    record = getattr(config, CONFIG_KEY, None)
    if record is not None and not any(True for _ in patched_layers(model)):
        raise ValueError(
            f"sparseops.patch: model.config.{CONFIG_KEY} = {record!r} says this model was saved patched, but it has "
            f"no sparseops layer: the plain from_pretrained (or a load into an unpatched model) dropped its masks "
            f"and kept the pruned weights' values. Load the folder with sparseops.hf.from_pretrained(cls, folder); "
            f"to patch this dense model anyway, delete model.config.{CONFIG_KEY} first")
    blocks = None
    if layer_gates is not None and layer_gates is not False:
        check_model(model, "patch")
        blocks = gates.find_blocks(model, None if layer_gates is True else layer_gates)  # checked before any change
    report = _walk(model, mode, filter_fn, s0, on_unsupported, apply=True)
    if blocks is not None:
        gates.gate(blocks)
    if config is not None and report.patched + report.already_patched:
        setattr(config, CONFIG_KEY, {"mode": mode})
    if report.unsupported and on_unsupported == "warn":
        warnings.warn(f"sparseops.patch: {len(report.unsupported)} layer(s) left unpatched:\n{report}", stacklevel=2)
    return model


def patch_report(model: nn.Module, *, mode: str = "mask",
                 filter_fn: Callable[[nn.Module, str], bool] | None = None) -> PatchReport:
    """What `patch(model, mode=..., filter_fn=...)` would do, without changing `model`."""
    return _walk(model, mode, filter_fn, 0.0, "ignore", apply=False)


def _walk(model, mode, filter_fn, s0, on_unsupported, apply) -> PatchReport:
    check_model(model, "patch")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError("sparseops.patch: patch the module before wrapping it in (Distributed)DataParallel")
    if mode not in MODES:
        raise ValueError(f"sparseops.patch: mode must be one of {MODES}, got {mode!r}")
    if on_unsupported not in ("warn", "raise", "ignore"):
        raise ValueError(f"sparseops.patch: on_unsupported must be 'warn', 'raise' or 'ignore', got {on_unsupported!r}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError("sparseops.patch: filter_fn must be callable as filter_fn(module, fqn)")
    twins = _twins()
    report = PatchReport()
    modules = list(OrderedDict((id(m), (n, m)) for n, m in model.named_modules(remove_duplicate=False)).values())
    # Weights owned by layers that stay unmasked: a layer tied to one of them cannot be masked alone.
    owners: dict[int, str] = {}
    candidates, sharded = [], []
    for name, m in modules:
        if _sharded_twin(m, twins) and (filter_fn is None or filter_fn(m, name)):
            sharded.append(name or "model")
            continue
        if is_patched(m):
            other = "soft" if isinstance(m, snn._SoftMaskedMixin) else "mask"
            if other != mode:
                raise ValueError(f"sparseops.patch: {name or 'model'} is already patched in mode {other!r}; "
                                 f"unpatch it before patching with mode {mode!r}")
            report.already_patched.append(name)
            continue
        reason = _unsupported_reason(m, twins)
        if reason is not None:
            report.unsupported[name] = reason
        elif type(m) in twins and (filter_fn is None or filter_fn(m, name)):
            candidates.append((name, m))
            continue
        elif type(m) in twins:
            report.filtered_out.append(name)
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), name)
    if sharded:  # the mask would be a DTensor (or the layer an FSDP2 class): refused before any change
        raise TypeError(f"sparseops.patch: layers {sharded} are sharded (FSDP2's fully_shard, or DTensor "
                        "weights); patch the model before fully_shard (or leave them out with filter_fn)")
    if report.unsupported and on_unsupported == "raise":
        raise NotImplementedError(f"sparseops.patch: cannot patch every layer:\n{report}")
    shared_masks: dict[int, torch.Tensor] = {}  # one mask per weight tensor, for weights tied between layers
    for name, m in candidates:
        w = m._parameters.get("weight_orig", m._parameters.get("weight"))
        if id(w) in owners:
            report.unsupported[name] = (f"its weight is shared with {owners[id(w)] or 'the model'}, "
                                        f"which stays unmasked")
            continue
        report.patched.append(name)
        if apply:
            _patch_one(m, twins[type(m)][mode], mode, s0, shared_masks)
    return report


def _sharded_twin(m: nn.Module, twins) -> bool:
    """A layer patch would patch (exactly a supported type, or FSDP2's wrapper of one: FSDPLinear's
    bases are FSDPModule and nn.Linear) whose weights are sharded."""
    cls = type(m)
    return (not is_patched(m) and (cls in twins or any(b in twins for b in cls.__bases__))
            and is_sharded(m))


def _patch_one(m: nn.Module, twin: type, mode: str, s0: float, shared_masks: dict) -> None:
    mask = _take_over_prune(m) if _prune_hooks(m) else None
    if mode == "soft" and mask is not None and not bool(mask.all()):
        raise ValueError("sparseops.patch: mode='soft' on a layer pruned by torch.nn.utils.prune would drop its "
                         "mask; remove the pruning first (torch.nn.utils.prune.remove)")
    m.__class__ = twin
    if mode == "mask":
        key = id(m.weight)
        if key in shared_masks:
            m.register_buffer("weight_mask", shared_masks[key])
        else:
            m._attach_mask(mask)
            shared_masks[key] = m.weight_mask
    else:
        m._attach_score(s0)


def unpatch(model: nn.Module, *, as_prune: bool = False) -> nn.Module:
    """Gives plain layers back, in place, and returns `model`.

    By default each mask is folded into the weight (`weight *= mask`, in place, so the Parameter
    objects stay). With `as_prune=True` the mask becomes a torch.nn.utils.prune reparametrisation
    instead (`weight_orig` and `weight_mask`), which keeps the pruned weights' values. Soft layers fold
    their current mask (soft, or the ticket's) including its scale.

    Layers sharded by FSDP2 (`fully_shard` after `patch`) fold their masks into their shards and keep
    FSDP2's wrapping (FSDPMaskedLinear becomes FSDPLinear); every rank must call it. Soft layers and
    `as_prune` are refused there. Every layer is checked before any changes.
    """
    check_model(model, "unpatch")
    plan = []
    for name, m in patched_layers(model):
        base = _plain_class(m, name)
        if is_sharded(m) or is_dtensor(m.weight):
            what = ("as_prune=True" if as_prune else "soft layers" if isinstance(m, snn._SoftMaskedMixin) else None)
            if what is not None:
                raise NotImplementedError(f"sparseops.unpatch: {what} on layers sharded by FSDP2 ({name or 'model'}) "
                                          "is not supported; unpatch before fully_shard")
        plan.append((m, base))
    for m in model.modules():
        if is_sharded(m) and hasattr(m, "reshard"):  # sharded parameters registered, so edits reach the shards
            m.reshard()
    for m, base in plan:
        with torch.no_grad():
            if isinstance(m, snn._SoftMaskedMixin):
                mask = m.soft_mask().detach()
                del m._parameters["weight_score"]
                m._buffers.pop("_hard_mask", None)
                for attr in ("s0", "beta", "ticket", "_hard_key"):
                    m.__dict__.pop(attr, None)
            else:
                mask = m._buffers.pop("weight_mask")
            m.__class__ = base
            if as_prune:
                torch_prune.custom_from_mask(m, "weight", mask)
            else:
                mask = mask.to(device=m.weight.device, dtype=m.weight.dtype)
                m.weight.mul_(like(mask, m.weight) if is_dtensor(m.weight) else mask)
    config = _hf_config(model)
    if config is not None and hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)  # dense again (folded, or torch.nn.utils.prune's own keys)
    return model


def _plain_class(m: nn.Module, name: str) -> type:
    """The class `m` gets back: its twin's base (MaskedLinear -> nn.Linear), or for a class a wrapper
    made around the twin (FSDP2's FSDPMaskedLinear), the same wrapper around the base (FSDPLinear)."""
    cls = type(m)
    if cls.__module__ == snn.__name__:
        return _base(m)
    twins = [b for b in cls.__bases__ if b.__module__ == snn.__name__]
    try:
        from torch.distributed.fsdp._fully_shard._fully_shard import get_cls_to_fsdp_cls
    except ImportError:
        wrappers = {}
    else:
        wrappers = get_cls_to_fsdp_cls()
    if len(twins) != 1 or wrappers.get(twins[0]) is not cls:
        raise TypeError(f"sparseops.unpatch: {name or 'model'} is a {cls.__name__}, a subclass of a sparseops "
                        "layer that unpatch does not know how to undo")
    base = next(b for b in twins[0].__mro__ if b.__module__ != snn.__name__)
    if base not in wrappers:  # as fully_shard makes it, so a later fully_shard(nn.Linear) gives the same class
        wrappers[base] = type(cls.__name__.replace(twins[0].__name__, base.__name__),
                              tuple(base if b is twins[0] else b for b in cls.__bases__),
                              {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")})
    return wrappers[base]


@contextlib.contextmanager
def as_torch_prune(model: nn.Module):
    """Within the block, the patched layers of `model` are torch.nn.utils.prune layers holding their
    masks (`unpatch(as_prune=True)`), so `prune.*` composes with them as torch composes two prunings:
    a PruningContainer, the new method's mask computed over the remaining weights. On exit they are
    patched back (the same Parameter objects) with the composed masks; `prune.remove` in the block
    makes a layer's pruning permanent in its weight, as in torch."""
    check_model(model, "as_torch_prune")
    layers = dict(patched_layers(model))
    soft = [n or "model" for n, m in layers.items() if isinstance(m, snn._SoftMaskedMixin)]
    if soft:
        raise TypeError(f"sparseops.as_torch_prune: soft layers {soft[:3]} have scores, not a mask torch.nn.utils.prune "
                        f"can compose with (set_ticket, then tickets.get_masks / set_masks on a masked model)")
    was = {id(m) for m in layers.values()}
    unpatch(model, as_prune=True)
    try:
        yield model
    finally:
        patch(model, filter_fn=lambda m, _: id(m) in was, on_unsupported="ignore")
