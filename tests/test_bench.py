"""The benchmark suite: its cost models (against hand counts and torch's FLOP counter), its timing harness and report
(on stand-in candidates), bad options, and one quick run of the real command. Nothing here asserts a speed."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastseq2seq.__main__ import main
from fastseq2seq.benchmarks import options, suite
from fastseq2seq.benchmarks.costs import (Cost, attention_cost, decoder_step_cost, lstm_cell_cost, lstm_layer_cost,
                                          roofline)
from fastseq2seq.benchmarks.report import markdown_table
from fastseq2seq.benchmarks.runner import BenchRun, measure
from fastseq2seq.benchmarks.seq2seq import make_batch, make_model, on_reference_attention, plain_copy
from fastseq2seq.benchmarks.timing import Candidate, input_set_count, time_alternating
from fastseq2seq.ops import attention_reference, lstm_cell_reference, lstm_layer_reference

FP32 = 4


def counted_flops(fn, backward=False):
    """The FLOPs torch's counter sees in fn (matrix products only, as the cost models count)."""
    with FlopCounterMode(display=False) as counter:
        outputs = [t for t in fn() if t is not None]
        if backward:
            torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])
    return counter.get_total_flops()


def test_lstm_cell_cost_matches_a_hand_count():
    B, I, H = 2, 3, 5
    # x @ W_ih^T: B x I x 4H multiply-adds; h @ W_hh^T: B x H x 4H
    assert lstm_cell_cost(B, I, H, itemsize=FP32).flops == 2 * (2 * 3 * 20) + 2 * (2 * 5 * 20)
    # read x (6), h (10), c (10), W_ih (60), W_hh (100), b_ih and b_hh (40); write h and c (20)
    assert lstm_cell_cost(B, I, H, itemsize=FP32).bytes == (6 + 10 + 10 + 60 + 100 + 40 + 20) * FP32
    backward = lstm_cell_cost(B, I, H, itemsize=FP32, backward=True)
    assert backward == Cost(3 * 640, 2 * 246 * FP32)


@pytest.mark.parametrize("backward", [False, True])
def test_lstm_costs_match_torchs_flop_counter(backward):
    B, I, H, T = 3, 7, 5, 4
    x, h, c = (torch.randn(*shape, requires_grad=True) for shape in ((T, B, I), (B, H), (B, H)))
    weights = [torch.randn(4 * H, n, requires_grad=True) for n in (I, H)] + [torch.randn(4 * H) for _ in range(2)]
    cell = counted_flops(lambda: lstm_cell_reference(x[0], (h, c), *weights), backward)
    assert lstm_cell_cost(B, I, H, itemsize=FP32, backward=backward).flops == cell
    layer = counted_flops(lambda: lstm_layer_reference(x, (h, c), *weights)[0:1], backward)
    assert lstm_layer_cost(T, B, I, H, itemsize=FP32, backward=backward).flops == layer == T * cell


def test_lstm_layer_cost_counts_only_real_steps():
    full = lstm_layer_cost(10, 4, 8, 8, itemsize=FP32)
    padded = lstm_layer_cost(10, 4, 8, 8, itemsize=FP32, steps=20)
    assert padded.flops == full.flops / 2
    assert padded.bytes == full.bytes + 4 * 8  # the same tensors, plus the int64 lengths


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("T", [1, 6])
def test_dot_attention_cost_matches_torchs_flop_counter(T, backward):
    B, S, D, Dv = 2, 5, 3, 4
    q = torch.randn(B, T, D, requires_grad=True)
    k, v = torch.randn(B, S, D, requires_grad=True), torch.randn(B, S, Dv, requires_grad=True)
    counted = counted_flops(lambda: attention_reference(q, k, v, return_weights=False), backward)
    assert attention_cost(B, T, S, D, Dv, score="dot", itemsize=FP32, backward=backward).flops == counted


def test_attention_cost_hand_count():
    B, T, S, D = 1, 1, 1, 1
    # additive: q + k, times v, summed (3); context: weight times value, summed (2)
    cost = attention_cost(B, T, S, D, D, score="additive", itemsize=FP32)
    assert cost.flops == 3 + 2
    # read q, k, values, v (4 elements) and the bool mask (1 byte); write context and weights (2 elements)
    assert cost.bytes == 6 * FP32 + 1
    assert attention_cost(B, T, S, D, D, score="additive", itemsize=FP32, return_weights=False).bytes == 5 * FP32 + 1


@pytest.mark.parametrize("attention", ["luong-dot", "bahdanau"])
def test_decoder_step_cost_matches_torchs_flop_counter(attention):
    bench = BenchRun(device="cpu", dtype=torch.float32)
    shape = {"B": 3, "S": 4, "T": 1, "emb": 6, "hidden": 8, "vocab": 20}
    model = plain_copy(make_model(bench, shape, attention, input_feeding=True)).eval()
    src, lengths, _, _ = make_batch(3, 4, 1, 20, "cpu")
    with torch.no_grad():
        memory, state = model.encode(src, lengths)
        counted = counted_flops(on_reference_attention(
            lambda: model.decode_step(src[:, 0], state, memory, return_weights=True)[:1]))
    cost = decoder_step_cost(model.config, 3, 4, itemsize=FP32)
    # the counter sees matrix-matrix products only: it leaves out additive attention's scores, v . tanh(q + k),
    # an add and a multiply-add per (b, s, feature)
    assert cost.flops == counted + (3 * 3 * 4 * 8 if attention == "bahdanau" else 0)


