"""Lottery-ticket search on sparseops' kernels: IMP with rewinding, Continuous Sparsification,
pruning rules, baselines, mask tools, and presets of the upstream runs (`tickets.presets`)."""
from . import presets
from .baselines import random_ticket, reinitialize
from .cs import continuous_sparsification
from .files import TicketFileError
from .imp import Level, LevelResult, SearchResult, imp, total_levels_for
from .masks import (SparsityReport, Ticket, difference, get_masks, intersection, overlap, set_masks,
                    sparsity_report, union)
from .presets import official_layers
from .pruning import magnitude_masks, random_masks, score_masks
from .train import Trainer, evaluate
from . import zoo  # noqa: E402  (small models and the digits data; scikit-learn is imported on use)

__all__ = [
    "Level", "LevelResult", "SearchResult", "SparsityReport", "Ticket", "TicketFileError", "Trainer", "continuous_sparsification",
    "difference", "evaluate", "get_masks", "imp", "intersection", "magnitude_masks", "official_layers", "overlap",
    "presets", "random_masks", "random_ticket", "reinitialize", "score_masks", "set_masks", "sparsity_report",
    "total_levels_for", "union", "zoo",
]
