"""The Wanda-sp example: its math against hand computations, the host contract in one line,
and the correction doing its job."""
from __future__ import annotations

import pytest
import torch

import tshrink_random.wanda as plugin
from tshrink.pipeline import prune
from tshrink.testing import check_method, contract_setup
from tshrink_random.wanda_math import least_squares_fold, wanda_sp_scores


def test_wanda_sp_scores_by_hand():
    W = torch.tensor([[1.0, -2.0, 3.0, 0.5]]).reshape(1, 2, 2)  # (out, units, width)
    norms = torch.tensor([[1.0, 2.0], [0.0, 4.0]])  # (units, width)
    torch.testing.assert_close(wanda_sp_scores(W, norms), torch.tensor([1 + 4.0, 0 + 2.0], dtype=torch.float64))


def test_fold_is_the_least_squares_fit():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(200, 6, generator=g, dtype=torch.float64)  # (tokens, n)
    A[:, 5] = A[:, 0] + 0.1 * A[:, 5]  # a correlated column: folding helps
    W = torch.randn(3, 6, generator=g, dtype=torch.float64)
    keep = torch.tensor([0, 2, 3])
    got = least_squares_fold(W, A.T @ A, keep, damping=0.0)
    want = torch.linalg.lstsq(A[:, keep], A @ W.T).solution.T  # (out, k)
    torch.testing.assert_close(got, want)
    assert (A @ W.T - A[:, keep] @ got.T).norm() < (A @ W.T - A[:, keep] @ W[:, keep].T).norm()


@pytest.mark.parametrize("method", ["example-wanda", "example-wanda-fold"])
def test_wanda_passes_the_tshrink_contract(method):
    check_method(method, plugins=[plugin])


def test_fold_brings_the_pruned_model_closer_to_the_dense_one():
    model, calib = contract_setup("llama")
    ids = calib.batches[0]["input_ids"]
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    errors = {}
    for method in ("example-wanda", "example-wanda-fold"):
        model, calib = contract_setup("llama")
        prune(model, method, 0.6, calib=calib)
        with torch.no_grad():
            errors[method] = float((model(input_ids=ids).logits - dense).norm())
    assert errors["example-wanda-fold"] < errors["example-wanda"], errors
