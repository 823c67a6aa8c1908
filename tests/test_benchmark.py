from pathlib import Path

import numpy as np
import pytest

from compression.benchmark import (BenchResult, benchmark, benchmark_pair, count_params_and_macs, ratio_interval,
                                   with_machine_state)
from compression.errors import UserError
from compression.export import export_onnx
from conftest import record_feeds


def test_benchmark_reports_latency_size_threads_and_compute(tiny_yolov5, tmp_path):
    path = export_onnx(tiny_yolov5, 64, tmp_path / "m.onnx").onnx_path
    r = benchmark(path, model=tiny_yolov5, runs=30, warmup=2, threads=1, progress=False)
    assert r.threads == 1 and r.runs == 30
    assert 0 < r.latency_ms <= r.p90_ms
    assert r.size_mb == pytest.approx((tmp_path / "m.onnx").stat().st_size / 1e6)
    assert (r.params, r.macs) == count_params_and_macs(tiny_yolov5, 64)
    assert r.params == sum(p.numel() for p in tiny_yolov5.parameters())


def test_benchmark_refuses_too_few_runs_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="30"):
        benchmark(tmp_path / "m.onnx", runs=5)
    with pytest.raises(UserError, match="not found"):
        benchmark(tmp_path / "m.onnx")


def test_pair_times_each_file_at_its_own_size_and_gives_a_rerun_interval(tiny_yolov5, tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_COMPRESS_CACHE", str(tmp_path / "cache"))
    small = export_onnx(tiny_yolov5, 64, tmp_path / "small.onnx").onnx_path
    large = export_onnx(tiny_yolov5, 160, tmp_path / "large.onnx").onnx_path
    fed = record_feeds(monkeypatch)
    res, base = benchmark_pair(small, large, runs=30, warmup=2, threads=1, progress=False, sessions=3)
    assert (res.imgsz, base.imgsz) == (64, 160)
    # what was timed, not how fast (the shared cores' noise is no test): each file got its own size, in fresh sessions
    assert {Path(f): shapes for f, shapes in fed.items()} == {Path(small): {(1, 3, 64, 64)}, Path(large): {(1, 3, 160, 160)}}
    assert [len(b) for b in res.blocks] == [len(b) for b in base.blocks] == [10, 10, 10]  # per session pair
    ratio = res.latency_ms / base.latency_ms
    lo, hi = ratio_interval(res, base)
    assert lo <= ratio <= hi
    # a run where the baseline was slower in one session pair: the interval must widen
    drift = BenchResult(**{**vars(base), "blocks": [[t * (3 if k == 0 else 1) for t in b]
                                                    for k, b in enumerate(base.blocks)]})
    lo2, hi2 = ratio_interval(res, drift)
    assert hi2 / lo2 > hi / lo
    assert base.state_runs == 0  # the baseline's first run here: no machine state known yet


def timed(ms: float, ratio: float, threads: int = 2) -> tuple[BenchResult, BenchResult]:
    """A model and a baseline run of 5 session pairs whose ratio barely moves within the run (a quiet run)."""
    blocks = [[ms * (1 + 0.002 * k)] * 10 for k in range(5)]
    base = BenchResult(ms, ms, threads, 7.5, 50, blocks=blocks)
    return BenchResult(ms * ratio, ms * ratio, threads, 2.2, 50, blocks=[[t * ratio for t in b] for b in blocks]), base


def test_the_interval_learns_the_machines_state_from_the_baselines_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_COMPRESS_CACHE", str(tmp_path / "cache"))
    baseline = tmp_path / "fp32.onnx"
    baseline.write_bytes(b"any file: the log is keyed by its path, size and time")
    # as measured on 2 shared cores: minutes with the FP32 file at 12.2 ms and the ratio 0.47, then 16.2 ms and 0.40
    runs = [timed(12.2, 0.47), timed(12.4, 0.47), timed(16.2, 0.40)]
    states = [with_machine_state(baseline, base) for _, base in runs]
    assert [s.state_runs for s in states] == [0, 0, 3] and states[1].state_sd == 0
    model, base = runs[2]
    quiet = ratio_interval(model, base)  # the run alone: it never saw the other state
    assert not quiet[0] <= 0.47 <= quiet[1]
    lo, hi = ratio_interval(model, states[2])
    assert lo <= 0.47 <= hi and lo <= 0.40 <= hi  # a re-run in either state
    # the log is per file, host and thread count: on one thread nothing is known yet
    assert with_machine_state(baseline, timed(30.0, 0.5, threads=1)[1]).state_runs == 0
    # a line that two writers interleaved is no run
    logs = sorted((tmp_path / "cache" / "latency").rglob("*.jsonl"), key=lambda f: len(f.read_text()))
    with open(logs[-1], "a") as f:
        f.write('{"time": 1, "latency_ms": 12.3{"time": 2, "lat\n')
    assert with_machine_state(baseline, runs[0][1]).state_runs == 4


def test_a_baseline_timed_here_for_the_first_time_starts_from_the_states_the_machine_showed(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_COMPRESS_CACHE", str(tmp_path / "cache"))
    old, new = tmp_path / "old.onnx", tmp_path / "new.onnx"
    old.write_bytes(b"the FP32 file at 640 that earlier trials timed")
    new.write_bytes(b"another base size: about half the latency, the same machine")
    for _, base in (timed(12.2, 0.47), timed(12.4, 0.47), timed(16.2, 0.40)):
        with_machine_state(old, base)
    model, base = timed(6.1, 0.47)  # the new file's first run, in the fast state
    state = with_machine_state(new, base)
    assert state.state_runs == 3  # the old file's runs; the new one's single run shows no spread yet
    lo, hi = ratio_interval(model, state)
    assert lo <= 0.40 <= hi  # a re-run in the slow state
    # each file's runs about its own mean: the new file's lower latency is no spread
    again = with_machine_state(new, timed(6.2, 0.47)[1])
    assert again.state_runs == 5 and again.state_dof == 3  # 5 runs of 2 files, each about its own mean
    assert again.state_sd == pytest.approx(float(np.sqrt((np.var(np.log([12.2, 12.4, 16.2]), ddof=1) * 2
                                                          + np.var(np.log([6.1, 6.2]), ddof=1)) / 3)))
    # other thread counts keep their own logs
    assert with_machine_state(new, timed(6.1, 0.47, threads=1)[1]).state_runs == 0


def test_pair_refuses_a_size_that_the_files_do_not_have(tiny_yolov5, tmp_path):
    path = export_onnx(tiny_yolov5, 64, tmp_path / "m.onnx").onnx_path
    with pytest.raises(UserError, match="fixed input of 64 px"):
        benchmark_pair(path, path, imgsz=96, runs=30)
    with pytest.raises(UserError, match="sessions must be in 1..6"):
        benchmark_pair(path, path, runs=30, sessions=7)


def test_a_state_spread_from_few_runs_widens_the_interval_by_students_t():
    model, base = timed(12.2, 0.47)
    few, many = (BenchResult(**{**vars(base), "state_sd": 0.1, "state_dof": d}) for d in (2, 10000))
    (lo_few, hi_few), (lo_many, hi_many) = ratio_interval(model, few), ratio_interval(model, many)
    within = np.log(ratio_interval(model, base)[1] / 0.47)  # this run's own half-width (log scale)
    for (lo, hi), q in (((lo_many, hi_many), 1.960), ((lo_few, hi_few), 4.303)):  # t(0.975) at 10000 and 2 dof
        assert np.log(hi / 0.47) == pytest.approx((within ** 2 + (q * 2 ** 0.5 * 0.1) ** 2) ** 0.5, rel=1e-3)
        assert np.log(0.47 / lo) == pytest.approx(np.log(hi / 0.47), rel=1e-6)
