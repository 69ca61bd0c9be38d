"""The analytic cost model against fvcore, before and after non-uniform pruning."""
from __future__ import annotations

import pytest

from conftest import tiny_model
from test_surgery import _random_selection
from tshrink.arch.families import get_adapter
from tshrink.cost import CostModel, check_budget
from tshrink.flops import measure_flops
from tshrink.surgery import apply_selection


@pytest.mark.parametrize("seq_len", [8, 32])
def test_analytic_matches_fvcore(family, seq_len):
    model = tiny_model(family)
    adapter = get_adapter(model)
    cost = CostModel(adapter, seq_len)
    dense = measure_flops(model, seq_len)["total"]
    assert abs(cost.backbone_macs() - dense) <= 0.01 * dense
    apply_selection(adapter, _random_selection(adapter, seed=3))
    pruned = measure_flops(model, seq_len)["total"]
    assert pruned < dense
    assert abs(cost.backbone_macs(adapter.widths()) - pruned) <= 0.01 * pruned


def test_fraction_and_budget_errors():
    adapter = get_adapter(tiny_model("llama"))
    cost = CostModel(adapter, 16)
    assert cost.fraction(adapter.widths()) == 1.0
    assert cost.budget_macs(0.5) == 0.5 * cost.macs()
    for bad in (0, -0.1, 1.5, "half", None):
        with pytest.raises(ValueError, match="budget"):
            check_budget(bad)
    with pytest.raises(ValueError, match="seq_len"):
        CostModel(adapter, 0)
