"""The benchmarks' logic: timing, noise, compile checks, shape sets, tables, models.

No test asserts that anything is fast: timings only have to be positive and
consistent with each other.
"""

import glob
import json
import math
import time

import pytest
import torch
from torch import nn

from benchmarks import __main__ as cli
from benchmarks import compiled, models, modes, overhead, report, shapes, suite, timing
from benchmarks.zoo import import_torchvision

QUICK_ARGS = ["--quick", "--device", "cpu"]


def quick_args(*extra):
    return cli.parse_args([*QUICK_ARGS, *extra])


# ---- timing and noise ----------------------------------------------------------------


def test_interleaved_times_times_each_callable_in_every_round():
    calls = {"short": 0, "long": 0}

    def sleeper(name, seconds):
        def fn():
            calls[name] += 1
            time.sleep(seconds)

        return fn

    times = timing.interleaved_times(
        {"short": sleeper("short", 0.002), "long": sleeper("long", 0.006)},
        "cpu", min_run_time=0.15, rounds=3)
    assert {name: len(t) for name, t in times.items()} == {"short": 3, "long": 3}
    assert 0.002 <= timing.median(times["short"]) < 0.006
    assert 2.0 < timing.ratio(times, "long", "short") < 4.0
    # warm-up, calibration and at least one timed call in each of the three rounds
    assert calls["short"] >= 5 and calls["long"] >= 5


def test_ratio_spread_ignores_one_odd_round_of_five():
    fused = [1.0] * 5
    assert timing.ratio_spread({"eager": [2, 2, 2, 2, 9], "fused": fused}, "eager", "fused") == 0
    spread = timing.ratio_spread({"eager": [1, 1.5, 2, 2.5, 3], "fused": fused}, "eager", "fused")
    assert spread == pytest.approx(0.5)  # (2.5 - 1.5) / 2
    assert timing.ratio_spread({"eager": [3.0], "fused": [1.0]}, "eager", "fused") == 0
    # three rounds: nothing dropped
    assert timing.ratio_spread({"eager": [1, 2, 4], "fused": [1, 1, 1]}, "eager",
                               "fused") == pytest.approx(1.5)


def test_faults_per_call_sees_fresh_pages():
    # 64 MiB is above glibc's largest mmap threshold: every call maps new pages
    # and fill_ faults each of them in.
    def fresh_pages():
        torch.empty(16 << 20, dtype=torch.float32).fill_(1.0)

    kept = torch.empty(16 << 20, dtype=torch.float32)

    def same_pages():
        kept.fill_(1.0)

    same_pages()
    assert timing.faults_per_call(fresh_pages, "cpu") > 1000
    assert timing.faults_per_call(same_pages, "cpu") < 100


def test_load_flags_a_busy_machine():
    assert timing.Load(cpus=2, threads=2, others=1.0).contended()
    assert not timing.Load(cpus=2, threads=2, others=0.2).contended()
    assert not timing.Load(cpus=8, threads=2, others=4.0).contended()  # CPUs to spare
    assert timing.Load(cpus=2, threads=2, before=1.5).contended()  # load average stands in
    assert not timing.Load(cpus=2, threads=2).contended()  # nothing known


def test_load_measures_the_other_processes():
    load = timing.Load.start(threads=1)
    sum(range(200_000))  # this process's own work is not "others"
    load.stop()
    if timing.busy_cpu_seconds() is not None:
        assert load.others is not None and load.others >= 0
    assert "1 thread on" in load.describe()


def test_noise_verdict_says_why():
    quiet = timing.Load(cpus=2, threads=2, others=0.0)
    rows = [{"noisy": False}, {"noisy": True}]
    assert timing.noise_verdict(quiet, [{"noisy": False}]) == []
    (line,) = timing.noise_verdict(quiet, rows, threshold=0.2)
    assert "1 of 2 rows are noisy" in line and "20%" in line
    busy = timing.Load(cpus=2, threads=2, others=1.5)
    assert any("busy" in line for line in timing.noise_verdict(busy, rows))


def test_rows_timed_on_a_busy_machine_are_marked():
    row = {"speedup_vs_eager": 1.5}
    timing.mark_busy(row, timing.Load(cpus=2, threads=2, others=0.9))
    assert row == {"speedup_vs_eager": 1.5, "others_cpus": 0.9, "busy": True}
    assert report.flags(row) == "busy"
    (line,) = timing.noise_verdict(timing.Load(cpus=2, threads=2, others=0.0), [row, {}])
    assert "1 of 2 rows were timed while other processes used CPUs" in line
    unknown = {}
    timing.mark_busy(unknown, timing.Load(cpus=2, threads=2))  # no /proc/stat
    assert unknown == {}


