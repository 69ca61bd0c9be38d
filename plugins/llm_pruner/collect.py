"""Loss gradients of the layer weights for LLM-Pruner's Taylor importance.

For every calibration batch the language-modelling loss ``model(**batch).loss`` (mean
next-token loss) is differentiated w.r.t. the Q/K/V/O and gate/up/down weights of every
layer; the sum of the per-batch gradients (the gradient of the summed loss, as one
``loss.backward()`` over the calibration batch in the reference code) and the sum of their
squares (``acc_grad``) are kept, both float32 on the CPU. The whole model is
differentiated at once, as the reference code does: memory grows with the model (the
limitation this baseline has at 70B); the model's weights are not changed.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tshrink.arch.base import Adapter
from tshrink.calibration import CalibrationData, model_inputs, to_device


def layer_linears(adapter: Adapter, layer: int) -> dict[str, torch.nn.Linear]:
    a, m = adapter.attn(layer), adapter.mlp(layer)
    out = {"o": a.o, "down": m.out}
    if a.q is not None:
        out.update(q=a.q, k=a.k, v=a.v)
    out.update({f"in{i}": lin for i, lin in enumerate(m.inputs)})
    return out


def collect_weight_grads(adapter: Adapter, calib: CalibrationData, *, device: torch.device | str | None = None,
                         ) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    """(grads, acc): per layer, per Linear name (q, k, v, o, in0.., down) the summed gradient
    and the summed squared gradient over calibration batches (each a weight-shaped tensor)."""
    model = adapter.model
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    linears = [layer_linears(adapter, layer) for layer in range(adapter.num_layers)]
    flat = [(layer, name, lin.weight) for layer, mods in enumerate(linears) for name, lin in mods.items()]
    grads = [{n: torch.zeros(lin.weight.shape) for n, lin in mods.items()} for mods in linears]
    acc = [{n: torch.zeros(lin.weight.shape) for n, lin in mods.items()} for mods in linears]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        for _, _, w in flat:
            w.requires_grad_(True)
        for index, batch in enumerate(calib.batches):
            if "labels" not in batch:
                raise ValueError(f"calibration batch {index} from {calib.source!r} has no 'labels': LLM-Pruner's "
                                 "Taylor importance needs the language-modelling loss")
            loss = model(**model_inputs(to_device(batch, dev), labels=True)).loss
            for (layer, name, _), g in zip(flat, torch.autograd.grad(loss, [w for _, _, w in flat], allow_unused=True)):
                if g is not None:
                    g = g.detach().float().cpu()
                    grads[layer][name] += g
                    acc[layer][name] += g * g
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return grads, acc
