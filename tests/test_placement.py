"""Device / dtype choice and layer-wise offload, on the CPU with tiny models.

Offload is forced with a small device-memory limit: the prune must then keep the layers on
the host, move one at a time to the device, and give exactly the model the resident prune
gives."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from _harness_fixtures import forbid_model_loading, run_cli, tiny_llama_dir
from conftest import tiny_batches, tiny_model
from tshrink.arch.families import get_adapter
from tshrink.calibration import LayerStream
from tshrink.pipeline import prune
from tshrink.placement import (PlacementError, model_shape, parse_bytes, plan_placement, resolve_device,
                               resolve_dtype)


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(PlacementError, match="'tpu' is not one of cpu, cuda, cuda:N, auto"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(PlacementError, match="no CUDA device"):
            resolve_device("cuda:3")
    elif torch.cuda.device_count() < 4:
        with pytest.raises(PlacementError, match="cuda:3: this machine has"):
            resolve_device("cuda:3")


def test_dtype_choice():
    cpu = torch.device("cpu")
    cfg = tiny_model("llama").config
    assert resolve_dtype("bfloat16", cpu)[0] == torch.bfloat16
    with pytest.raises(PlacementError, match="float16 on the CPU"):
        resolve_dtype("float16", cpu)
    with pytest.raises(PlacementError, match="'half' is not one of auto, bfloat16, float16, float32"):
        resolve_dtype("half", cpu)
    cfg.dtype = torch.bfloat16
    assert resolve_dtype("auto", cpu, cfg)[0] == torch.bfloat16
    cfg.dtype = torch.float16
    assert resolve_dtype("auto", cpu, cfg)[0] == torch.float32  # no fast float16 on the CPU


def test_parse_bytes():
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("512MB") == 512 * 2**20 and parse_bytes("1e6") == 10**6
    with pytest.raises(PlacementError, match="memory size"):
        parse_bytes("lots")


def test_plan_from_config_without_weights():
    model = tiny_model("llama")
    shape = model_shape(model.config, torch.float32)
    assert shape.total_bytes == sum(p.numel() for p in model.parameters()) * 4
    kw = dict(calib_tokens=64, batch_tokens=32)
    full = plan_placement(shape, torch.device("cpu"), torch.float32, limit=10**9, **kw)
    assert full.layers == "device"
    small = plan_placement(shape, torch.device("cpu"), torch.float32, limit=full.need_offload_bytes, **kw)
    assert small.layers == "offload" and "one at a time" in small.reason
    with pytest.raises(PlacementError, match="even with layer offload"):
        plan_placement(shape, torch.device("cpu"), torch.float32, limit=full.need_offload_bytes - 1, **kw)


def _tight(model):
    """A plan whose device memory holds the offloaded prune but not the whole model."""
    shape = model_shape(model, torch.float32)
    kw = dict(calib_tokens=72, batch_tokens=36)
    probe = plan_placement(shape, torch.device("cpu"), torch.float32, limit=10**12, **kw)
    return plan_placement(shape, torch.device("cpu"), torch.float32, limit=probe.need_offload_bytes, **kw)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["stat", "fisher-tune-only", "magnitude"])
def test_offloaded_prune_equals_resident_prune(method):
    base = tiny_model("llama", "causal-lm")
    calib = tiny_batches("llama", labels="lm")
    tight = _tight(base)
    assert tight.layer_offload
    recipe = "score=magnitude,select=uniform,correct=fisher-tune" if method == "fisher-tune-only" else method
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    # mask tuning after a non-Fisher selection has no search mask to be taught by: the dense teacher
    opts = {"fisher_tune_teacher": "dense"} if method == "fisher-tune-only" else {}
    ra = prune(a, recipe, 0.6, calib=calib, options=opts)
    rb = prune(b, recipe, 0.6, calib=calib, placement=tight, options=opts)
    assert rb.report["placement"]["layers"] == "offload"
    assert ra.selection.heads == rb.selection.heads and ra.selection.neurons == rb.selection.neurons
    sa, sb = _state(a), _state(b)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=0)
    resident = b.__dict__.get("_tshrink_resident")
    if method != "magnitude":  # magnitude reads weights only: no stream
        assert resident["max"] == 1 and not resident["layers"]  # one layer at a time, all back on the host


def test_offload_refuses_whole_model_gradients():
    model = tiny_model("llama", "causal-lm")
    tight = _tight(model)
    with pytest.raises(ValueError, match="back-propagates through the whole model"):
        prune(model, "fisher", 0.6, calib=tiny_batches("llama", labels="lm"), placement=tight)


def test_stream_moves_one_layer_at_a_time():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    stream = LayerStream(adapter, tiny_batches("llama"), layer_offload=True)
    for _ in range(adapter.num_layers):
        stream.run()
        assert model.__dict__["_tshrink_resident"]["layers"] == {stream.layer}
        stream.advance()
    assert stream.max_resident == 1 and not model.__dict__["_tshrink_resident"]["layers"]


def _tiny_dir(tmp_path):
    return tiny_llama_dir(tmp_path)


def test_cli_prunes_bfloat16_with_offload_under_a_small_memory_limit(tmp_path):
    from tshrink.models import load_model
    from tshrink_harness.cli import main

    model_dir, out = _tiny_dir(tmp_path), tmp_path / "pruned"
    from transformers import AutoConfig

    shape = model_shape(AutoConfig.from_pretrained(model_dir), torch.bfloat16, head="causal-lm")
    probe = plan_placement(shape, torch.device("cpu"), torch.bfloat16, calib_tokens=64, batch_tokens=64, limit=10**12)
    assert probe.need_offload_bytes < probe.need_resident_bytes
    rc = main(["prune", "--method", "stat", "--model", str(model_dir), "--flops", "0.6", "--output", str(out),
               "--calib-samples", "4", "--seq-len", "16", "--dtype", "bfloat16",
               "--device-memory", str(probe.need_offload_bytes)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["placement"]["layers"] == "offload" and report["dtype"] == "bfloat16"
    assert report["flops_kept"] <= 0.6
    reloaded, _ = load_model(str(out))
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("extra, message", [
    (["--dtype", "half"], "--dtype 'half' is not one of auto, bfloat16, float16, float32"),
    (["--dtype", "float16"], "float16 on the cpu"),
    (["--device", "tpu"], "--device 'tpu' is not one of cpu, cuda, cuda:n, auto"),
    (["--device", "cuda:3"], "cuda:3"),
    (["--device-memory", "1KiB"], "even with layer offload"),
    (["--device-memory", "lots"], "--device-memory"),
])
def test_bad_device_dtype_memory_is_one_line_before_loading(tmp_path, capsys, monkeypatch, extra, message):
    model_dir = _tiny_dir(tmp_path)
    capsys.readouterr()
    forbid_model_loading(monkeypatch)
    argv = ["prune", "--method", "stat", "--model", str(model_dir), "--flops", "0.6",
            "--output", str(tmp_path / "out"), "--calib-samples", "4", "--seq-len", "16", *extra]
    rc, err = run_cli(argv, capsys)
    assert rc == 2 and message in err.lower()
    assert len(err.strip().splitlines()) == 1
