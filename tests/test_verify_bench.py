"""Equivalence checks (torch vs torch, torch vs onnxruntime) and the latency benchmark protocol."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from nepenthe_compress import bench as bench_mod
from nepenthe_compress.bench import bench_onnx, bench_torch, compare_latency
from nepenthe_compress.commands.bench import bench as bench_cmd
from nepenthe_compress.commands.verify import verify as verify_cmd
from nepenthe_compress.errors import UserError
from nepenthe_compress.verify import (eval_mode, onnx_matches_torch, onnx_runner, ort_session, verify_equivalence,
                                      verify_float64)

FEATURES = 16


# ---------------------------------------------------------------------------------------- helpers

def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3, 3, 8, 8, generator=g), torch.randn(5, 3, 8, 8, generator=g)]


def expected_rel(ref: nn.Module, cand: nn.Module, xs: list[torch.Tensor]) -> float:
    """max|cand - ref| / max|ref| in float64, computed here independently of verify.py."""
    r64, c64 = copy.deepcopy(ref).double(), copy.deepcopy(cand).double()
    with torch.no_grad():
        pairs = [(r64(x.double()), c64(x.double())) for x in xs]
    return float(max((c - r).abs().max() for r, c in pairs) / max(r.abs().max() for r, _ in pairs))


def gemm_onnx(path: Path, weights: list[np.ndarray], input_dims: list | None = None) -> Path:
    """Chain of Gemm layers y = x W^T + b (b = 0.1), input (N, FEATURES)."""
    nodes, inits, prev = [], [], "x"
    for i, w in enumerate(weights):
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(np.full(w.shape[0], 0.1, np.float32), f"b{i}")]
        out = "y" if i == len(weights) - 1 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [out], transB=1))
        prev = out
    dims = input_dims or ["N", FEATURES]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", weights[-1].shape[0]])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def square(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((FEATURES, FEATURES)) / 4


def torch_linear(w: np.ndarray) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
        lin.bias.fill_(0.1)
    return lin.eval()


# ---------------------------------------------------------------------------------------- verify

def test_identical_models_pass():
    ref = small_net()
    r = verify_equivalence(ref, copy.deepcopy(ref), batches())
    assert r.passed and r.max_abs == 0.0 and r.max_rel == 0.0
    assert r.samples == 8 and r.top1_agreement == 1.0 and r.tol == 1e-5


def test_perturbed_weight_fails_with_the_right_error():
    ref = small_net()
    bad = copy.deepcopy(ref)
    with torch.no_grad():
        bad[3].weight[2, 7] += 1e-2
    r = verify_equivalence(ref, bad, batches())
    assert not r.passed
    assert r.max_rel == pytest.approx(expected_rel(ref, bad, batches()), rel=1e-3)
    assert r.max_rel > 1e-5


def test_top1_agreement_counts_changed_argmax():
    ref = small_net()
    cand = copy.deepcopy(ref)
    with torch.no_grad():
        cand[3].bias[0] += 0.3           # pushes some samples' argmax to class 0
        xs = batches()
        a = torch.cat([ref(x) for x in xs]).argmax(1)
        b = torch.cat([cand(x) for x in xs]).argmax(1)
    expected = float((a == b).double().mean())
    assert 0.0 < expected < 1.0          # the test data must exercise both cases
    assert verify_equivalence(ref, cand, xs).top1_agreement == pytest.approx(expected)


def test_top1_is_none_for_non_classification_outputs():
    seq = nn.Linear(4, 4)                # (N, T, 4): not (N, classes)
    assert verify_equivalence(seq, seq, [torch.randn(2, 3, 4)]).top1_agreement is None
    one = nn.Linear(4, 1)                # (N, 1): a single score
    assert verify_equivalence(one, one, [torch.randn(2, 4)]).top1_agreement is None


class Nan(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("nan")


def test_nan_output_fails():
    r = verify_equivalence(nn.Identity(), Nan(), [torch.randn(2, 3)])
    assert not r.passed and np.isnan(r.max_abs)


def test_mismatched_outputs_and_empty_batches_are_user_errors():
    with pytest.raises(UserError, match="shape"):
        verify_equivalence(nn.Linear(4, 3), nn.Linear(4, 2), [torch.randn(2, 4)])
    with pytest.raises(UserError, match="no batches"):
        verify_equivalence(nn.Identity(), nn.Identity(), [])


def test_verify_float64_resolves_beyond_float32_noise():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).eval()      # float32
    a, b = (copy.deepcopy(m).double() for m in ref)
    merged = nn.Linear(8, 8).double()                                  # merged in float64: exact algebra
    with torch.no_grad():
        merged.weight.copy_(b.weight @ a.weight)
        merged.bias.copy_(b.weight @ a.bias + b.bias)
    xs = [torch.randn(4, 8), torch.randn(2, 8)]
    exact = verify_float64(ref, merged, xs)
    assert exact.passed and exact.max_rel < 1e-13
    with torch.no_grad():
        merged.bias[0] += 1e-9                                          # invisible in float32
    off = verify_float64(ref, merged, xs)
    assert not off.passed and 1e-11 < off.max_rel < 1e-8
    assert next(ref.parameters()).dtype == torch.float32                # inputs not converted in place


def test_eval_mode_restores_each_flag_and_verify_uses_eval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4)).train()
    model[2].eval()                       # a frozen BN inside a training model
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, True, False]
    # with dropout active the two copies would differ; in eval mode they are identical
    assert verify_equivalence(model, copy.deepcopy(model), [torch.randn(8, 4)]).max_abs == 0.0
    assert model.training


def test_torch_export_module_can_be_verified():
    lin = nn.Linear(4, 3).eval()
    ep = torch.export.export(lin, (torch.randn(2, 4),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    r = verify_equivalence(lin, ep.module(), [torch.randn(2, 4), torch.randn(5, 4)])
    assert r.passed and r.max_rel < 1e-6


def test_onnx_matches_torch(tmp_path):
    w = square(0)
    path = gemm_onnx(tmp_path / "lin.onnx", [w])
    xs = [torch.randn(1, FEATURES), torch.randn(7, FEATURES)]
    good = onnx_matches_torch(torch_linear(w), path, xs)
    assert good.passed and good.max_rel < 1e-6 and good.samples == 8
    w_bad = w.copy()
    w_bad[3, 5] += 0.05
    bad = onnx_matches_torch(torch_linear(w_bad), path, xs)
    assert not bad.passed
    assert bad.max_rel == pytest.approx(expected_rel(torch_linear(w_bad), torch_linear(w), xs), rel=1e-3)


def test_onnx_load_and_run_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="missing.onnx"):
        ort_session(tmp_path / "missing.onnx")
    run = onnx_runner(gemm_onnx(tmp_path / "lin.onnx", [square(0)]))
    with pytest.raises(UserError, match=r"input \(2, 3\)"):
        run(torch.randn(2, 3))


# ---------------------------------------------------------------------------------------- bench

@pytest.fixture()
def two_models(tmp_path) -> dict[str, Path]:
    return {"small": gemm_onnx(tmp_path / "small.onnx", [square(0)]),
            "deep": gemm_onnx(tmp_path / "deep.onnx", [square(i) for i in range(4)])}


def test_compare_latency_table_is_consistent(two_models):
    table = compare_latency(two_models, batches=(1, 4), repeats=5, warmup=1)
    assert table.input_shape == (FEATURES,) and table.baseline == "small"
    assert [(r.model, r.batch) for r in table.rows] == [("small", 1), ("deep", 1), ("small", 4), ("deep", 4)]
    for r in table.rows:
        assert 0 < r.median_s < 1 and r.iqr_s >= 0
        assert r.speedup == pytest.approx(table.median("small", r.batch) / r.median_s)
    assert all(r.speedup == 1.0 for r in table.rows if r.model == "small")
    assert table.to_dict()["rows"][1]["model"] == "deep"


def test_interleaved_order_rotates():
    calls: list[str] = []
    runs = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = bench_mod._interleaved(runs, warmup=1, repeats=3)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_bench_onnx_and_torch_return_positive_latencies(two_models):
    lat = bench_onnx(two_models["small"], None, batch=2, repeats=4, warmup=0)
    assert len(lat) == 4 and all(t > 0 for t in lat)
    threads = torch.get_num_threads()
    lat = bench_torch(torch_linear(square(0)), (FEATURES,), batch=2, threads=threads + 1, repeats=3, warmup=0)
    assert len(lat) == 3 and all(t > 0 for t in lat)
    assert torch.get_num_threads() == threads


def test_bench_errors(tmp_path, two_models):
    with pytest.raises(UserError, match="baseline"):
        compare_latency(two_models, baseline="nope")
    symbolic = gemm_onnx(tmp_path / "sym.onnx", [square(0)], input_dims=["N", "F"])
    with pytest.raises(UserError, match="input shape"):
        compare_latency({"s": symbolic}, repeats=1)
    assert compare_latency({"s": symbolic}, (FEATURES,), batches=(2,), repeats=1).rows[0].speedup == 1.0


# ---------------------------------------------------------------------------------------- commands

def test_bench_command(tmp_path, two_models):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(bench_cmd, [str(two_models["small"]), str(two_models["deep"]), "--batch", "1",
                                         "--batch", "3", "--repeats", "3", "--warmup", "0", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert [(r["batch"], r["speedup"] == 1.0) for r in data["rows"]] == [(1, True), (1, False), (3, True), (3, False)]
    assert "deep.onnx" in res.output


def test_verify_command_random_inputs(tmp_path):
    w = square(0)
    ref = gemm_onnx(tmp_path / "ref.onnx", [w])
    same = gemm_onnx(tmp_path / "same.onnx", [w.copy()])
    w_bad = w.copy()
    w_bad[0, 0] += 0.05
    bad = gemm_onnx(tmp_path / "bad.onnx", [w_bad])
    runner = CliRunner()
    ok = runner.invoke(verify_cmd, [str(ref), str(same), "--input-shape", str(FEATURES)])
    assert ok.exit_code == 0, ok.output
    assert "equivalent" in ok.output
    out = tmp_path / "v.json"
    fail = runner.invoke(verify_cmd, [str(ref), str(bad), "--input-shape", str(FEATURES), "--limit", "10",
                                      "--json", str(out)])
    assert fail.exit_code == 1 and "not equivalent" in fail.output and "Traceback" not in fail.output
    data = json.loads(out.read_text())
    assert data["samples"] == 10 and data["passed"] is False
    x = torch.randn((10, FEATURES), generator=torch.Generator().manual_seed(0))   # the command's seeded inputs
    assert data["max_rel"] == pytest.approx(expected_rel(torch_linear(w), torch_linear(w_bad), [x]), rel=1e-3)


def test_verify_command_calibration_file_and_missing_data(tmp_path):
    w = square(0)
    ref, same = gemm_onnx(tmp_path / "a.onnx", [w]), gemm_onnx(tmp_path / "b.onnx", [w])
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((12, FEATURES)).astype(np.float32))
    out = tmp_path / "v.json"
    res = CliRunner().invoke(verify_cmd, [str(ref), str(same), "--calib", str(tmp_path / "calib.npz"),
                                          "--batch-size", "5", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["samples"] == 12
    res = CliRunner().invoke(verify_cmd, [str(ref), str(same)])
    assert res.exit_code == 1 and "--calib" in res.output


def test_float32_noise_equals_an_independent_float64_comparison() -> None:
    from nepenthe_compress.verify import float32_noise

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    x = torch.randn(16, 64)
    w1, b1, w2, b2 = (p.detach().double() for p in model.parameters())
    ref = torch.tanh(x.double() @ w1.T + b1) @ w2.T + b2
    with torch.no_grad():
        expected = float((model(x).double() - ref).abs().max() / ref.abs().max())
    assert expected > 0  # float32 really rounds here
    assert float32_noise(model, [x]) == pytest.approx(expected, rel=1e-9)
