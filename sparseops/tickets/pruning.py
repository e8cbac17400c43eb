"""Pruning: new masks from the current ones, by weight magnitude (global or per layer), at random
(the same fraction of each layer), or by any score. Each removes `rate` of the weights still kept.

The rule is open_lth's (sparse_global): with `n = ceil(rate * kept)`, the threshold is the
(n+1)-th smallest score among kept weights and weights whose score is <= it are removed, so at
least `n` go; ties at the threshold go together.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .. import nn as snn
from ..patch import check_model, patched_layers
from .masks import get_masks

SCOPES = ("global", "layerwise")


def check_rate(rate, fn: str) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < float(rate) < 1.0:
        raise ValueError(f"sparseops.tickets.{fn}: rate must be a number in (0, 1), got {rate!r}")
    return float(rate)


def prunable_layers(model: nn.Module, exclude: Iterable[str] = (), fn: str = "prune") -> dict[str, nn.Module]:
    """The hard-masked sparseops layers of `model` by name, less `exclude` (names must exist)."""
    check_model(model, f"tickets.{fn}")
    if isinstance(exclude, str):
        exclude = (exclude,)
    exclude = set(exclude)
    layers = {n: m for n, m in patched_layers(model) if isinstance(m, snn._MaskedMixin)}
    unknown = sorted(exclude - set(layers))
    if unknown:
        raise ValueError(f"sparseops.tickets.{fn}: exclude names {unknown}, which are not masked layers of the "
                         f"model (masked layers: {sorted(layers)})")
    if not layers:
        raise ValueError(f"sparseops.tickets.{fn}: the model has no masked layers; call sparseops.patch(model) first")
    return {n: m for n, m in layers.items() if n not in exclude}


def _threshold_prune(scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], rate: float) -> dict:
    """open_lth's rule over the kept entries of all `scores` together."""
    kept = torch.cat([scores[k][masks[k]].reshape(-1).double().cpu() for k in scores])
    n = math.ceil(rate * kept.numel())
    if n >= kept.numel():
        return {k: torch.zeros_like(masks[k]) for k in scores}
    threshold = kept.kthvalue(n + 1).values.item()
    return {k: masks[k] & (scores[k].double() > threshold) for k in scores}


def score_masks(model: nn.Module, scores: Mapping[str, torch.Tensor], rate: float, *, scope: str = "global",
                exclude: Iterable[str] = (), fn: str = "score_masks") -> dict[str, torch.Tensor]:
    """New masks that remove `rate` of the kept weights with the lowest `scores` ({layer: tensor of the
    weight's shape}; layers without a score keep their masks). `scope`: one threshold for all layers
    ("global") or one per layer ("layerwise")."""
    rate = check_rate(rate, fn)
    if scope not in SCOPES:
        raise ValueError(f"sparseops.tickets.{fn}: scope must be one of {SCOPES}, got {scope!r}")
    layers = prunable_layers(model, exclude, fn)
    current = get_masks(model)
    if not isinstance(scores, Mapping):
        raise TypeError(f"sparseops.tickets.{fn}: scores must be a mapping of layer name to tensor")
    unknown = sorted(set(scores) - set(layers))
    if unknown:
        raise ValueError(f"sparseops.tickets.{fn}: scores for {unknown}, which are not prunable layers")
    for k, s in scores.items():
        if not isinstance(s, torch.Tensor) or s.shape != layers[k].weight.shape:
            raise ValueError(f"sparseops.tickets.{fn}: scores[{k!r}] must be a tensor of shape "
                             f"{tuple(layers[k].weight.shape)}")
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"sparseops.tickets.{fn}: scores[{k!r}] has NaN or infinite values")
    scores = {k: s.detach().to(current[k].device) for k, s in scores.items()}
    new = dict(current)
    if scope == "global":
        new.update(_threshold_prune(scores, current, rate))
    else:
        for k in scores:
            new.update(_threshold_prune({k: scores[k]}, current, rate))
    return new


def magnitude_masks(model: nn.Module, rate: float = 0.2, *, scope: str = "global",
                    exclude: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Magnitude pruning: removes `rate` of the kept weights with the smallest |w| (IMP's step)."""
    layers = prunable_layers(model, exclude, "magnitude_masks")
    scores = {k: m.weight.detach().abs() for k, m in layers.items()}
    return score_masks(model, scores, rate, scope=scope, exclude=exclude, fn="magnitude_masks")


def random_masks(model: nn.Module, rate: float = 0.2, *, exclude: Iterable[str] = (),
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random pruning: removes `rate` of each layer's kept weights, chosen uniformly at random."""
    layers = prunable_layers(model, exclude, "random_masks")
    scores = {k: torch.rand(m.weight.shape, generator=generator, dtype=torch.float64) for k, m in layers.items()}
    return score_masks(model, scores, rate, scope="layerwise", exclude=exclude, fn="random_masks")
