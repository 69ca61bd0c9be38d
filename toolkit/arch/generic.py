"""A decoder adapter found from module names, for families without their own adapter.

Many decoders follow one layout: the backbone holds a ``layers`` list (or ``h``), each layer
an attention module (``self_attn`` / ``attention`` / ``attn``) with ``q_proj``, ``k_proj``,
``v_proj`` and ``o_proj`` Linears (grouped-query or not) and an MLP (``mlp`` /
``feed_forward``) with ``gate_proj``/``up_proj``/``down_proj`` (or ``w1``/``w3``/``w2``) or
``up_proj``/``down_proj`` (or ``fc1``/``fc2``). :func:`generic_adapter` builds an adapter
for such a model, warns that it is not a reviewed family, and checks it once per model by
the test every reviewed family passes: on a copy of the first prunable layer (random weights, so it
works on an uninitialised model too), keeping half of the units through masks and through
physical removal must give the same output. A model that fails is refused with the reason.
The cost model is the generic one (LayerNorms counted, RMSNorms not) and is not checked
against fvcore at run time.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .base import Adapter, AttnParts, EmptyAttention, MlpParts

LAYER_LISTS = ("layers", "h", "blocks")
ATTENTION = ("self_attn", "attention", "attn")
QKVO = (("q_proj", "k_proj", "v_proj", "o_proj"),)
MLPS = ("mlp", "feed_forward")
GATED = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))  # (gate, up, down)
PLAIN = (("up_proj", "down_proj"), ("fc1", "fc2"), ("c_fc", "c_proj"))  # (up, down)
CHECKED = "_tshrink_generic_checked"


class GenericDecoderAdapter(Adapter):
    family = "generic"
    causal = True

    def __init__(self, model: nn.Module, names: dict[str, object]) -> None:
        super().__init__(model)
        self.names = names
        self.gated_mlp = len(names["mlp_parts"]) == 3
        self._layers: nn.ModuleList | None = None

    def layers(self) -> nn.ModuleList:
        if self._layers is not None:
            return self._layers
        return getattr(self.backbone(), self.names["layers"])

    def _dims(self) -> tuple[int, int]:
        c = self.config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return head_dim, heads // (getattr(c, "num_key_value_heads", None) or heads)

    def attn(self, layer: int) -> AttnParts:
        a = getattr(self.layers()[layer], self.names["attn"])
        q, k, v, o = self.names["qkvo"]
        d, g = self._dims()
        if isinstance(a, EmptyAttention):
            return AttnParts(None, None, None, getattr(a, o), d, g)
        q, k, v, o = (getattr(a, n) for n in (q, k, v, o))
        return AttnParts(q, k, v, o, d, q.out_features // max(k.out_features, 1))

    def mlp(self, layer: int) -> MlpParts:
        m = getattr(self.layers()[layer], self.names["mlp"])
        *inputs, out = (getattr(m, n) for n in self.names["mlp_parts"])
        return MlpParts(list(inputs), out)

    def empty_attention(self, layer: int) -> None:
        block = self.layers()[layer]
        o = self.names["qkvo"][3]
        setattr(block, self.names["attn"], EmptyAttention(getattr(getattr(block, self.names["attn"]), o), o))

    def update_attn_attrs(self, layer: int, units: int) -> None:
        a = getattr(self.layers()[layer], self.names["attn"])
        if isinstance(a, EmptyAttention):
            return
        g = self.attn(layer).group
        for attr, value in (("num_heads", units * g), ("num_attention_heads", units * g),
                            ("num_key_value_heads", units), ("num_key_value_groups", g)):
            if isinstance(getattr(a, attr, None), int):
                setattr(a, attr, value)

    def norm_macs_per_token(self) -> tuple[int, int]:
        layer = self.layers()[0]
        inside = sum(isinstance(m, nn.LayerNorm) for m in layer.modules())
        total = sum(isinstance(m, nn.LayerNorm) for m in self.backbone().modules())
        per_layer = inside * 5 * self.hidden_size
        return per_layer, (total - inside * self.num_layers) * 5 * self.hidden_size


def _find_names(model: nn.Module) -> dict[str, object] | str:
    """The module names of the common decoder layout, or why the model does not have it."""
    backbone = getattr(model, "base_model", model)
    config = getattr(model, "config", None)
    for attr in ("num_attention_heads", "hidden_size"):
        if not isinstance(getattr(config, attr, None), int):
            return f"its config has no integer {attr!r}"
    lists = [n for n in LAYER_LISTS if isinstance(getattr(backbone, n, None), nn.ModuleList)]
    if not lists:
        return f"its backbone {type(backbone).__name__} has no layer list named {' / '.join(LAYER_LISTS)}"
    layers = getattr(backbone, lists[0])
    # a layer whose attention is still there (pruned models may have lost some)
    first = next((la for la in layers if not any(isinstance(getattr(la, n, None), EmptyAttention) for n in ATTENTION)),
                 layers[0])
    attn = next((n for n in ATTENTION if isinstance(getattr(first, n, None), nn.Module)), None)
    if attn is None:
        return f"its layers ({type(first).__name__}) have no attention module named {' / '.join(ATTENTION)}"
    a = getattr(first, attn)
    qkvo = next((names for names in QKVO if all(isinstance(getattr(a, n, None), nn.Linear) for n in names)), None)
    if qkvo is None:
        return f"its attention ({type(a).__name__}) has no separate q_proj/k_proj/v_proj/o_proj Linears"
    mlp = next((n for n in MLPS if isinstance(getattr(first, n, None), nn.Module)), None)
    if mlp is None:
        return f"its layers have no MLP module named {' / '.join(MLPS)}"
    m = getattr(first, mlp)
    parts = next((names for names in GATED + PLAIN if all(isinstance(getattr(m, n, None), nn.Linear) for n in names)),
                 None)
    if parts is None:
        return (f"its MLP ({type(m).__name__}) has none of the Linear sets "
                f"{', '.join('/'.join(p) for p in GATED + PLAIN)} (mixture-of-experts or fused weights)")
    for i, layer in enumerate(layers):
        la, lm = getattr(layer, attn, None), getattr(layer, mlp, None)
        if isinstance(la, EmptyAttention):
            la = a
        if la is None or lm is None or type(la) is not type(a) or type(lm) is not type(m):
            return f"layer {i} is not built like layer {layers.index(first) if first in layers else 0}"
    return {"layers": lists[0], "attn": attn, "qkvo": qkvo, "mlp": mlp, "mlp_parts": parts}


def _check(adapter: GenericDecoderAdapter) -> str | None:
    """Masked == physically pruned on a randomised copy of layer 0; None when it holds."""
    from ..calibration import CalibrationData, LayerStream
    from ..masking import soft_masks
    from ..surgery import prune_heads, prune_neurons

    param = next(adapter.model.parameters())
    d, g = adapter._dims()
    at = next((i for i in range(adapter.num_layers) if adapter.attn(i).units and adapter.mlp(i).neurons), None)
    if at is None:
        return None  # nothing left to prune in any layer (a checkpoint pruned before)
    try:
        p, m = adapter.attn(at), adapter.mlp(at)
        c = adapter.config
        if p.q.out_features != p.units * p.group * d or p.k.out_features != p.units * d:
            return (f"q_proj/k_proj widths ({p.q.out_features}/{p.k.out_features}) do not match "
                    f"{c.num_attention_heads} heads x head_dim {d} with groups of {g}")
        vocab = int(getattr(c, "vocab_size", 2) or 2)
        ids = (torch.arange(8, device=param.device) % vocab).reshape(1, 8)
        calib = CalibrationData([{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], source="check")
        stream = LayerStream(adapter, calib)
        kind = stream._kind[at]
        args, kwargs = stream._layer_args[kind][0], stream._layer_kwargs[kind][0]
        hidden = torch.randn(stream.hidden[0].shape, generator=torch.Generator().manual_seed(0))
        hidden = hidden.to(param.device, param.dtype)
        layer = copy.deepcopy(adapter.layers()[at])
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for t in layer.parameters():
                t.copy_(torch.randn(t.shape, generator=gen) * (0.2 if t.dim() > 1 else 1.0))
        sub = copy.copy(adapter)
        sub._layers = nn.ModuleList([layer])
        units, neurons = p.units, m.neurons
        keep_h = list(range(0, units, 2)) if units > 1 else [0]
        keep_n = list(range(0, neurons, 2))
        hm = torch.zeros(units)
        hm[keep_h] = 1
        nm = torch.zeros(neurons)
        nm[keep_n] = 1

        def run() -> torch.Tensor:
            with torch.no_grad():
                out = layer(hidden, *args, **kwargs)
            return (out[0] if isinstance(out, tuple) else out).float()

        dense = run()
        with soft_masks(sub, [hm], [nm]):
            masked = run()
        prune_heads(sub, 0, keep_h)
        prune_neurons(sub, 0, keep_n)
        pruned = run()
    except Exception as err:  # noqa: BLE001 - any failure means the layout is not what it looks like
        return f"the masked-vs-pruned check on layer {at} raised {type(err).__name__}: {err}"
    tol = 1e-4 if param.dtype == torch.float32 else 2e-2
    scale = masked.norm().clamp_min(1e-12)
    if (masked - dense).norm() <= tol * scale:
        return "masking the output / down projections' inputs did not change the layer's output"
    err = float((pruned - masked).norm() / scale)
    if err > tol:
        return f"the physically pruned layer {at} differs from the masked one (relative error {err:.2e})"
    return None


def generic_adapter(model: nn.Module) -> GenericDecoderAdapter | str:
    """A checked generic adapter for ``model``, or the reason there is none."""
    names = _find_names(model)
    if isinstance(names, str):
        return names
    adapter = GenericDecoderAdapter(model, names)
    state = getattr(model, CHECKED, None)
    if state is None:
        state = _check(adapter) or "ok"
        object.__setattr__(model, CHECKED, state)  # once per model object, not a parameter or buffer
        if state == "ok":
            warnings.warn(
                f"{model.config.model_type!r} has no reviewed tshrink adapter; using the generic decoder adapter "
                f"built from its module names ({names['attn']}.{'/'.join(names['qkvo'])}, "
                f"{names['mlp']}.{'/'.join(names['mlp_parts'])}). It passed the masked-vs-pruned check on layer 0; "
                "its FLOPs model is not checked against fvcore.", UserWarning, stacklevel=3)
    return adapter if state == "ok" else state
