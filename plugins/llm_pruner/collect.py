"""Loss gradients of the layer weights for LLM-Pruner's Taylor importance.

As the reference code does for its ``param_mix`` / ``param_second`` importance: every
calibration example (one sequence) is a backward pass of its language-modelling loss; the
gradient ``g`` is the mean of the per-example gradients (the gradient of the mean loss over
the calibration set) and ``acc`` the mean of their squares (the code's ``acc_grad``, a Fisher
approximation of the Hessian diagonal), both float32 on the CPU, for the Q/K/V/O and
gate/up/down weights of every layer. The whole model is differentiated at once, as in the
reference code: memory grows with the model (the limitation this baseline has at 70B); the
model's weights are not changed.
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
    """(grads, acc): per layer, per Linear name (q, k, v, o, in0.., down) the mean gradient and
    the mean squared gradient over the calibration examples (each a weight-shaped tensor)."""
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
        examples = 0
        for index, batch in enumerate(calib.batches):
            if "labels" not in batch:
                raise ValueError(f"calibration batch {index} from {calib.source!r} has no 'labels': LLM-Pruner's "
                                 "Taylor importance needs the language-modelling loss")
            for row in range(int(batch["input_ids"].shape[0])):
                example = {k: v[row:row + 1] for k, v in batch.items()}
                loss = model(**model_inputs(to_device(example, dev), labels=True)).loss
                ws = [w for _, _, w in flat]
                for (layer, name, _), g in zip(flat, torch.autograd.grad(loss, ws, allow_unused=True)):
                    if g is not None:
                        g = g.detach().float().cpu()
                        grads[layer][name] += g
                        acc[layer][name] += g * g
                examples += 1
        for per_layer in grads + acc:
            for name in per_layer:
                per_layer[name] /= max(examples, 1)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return grads, acc
