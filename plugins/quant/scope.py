"""Which Linear weights a quantization scope covers, found by walking the modules by name.

Transform stages must also work on architectures the pruning adapters do not know (Marian,
BART, T5), so the weights are not taken from the adapter. Rule:

* only ``nn.Linear`` modules *inside a transformer layer* count: their dotted name has a
  numeric component (``encoder.layer.3...``, ``model.layers.0...``, ``decoder.block.1...``).
  Embeddings, ``lm_head``, poolers and task heads sit outside the layer lists and are never
  quantized;
* the part of the name after the first numeric component decides the role. A component
  that names cross-attention (``encoder_attn``, ``crossattention``, ``cross_attn``,
  ``EncDecAttention``) makes it ``"cross"``; otherwise a component containing ``attn`` or
  ``attention`` makes it ``"self"`` (BERT's ``attention.self.query`` and
  ``attention.output.dense``, DistilBERT's ``attention.q_lin``, Llama's ``self_attn``);
  everything else is ``"mlp"`` (BERT ``intermediate.dense`` / ``output.dense``, DistilBERT
  ``ffn``, Llama ``mlp``, Marian ``fc1`` / ``fc2``, T5 ``DenseReluDense``).

Scopes: ``"attention"`` = self-attention only (cross-attention excluded), ``"mlp"``,
``"all"`` = every Linear in the layers (self, cross and MLP). Empty weights (an attention
block whose every head was pruned) are skipped; a weight shared by several modules is
listed once.
"""
from __future__ import annotations

from torch import nn

SCOPES = ("all", "attention", "mlp")
ROLES = {"all": ("self", "cross", "mlp"), "attention": ("self",), "mlp": ("mlp",)}
_CROSS = ("encoder_attn", "crossattention", "cross_attn", "encdecattention")


def role(name: str) -> str | None:
    """``"self"``, ``"cross"`` or ``"mlp"`` for a Linear's dotted module name; ``None``
    when the module is not inside a transformer layer (no numeric name component)."""
    parts = name.split(".")
    first = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    if first is None:
        return None
    inner = [p.lower() for p in parts[first + 1:]]
    if any(c in p for p in inner for c in _CROSS):
        return "cross"
    if any("attn" in p or "attention" in p for p in inner):
        return "self"
    return "mlp"


def scope_linears(model: nn.Module, scope: str) -> list[tuple[str, nn.Linear]]:
    """``(parameter name of the weight, module)`` for every Linear in ``scope``, in module order.

    The name is the weight's key in ``model.state_dict()`` (``<module name>.weight``).
    """
    if scope not in SCOPES:
        raise ValueError(f"quant_scope must be one of {SCOPES}, got {scope!r}")
    wanted = ROLES[scope]
    seen: set[int] = set()
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or role(name) not in wanted:
            continue
        if module.weight.numel() == 0 or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        out.append((f"{name}.weight", module))
    if not out:
        raise ValueError(f"quant_scope={scope!r} selects no Linear weight inside the transformer layers of "
                         f"{type(model).__name__}; nothing to quantize")
    return out
