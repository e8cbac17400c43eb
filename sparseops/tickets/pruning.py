"""Pruning: new masks from the current ones, by weight magnitude (global or per layer), at random
(the same fraction of each layer), or by any score. Each removes `rate` of the weights still kept.

The rule is open_lth's (sparse_global): with `n = ceil(rate * kept)`, the threshold is the
(n+1)-th smallest score among the prunable kept weights and weights whose score is <= it are
removed, so at least `n` go; ties at the threshold go together.

The budget `kept` (global scope): with `budget="all"` (open_lth's rule, the default) it counts the
kept weights of every masked layer, excluded layers' included, and the `n` weights all come out of
the prunable layers, so each level removes `rate` of the whole network's kept weights; with
`budget="prunable"` it counts the prunable layers only (each level removes `rate` of what the
prunable layers keep, so the whole network loses less than `rate` when a layer is excluded).
In layerwise scope (and random pruning) every prunable layer loses the same fraction of its own
kept weights: `rate` with budget "prunable"; with budget "all", `rate * all kept / prunable kept`, so
the network as a whole loses `rate` as in global scope.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .. import nn as snn
from ..distributed import check_masks, full_tensor, is_dtensor
from ..patch import check_model, patched_layers
from .masks import get_masks

SCOPES = ("global", "layerwise")
BUDGETS = ("all", "prunable")


def check_rate(rate, fn: str) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < float(rate) < 1.0:
        raise ValueError(f"sparseops.tickets.{fn}: rate must be a number in (0, 1), got {rate!r}")
    return float(rate)


OUTPUT = "output"


def resolve_exclude(model: nn.Module, exclude: Iterable[str] | str | None) -> tuple[str, ...]:
    """The layer names `exclude` stands for. None: the model's `default_exclude` attribute if it has
    one (sparseops' zoo models carry open_lth's: the output layer for LeNet and VGG, nothing for
    ResNet), else nothing. The name "output" (unless the model has a layer of that name) stands
    for the model's last masked layer in `named_modules()` order, its output layer."""
    if exclude is None:
        exclude = getattr(model, "default_exclude", ())
    if isinstance(exclude, str):
        exclude = (exclude,)
    exclude = tuple(exclude)
    if OUTPUT in exclude and OUTPUT not in dict(model.named_modules()):
        last = [n for n, _ in patched_layers(model)][-1:]
        exclude = tuple(x for n in exclude for x in (last if n == OUTPUT else [n]))
    return tuple(dict.fromkeys(exclude))


def prunable_layers(model: nn.Module, exclude: Iterable[str] | None = None, fn: str = "prune") -> dict[str, nn.Module]:
    """The hard-masked sparseops layers of `model` by name, less `exclude` (names must exist; None
    and "output" as in `resolve_exclude`)."""
    check_model(model, f"tickets.{fn}")
    exclude = set(resolve_exclude(model, exclude))
    layers = {n: m for n, m in patched_layers(model) if isinstance(m, snn._MaskedMixin)}
    unknown = sorted(exclude - set(layers))
    if unknown:
        raise ValueError(f"sparseops.tickets.{fn}: exclude names {unknown}, which are not masked layers of the "
                         f"model (masked layers: {sorted(layers)})")
    if not layers:
        raise ValueError(f"sparseops.tickets.{fn}: the model has no masked layers; call sparseops.patch(model) first")
    return {n: m for n, m in layers.items() if n not in exclude}


def check_budget(budget, fn: str) -> str:
    if budget not in BUDGETS:
        raise ValueError(f"sparseops.tickets.{fn}: budget must be one of {BUDGETS}, got {budget!r}")
    return budget


def _threshold_prune(scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], rate: float,
                     budget: int | None = None) -> dict:
    """open_lth's rule over the kept entries of all `scores` together; `budget` is the count of kept
    weights `rate` applies to (default: the kept entries of `scores` themselves)."""
    kept = torch.cat([scores[k][masks[k]].reshape(-1).double().cpu() for k in scores])
    n = math.ceil(rate * (kept.numel() if budget is None else budget))
    if n >= kept.numel():
        return {k: torch.zeros_like(masks[k]) for k in scores}
    threshold = kept.kthvalue(n + 1).values.item()
    return {k: masks[k] & (scores[k].double() > threshold) for k in scores}


