"""Iterative magnitude pruning with rewinding (Frankle & Carbin; Frankle et al.), as open_lth runs it.

Level 0 trains the dense network and saves its weights at the rewind point k (iteration or epoch;
0 is the original LTH reset to the initial weights). Each later level prunes `rate` of the weights
the network kept (excluded layers counted, as open_lth's sparse_global), by the magnitude of the
trained weights, rewinds the kept weights to the rewind point, and trains from step k to the end
(T - k steps, the learning-rate schedule at step k). The model's layers run on sparseops' masked
kernels throughout. docs/tickets.md compares every default with open_lth.
"""
from __future__ import annotations

import math
import os
import random
import re
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..distributed import check_masks, is_dtensor
from ..patch import check_model, patch
from ..shrink import require_torch_pruning, shrink_mapped, write_back
from .files import python_rng_state, read_checkpoints, save_checkpoint
from .masks import get_masks, set_masks, sparsity_report
from .presets import IMPPreset
from .removal import removable_layers, with_readers, zero_removed
from .pruning import (GRANULARITIES, SCOPES, channel_masks, check_budget, check_rate, magnitude_masks,
                      prunable_layers, random_channel_masks, random_masks, resolve_exclude)

PRUNINGS = ("magnitude", "random")


def parse_rewind(rewind) -> tuple[int, str]:
    """0, an iteration count (int or "500it") or an epoch count ("2ep") -> (count, "it" | "ep")."""
    if isinstance(rewind, bool):
        raise ValueError("sparseops.tickets.imp: rewind must be an int or a string like '500it' or '2ep', "
                         f"got {rewind!r}")
    if isinstance(rewind, int):
        count, unit = rewind, "it"
    else:
        m = re.fullmatch(r"\s*(\d+)\s*(it|ep)\s*", str(rewind))
        if not m:
            raise ValueError(f"sparseops.tickets.imp: rewind must be an int or a string like '500it' or '2ep', "
                             f"got {rewind!r}")
        count, unit = int(m.group(1)), m.group(2)
    if count < 0:
        raise ValueError(f"sparseops.tickets.imp: rewind must be >= 0, got {rewind!r}")
    return count, unit


class Level:
    """What a training function learns of the level it trains, and how it reports progress.

    Call `level.step()` after every optimiser step and `level.end_epoch()` after every epoch: at
    level 0 the search saves the rewind weights when the rewind point is reached, and the call
    that saved them returns True.

    Where a level starts (open_lth's semantics): level 0 starts at step 0; every later level starts
    at the rewind point, `start_iteration` optimiser steps into training (`start_epoch` whole
    epochs and `start_batch` batches of the next), and trains to the end of the schedule, so
    T - k steps with the learning-rate schedule at step k. open_lth pretrains to the rewind point
    with an optimiser of its own and starts level 0's optimiser there; a training function that
    follows it builds a fresh optimiser when `step()` / `end_epoch()` returns True. `iteration`
    and `epoch` count from the start point (the global position in the schedule).
    """

    def __init__(self, index: int, sparsity: float, rewind: tuple[int, str], on_rewind: Callable | None,
                 start: tuple[int, int, int] = (0, 0, 0)):
        self.index, self.sparsity = index, sparsity
        self.start_iteration, self.start_epoch, self.start_batch = start
        self.iteration, self.epoch = self.start_iteration, self.start_epoch
        self._batch = self.start_batch  # batches into the current epoch
        self._rewind, self._on_rewind = rewind, on_rewind

    def _tick(self, unit) -> bool:
        if self._on_rewind is not None and self._rewind == ((self.iteration if unit == "it" else self.epoch), unit):
            self._on_rewind((self.iteration, self.epoch, self._batch))
            self._on_rewind = None
            return True
        return False

    def step(self) -> bool:
        self.iteration += 1
        self._batch += 1
        return self._tick("it")

    def end_epoch(self) -> bool:
        self.epoch += 1
        self._batch = 0
        return self._tick("ep")

    def __repr__(self):
        start = f", start_iteration={self.start_iteration}" if self.start_iteration else ""
        return f"Level({self.index}, sparsity={self.sparsity:.4f}{start})"


@dataclass
class LevelResult:
    level: int
    sparsity: float
    metrics: dict
    wall_time: float
    masks: dict[str, torch.Tensor] = field(repr=False)


