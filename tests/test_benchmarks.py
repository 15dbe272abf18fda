"""The benchmark's measurement helpers (the timings themselves are not asserted)."""

import glob
import time

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import suite


def test_interleaved_medians_times_each_callable():
    calls = {"short": 0, "long": 0}

    def sleeper(name, seconds):
        def fn():
            calls[name] += 1
            time.sleep(seconds)

        return fn

    medians = suite.interleaved_medians(
        {"short": sleeper("short", 0.002), "long": sleeper("long", 0.006)},
        "cpu", min_run_time=0.15, rounds=3)
    assert set(medians) == {"short", "long"}
    assert 0.002 <= medians["short"] < 0.006
    assert 2.0 < medians["long"] / medians["short"] < 4.0
    # warm-up plus at least one timed call in each of the three rounds
    assert calls["short"] >= 4 and calls["long"] >= 4


def test_faults_per_call_sees_fresh_pages():
    # 64 MiB is above glibc's largest mmap threshold: every call maps new pages
    # and fill_ faults each of them in.
    def fresh_pages():
        torch.empty(16 << 20, dtype=torch.float32).fill_(1.0)

    kept = torch.empty(16 << 20, dtype=torch.float32)

    def same_pages():
        kept.fill_(1.0)

    same_pages()
    assert suite.faults_per_call(fresh_pages, "cpu") > 1000
    assert suite.faults_per_call(same_pages, "cpu") < 100


def test_run_case_row():
    args = cli.parse_args(["--quick", "--ops", "bn_relu_fwd_bwd", "--shapes", "4,8,6,6",
                           "--rounds", "2", "--device", "cpu"])
    assert args.rounds == 1  # --quick: one round
    args.rounds = 2
    case = next(suite.cases(args.ops, args.shapes, args.dtypes, args.layouts, args.devices))
    row = suite.run_case(case, args)
    for key in ("copy_ms", "fused_ms", "eager_ms", "compile_ms"):
        assert row[key] > 0
    assert row["speedup_vs_eager"] == pytest.approx(row["eager_ms"] / row["fused_ms"])
    assert row["memory_GBps"] > 0 and "memory_copy_ms" not in row
    assert row["pct_of_memory_bw"] == pytest.approx(100 * row["fused_GBps"] / row["memory_GBps"])
    # At 100% of the memory bandwidth the fused step would be as much faster than eager as
    # the floor is.
    assert row["floor_speedup_vs_eager"] == pytest.approx(
        row["speedup_vs_eager"] * 100 / row["pct_of_memory_bw"])
    assert row["faults_fused"] >= 0 and row["faults_eager"] >= 0
    assert row["saved_fused_MB"] < row["saved_eager_MB"]  # BN+ReLU keeps x only


def test_memory_copy_is_far_larger_than_the_caches():
    cache = suite.last_level_cache_bytes("cpu")
    if glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        assert cache >= 1 << 20  # where Linux reports the caches, the largest is 1 MiB or more
    source, destination = suite.memory_copy_buffers("cpu")
    nbytes = source.numel() * source.element_size()
    assert nbytes >= suite.MEMORY_COPY_MIN_BYTES
    assert nbytes >= suite.MEMORY_COPY_CACHE_FACTOR * cache
    assert destination.shape == source.shape and destination.data_ptr() != source.data_ptr()
    assert suite.memory_copy_buffers("cpu")[0] is source  # allocated once


def test_rounds_and_threads_must_be_positive():
    with pytest.raises(SystemExit):
        cli.parse_args(["--rounds", "0"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--threads", "0"])


def test_threads_option_sets_torch_threads(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(suite, "run", lambda args: seen.append(torch.get_num_threads()) or [])
    previous = torch.get_num_threads()
    try:
        cli.main(["--quick", "--threads", "1", "--json", str(tmp_path / "out.json")])
    finally:
        torch.set_num_threads(previous)
    assert seen == [1]
    assert '"cores": 1' in (tmp_path / "out.json").read_text()