def score_masks(model: nn.Module, scores: Mapping[str, torch.Tensor], rate: float, *, scope: str = "global",
                exclude: Iterable[str] | None = None, budget: str = "all", fn: str = "score_masks") -> dict[str, torch.Tensor]:
    """New masks that remove `rate` of the kept weights with the lowest `scores` ({layer: tensor of the
    weight's shape}; layers without a score keep their masks). `scope`: one threshold for all layers
    ("global") or one per layer ("layerwise"). `budget`: "all" counts the kept weights of every masked
    layer, unscored and excluded ones included (open_lth), "prunable" those of the scored layers only
    (in layerwise scope: each scored layer loses the fraction that removes the budget)."""
    rate = check_rate(rate, fn)
    if scope not in SCOPES:
        raise ValueError(f"sparseops.tickets.{fn}: scope must be one of {SCOPES}, got {scope!r}")
    check_budget(budget, fn)
    layers = prunable_layers(model, exclude, fn)
    current = get_masks(model)
    if not isinstance(scores, Mapping):
        raise TypeError(f"sparseops.tickets.{fn}: scores must be a mapping of layer name to tensor")
    unknown = sorted(set(scores) - set(layers))
    if unknown:
        raise ValueError(f"sparseops.tickets.{fn}: scores for {unknown}, which are not prunable layers")
    # FSDP2's DTensor weights: every rank gathers the whole scores, so the threshold is the one over
    # all ranks' shards and every rank computes the same masks (checked below).
    sharded = any(is_dtensor(s) for s in scores.values()) or any(is_dtensor(m.weight) for m in layers.values())
    scores = {k: full_tensor(s) for k, s in scores.items()}
    for k, s in scores.items():
        if not isinstance(s, torch.Tensor) or s.shape != layers[k].weight.shape:
            raise ValueError(f"sparseops.tickets.{fn}: scores[{k!r}] must be a tensor of shape "
                             f"{tuple(layers[k].weight.shape)}")
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"sparseops.tickets.{fn}: scores[{k!r}] has NaN or infinite values")
    scores = {k: s.detach().to(current[k].device) for k, s in scores.items()}
    new = dict(current)
    if scope == "global":
        total = sum(int(m.sum()) for m in current.values()) if budget == "all" else None
        new.update(_threshold_prune(scores, current, rate, total))
    else:
        layer_rate = rate
        if budget == "all":  # the network loses `rate` of its kept weights, each prunable layer the same share
            prunable_kept = sum(int(current[k].sum()) for k in scores)
            if prunable_kept:
                layer_rate = min(1.0, rate * sum(int(m.sum()) for m in current.values()) / prunable_kept)
        for k in scores:
            new.update(_threshold_prune({k: scores[k]}, current, layer_rate))
    if sharded:  # a collective already: a mask that differs between ranks is found here, not later
        check_masks(new, f"tickets.{fn}")
    return new


def magnitude_masks(model: nn.Module, rate: float = 0.2, *, scope: str = "global",
                    exclude: Iterable[str] | None = None, budget: str = "all") -> dict[str, torch.Tensor]:
    """Magnitude pruning: removes `rate` of the kept weights with the smallest |w| (IMP's step);
    `budget` as in `score_masks` (open_lth's "all" by default)."""
    layers = prunable_layers(model, exclude, "magnitude_masks")
    scores = {k: m.weight.detach().abs() for k, m in layers.items()}
    return score_masks(model, scores, rate, scope=scope, exclude=exclude, budget=budget, fn="magnitude_masks")


def random_masks(model: nn.Module, rate: float = 0.2, *, exclude: Iterable[str] | None = None,
                 generator: torch.Generator | None = None, budget: str = "all") -> dict[str, torch.Tensor]:
    """Random pruning: removes the same fraction of each prunable layer's kept weights (`rate`, or with
    budget "all" the fraction that removes `rate` of all kept weights), chosen uniformly at random."""
    layers = prunable_layers(model, exclude, "random_masks")
    scores = {k: torch.rand(m.weight.shape, generator=generator, dtype=torch.float64) for k, m in layers.items()}
    return score_masks(model, scores, rate, scope="layerwise", exclude=exclude, budget=budget, fn="random_masks")



