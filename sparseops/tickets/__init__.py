"""Lottery-ticket search on sparseops' kernels: IMP with rewinding (per weight or per filter), Continuous
Sparsification and its structured variant, pruning rules, baselines, mask tools, and presets of the
upstream runs (`tickets.presets`)."""
from . import presets
from .baselines import random_ticket, reinitialize
from .cs import continuous_sparsification
from .files import TicketFileError
from .gating import apply_gates, get_gates, random_gates
from .imp import Level, LevelResult, SearchResult, imp, total_levels_for
from .masks import (SparsityReport, Ticket, difference, get_masks, intersection, overlap, set_masks,
                    sparsity_report, union)
from .presets import official_layers
from .pruning import channel_masks, magnitude_masks, random_channel_masks, random_masks, score_masks
from .structured_cs import structured_cs
from .train import Trainer, evaluate
from . import zoo  # noqa: E402  (small models and the digits data; scikit-learn is imported on use)

__all__ = [
    "Level", "LevelResult", "SearchResult", "SparsityReport", "Ticket", "TicketFileError", "Trainer", "apply_gates",
    "channel_masks", "continuous_sparsification", "difference", "evaluate", "get_gates", "get_masks", "imp",
    "intersection", "magnitude_masks", "official_layers", "overlap", "presets", "random_channel_masks", "random_gates",
    "random_masks", "random_ticket", "reinitialize", "score_masks", "set_masks", "sparsity_report", "structured_cs",
    "total_levels_for", "union", "zoo",
]