def test_roofline_takes_the_slower_of_compute_and_memory():
    ceilings = {"flops_per_s": 1e12, "bytes_per_s": 1e11}
    compute_bound = roofline(Cost(flops=2e9, bytes=1e6), 4.0, ceilings)  # 2 ms of compute, 0.01 ms of memory
    assert compute_bound["bound"] == "compute" and compute_bound["roofline_fraction"] == pytest.approx(0.5)
    assert compute_bound["gflops"] == pytest.approx(500)
    memory_bound = roofline(Cost(flops=1e6, bytes=1e8), 1.0, ceilings)
    assert memory_bound["bound"] == "memory" and memory_bound["roofline_fraction"] == pytest.approx(1.0)


def test_time_alternating_rotates_the_input_sets_and_orders():
    calls = []
    sets = [{name: Candidate(lambda name=name, i=i: calls.append((name, i))) for name in "ab"} for i in range(3)]
    stats, dropped = time_alternating(sets, "cpu", repeats=6, min_repeats=6, warmup=1)
    assert dropped == {} and stats["a"]["repeats"] == stats["b"]["repeats"] == 6
    timed = calls[2:]  # after the warm-up round
    assert [i for _, i in timed[::2]] == [0, 1, 2, 0, 1, 2]
    assert [name for name, _ in timed[:4]] == ["a", "b", "b", "a"]  # who goes first alternates
    assert stats["a"]["min_ms"] <= stats["a"]["q1_ms"] <= stats["a"]["median_ms"] <= stats["a"]["q3_ms"]


def test_an_optional_candidate_that_fails_is_dropped_and_a_required_one_stops_the_run():
    def fail():
        raise RuntimeError("not built for this GPU")
    stats, dropped = time_alternating([{"ok": Candidate(lambda: None), "maybe": Candidate(fail, optional=True)}],
                                      "cpu", repeats=2, warmup=1)
    assert list(stats) == ["ok"] and "not built for this GPU" in dropped["maybe"]
    with pytest.raises(RuntimeError):
        time_alternating([{"ok": Candidate(lambda: None), "required": Candidate(fail)}], "cpu", repeats=2)


def test_input_sets_pass_twice_the_cache_within_the_limit(monkeypatch):
    monkeypatch.setattr("fastseq2seq.benchmarks.timing.last_level_cache_bytes", lambda device: 32 * 2 ** 20)
    assert input_set_count(None, "cpu") == 1
    assert input_set_count(100 * 2 ** 20, "cpu") == 1
    assert input_set_count(10 * 2 ** 20, "cpu") == 7
    assert input_set_count(1000, "cpu") == 16


def test_measure_gives_ratios_against_the_named_baselines_and_the_roofline():
    bench = BenchRun(device="cpu", dtype=torch.float32, quick=True, log=lambda text: None,
                     ceilings={"flops_per_s": 1e9, "bytes_per_s": 1e9})
    rows = measure(bench, "demo", {"pass": "fwd", "B": 2}, lambda seed: {
        "base": Candidate(lambda: sum(range(2000))), "other": Candidate(lambda: None),
        "ours": Candidate(lambda: None, ours=True, against=("base",))}, repeats=3, cost=Cost(1e3, 1e3))
    ours = next(row for row in rows if row["impl"] == "ours")
    assert set(ours["speedup"]) == {"base"} and ours["speedup"]["base"] > 0
    assert ours["case"] == {"pass": "fwd", "B": 2} and "roofline_fraction" in ours
    table = markdown_table(rows).splitlines()
    assert table[0].startswith("| pass | B | impl | median ms") and "vs base" in table[0]
    assert len(table) == 2 + 3


def test_every_benchmark_is_named_in_the_options():
    assert tuple(suite.BENCHMARKS) == options.BENCHMARK_NAMES
    for module in suite.BENCHMARKS.values():
        module.add_arguments(argparse.ArgumentParser())  # each has its own options


@pytest.mark.parametrize("argv, words", [
    (["--only", "nothing"], ["invalid choice", "lstm_cell"]),
    (["--dtype", "bfloat16", "--device", "cpu"], ["float32"]),
    (["--repeats", "0"], ["--repeats"]),
    (["--max-minutes", "0"], ["--max-minutes"]),
])
def test_bad_bench_options_are_one_line_errors(capsys, tmp_path, argv, words):
    assert main(["bench", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastseq2seq: error: ") and len(err.splitlines()) == 1
    assert all(word in err for word in words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_bench_on_cuda_without_a_gpu_is_a_one_line_error(capsys, tmp_path):
    assert main(["bench", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_quick_bench_command_writes_the_report(tmp_path):
    """The smoke run CI makes: the real command in a fresh process, one cheap benchmark."""
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, "-m", "fastseq2seq", "bench", "--quick", "--device", "cpu", "--only",
                           "lstm_cell", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"results.md", "results.json", "speedup_lstm_cell.png", "roofline_lstm_cell.png"} <= set(os.listdir(out))
    data = json.loads((out / "results.json").read_text())
    assert data["environment"]["device"] and data["ceilings"]["flops_per_s"] > 0
    rows = data["benchmarks"]["lstm_cell"]["rows"]
    assert {"nn.LSTMCell", "fastseq2seq[cpu]"} <= {row["impl"] for row in rows}
    assert all(row["median_ms"] > 0 for row in rows)
    assert all("nn.LSTMCell" in row["speedup"] for row in rows if row["ours"])
    assert "## lstm_cell" in (out / "results.md").read_text()