def test_speedups_flag_noisy_rows():
    args = quick_args("--noise-threshold", "0.1")
    row = {}
    suite._speedups(row, {"eager": [2.0, 2.0, 3.0], "fused": [1.0] * 3}, args.noise_threshold)
    assert row["speedup_vs_eager"] == 2.0 and row["spread_vs_eager"] == 0.5 and row["noisy"]
    row = {}
    suite._speedups(row, {"eager": [2.0] * 3, "fused": [1.0] * 3, "compile": [4.0] * 3}, 0.1)
    assert row["speedup_vs_compile"] == 4.0 and not row["noisy"]


# ---- compile verification ------------------------------------------------------------


def test_compile_check_sees_a_fall_back():
    module = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())
    compiled.reset()
    fn = torch.compile(module)
    check = compiled.CompileCheck()
    fn(torch.randn(2, 4, 3, 3))
    assert check.compiled() == 0
    traced = compiled.snapshot()
    fn(torch.randn(2, 4, 3, 3))  # a cache hit traces nothing
    compiled.check_unchanged(traced)
    with torch._dynamo.config.patch(recompile_limit=1):
        fn(torch.randn(2, 4, 5, 5))  # a new shape over the limit: runs eagerly
    with pytest.raises(compiled.CompileFellBack, match="traced again"):
        compiled.check_unchanged(traced)


def test_compile_check_needs_a_graph():
    compiled.reset()
    check = compiled.CompileCheck()
    with pytest.raises(compiled.CompileFellBack, match="no graph"):
        check.compiled()


def compile_rows(count):
    """`count` bn_relu_fwd_bwd rows on distinct shapes, each with the compile baseline."""
    shapes_ = [f"2,{4 + i},3,3" for i in range(count)]
    args = quick_args("--ops", "bn_relu_fwd_bwd", "--layouts", "contiguous", "--shapes",
                      *shapes_)
    return [suite.run_case(case, args) for case in suite.cases(args.grids, args.devices)]


def test_every_compile_row_compiles():
    # Without a fresh cache per row, every row after the limit's would time eager.
    with torch._dynamo.config.patch(recompile_limit=2):
        rows = compile_rows(4)
    assert len(rows) == 4
    for row in rows:
        assert "compile_error" not in row, row["compile_error"]
        assert row["compile_ms"] > 0 and row["speedup_vs_compile"] > 0


def test_a_row_that_falls_back_is_not_reported_as_compiled(monkeypatch):
    # Counters cleared but the dynamo cache kept: the recompile limit is reached.
    torch._dynamo.reset()
    monkeypatch.setattr(compiled.torch._dynamo, "reset", lambda: None)
    with torch._dynamo.config.patch(recompile_limit=1):
        rows = compile_rows(3)
    torch._dynamo.reset()
    assert "compile_error" not in rows[0]
    for row in rows[1:]:
        assert "compile_ms" not in row and "speedup_vs_compile" not in row
        assert row["compile_error"]
        assert "compile fell back" in report.flags(row)


# ---- rows, shape sets, options -------------------------------------------------------


def test_run_case_row():
    args = quick_args("--ops", "bn_relu_fwd_bwd", "--shapes", "4,8,6,6", "--rounds", "2")
    assert args.rounds == 2 and args.min_run_time == cli.QUICK_TIMING["min_run_time"]
    case = next(suite.cases(args.grids, args.devices))
    row = suite.run_case(case, args)
    for key in ("fused_ms", "eager_ms", "compile_ms"):
        assert row[key] > 0
    assert row["speedup_vs_eager"] == pytest.approx(row["eager_ms"] / row["fused_ms"])
    assert row["spread_vs_eager"] >= 0 and isinstance(row["noisy"], bool)
    if timing.busy_cpu_seconds() is not None:
        assert row["others_cpus"] >= 0 and isinstance(row["busy"], bool)
    assert row["faults_fused"] >= 0 and row["faults_eager"] >= 0
    assert row["saved_fused_MB"] < row["saved_eager_MB"]  # BN+ReLU keeps x only
    assert "copy_ms" not in row and "memory_GBps" not in row  # --verbose only


