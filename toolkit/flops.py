"""FLOPs measured with fvcore, for reporting next to the analytic cost model.

fvcore skips ``aten::scaled_dot_product_attention`` by default, so a handle is registered
here; like every fvcore handle it counts one multiply-add as one flop. Only the backbone
(no task head) is traced, with ``use_cache=False`` and tuple outputs so that
``torch.jit.trace`` accepts the model.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for aten::scaled_dot_product_attention: QK^T plus attention x V."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(inputs[i]) for i in range(3))
    batch_heads = math.prod(q[:-2])  # (batch, query heads)
    return batch_heads * q[-2] * k[-2] * q[-1] + batch_heads * q[-2] * k[-2] * v[-1]


class _Backbone(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # (batch, seq, hidden); no KV cache object, which torch.jit.trace cannot return
        kwargs = {"use_cache": False} if hasattr(self.backbone.config, "use_cache") else {}
        return self.backbone(input_ids=input_ids, return_dict=False, **kwargs)[0]


def measure_flops(model: nn.Module, seq_len: int, *, batch_size: int = 1) -> dict[str, Any]:
    """fvcore FLOPs (1 multiply-add = 1 flop) of the model's backbone on one batch.

    Returns ``{"total": int, "per_sequence": int, "by_operator": {...}, "convention": str}``.
    """
    from fvcore.nn import FlopCountAnalysis

    from .arch.families import get_adapter

    backbone = get_adapter(model).backbone()
    param = next(backbone.parameters())
    vocab = int(getattr(backbone.config, "vocab_size", 2))
    ids = torch.arange(batch_size * seq_len, device=param.device).reshape(batch_size, seq_len) % vocab
    was_training = backbone.training
    backbone.eval()
    # mixture-of-experts: fvcore counts the eager per-expert matmuls (what runs for this input's
    # routing), not the fused grouped_mm kernels, so the experts run eagerly while traced
    cfg = backbone.config
    experts_impl = getattr(cfg, "_experts_implementation", None)
    moe = experts_impl not in (None, "eager") and any(hasattr(m, "gate_up_proj") and hasattr(m, "down_proj")
                                                      for m in backbone.modules())
    if moe:
        cfg._experts_implementation = "eager"
    try:
        with torch.no_grad():
            fa = FlopCountAnalysis(_Backbone(backbone), (ids,))
            fa.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
            fa.unsupported_ops_warnings(False)
            fa.uncalled_modules_warnings(False)
            total = int(fa.total())
            by_op = {k: int(v) for k, v in sorted(fa.by_operator().items())}
    finally:
        backbone.train(was_training)
        if moe:
            cfg._experts_implementation = experts_impl
    return {
        "total": total,
        "per_sequence": total // batch_size,
        "by_operator": by_op,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "convention": "fvcore: 1 multiply-add = 1 FLOP",
    }
