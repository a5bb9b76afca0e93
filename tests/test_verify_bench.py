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
from nepenthe_compress.verify import (compare_runners, eval_mode, onnx_matches_torch, onnx_runner, ort_session,
                                      verify_equivalence, verify_float64)

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
    with pytest.raises(UserError) as err:
        verify_equivalence(nn.Linear(4, 3), nn.Linear(4, 2), [torch.randn(2, 4)])
    assert str(err.value) == "output 0: the reference gives (2, 3) but the candidate gives (2, 2)"
    with pytest.raises(UserError) as err:
        compare_runners(lambda x: [x], lambda x: [x, x], [torch.randn(2, 4)], names=("'a.onnx'", "'b.pt'"))
    assert str(err.value) == "'a.onnx' gives 1 output(s) but 'b.pt' gives 2"
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
    free = [gemm_onnx(tmp_path / f"{n}.onnx", [w], input_dims=["N", "F"]) for n in ("fa", "fb")]
    res = CliRunner().invoke(verify_cmd, [str(free[0]), str(free[1])])   # no data, no declared shape
    assert res.exit_code == 1
    assert res.stderr == "error: no input data: pass --calib SRC (or --input-shape C,H,W for random inputs)\n"


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


# ---------------------------------------------------------------------------------------- bad inputs

