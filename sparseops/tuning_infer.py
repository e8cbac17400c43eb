"""What `auto` infers for a key from the measurements of the same call at other densities and batch
sizes (sparseops.tuning): a winner without measuring, or fewer candidates to measure."""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence

# The implementations that compute densely: a mask denser than one where they won makes them win again.
DENSE_PATHS = frozenset({"dense", "mask_multiply", "unmasked", "reference", "unfused"})


def split(k: str) -> tuple[str, float]:
    """(the key without its density bucket, the bucket)."""
    prefix, bucket = k.rsplit("|", 1)
    return prefix, float(bucket.removeprefix("d<="))


def inferred(k: str, live: Sequence[str], entries: dict) -> tuple[str | None, list[str]]:
    """What the same call at other densities says, as a winner or fewer candidates. Time grows with
    density for the sparse paths and not for the dense ones: where dense won at a sparser mask it
    wins here; where a sparse path beat dense clearly at a denser mask, dense cannot win here."""
    prefix, bucket = split(k)
    keep = list(live)
    trained = entries.get(k.replace(":infer|", "|", 1)) if ":infer|" in k else None
    if trained and trained.get("winner") in live:  # an evaluation pass runs what its training measured
        return trained["winner"], keep
    batchless = without_batch(k.replace(":infer|", "|", 1))
    for other, e in entries.items():  # another batch size of this layer (a last, partial batch)
        if e.get("winner") in live and without_batch(other.replace(":infer|", "|", 1)) == batchless:
            return e["winner"], keep
    if all(c in DENSE_PATHS for c in live):  # which dense path is faster does not depend on the mask
        for other, e in entries.items():
            times = e.get("times_ms", {})
            if "|d<=" in other and split(other)[0] == prefix and all(c in times for c in live):
                return min(live, key=times.get), keep
    for other, e in entries.items():
        p2, b2 = split(other) if "|d<=" in other else (None, 0.0)
        if p2 != prefix or e.get("winner") not in live:
            continue
        times = e.get("times_ms", {})
        dense_best = min((t for i, t in times.items() if i in DENSE_PATHS), default=None)
        if b2 < bucket and e["winner"] in DENSE_PATHS:
            return e["winner"], keep
        if b2 > bucket and e["winner"] not in DENSE_PATHS and dense_best is not None \
                and times.get(e["winner"], dense_best) <= 0.8 * dense_best:
            keep = [c for c in keep if c not in DENSE_PATHS]
    return None, _undominated(prefix, bucket, keep, entries)


# Implementations of one kind keep their order across densities (the dense paths do the same work
# at any density; the sparse ones all scale with the kept weights): one that lost to another of its
# kind by this margin at the nearest density timed with both is not timed again. (The dense paths:
# any margin, their race is the same at every density; it cost 5-10 ms per density of the demo's
# 2048x2048 layer when a 15% margin kept them racing.)
_DOMINATED = {True: 1.0, False: 1.4}


def _undominated(prefix: str, bucket: float, keep: list[str], entries: dict) -> list[str]:
    for dense_kind, margin in _DOMINATED.items():
        kind = [c for c in keep if (c in DENSE_PATHS) == dense_kind]
        if len(kind) < 2:
            continue
        timed = [(abs(math.log(b / bucket)), e["times_ms"]) for other, e in entries.items() if "|d<=" in other
                 for p, b in [split(other)] if p == prefix and all(c in e.get("times_ms", {}) for c in kind)]
        if timed:
            times = min(timed, key=lambda t: t[0])[1]
            best = min(times[c] for c in kind)
            keep = [c for c in keep if c not in kind or times[c] <= margin * best]
    return keep


def without_batch(k: str) -> str:
    """The key without its first problem size (the batch rows)."""
    parts = k.split("|")
    if len(parts) >= 4:
        parts[3] = parts[3].partition("x")[2]
    return "|".join(parts)


@functools.lru_cache(maxsize=4096)  # (a regex on every call's key otherwise: `pick` asks it 1-3 times a call)
def layer(k: str) -> str:
    """The guard's key: the layer without its density, batch and channel-work bucket (a kernel right for
    one is right for all)."""
    return re.sub(r"xc\d+$", "", without_batch(split(k)[0].replace(":infer", "", 1) if "|d<=" in k else k))