def test_verbose_row_has_the_bandwidth_columns():
    args = quick_args("--ops", "bn_fwd_bwd", "--shapes", "4,8,6,6", "--verbose",
                      "--compile-ops", "none")
    row = suite.run_case(next(suite.cases(args.grids, args.devices)), args)
    assert "compile_ms" not in row
    assert row["copy_ms"] > 0 and row["memory_GBps"] > 0
    assert row["pct_of_memory_bw"] == pytest.approx(100 * row["fused_GBps"] / row["memory_GBps"])
    # At 100% of the memory bandwidth the fused step would be as much faster than eager as
    # the floor is.
    assert row["floor_speedup_vs_eager"] == pytest.approx(
        row["speedup_vs_eager"] * 100 / row["pct_of_memory_bw"])


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


def labels(args):
    return [(c.op.name, c.shape, c.dtype, c.layout) for c in suite.cases(args.grids, ["cpu"])]


def test_presets_and_grids():
    default = labels(cli.parse_args([]))
    assert len(default) == len(set(default)) >= 30
    assert {op for op, *_ in default} == set(suite.available_ops())
    assert any(shape[0] == 16 for _, shape, *_ in default)  # resnet50 layers
    full = labels(cli.parse_args(["--full"]))
    # (3 4D shapes x 2 layouts + 3 others) x 2 dtypes: the earlier default grid
    assert len(full) == len(suite.available_ops()) * 9 * 2
    custom = labels(cli.parse_args(["--ops", "bn_fwd_bwd", "--shapes", "8,4", "--dtypes",
                                    "bfloat16"]))
    assert custom == [("bn_fwd_bwd", (8, 4), "bfloat16", "contiguous")]
    quick = labels(cli.parse_args(["--quick", "--ops", "dropout_fwd"]))
    assert {shape for _, shape, *_ in quick} == set(suite.QUICK[0].shapes)


def test_shape_sets_give_the_layers_forward_backward_rows():
    args = cli.parse_args(["--shapes", "resnet50", "--layouts", "contiguous", "--dtypes",
                           "float32"])
    cases = list(suite.cases(args.grids, ["cpu"]))
    resnet50 = shapes.SHAPE_SETS["resnet50"]
    assert {c.op.name for c in cases} == set(suite.LAYER_OPS)
    assert sum(c.layers for c in cases) == sum(s.relu_layers + s.plain_layers
                                               for s in resnet50.layers) == 53
    for case in cases:  # a row only where some layer is that op
        kind = "relu_layers" if case.op.name == "bn_relu_fwd_bwd" else "plain_layers"
        layer = next(s for s in resnet50.layers if s.shape == case.shape)
        assert case.layers == getattr(layer, kind) > 0
    with pytest.raises(SystemExit):
        cli.parse_args(["--shapes", "resnet51"])


def test_shape_sets_scale_with_batch_and_size():
    for name, shape_set in shapes.SHAPE_SETS.items():
        assert all(s.shape[0] == shape_set.batch for s in shape_set.layers), name
        assert 16 <= shape_set.batch <= 32 and 112 <= shape_set.size <= 224
    small, large = shapes.SHAPE_SETS["resnet50"], shapes.SHAPE_SETS["resnet50_224"]
    assert [s.shape[1] for s in small.layers] == [s.shape[1] for s in large.layers]


@pytest.mark.parametrize("name", list(shapes.SHAPE_SETS))
def test_static_shape_sets_match_the_models(name):
    if import_torchvision() is None:
        pytest.skip("torchvision is not installed")
    static = shapes.SHAPE_SETS[name]
    assert shapes.derive(static.model, static.batch, static.size) == static


def test_shape_set_totals_weigh_rows_by_layers():
    common = {"shape_set": "resnet50", "dtype": "float32", "layout": "contiguous",
              "device": "cpu"}
    rows = [{**common, "layers": 2, "fused_ms": 1.0, "eager_ms": 3.0},
            {**common, "layers": 1, "fused_ms": 2.0, "eager_ms": 2.0},
            {"layers": 0, "fused_ms": 9.0, "eager_ms": 9.0}]
    (line,) = report.shape_set_totals(rows)
    assert "3 of its 53 layers" in line and "fused 4.0 ms, eager 8.0 ms (2.00x)" in line


# ---- tables and summaries ------------------------------------------------------------