def onnx_file(path: Path, nodes: list, inputs: dict[str, list | None], outputs: dict[str, list | None],
              inits: tuple = ()) -> Path:
    """A float32 ONNX graph with the given declared input / output dims (None: no shape declared)."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in inputs.items()],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in outputs.items()],
                              initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.save(model, str(path))   # not checker-clean where shapes are left undeclared; onnxruntime loads it
    return path


def relu_onnx(path: Path, dims: list) -> Path:
    return onnx_file(path, [helper.make_node("Relu", ["x"], ["y"])], {"x": dims}, {"y": dims})


def one_error(res, needle: str | None = None) -> str:
    """The command failed with exit 1 and exactly one stderr line, 'error: ...', and no traceback."""
    assert res.exit_code == 1, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit), res.exception
    if needle is not None:
        assert lines[0] == f"error: {needle}"
    return lines[0]


def run_bench(*args: str):
    return CliRunner().invoke(bench_cmd, [*args, "--repeats", "1", "--warmup", "0"])


def run_verify(*args: str):
    return CliRunner().invoke(verify_cmd, list(args))


def test_models_without_exactly_one_input_are_refused(tmp_path):
    two = onnx_file(tmp_path / "two.onnx", [helper.make_node("Add", ["a", "b"], ["y"])],
                    {"a": ["N", 4], "b": ["N", 4]}, {"y": ["N", 4]})
    const = helper.make_node("Constant", [], ["y"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]))
    none = onnx_file(tmp_path / "none.onnx", [const], {}, {"y": [1]})
    one = relu_onnx(tmp_path / "one.onnx", ["N", 4])
    msg = f"'{two}' has 2 inputs (a, b); bench/verify need single-input models"
    one_error(run_bench(str(two)), msg)
    one_error(run_verify(str(one), str(two), "--input-shape", "4"), msg)
    one_error(run_bench(str(none)), f"'{none}' has 0 inputs; bench/verify need single-input models")
    with pytest.raises(UserError, match="has 2 inputs"):
        onnx_runner(two)


def test_input_shapes_are_compared_before_anything_runs(tmp_path):
    a = relu_onnx(tmp_path / "a.onnx", ["N", 3, 32, 32])
    b = relu_onnx(tmp_path / "b.onnx", ["N", 1, 28, 28])
    out = tmp_path / "v.json"
    # the two models against each other
    one_error(run_bench(str(a), str(b)), f"'{a}' expects input (N, 3, 32, 32) but '{b}' expects (N, 1, 28, 28)")
    one_error(run_verify(str(a), str(b), "--json", str(out)),
              f"'{a}' expects input (N, 3, 32, 32) but '{b}' expects (N, 1, 28, 28)")
    # a model against --input-shape or the data
    one_error(run_bench(str(a), "--input-shape", "1,28,28"),
              f"'{a}' expects input (N, 3, 32, 32) but the input is (N, 1, 28, 28)")
    one_error(run_verify(str(a), str(a), "--input-shape", "1,28,28", "--json", str(out)),
              f"'{a}' expects input (N, 3, 32, 32) but the data is (N, 1, 28, 28)")
    np.savez(tmp_path / "grey.npz", x=np.zeros((4, 1, 28, 28), np.float32))
    one_error(run_verify(str(a), str(a), "--calib", str(tmp_path / "grey.npz"), "--json", str(out)),
              f"'{a}' expects input (N, 3, 32, 32) but the data is (N, 1, 28, 28)")
    one_error(run_verify(str(a), str(a), "--input-shape", "3,32", "--json", str(out)),
              f"'{a}' expects input (N, 3, 32, 32) but the data is (N, 3, 32)")
    assert not out.exists()   # the comparison never ran: no verdict written
    # a fixed batch dimension
    fixed = relu_onnx(tmp_path / "fixed.onnx", [1, FEATURES])
    one_error(run_bench(str(fixed), "--batch", "1", "--batch", "4"),
              f"'{fixed}' expects input (1, {FEATURES}) (a fixed batch of 1) but the input comes in batches of 4")
    one_error(run_verify(str(fixed), str(fixed), "--limit", "10"),
              f"'{fixed}' expects input (1, {FEATURES}) (a fixed batch of 1) but the data comes in batches of 10")
    ok = run_verify(str(fixed), str(fixed), "--limit", "3", "--batch-size", "1")
    assert ok.exit_code == 0, ok.output
    # declared dims are enough for random inputs: no --input-shape needed
    ok = run_verify(str(a), str(a), "--limit", "2", "--json", str(out))
    assert ok.exit_code == 0, ok.output
    assert json.loads(out.read_text())["samples"] == 2


def test_output_count_and_shape_mismatches_name_both_models(tmp_path):
    five = gemm_onnx(tmp_path / "five.onnx", [square(0)[:5]])
    four = gemm_onnx(tmp_path / "four.onnx", [square(0)[:4]])
    one_error(run_verify(str(five), str(four)), f"output 0: '{five}' gives (N, 5) but '{four}' gives (N, 4)")
    pair = onnx_file(tmp_path / "pair.onnx", [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["z"])],
                     {"x": ["N", FEATURES]}, {"y": ["N", FEATURES], "z": ["N", FEATURES]})
    single = relu_onnx(tmp_path / "single.onnx", ["N", FEATURES])
    one_error(run_verify(str(single), str(pair)),
              f"'{single}' has 1 output ((N, {FEATURES})) but '{pair}' has 2 outputs ((N, {FEATURES}), (N, {FEATURES}))")
    # an output shape the file leaves undeclared is the one onnxruntime infers from the graph
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    loose = onnx_file(tmp_path / "loose.onnx", [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)],
                      {"x": ["N", FEATURES]}, {"y": None}, inits=(axes,))
    one_error(run_verify(str(single), str(loose), "--limit", "3"),
              f"output 0: '{single}' gives (N, {FEATURES}) but '{loose}' gives (N, 1)")


def test_error_line_is_one_clean_line():
    from nepenthe_compress.verify import MESSAGE_CHARS, error_line

    ort_text = ("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: x for the following "
                "indices\n index: 1 Got: 3 Expected: 1\n index: 2 Got: 32 Expected: 28\n Please fix either the "
                "inputs/outputs or the model.")
    assert error_line(RuntimeError(ort_text)) == (
        "Got invalid dimensions for input: x for the following indices index: 1 Got: 3 Expected: 1 index: 2 "
        "Got: 32 Expected: 28 Please fix either the inputs/outputs or the model.")
    words = [f"w{i:03d}" for i in range(200)]          # 999 characters, every word distinct
    long = error_line(ValueError("\n".join(words)))
    head, tail = long.split(" ... ")
    assert len(long) <= MESSAGE_CHARS + 5 and "\n" not in long
    assert " ".join(words).startswith(head) and " ".join(words).endswith(tail)      # whole words only
    assert head.split()[-1] in words and tail.split()[0] in words and tail.endswith("w199")
    assert error_line(ValueError("")) == "ValueError"


def test_runtime_failures_are_one_line_with_the_reason(tmp_path):
    """A model whose declared dims fit but which fails inside: onnxruntime's multi-line, 400-character
    message becomes one line that keeps what failed (the node) and why (the end)."""
    shape = numpy_helper.from_array(np.array([2, 8], np.int64), "s")
    bad = onnx_file(tmp_path / "reshape.onnx", [helper.make_node("Reshape", ["x", "s"], ["y"])],
                    {"x": ["N", FEATURES]}, {"y": None}, inits=(shape,))
    line = one_error(run_bench(str(bad), "--batch", "3"))
    assert line.startswith(f"error: onnxruntime failed on '{bad}' with input (3, {FEATURES}): Non-zero status code "
                           "returned while running Reshape node.")
    assert line.endswith("Input shape:{3,16}, requested shape:{2,8}") and "[ONNXRuntimeError]" not in line
    out = tmp_path / "v.json"
    line = one_error(run_verify(str(bad), str(bad), "--limit", "3", "--json", str(out)))
    assert line.startswith(f"error: onnxruntime failed on '{bad}' with input (3, {FEATURES}): Non-zero status")
    assert not out.exists()
    # a torch model the user named: its exception becomes one line naming it
    from nepenthe_compress.verify import torch_runner

    with pytest.raises(UserError) as err:
        torch_runner(nn.Linear(FEATURES, 2), "m.pt")(torch.randn(2, 5))
    assert str(err.value).startswith("'m.pt' failed on input (2, 5): mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError):            # unnamed (internal) runners let errors through
        torch_runner(nn.Linear(FEATURES, 2))(torch.randn(2, 5))


def test_inputs_over_the_memory_budget_are_refused_before_allocation(tmp_path):
    from nepenthe_compress.signature import MAX_INPUT_BYTES

    assert MAX_INPUT_BYTES == 4 * 2**30
    big = relu_onnx(tmp_path / "big.onnx", ["N", 3, 224, 224])
    one_error(run_bench(str(big), "--batch", "100000000"),
              "input (100000000, 3, 224, 224) would take 110 TiB, over the 4 GiB input budget: "
              "use a smaller batch or input shape")
    one_error(run_verify(str(big), str(big), "--limit", "100000000"),
              "random input (100000000, 3, 224, 224) would take 54.8 TiB, over the 4 GiB input budget: "
              "use a smaller batch or input shape")
    # the largest batch under the budget is not refused by the check (float64 samples: 8 bytes each)
    from nepenthe_compress.signature import check_input_bytes

    per_sample = 3 * 224 * 224 * 8
    check_input_bytes((MAX_INPUT_BYTES // per_sample, 3, 224, 224), 8)
    with pytest.raises(UserError, match="over the 4 GiB input budget"):
        check_input_bytes((MAX_INPUT_BYTES // per_sample + 1, 3, 224, 224), 8)


def test_thread_counts_are_bounded(tmp_path):
    from nepenthe_compress.verify import MAX_THREADS

    model = relu_onnx(tmp_path / "m.onnx", ["N", 4])
    for res in (run_bench(str(model), "--threads", "100000"), run_verify(str(model), str(model), "--threads", "0")):
        assert res.exit_code == 2 and f"1<=x<={MAX_THREADS}" in res.output
    with pytest.raises(UserError, match=f"threads must be between 1 and {MAX_THREADS}, got 100000"):
        ort_session(model, threads=100000)


def test_verify_json_is_written_exactly_when_the_comparison_ran(tmp_path):
    w = square(0)
    w_bad = w.copy()
    w_bad[1, 2] += 0.1
    ref, same, bad = (gemm_onnx(tmp_path / f"{n}.onnx", [m]) for n, m in (("ref", w), ("same", w), ("bad", w_bad)))
    out = tmp_path / "v.json"
    passed = run_verify(str(ref), str(same), "--limit", "4", "--json", str(out))
    assert passed.exit_code == 0 and passed.stderr == ""
    assert json.loads(out.read_text())["passed"] is True
    out.unlink()
    failed = run_verify(str(ref), str(bad), "--limit", "4", "--json", str(out))
    verdict = json.loads(out.read_text())
    assert verdict["passed"] is False and verdict["max_rel"] > 1e-5 and verdict["samples"] == 4
    one_error(failed, f"not equivalent: max |diff| / max |ref| = {verdict['max_rel']:.3g} > tol 1e-05")
    to_stdout = run_verify(str(ref), str(bad), "--limit", "4", "--json", "-")
    assert to_stdout.exit_code == 1 and json.loads(to_stdout.stdout) == verdict   # stdout holds only the verdict
    assert "NOT equivalent" in to_stdout.stderr                                   # the table went to stderr
    assert to_stdout.stderr.splitlines()[-1] == failed.stderr.strip()
    out.unlink()
    missing = run_verify(str(ref), str(tmp_path / "model.pt"), "--json", str(out))
    assert missing.exit_code == 2 and not out.exists()     # click refuses the missing file
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    line = one_error(run_verify(str(ref), str(garbage), "--json", str(out)))
    assert line.startswith(f"error: onnxruntime cannot load '{garbage}': ")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ref.onnx", "same.onnx", "bad.onnx", "garbage.onnx"])


@pytest.fixture()
def program(tmp_path) -> tuple[Path, nn.Module]:
    from nepenthe_compress.export import export_pt2

    model = small_net()
    return export_pt2(model, torch.randn(2, 3, 8, 8), tmp_path / "net.pt2"), model


def test_pt2_needs_trust_and_then_verifies_with_its_declared_input(tmp_path, program):
    path, model = program
    refused = run_verify(str(path), str(path), "--input-shape", "3,8,8")
    one_error(refused, f"'{path}' is a torch.export program, and loading one runs code stored in the file: "
                       "pass --trust-pickle if you trust it, or verify the .onnx instead")
    out = tmp_path / "v.json"
    ok = run_verify(str(path), str(path), "--trust-pickle", "--limit", "3", "--json", str(out))
    assert ok.exit_code == 0, ok.output
    assert json.loads(out.read_text())["samples"] == 3        # shape (3, 8, 8) read from the program
    other = relu_onnx(tmp_path / "other.onnx", ["N", 3, 32, 32])
    one_error(run_verify(str(path), str(other), "--trust-pickle"),
              f"'{path}' expects input (batch, 3, 8, 8) but '{other}' expects (N, 3, 32, 32)")


def test_pt2_payload_is_not_run_without_trust(tmp_path, program):
    import os
    import pickle
    import zipfile

    path, _ = program
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                next(iter(config["config"].values()))["use_pickle"] = True
                data = json.dumps(config).encode()
            elif info.filename.endswith("weights/weight_0"):
                data = pickle.dumps(Payload())
            dst.writestr(info, data)
    assert "is a torch.export program" in one_error(run_verify(str(evil), str(path), "--input-shape", "3,8,8"))
    assert not marker.exists()


def test_corrupt_pt2_gives_one_line_and_no_torch_noise(tmp_path, capfd, program):
    from nepenthe_compress.errors import ExportError
    from nepenthe_compress.export import load_pt2

    path, _ = program
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(path.read_bytes()[:3000])
    capfd.readouterr()
    with pytest.raises(ExportError) as err:
        load_pt2(truncated)
    assert str(err.value) == f"cannot load exported program '{truncated}': File is not a zip file"
    res = run_verify(str(truncated), str(path), "--trust-pickle", "--input-shape", "3,8,8")
    one_error(res, f"cannot load exported program '{truncated}': File is not a zip file")
    assert capfd.readouterr() == ("", "")      # torch's warnings and log lines (written to fd 2) are silenced


# ---------------------------------------------------------------------------------------- verify per site

def test_verify_checks_the_states_a_fold_relied_on_per_site(tmp_path):
    """A fold relies on neuron 1 of ``act`` being OFF (it is, far from 0, on all its data); on new
    data that neuron is ON for 5 samples: verify names the site, counts the flips and reports the
    error of the linear map there (relu(z) - 0 = z, so the largest positive z)."""
    from nepenthe_compress.cli import main
    from test_certify import columns, tiny, uniform

    tiny(tmp_path)
    state = tmp_path / "tiny.pt"
    torch.save(tiny(tmp_path).state_dict(), state)
    n = 100
    np.savez(tmp_path / "calib.npz", x=columns(uniform(5, 6, n, 0), uniform(-6, -5, n, 1),
                                               uniform(-6, -5, n, 2)).numpy())
    new = columns(uniform(5, 6, 20, 3), uniform(-6, -5, 20, 4), uniform(-6, -5, 20, 5)).numpy()
    new[[2, 5, 7, 11, 13], 1] = [0.1, 0.7, 0.3, 0.2, 0.4]
    np.savez(tmp_path / "new.npz", x=new)
    load = ["--arch", "tiny_certify:build", "--code-path", str(tmp_path)]
    folded = CliRunner().invoke(main, ["fold", str(state), *load, "--calib", str(tmp_path / "calib.npz"), "-o",
                                       str(tmp_path / "out"), "--no-bench", "--no-pt2", "--cost", "flops"])
    assert folded.exit_code == 0, folded.output
    onnx_file = tmp_path / "out" / "tiny.folded.onnx"

    res = CliRunner().invoke(main, ["verify", str(state), str(onnx_file), *load, "--calib", str(tmp_path / "new.npz"),
                                    "--json", str(tmp_path / "v.json")])
    assert res.exit_code == 1 and res.stderr.splitlines()[-1].startswith("error: not equivalent"), res.output
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["fold_report"] == str(tmp_path / "out" / "tiny.report.json")
    (site,) = data["sites"]
    assert (site["target"], site["neurons_relied_on"], site["observations"]) == ("act", 3, 20)
    assert (site["flipped"], site["flipped_elements"]) == (1, 5)
    assert site["element_flip_rate"] == pytest.approx(5 / 60)
    assert site["max_abs_error"] == pytest.approx(0.7, rel=1e-6)
    assert "states relied on by the fold" in res.stdout

    same = CliRunner().invoke(main, ["verify", str(state), str(onnx_file), *load, "--calib", str(tmp_path / "calib.npz"),
                                     "--json", str(tmp_path / "c.json")])
    assert same.exit_code == 0, same.output
    (site,) = json.loads((tmp_path / "c.json").read_text())["sites"]
    assert (site["flipped"], site["flipped_elements"], site["max_abs_error"]) == (0, 0, 0.0)

    # the states are read through the original model: an ONNX reference cannot check them
    bad = CliRunner().invoke(main, ["verify", str(tmp_path / "out" / "tiny.onnx"), str(onnx_file), "--calib",
                                    str(tmp_path / "new.npz"), "--report", str(tmp_path / "out" / "tiny.report.json")])
    assert bad.exit_code == 1 and bad.stderr.count("\n") == 1 and "REFERENCE must be the checkpoint" in bad.stderr


def test_relied_error_of_each_state_by_hand():
    from nepenthe_compress.certify import relied_error
    from nepenthe_compress.sites import LEAKY, RELU6

    low, high = np.array([-2.0, -1.0, 0.5, 5.0]), np.array([-0.5, 2.0, 7.0, 8.0])
    # ReLU6 relied OFF (0), LINEAR (z), LINEAR (z), SATURATED (6): |relu6(z) - map| at the worst z
    err = relied_error(RELU6, {"min": 0.0, "max": 6.0}, np.array([0, 1, 1, 2]), low, high)
    np.testing.assert_allclose(err, [0.0, 1.0, 1.0, 1.0])
    # LeakyReLU(0.1) relied OFF (0.1 z) with z up to 2: 2 - 0.2; ON (z) with z down to -2: 2 - 0.2; -1: none
    err = relied_error(LEAKY, {"negative_slope": 0.1}, np.array([0, 1, -1, 1]),
                       np.array([-1.0, -2.0, -3.0, 1.0]), np.array([2.0, 1.0, 3.0, 2.0]))
    np.testing.assert_allclose(err, [1.8, 1.8, 0.0, 0.0])
