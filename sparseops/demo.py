"""`make demo`: a masked MLP trained on scikit-learn's digits at a few sparsities, timed with the
usual mask multiplication (torch.nn.utils.prune) and with sparseops, same init, same masks."""
from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from .nn import MaskedLinear


def load_digits_tensors(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    f = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return f(x_tr), torch.tensor(y_tr), f(x_te), torch.tensor(y_te)


def mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def magnitude_masks(model: nn.Module, sparsity: float, layers=("2",)) -> dict[str, torch.Tensor]:
    """Magnitude pruning of the named layers (by default the hidden x hidden one, which holds
    nearly all weights and time; the 64-wide input and 10-wide output layers stay dense):
    keep the largest (1 - sparsity) fraction of each weight."""
    masks = {}
    for name, mod in model.named_modules():
        if name in layers:
            w = mod.weight.detach().abs().flatten()
            keep = max(1, round(w.numel() * (1 - sparsity)))
            mask = torch.zeros_like(w, dtype=torch.bool)
            mask[w.topk(keep).indices] = True
            masks[name] = mask.view_as(mod.weight)
    return masks


def with_prune(model, masks):
    import torch.nn.utils.prune as prune

    for name, mod in model.named_modules():
        if name in masks:
            prune.custom_from_mask(mod, "weight", masks[name])
    return model


def with_sparseops(model, masks):
    for name, mod in list(model.named_modules()):
        if name in masks:
            model[int(name)] = MaskedLinear.from_linear(mod, masks[name])
    return model


def train(model, data, epochs: int, batch_size: int, seed: int):
    x_tr, y_tr, x_te, y_te = data
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(epochs):
        order = torch.randperm(len(x_tr), generator=gen)
        t0 = time.perf_counter()
        model.train()
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    return acc, statistics.median(times[1:] or times)  # the first epoch includes warm-up


def run(sparsities=(0.0, 0.9, 0.95, 0.98, 0.99), epochs: int = 8, hidden: int = 2048, batch_size: int = 128,
        seed: int = 0, out=print):
    from tqdm import tqdm

    data = load_digits_tensors(seed)
    out(f"digits: {len(data[0])} train / {len(data[2])} test images; MLP 64-{hidden}-{hidden}-10 with the "
        f"{hidden}x{hidden} layer pruned by magnitude at init; "
        f"{epochs} epochs, batch {batch_size}, {torch.get_num_threads()} threads")
    rows = []
    for sparsity in tqdm(sparsities, desc="sparsities", leave=False):
        torch.manual_seed(seed)
        base = mlp(hidden)
        masks = magnitude_masks(base, sparsity)
        results = {}
        for label, wrap in (("mask multiply", with_prune), ("sparseops", with_sparseops)):
            model = wrap(copy.deepcopy(base), {k: v.clone() for k, v in masks.items()})
            results[label] = train(model, data, epochs, batch_size, seed)
        rows.append((sparsity, results))
    out(f"{'sparsity':>8} | {'acc (mask mult.)':>16} | {'acc (sparseops)':>15} | "
        f"{'epoch (mask mult.)':>18} | {'epoch (sparseops)':>17} | speed-up")
    for sparsity, r in rows:
        (a0, t0), (a1, t1) = r["mask multiply"], r["sparseops"]
        out(f"{sparsity:>8.2%} | {a0:>16.3f} | {a1:>15.3f} | {t0 * 1e3:>15.1f} ms | {t1 * 1e3:>14.1f} ms | "
            f"{t0 / t1:>6.2f}x")
    return rows
