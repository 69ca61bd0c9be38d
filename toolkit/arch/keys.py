"""Checkpoint key names as transformers 5 renames them on load.

``save_pretrained`` writes some families under their historical names (GPT-NeoX's
``embed_out`` for the model's ``lm_head``) and ``from_pretrained`` renames them back
through the model's registered weight conversions. :func:`tshrink.checkpoint.load_pruned`
reads the tensors itself (the shapes are the pruned ones), so it applies the same renames.
"""
from __future__ import annotations

import torch
from torch import nn


def rename_checkpoint_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with its keys renamed as ``from_pretrained`` would for ``model`` (plain
    renames only; a key that is already one of the model's keeps its name)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # a transformers without weight conversions: names are as saved
        return state
    renames = [t for t in get_model_conversion_mapping(model) if type(t) is WeightRenaming]
    if not renames:
        return state
    own = set(model.state_dict())
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new = key
        if key not in own:
            for t in renames:
                new, _ = t.rename_source_key(new)
        out[new] = tensor
    return out
