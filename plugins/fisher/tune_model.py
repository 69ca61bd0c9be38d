"""Mask tuning on the model, layer by layer (Kwon et al. 2022, section 4.4).

After search and rearrangement the kept units' masks are 1 and the pruned ones 0. Tuning
makes the kept entries real numbers ``s`` so that every sub-layer of the pruned model (the
student) reproduces the unpruned model's (the teacher's) on calibration data. As in the
public code (``prune/rescale.py``), the matched quantity is the sub-layer's output BEFORE
its LayerNorm, i.e. projection output plus residual:

    attention:  O(x) + residual          MLP:  Down(h) + residual

and the student's own residual is moved to the target, so the kept units also absorb the
drift that earlier pruned layers left in the residual stream:

    t = (teacher projection output + teacher residual) - bias - student residual   # (tokens, hidden)
    C[:, i] = kept unit i's contribution to the student's projection output       # (tokens*hidden,)
    min_s ||C s - t||^2 + lam ||s - 1||^2                          (tuning.tune_scales_gram)

over the real (non-padding) tokens. A unit's contribution is ``x_u W_u^T`` (its ``group *
head_dim`` input columns of O times their weight columns) or ``h_n w_n`` for a neuron, so
for neurons ``C^T C = (H^T H) * (W^T W)`` is formed without materialising C. The normal
equations are accumulated over batches (float64), so memory is one layer's activations.

Residual positions: the attention residual is the layer input in every supported family;
the MLP residual is the MLP's input for the post-norm encoders (BERT, DeBERTa, DistilBERT) and
``layer output - Down output`` for the pre-norm models (Llama family, Phi-3, GPT-2,
ModernBERT, and GPT-NeoX, whose parallel residual makes ``output - Down`` the input plus
the attention).
Gemma 2/3 normalise each sub-layer's output before adding it to the stream ("sandwich"
norms), so a residual drift cannot be moved linearly onto the projections: there the
target is the teacher's projection output itself (minus bias), without residuals. The
generic adapter (layout not reviewed) uses these projection-output targets too; the report
names the targets used.

Order (as in the public code): layer by layer; within a layer the attention scales are
solved first, then the MLP's on student activations that already use them; then the
student advances one layer with its tuned masks, the teacher with its own (dense: none).

Teacher (``teacher``): ``None`` is the unpruned model (the paper's text); a selection is
applied to the teacher as 0/1 masks. The public code's teacher, which produced the
published numbers, is the search's mask at the intermediate budget ``sqrt(budget)`` (not
rearranged); the plugin's select stages hand it over (``fisher_tune_teacher``).

CLS only (``cls_only``): for sequence classification the public code matches only the
first ([CLS]) token in the LAST layer's MLP problem (what the pooler and classifier read);
every other sub-layer is matched over all real tokens.

Differences from the public code, on purpose: the first layer's attention is tuned too
(the public code skips it); a rejected sub-layer keeps its 0/1 mask and tuning goes on
with the next one (the public code stops tuning altogether); the damping is relative (see
``tuning.py``); no free constant column is added to the attention problem.

``tune_masks`` only reads the model (masks via hooks); ``fold_scales`` writes the tuned
scales into the output-projection / down-projection columns of the kept units, after which
the host removes the pruned units physically.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tshrink.arch.base import Adapter
from tshrink.surgery import write_columns
from tshrink.calibration import CalibrationData, LayerStream
from tshrink.progress import Track, untracked
from tshrink.masking import soft_masks
from tshrink.units import Selection

from .tuning import BOUNDS, DAMP, tune_scales_gram

#: where the MLP's residual is, per adapter family (see the module docstring)
MLP_RESIDUAL = {"bert": "mlp_input", "deberta-v2": "mlp_input", "distilbert": "mlp_input",
                "llama": "output_minus_mlp",
                "phi3": "output_minus_mlp", "gpt2": "output_minus_mlp", "gpt_neox": "output_minus_mlp",
                "modernbert": "output_minus_mlp", "gemma": "none",
                "moe": "output_minus_mlp"}  # MoE: the residual plus the shared expert (not masked)
#: families whose sequence classifier reads the first token (pooler / [CLS]): cls_only applies
CLS_FAMILIES = frozenset({"bert", "distilbert"})


def residual_layout(adapter: Adapter) -> str:
    """The family's entry of :data:`MLP_RESIDUAL`; ``"none"`` (projection-output targets,
    valid whatever the residual wiring) for the generic adapter, whose layout is unknown."""
    if adapter.family == "generic":
        return "none"
    if adapter.family not in MLP_RESIDUAL:
        raise ValueError(f"mask tuning knows the residual layout of the families {sorted(MLP_RESIDUAL)}, "
                         f"not {adapter.family!r}")
    return MLP_RESIDUAL[adapter.family]


CHUNK_ELEMENTS = 1 << 24  # bound on (units x tokens x hidden) per attention contribution block


@dataclass
class TuneResult:
    """Real-valued masks (0 for pruned units, the tuned scale for kept ones) and statistics."""

    heads: list[Tensor]  # per layer (units_l,) float32
    neurons: list[Tensor]  # per layer (neurons_l,) float32
    stats: list[dict[str, Any]] = field(default_factory=list)  # one entry per tuned sub-layer

    @property
    def rejected(self) -> int:
        return sum(not s["accepted"] for s in self.stats)


class _Normal:
    """Accumulated normal equations of one sub-layer: C^T C, C^T r, ||r||^2 with r = t - C 1.

    Sums are float64 on the device of the first batch (no host round trip per batch)."""

    def __init__(self) -> None:
        self.ctc: Tensor | None = None  # (k, k)
        self.ctr: Tensor | None = None  # (k,)
        self.rr: Tensor | float = 0.0
        self.tt: Tensor | float = 0.0

    def add(self, ctc: Tensor, ctr: Tensor, r: Tensor, t: Tensor) -> None:
        if self.ctc is None:
            self.ctc, self.ctr = torch.zeros_like(ctc, dtype=torch.float64), torch.zeros_like(ctr, dtype=torch.float64)
        self.ctc += ctc.detach()
        self.ctr += ctr.detach()
        self.rr = self.rr + r.double().pow(2).sum()
        self.tt = self.tt + t.double().pow(2).sum()

    def solve(self, damp: float, bounds: tuple[float, float]) -> tuple[Tensor, bool, float, float]:
        """(scales (k,), accepted, relative error before, relative error after)."""
        ctc = self.ctc.cpu()
        ctc = 0.5 * (ctc + ctc.T)
        ctr, rr, tt = self.ctr.cpu(), float(self.rr), float(self.tt)
        scales, ok = tune_scales_gram(ctc, ctr + ctc.sum(1), damp=damp, bounds=bounds)
        x = scales.double() - 1.0
        after = max(rr - 2.0 * float(x @ ctr) + float(x @ ctc @ x), 0.0)
        norm = max(tt, 1e-300)
        return scales.float(), ok, rr / norm, after / norm


def _real(x: Tensor, token_mask: Tensor) -> Tensor:
    """(batch, seq, f) -> (tokens, f) over the real tokens, float32."""
    return x[token_mask.to(x.device)].float()


def _minus_bias(x: Tensor, linear: torch.nn.Linear) -> Tensor:
    return x - linear.bias.float() if linear.bias is not None else x


def _head_normal(x: Tensor, weight: Tensor, kept: Tensor, width: int, t: Tensor, acc: _Normal) -> None:
    """Add one batch: ``x`` (n, units*width) raw O input, ``weight`` (hidden, units*width),
    ``t`` (n, hidden) target without bias and student residual."""
    n, hidden = x.shape[0], weight.shape[0]
    k = kept.numel()
    wk = weight.float().reshape(hidden, -1, width)[:, kept]  # (hidden, k, width)
    xk = x.reshape(n, -1, width)[:, kept]  # (n, k, width)
    step = max(1, CHUNK_ELEMENTS // max(1, k * hidden))
    for s in range(0, n, step):
        contrib = torch.einsum("nkw,hkw->knh", xk[s:s + step], wk)  # (k, chunk, hidden)
        r = t[s:s + step] - contrib.sum(0)  # (chunk, hidden)
        flat = contrib.reshape(k, -1)  # (k, chunk*hidden)
        acc.add(flat @ flat.T, flat @ r.reshape(-1), r, t[s:s + step])


def _neuron_normal(h: Tensor, wk: Tensor, wtw: Tensor, kept: Tensor, t: Tensor, acc: _Normal) -> None:
    """Add one batch: ``h`` (n, neurons) raw Down input, ``wk`` (hidden, k) kept Down columns,
    ``wtw`` (k, k) = wk^T wk, ``t`` (n, hidden) target."""
    hk = h[:, kept]  # (n, k)
    r = t - hk @ wk.T  # (n, hidden)
    acc.add((hk.T @ hk) * wtw, (hk * (r @ wk)).sum(0), r, t)


def tune_masks(
    adapter: Adapter,
    calib: CalibrationData,
    selection: Selection,
    *,
    damp: float = DAMP,
    bounds: tuple[float, float] = BOUNDS,
    device: torch.device | str | None = None,
    teacher: Selection | None = None,
    cls_only: bool = False,
    track: Track = untracked,
    stream_options: dict[str, Any] | None = None,
) -> TuneResult:
    """Tuned real masks for ``selection`` (see the module docstring); the model is not changed.

    ``teacher``: the selection the teacher runs with (0/1 masks), ``None`` = dense.
    ``cls_only``: match only the first token in the last layer's MLP (post-norm encoders)."""
    layout = residual_layout(adapter)
    counts = (adapter.head_counts(), adapter.neuron_counts())
    selection.check(*counts)
    pre_norm = layout == "output_minus_mlp"
    sandwich = layout == "none"  # targets without residuals
    if cls_only and adapter.family not in CLS_FAMILIES:
        raise ValueError(f"cls_only tuning matches the first token, which the {adapter.family!r} family does not "
                         f"pool; it applies to {sorted(CLS_FAMILIES)}")
    hm, nm = selection.masks(*counts)  # 0/1 float32, per layer
    dev = torch.device(device) if device is not None else next(adapter.model.parameters()).device
    masks_dev = [m.to(dev) for m in hm + nm]  # read by the hooks at every forward; edited in place
    heads, neurons = masks_dev[: len(hm)], masks_dev[len(hm):]
    if teacher is not None:
        teacher.check(*counts)
        thm, tnm = teacher.masks(*counts)
        t_masks = ([m.to(dev) for m in thm], [m.to(dev) for m in tnm])
    else:
        t_masks = (None, None)  # dense teacher: no hook at all
    opts = dict(stream_options or {}, device=dev)
    teacher = LayerStream(adapter, calib, **opts)  # from here on, the teacher's stream
    student = LayerStream(adapter, calib, **opts)
    stats: list[dict[str, Any]] = []
    for layer in track(range(adapter.num_layers), desc="layers"):
        attn, mlp = adapter.attn(layer), adapter.mlp(layer)

        # -- teacher: targets (projection output + residual - bias), real tokens, per batch
        t_attn: list[Tensor] = []
        t_mlp: list[Tensor] = []
        grab: dict[str, Tensor] = {}
        # CLS only: the last layer's MLP problem sees the first token of each sequence only
        cls_layer = cls_only and layer == adapter.num_layers - 1
        mlp_keys = ("down", "mlp_in", "h")

        def pick(key: str, tm: Tensor) -> Tensor:
            if cls_layer and key in mlp_keys:
                first = torch.zeros_like(tm)
                first[:, 0] = tm[:, 0]
                return first
            return tm

        put = lambda key: (lambda x, tm: grab.__setitem__(key, _real(x, pick(key, tm))))  # noqa: E731

        def teacher_batch(out: Tensor, i: int) -> None:
            tm = teacher.token_masks[i]
            residual = 0 if sandwich else _real(teacher.hidden[i].to(out.device), tm)
            t_attn.append(_minus_bias(grab["o"] + residual, attn.o).cpu())
            total = grab["down"] if sandwich else _real(out, pick("down", tm)) if pre_norm else grab["down"] + grab["mlp_in"]
            t_mlp.append(_minus_bias(total, mlp.out).cpu())

        with teacher.capture(attn.o, put("o"), output=True), teacher.capture(mlp.out, put("down"), output=True), \
                teacher.capture(mlp.inputs[0], put("mlp_in")), soft_masks(adapter, *t_masks):
            teacher.advance(teacher_batch)

        # -- student, attention: accumulate and solve for the kept units' scales
        kept_h = torch.nonzero(heads[layer]).flatten()
        if kept_h.numel():
            acc = _Normal()
            width = attn.head_dim * attn.group

            def attn_batch(out: Tensor, i: int) -> None:
                tm = student.token_masks[i]
                t = t_attn[i].to(out.device)
                if not sandwich:
                    t = t - _real(student.hidden[i].to(out.device), tm)
                _head_normal(grab["o_in"], attn.o.weight.detach(), kept_h.to(out.device), width, t, acc)

            with student.capture(attn.o, put("o_in")), soft_masks(adapter, heads, neurons):
                student.run(attn_batch)
            stats.append(_solve(acc, "attention", layer, kept_h, heads[layer], damp, bounds))

        # -- student, MLP (with this layer's tuned attention)
        kept_n = torch.nonzero(neurons[layer]).flatten()
        if kept_n.numel():
            acc = _Normal()
            wk = mlp.out.weight.detach().float()[:, kept_n.to(mlp.out.weight.device)]  # (hidden, k)
            wtw = wk.T @ wk  # (k, k)

            def mlp_batch(out: Tensor, i: int) -> None:
                tm = student.token_masks[i]
                residual = 0 if sandwich else _real(out, pick("down", tm)) - grab["down"] if pre_norm else grab["mlp_in"]
                t = t_mlp[i].to(out.device) - residual
                _neuron_normal(grab["h"], wk, wtw, kept_n.to(out.device), t, acc)

            with student.capture(mlp.out, put("h")), student.capture(mlp.out, put("down"), output=True), \
                    student.capture(mlp.inputs[0], put("mlp_in")), soft_masks(adapter, heads, neurons):
                student.run(mlp_batch)
            stats.append(_solve(acc, "mlp", layer, kept_n, neurons[layer], damp, bounds)
                         | {"tokens": "first" if cls_layer else "all"})
        if layer + 1 < adapter.num_layers:
            with soft_masks(adapter, heads, neurons):
                student.advance()
    student.release()
    return TuneResult([m.cpu() for m in heads], [m.cpu() for m in neurons], stats)


