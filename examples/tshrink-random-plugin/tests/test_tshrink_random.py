"""The example plugin tests itself the way any plugin repository can: the math on its own,
and the host's contract with one line (tshrink.testing.check_method)."""
from __future__ import annotations

import torch

import tshrink_random.plugin as plugin
from tshrink.testing import check_method
from tshrink_random.scores import random_scores


def test_random_scores_are_seeded_and_shaped():
    a = random_scores([3, 0, 5], torch.Generator().manual_seed(1))
    b = random_scores([3, 0, 5], torch.Generator().manual_seed(1))
    assert [t.shape for t in a] == [(3,), (0,), (5,)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_random_passes_the_tshrink_contract():
    # plugins=[plugin] also works when the package is not installed (no entry point yet)
    check_method("random", plugins=[plugin])