def test_summary_math():
    rows = [{"op": "a", "speedup_vs_eager": 2.0, "faults_fused": 0, "faults_eager": 10},
            {"op": "a", "speedup_vs_eager": 0.5, "speedup_vs_compile": 3.0, "noisy": True,
             "faults_fused": 4, "faults_eager": 0},
            {"op": "b", "speedup_vs_eager": 4.0, "tuned_speedup_vs_eager": 2.0}]
    a, b, overall = report.summarize(rows)
    assert a["op"] == "a" and a["rows"] == 2 and a["slower"] == 1 and a["noisy"] == 1
    assert a["speedup_vs_eager"] == {"geomean": pytest.approx(1.0), "min": 0.5, "max": 2.0,
                                     "rows": 2}
    assert a["speedup_vs_compile"]["geomean"] == pytest.approx(3.0)
    assert a["faults_fused"] == 2 and a["faults_eager"] == 5
    assert b["tuned_speedup_vs_eager"]["geomean"] == pytest.approx(2.0) and "faults_fused" not in b
    assert overall["op"] == "all rows" and overall["rows"] == 3
    assert overall["speedup_vs_eager"]["geomean"] == pytest.approx(4 ** (1 / 3))
    text = report.summary_table(rows)
    assert "1.00x (0.50-2.00)" in text and "2 / 5" in text
    assert timing.geomean([]) != timing.geomean([])  # nan for no rows


def test_table_marks_slower_rows():
    rows = [{"op": "bn_fwd_bwd", "shape": [2, 3], "speedup_vs_eager": 0.9, "fused_ms": 1.0},
            {"op": "bn_fwd_bwd", "shape": [2, 3], "speedup_vs_eager": 1.1, "fused_ms": 1.0,
             "tuned_speedup_vs_eager": 0.95}]
    lines = report.row_table(rows, report.MAIN_COLUMNS).splitlines()
    assert lines[0].split()[:2] == ["op", "shape"] and "compile ms" not in lines[0]
    assert lines[1].endswith("SLOWER") and lines[2].endswith("SLOWER(tuned)")
    assert report.flags({"speedup_vs_eager": 2.0, "noisy": True, "tuned_busy": True,
                         "tuned_noisy": False}) == "noisy busy(tuned)"
    markdown = report.row_table(rows, report.MAIN_COLUMNS, markdown=True).splitlines()
    assert markdown[0].startswith("| op | shape |") and "| 0.90x |" in markdown[2]


def test_render_says_when_ratios_are_not_trustworthy():
    args = quick_args()
    load = timing.Load(cpus=2, threads=2, others=1.2)
    rows = [{"op": "bn_fwd_bwd", "shape": [2, 3], "dtype": "float32", "layout": "contiguous",
             "fused_ms": 1.0, "eager_ms": 2.0, "speedup_vs_eager": 2.0, "noisy": True}]
    runs = {"default": {"load": vars(load), "wall_s": 1.0, "rows": rows,
                        "noise": timing.noise_verdict(load, rows)}}
    text = cli.render(runs, rows, args, markdown=False)
    assert "RATIOS NOT TRUSTWORTHY ('default'): the machine was busy" in text
    assert "1 of 1 rows are noisy" in text


# ---- malloc modes --------------------------------------------------------------------


def test_child_argv_leaves_the_outputs_to_the_parent():
    argv = ["--quick", "--json", "a.json", "--markdown=b.md", "--plot", "c.png", "--threads",
            "1"]
    assert modes.child_argv(argv, "steady", "x.json") == [
        "--quick", "--threads", "1", "--malloc", "steady", "--json", "x.json"]


def test_merge_puts_the_tuned_figures_beside_the_headline():
    row = {"op": "bn_fwd_bwd", "shape": [2, 3], "dtype": "float32", "layout": "contiguous",
           "device": "cpu"}
    headline = [{**row, "speedup_vs_eager": 0.9, "faults_fused": 100}]
    tuned = [{**row, "speedup_vs_eager": 2.0, "faults_fused": 0, "copy_ms": 1.0}]
    (merged,) = modes.merge(headline, tuned)
    assert merged["speedup_vs_eager"] == 0.9 and merged["tuned_speedup_vs_eager"] == 2.0
    assert merged["tuned_faults_fused"] == 0 and "tuned_copy_ms" not in merged


def test_default_run_has_both_malloc_modes_each_in_its_own_process(tmp_path):
    if not cli.allocator.available():
        pytest.skip("glibc's malloc only")
    out = tmp_path / "out.json"
    cli.main([*QUICK_ARGS, "--ops", "dropout_fwd", "--shapes", "64,32", "--json", str(out),
              "--markdown", str(tmp_path / "out.md")])
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"default", "steady"}
    assert "default malloc" in result["runs"]["default"]["malloc"]
    assert "mallopt" in result["runs"]["steady"]["malloc"]
    (row,) = result["rows"]
    assert row["tuned_faults_fused"] >= 0 and row["tuned_speedup_vs_eager"] > 0
    assert "tuned malloc: vs eager" in (tmp_path / "out.md").read_text()