def _solve(acc: _Normal, kind: str, layer: int, kept: Tensor, mask: Tensor, damp: float,
           bounds: tuple[float, float]) -> dict[str, Any]:
    """Solve one sub-layer, write the scales into ``mask`` (in place), return its statistics."""
    scales, ok, before, after = acc.solve(damp, bounds)
    mask[kept.to(mask.device)] = scales.to(mask)
    return {"layer": layer, "kind": kind, "kept": int(kept.numel()), "accepted": ok,
            "rel_error_before": before, "rel_error_after": after if ok else before,
            "scale_min": float(scales.min()), "scale_max": float(scales.max())}


def fold_scales(adapter: Adapter, selection: Selection, head_masks: list[Tensor],
                neuron_masks: list[Tensor]) -> None:
    """Multiply each kept unit's output-projection columns (each kept neuron's Down column)
    by its mask value, in place; pruned units are left as they are (the host removes them).
    Afterwards the model pruned to ``selection`` equals the dense model run with these masks
    (and zeros on the pruned units)."""
    counts = (adapter.head_counts(), adapter.neuron_counts())
    selection.check(*counts)
    n = adapter.num_layers
    if len(head_masks) != n or len(neuron_masks) != n:
        raise ValueError(f"masks for {len(head_masks)}/{len(neuron_masks)} layers, the model has {n}")
    with torch.no_grad():
        for layer in range(n):
            attn, mlp = adapter.attn(layer), adapter.mlp(layer)
            hm, nm = head_masks[layer], neuron_masks[layer]
            if hm.shape != (attn.units,) or nm.shape != (mlp.neurons,):
                raise ValueError(f"layer {layer}: masks of shapes {tuple(hm.shape)}/{tuple(nm.shape)}, "
                                 f"expected ({attn.units},)/({mlp.neurons},)")
            kept_h = torch.tensor(selection.heads[layer], dtype=torch.long)
            if kept_h.numel():
                cols = adapter.unit_columns(layer, kept_h).to(attn.o.weight.device)
                width = attn.head_dim * attn.group
                scale = hm[kept_h].repeat_interleave(width).to(attn.o.weight)  # (k*width,)
                attn.o.weight[:, cols] *= scale
            kept_n = torch.tensor(selection.neurons[layer], dtype=torch.long)
            if kept_n.numel():
                w = mlp.out.weight  # a copy for a mixture-of-experts layer: written back below
                cols = kept_n.to(w.device)
                write_columns(mlp.out, cols, w[:, cols] * nm[kept_n].to(w))  # (hidden, k)