GRANULARITIES = ("weight", "channel")
NORMS = ("l1", "l2")


def _filter_scores(layers, norm, fn, generator=None) -> dict[str, torch.Tensor]:
    """One score per filter (output channel, row of the weight): its L1 or L2 norm over the kept
    weights, or with `generator` a uniform random number."""
    if norm not in NORMS:
        raise ValueError(f"sparseops.tickets.{fn}: norm must be one of {NORMS}, got {norm!r}")
    scores = {}
    for k, m in layers.items():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"sparseops.tickets.{fn}: channel pruning needs Conv2d or Linear layers (output "
                             f"channel = dim 0 of the weight); exclude {k} ({type(m).__name__})")
        w = torch.where(m.weight_mask, m.weight.detach(), 0).flatten(1).double().cpu()
        if generator is not None:
            scores[k] = torch.rand(w.shape[0], generator=generator, dtype=torch.float64)
        else:
            scores[k] = w.abs().sum(1) if norm == "l1" else w.pow(2).sum(1).sqrt()
    return scores


def _prune_filters(model, layers, scores, rate, scope, fn) -> dict[str, torch.Tensor]:
    """Removes ceil(rate * kept filters) filters with the lowest scores, per layer or over all layers
    (ties broken by position); a layer left without a filter is an error."""
    current = get_masks(model)
    kept = {k: current[k].flatten(1).any(1).cpu() for k in layers}
    drop = {k: torch.zeros_like(kept[k]) for k in layers}
    groups = [[k] for k in layers] if scope == "layerwise" else [list(layers)]
    for group in groups:
        names = [k for k in group for _ in range(int(kept[k].sum()))]
        index = torch.cat([kept[k].nonzero().view(-1) for k in group])
        values = torch.cat([scores[k][kept[k]] for k in group])
        n = math.ceil(rate * len(values))
        for i in torch.sort(values, stable=True).indices[:n].tolist():
            drop[names[i]][index[i]] = True
    empty = sorted(k for k in layers if not bool((kept[k] & ~drop[k]).any()))
    if empty:
        raise ValueError(f"sparseops.tickets.{fn}: this step would prune every filter of {empty}; use a smaller "
                         "rate or fewer levels")
    new = dict(current)
    for k, m in layers.items():
        rows = (~drop[k]).to(current[k].device).view(-1, *([1] * (m.weight.dim() - 1)))
        new[k] = current[k] & rows
    return new


def channel_masks(model: nn.Module, rate: float = 0.2, *, norm: str = "l1", scope: str = "layerwise",
                  exclude: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Filter pruning (Li et al., 2017): removes ceil(rate * kept filters) filters (whole output
    channels: rows of the weight) with the smallest L1 or L2 norm, in every prunable layer
    ("layerwise", Li et al.'s) or over all of them ("global"). A layer never loses its last filter (an
    error). Only the rows are masked: a batch norm after a pruned filter still emits its shift."""
    rate = check_rate(rate, "channel_masks")
    if scope not in SCOPES:
        raise ValueError(f"sparseops.tickets.channel_masks: scope must be one of {SCOPES}, got {scope!r}")
    layers = prunable_layers(model, exclude, "channel_masks")
    return _prune_filters(model, layers, _filter_scores(layers, norm, "channel_masks"), rate, scope, "channel_masks")


def random_channel_masks(model: nn.Module, rate: float = 0.2, *, exclude: Iterable[str] | None = None,
                         generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The random channel baseline: as many filters of each prunable layer as `channel_masks` removes
    in layerwise scope, chosen uniformly at random."""
    rate = check_rate(rate, "random_channel_masks")
    layers = prunable_layers(model, exclude, "random_channel_masks")
    scores = _filter_scores(layers, "l1", "random_channel_masks",
                            generator=generator if generator is not None else torch.default_generator)
    return _prune_filters(model, layers, scores, rate, "layerwise", "random_channel_masks")
