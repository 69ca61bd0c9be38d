"""Shared fixtures: tiny randomly initialised models of every supported family (from
:mod:`tshrink.testing`, which plugin authors use too)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# the tiny models and batches are the plugin authors' test kit too (tshrink.testing)
from tshrink.testing import DECODERS, FAMILIES, GENERIC, tiny_batches, tiny_model  # noqa: E402,F401


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def data_dir() -> Path:
    """The real benchmark data (../shared/data or $TSHRINK_DATA_DIR); skip when absent."""
    path = Path(os.environ.get("TSHRINK_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (set TSHRINK_DATA_DIR)")
    return path.resolve()


@pytest.fixture(autouse=True, scope="session")
def _latency_tables_in_a_temporary_cache(tmp_path_factory):
    """Latency tables that tests measure go to a session directory, never the user's cache."""
    old = os.environ.get("TSHRINK_LATENCY_CACHE")
    os.environ["TSHRINK_LATENCY_CACHE"] = str(tmp_path_factory.mktemp("latency-tables"))
    yield
    if old is None:
        os.environ.pop("TSHRINK_LATENCY_CACHE", None)
    else:
        os.environ["TSHRINK_LATENCY_CACHE"] = old