@dataclass
class SearchResult:
    """Per level (IMP) or round (CS): sparsity, the training function's metrics, wall time, masks."""

    method: str
    levels: list[LevelResult]

    @property
    def final_masks(self) -> dict[str, torch.Tensor]:
        return self.levels[-1].masks

    def to_dict(self) -> list[dict]:
        return [{"level": r.level, "sparsity": r.sparsity, "wall_time": r.wall_time, **r.metrics}
                for r in self.levels]

    def table(self) -> str:
        lines = [f"{'level':>5} | {'sparsity':>8} | {'accuracy':>8} | {'epoch time':>10} | {'level time':>10}"]
        for r in self.levels:
            acc = r.metrics.get("accuracy")
            ep = r.metrics.get("epoch_time")
            lines.append(f"{r.level:>5} | {r.sparsity:>8.2%} | {'-' if acc is None else f'{acc:.4f}':>8} | "
                         f"{'-' if ep is None else f'{ep * 1e3:.1f} ms':>10} | {r.wall_time:>8.2f} s")
        return "\n".join(lines)


def _weights_state(model: nn.Module) -> dict:
    """The model's state without its masks (what rewinding restores)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("weight_mask")}


def imp(model: nn.Module, train_fn: Callable, *, levels: int, rate: float | None = None, rewind=None,
        scope: str | None = None, exclude: Iterable[str] | str | None = None, budget: str | None = None,
        pruning: str = "magnitude", filter_fn: Callable | None = None,
        checkpoint_dir: str | os.PathLike | None = None, generator: torch.Generator | None = None,
        progress: bool = True, preset=None, granularity: str = "weight", norm: str = "l1",
        remove_channels: bool = True, shrink: bool = False, example_inputs=None) -> SearchResult:
    """Runs `levels` pruning levels after a dense level 0 and returns every level's result.

    train_fn(model, level) trains the model in place for one level (building its own optimiser) and
    returns a dict of metrics (e.g. {"accuracy": ...}) or None; it must call `level.step()` per
    optimiser step and `level.end_epoch()` per epoch when `rewind` is not 0 (the built-in
    `sparseops.tickets.Trainer` does). The model is patched first if it is not (`filter_fn` picks
    layers).

    Defaults are open_lth's (`None` takes them, or the preset's): `rate` 0.2 of the kept weights per
    level; `rewind` 0 (the initial weights), "<N>it" or "<N>ep"; every level after the rewind
    point trains from it to the end (`Level.start_iteration`; the built-in Trainer does, with the
    schedule at that step); `scope` "global"; `budget` "all": each level removes `rate` of all kept
    weights, excluded layers' included, from the prunable layers ("prunable": of the prunable
    layers' only); `exclude` names layers never pruned, "output" the output layer, None the model's
    `default_exclude` (sparseops' zoo models: open_lth's per model) or nothing. `preset` (a
    `sparseops.tickets.presets.IMPPreset`) supplies rate, rewind, scope, budget and exclude where
    they are None. `pruning="random"` removes as many weights at random instead, the same fraction
    of each prunable layer (the random-pruning baseline).

    `granularity="channel"` prunes whole filters (rows of the weight) instead, by their `norm` ("l1" or
    "l2", Li et al.'s filter pruning; `pruning="random"`: random filters, the baseline): `rate` of each
    prunable layer's kept filters (`scope` None means "layerwise", as Li et al.; "global" one threshold
    over all filters); `budget` does not apply (it counts weights) and must be None or "prunable". A
    pruned filter's channel is removed where the model's graph makes that exact (sparseops.tickets.removal:
    the readers' columns masked, its batch norm's scale and shift zeroed), else (or `remove_channels=False`)
    only its row is masked.

    `shrink=True` (channel IMP) trains each pruned level on a physically smaller copy of the model
    (`sparseops.shrink(model, example_inputs)`: the removed channels gone from every layer, batch norm,
    activation and pooling, not just skipped by the masked layers) and writes its trained parameters
    and buffers back into `model`'s kept entries. train_fn then gets that copy: it must train the model
    it is given (it raises if `model`'s own parameters changed meanwhile). The removed channels' batch
    norm statistics are not updated then (the channels are dead: no output depends on them).

    With `checkpoint_dir`, each finished level is saved (masks, trained weights, rewind weights,
    metrics, torch's, Python's and `generator`'s RNG states); calling imp again with the same directory and settings
    resumes after the last finished level and gives the same result as an uninterrupted run.
    """
    check_model(model, "tickets.imp")
    if not callable(train_fn):
        raise TypeError("sparseops.tickets.imp: train_fn must be callable as train_fn(model, level)")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"sparseops.tickets.imp: levels must be an integer >= 1, got {levels!r}")
    if preset is not None:

        if not isinstance(preset, IMPPreset):
            raise TypeError(f"sparseops.tickets.imp: preset must be an IMPPreset (sparseops.tickets.presets), "
                            f"got {type(preset).__name__}")
        rate = preset.rate if rate is None else rate
        rewind = preset.rewind if rewind is None else rewind
        if granularity == "weight":
            scope = preset.scope if scope is None else scope
            budget = preset.budget if budget is None else budget
        exclude = preset.exclude if exclude is None else exclude
    if granularity not in GRANULARITIES:
        raise ValueError(f"sparseops.tickets.imp: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "channel":
        if budget not in (None, "prunable"):
            raise ValueError(f"sparseops.tickets.imp: budget={budget!r} counts weights; granularity='channel' prunes "
                             "rate of each layer's filters (budget None or 'prunable')")
        if norm not in ("l1", "l2"):
            raise ValueError(f"sparseops.tickets.imp: norm must be 'l1' or 'l2', got {norm!r}")
        scope = "layerwise" if scope is None else scope
        budget = "prunable"
    if shrink:
        if granularity != "channel" or not remove_channels:
            raise ValueError("sparseops.tickets.imp: shrink=True needs granularity='channel' and remove_channels=True "
                             "(only removed channels are dead, and only they can be cut out)")
        if example_inputs is None:
            raise ValueError("sparseops.tickets.imp: shrink=True needs example_inputs (a batch the model accepts, to "
                             "trace its graph)")
        if any(is_dtensor(p) for p in model.parameters()):
            raise NotImplementedError("sparseops.tickets.imp: shrink=True on a model sharded by FSDP2 (DTensor "
                                      "parameters) is not supported")
        require_torch_pruning()  # (now, not after level 0's training: an ImportError naming the extra)
    rate = check_rate(0.2 if rate is None else rate, "imp")
    rewind = 0 if rewind is None else rewind
    rewind_point = parse_rewind(rewind)
    scope = "global" if scope is None else scope
    budget = check_budget("all" if budget is None else budget, "imp")
    if pruning not in PRUNINGS:
        raise ValueError(f"sparseops.tickets.imp: pruning must be one of {PRUNINGS}, got {pruning!r}")
    if scope not in SCOPES:  # checked now, not when level 1 prunes after level 0's training
        raise ValueError(f"sparseops.tickets.imp: scope must be one of {SCOPES}, got {scope!r}")
    patch(model, filter_fn=filter_fn)
    exclude = resolve_exclude(model, exclude)
    layers = prunable_layers(model, exclude, "imp")  # checks the names now, not after level 0's training
    # Channel IMP removes a pruned filter's channel where that is exact (its readers' columns, its batch norm)
    removable = removable_layers(model, list(layers), exclude) if granularity == "channel" and remove_channels else {}
    config = {"levels": levels, "rate": rate, "rewind": list(rewind_point), "scope": scope,
              "exclude": sorted(exclude), "budget": budget, "pruning": pruning, "layers": sorted(get_masks(model))}
    if granularity != "weight":  # (absent for weights: checkpoints written before the option still resume)
        config.update(granularity=granularity, norm=norm, removed_channels=sorted(removable))

    results: list[LevelResult] = []
    rewind_state, start_point = None, (0, 0, 0)
    start = 0
    if checkpoint_dir is not None:
        if any(is_dtensor(p) for p in model.parameters()):
            raise NotImplementedError("sparseops.tickets.imp: checkpoint_dir on a model sharded by FSDP2 (DTensor "
                                      "parameters) is not supported: each rank holds only its shards")
        os.makedirs(checkpoint_dir, exist_ok=True)
        results, rewind_state, start_point = _resume(model, checkpoint_dir, config, generator)
        start = len(results)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=levels + 1, initial=start, desc=f"IMP ({pruning})", unit="level")
    for index in range(start, levels + 1):
        if index > 0:
            if granularity == "channel":
                masks = with_readers(channel_masks(model, rate, norm=norm, scope=scope, exclude=exclude)
                                     if pruning == "magnitude" else
                                     random_channel_masks(model, rate, exclude=exclude, generator=generator), removable)
            elif pruning == "magnitude":
                masks = magnitude_masks(model, rate, scope=scope, exclude=exclude, budget=budget)
            else:
                masks = random_masks(model, rate, exclude=exclude, generator=generator, budget=budget)
            check_masks(masks, "tickets.imp")  # DDP/FSDP2: every rank must prune alike (nothing when alone)
            model.load_state_dict(rewind_state)  # masks are not in it: the current ones stay ...
            set_masks(model, masks)  # ... until this
            zero_removed(model, masks, removable)  # (the rewound batch norms of removed channels)
        sparsity = sparsity_report(model).sparsity
        saved = {}

        def save_rewind(point=(0, 0, 0)):
            saved["state"], saved["point"] = _weights_state(model), tuple(point)

        if index == 0 and rewind_point[0] == 0:
            save_rewind()
        level = Level(index, sparsity, rewind_point, save_rewind if index == 0 and not saved else None,
                      start=(0, 0, 0) if index == 0 else start_point)
        t0 = time.perf_counter()
        metrics = train_fn(model, level) if not (shrink and index > 0) else _train_shrunk(model, train_fn, level,
                                                                                         example_inputs)
        wall = time.perf_counter() - t0
        if index == 0:
            if "state" not in saved:
                raise RuntimeError(f"sparseops.tickets.imp: level 0 ended before the rewind point {rewind!r} "
                                   f"(train_fn reported {level.iteration} steps and {level.epoch} epochs through "
                                   "level.step() / level.end_epoch())")
            rewind_state, start_point = saved["state"], saved["point"]
        if metrics is not None and not isinstance(metrics, dict):
            raise TypeError(f"sparseops.tickets.imp: train_fn must return a dict of metrics or None, "
                            f"got {type(metrics).__name__}")
        result = LevelResult(index, sparsity, dict(metrics or {}), wall, get_masks(model))
        results.append(result)
        if checkpoint_dir is not None:
            save_checkpoint({"config": config, "level": index, "sparsity": sparsity, "metrics": result.metrics,
                   "wall_time": wall, "masks": result.masks, "state": _weights_state(model),
                   "rewind": rewind_state if index == 0 else None,
                   "rewind_point": list(start_point) if index == 0 else None, "torch_rng": torch.get_rng_state(),
                   "python_rng": random.getstate(),
                   "generator_rng": None if generator is None else generator.get_state()},
                  os.path.join(checkpoint_dir, f"level_{index:03d}.pt"))
        if bar is not None:
            acc = result.metrics.get("accuracy")
            bar.set_postfix(sparsity=f"{sparsity:.1%}", **({} if acc is None else {"acc": f"{acc:.3f}"}))
            bar.update()
    if bar is not None:
        bar.close()
    return SearchResult("imp" if pruning == "magnitude" else "random", results)


def _train_shrunk(model: nn.Module, train_fn: Callable, level, example_inputs):
    """train_fn on the shrunk model, its result written back into `model` (imp's shrink=True)."""
    with warnings.catch_warnings():  # (channels of layers whose readers are excluded stay, by design)
        warnings.filterwarnings("ignore", message="sparseops.shrink: kept")
        small, cuts = shrink_mapped(model, example_inputs)
    versions = [p._version for p in model.parameters()]
    metrics = train_fn(small, level)
    if versions != [p._version for p in model.parameters()]:
        raise RuntimeError("sparseops.tickets.imp: with shrink=True, train_fn must train the model it is given (a "
                           "smaller copy), but the full model's parameters changed (an optimiser over them?)")
    write_back(model, small, cuts)
    return metrics


def _resume(model, checkpoint_dir, config, generator):
    checkpoints = read_checkpoints(checkpoint_dir, "level", config, "imp", "IMP level checkpoint", _KEYS)
    results = [LevelResult(ck["level"], ck["sparsity"], ck["metrics"], ck["wall_time"], ck["masks"])
               for ck in checkpoints]
    rewind_state, point = (checkpoints[0]["rewind"], tuple(checkpoints[0]["rewind_point"])) if checkpoints \
        else (None, (0, 0, 0))
    if checkpoints:
        last = checkpoints[-1]
        set_masks(model, last["masks"])
        model.load_state_dict(last["state"])
        torch.set_rng_state(last["torch_rng"])
        random.setstate(python_rng_state(last["python_rng"]))
        if generator is not None and last.get("generator_rng") is not None:  # random pruning's draws go on
            generator.set_state(last["generator_rng"])
    return results, rewind_state, point


_KEYS = ("config", "level", "sparsity", "metrics", "wall_time", "masks", "state", "rewind", "rewind_point",
         "torch_rng", "python_rng")


def total_levels_for(sparsity: float, rate: float = 0.2) -> int:
    """How many levels pruning `rate` per level takes to reach `sparsity` (e.g. 0.9 at 0.2 -> 11)."""
    return math.ceil(math.log(1 - sparsity) / math.log(1 - rate))
