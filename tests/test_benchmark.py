import pytest

from compression.benchmark import benchmark, count_params_and_macs
from compression.errors import UserError
from compression.export import export_onnx


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