def test_threads_option_sets_torch_threads(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(suite, "run", lambda args: seen.append(torch.get_num_threads()) or [])
    previous = torch.get_num_threads()
    try:
        cli.main(["--quick", "--threads", "1", "--malloc", "steady", "--json",
                  str(tmp_path / "out.json")])
    finally:
        torch.set_num_threads(previous)
    assert seen == [1]
    assert '"cores": 1' in (tmp_path / "out.json").read_text()


def test_rounds_and_threads_must_be_positive():
    with pytest.raises(SystemExit):
        cli.parse_args(["--rounds", "0"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--threads", "0"])


# ---- per-call overhead ---------------------------------------------------------------


def test_overhead_rows_cover_every_module_and_mode():
    args = cli.parse_args(["--overhead", "--quick"])
    assert args.rounds == cli.QUICK_TIMING["rounds"]
    assert cli.parse_args(["--overhead"]).rounds == overhead.TIMING["rounds"]
    for name in overhead.PAIRS:
        for mode in overhead.MODES:
            row = overhead.run_row(name, (4, 16, 8, 8), mode, args)
            assert row["eager_us"] > 0 and row["fused_us"] > 0
            assert row["speedup_vs_eager"] == pytest.approx(row["eager_us"] / row["fused_us"],
                                                            rel=1e-6)
    summary = overhead.summarize([{"module": "BatchNorm", "mode": "train, fwd+bwd",
                                   "speedup_vs_eager": s} for s in (0.5, 2.0)])
    assert summary[0]["slower"] == 1
    assert summary[0]["speedup_vs_eager"]["geomean"] == pytest.approx(1.0)


# ---- whole models --------------------------------------------------------------------


def test_saved_for_backward_bytes_leaves_out_parameters():
    model = nn.Sequential(nn.Linear(16, 4))  # keeps its input (and its weight, a parameter)
    x = torch.randn(8, 16)
    target = torch.randint(4, (8,))
    saved = models.saved_for_backward_bytes(model, x, target)
    logits_and_more = saved - x.numel() * x.element_size()
    assert 0 <= logits_and_more < x.numel() * x.element_size()


def test_peak_step_bytes_sees_a_temporary():
    def step():
        torch.ones(1 << 20).add_(1)  # 4 MiB, freed at once

    step()
    assert models.peak_step_bytes(step, "cpu") >= 4 << 20


def test_models_table_on_the_mlp(monkeypatch):
    # A later variant is one registry entry.
    variant = models.Variant("eager-copy", "the eager model again", lambda m: (m, "copy"))
    monkeypatch.setitem(models.VARIANTS, variant.name, variant)
    args = models.parse_args(["--models", "mlp", "--batch", "16", "--min-run-time", "0.05",
                              "--rounds", "3", "--variants", "eager", "fused", "compile",
                              "eager-copy"])
    rows = models.run_model("mlp", args)
    by_variant = {row["variant"]: row for row in rows}
    assert list(by_variant) == ["eager", "fused", "compile", "eager-copy"]
    for name, row in by_variant.items():
        assert row["step_ms"] > 0 and row["input"] == [16, 64], name
        assert row["saved_MB"] > 0 and row["peak_MB"] > 0
        assert ("speedup_vs_eager" in row) == (name != "eager")
    assert "2 BN, 2 with activation, 0 with add" in by_variant["fused"]["note"]
    assert by_variant["compile"]["note"].startswith("compiled in")
    # BatchNorm+ReLU keeps one tensor where PyTorch's pair keeps two
    assert by_variant["fused"]["saved_MB"] < by_variant["eager"]["saved_MB"]
    text = models.render(rows, timing.Load(2, 2, others=0.0), args, markdown=False)
    assert "eager-copy" in text and not math.isnan(by_variant["fused"]["speedup_vs_eager"])


def test_models_need_the_eager_baseline():
    with pytest.raises(SystemExit):
        models.parse_args(["--variants", "fused"])


def test_activation_and_residual_rows_time_the_same_computation():
    # Each new row's fused and eager modules compute the same thing (and backward reaches
    # the residual), so their ratio compares like with like.
    for name in suite.ACTIVATION_OPS:
        case = suite.Case(suite.OPS[name], (4, 6, 5, 5), "float32", "contiguous", "cpu")
        torch.manual_seed(0)
        fused, eager = suite.modules(case)
        eager.load_state_dict(fused.state_dict(), strict=False)
        x = suite.make_input(case).requires_grad_()
        y_fused, y_eager = fused(x), eager(x)
        torch.testing.assert_close(y_fused, y_eager, rtol=1e-5, atol=1e-5, msg=name)
        if case.op.residual:
            y_fused.sum().backward()
            assert fused.residual.grad is not None
