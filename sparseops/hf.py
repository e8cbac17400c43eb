"""Hugging Face transformers: a patched model back from a `save_pretrained` folder or a Trainer
checkpoint (`checkpoint-N`), masks included.

`model.save_pretrained(folder)` of a patched model stores every layer's `weight` (all its values,
pruned entries too) and `weight_mask` (or `weight_score` for soft layers), and `patch` records
`config.sparseops` so the folder says it holds masks. transformers' own `from_pretrained` treats
the mask keys as unexpected and ignorable and gives a dense model with the pruned weights' stale
values; `sparseops.patch` refuses such a model (it would pass for the pruned one).
`sparseops.hf.from_pretrained(cls, folder)` is the path that restores the patched model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .patch import CONFIG_KEY, patch

_OURS = (".weight_mask", ".weight_score")  # the keys sparseops adds to a layer's state dict
_FILES = (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin"))


def _read(path: Path, keys=None) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keys is None or k in keys}
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if keys is None or k in keys}


def saved_masks(folder) -> dict[str, torch.Tensor]:
    """The sparseops tensors (`*.weight_mask`, `*.weight_score`) of a save_pretrained folder or
    Trainer checkpoint: model.safetensors, pytorch_model.bin, or their sharded index."""
    folder = Path(folder)
    for index, single in _FILES:
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            ours = {k: f for k, f in weight_map.items() if k.endswith(_OURS)}
            out = {}
            for file in sorted(set(ours.values())):
                out.update(_read(folder / file, {k for k, f in ours.items() if f == file}))
            return out
        if (folder / single).is_file():
            return {k: v for k, v in _read(folder / single).items() if k.endswith(_OURS)}
    raise FileNotFoundError(f"sparseops.hf.from_pretrained: no model weights (model.safetensors, pytorch_model.bin "
                            f"or their index) in {folder}")


def from_pretrained(cls, folder, *, mode: str | None = None, on_unsupported: str = "ignore", **kwargs):
    """`cls.from_pretrained(folder, **kwargs)`, patched, with the folder's masks (or soft scores).

    `cls` is the transformers model class (`BertForSequenceClassification`, `AutoModelForCausalLM`,
    ...); `folder` a local `save_pretrained` folder or a Trainer `checkpoint-N` folder. `mode` is the
    folder's (`config.sparseops`, else soft when it holds `weight_score` keys, else "mask");
    `on_unsupported` is passed to `patch` (embeddings and tied heads stay unpatched, as when saved).
    Soft layers get their scores; beta, ticket mode and s0 are not in these folders (tensor-only
    formats): set them after loading. A folder without masks gives all-ones masks.
    """
    ours = saved_masks(folder)
    # Only our keys are silenced in transformers' load report (it lists them as unexpected otherwise);
    # a subclass for the call because transformers reads the patterns from the class at construction
    # (an Auto class builds another class: the report then lists them, and the load is the same).
    ignore = [*(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or []), r"\.weight_mask$", r"\.weight_score$"]
    quiet = type(cls.__name__, (cls,), {"_keys_to_ignore_on_load_unexpected": ignore, "__module__": cls.__module__})
    model = quiet.from_pretrained(folder, **kwargs)
    if type(model) is quiet:
        model.__class__ = cls
    if isinstance(getattr(model, "_keys_to_ignore_on_load_unexpected", None), set):  # post_init's copy
        model._keys_to_ignore_on_load_unexpected -= set(ignore[-2:])
    record = getattr(model.config, CONFIG_KEY, None)
    if record is not None:
        delattr(model.config, CONFIG_KEY)  # this load restores the masks: patch must not refuse it
    if mode is None:
        saved_mode = record.get("mode") if isinstance(record, dict) else None
        mode = saved_mode or ("soft" if any(k.endswith(".weight_score") for k in ours) else "mask")
    patch(model, mode=mode, on_unsupported=on_unsupported)
    result = model.load_state_dict(ours, strict=False)  # copied onto each layer's device
    if result.unexpected_keys:
        raise ValueError(f"sparseops.hf.from_pretrained: {folder} holds masks for layers this model does not patch "
                         f"in mode {mode!r}: {sorted(result.unexpected_keys)[:5]}")
    return model
