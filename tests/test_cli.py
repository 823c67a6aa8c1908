import json
import subprocess
import sys

import pytest

from conftest import write_yolov5_checkpoint


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "compression", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def tiny_pt(tiny_yolov5, tmp_path_factory):
    return write_yolov5_checkpoint(tiny_yolov5, tmp_path_factory.mktemp("cli") / "tiny.pt")


def test_export_evaluate_benchmark_end_with_one_json_line(tiny_pt, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_COMPRESS_CACHE", str(tmp_path / "cache"))  # the benchmark logs the baseline's runs
    out = tmp_path / "m.onnx"
    r = run_cli("export", "--weights", tiny_pt, "--imgsz", 64, "--out", out)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["onnx_path"] == str(out)

    r = run_cli("evaluate", "--model", out, "--data", tiny_data, "--imgsz", 64)
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout.strip().splitlines()[-1])) >= {"mAP50", "mAP50_95", "images"}

    r = run_cli("benchmark", "--model", out, "--baseline", out, "--runs", 30)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(result) >= {"latency_ms", "p90_ms", "threads", "size_mb", "speedup", "imgsz", "baseline_imgsz"}
    lo, hi = result["latency_ratio_interval"]
    assert lo <= result["latency_ratio"] <= hi and "blocks" not in result and "state_sd" not in result
    assert result["latency_state"] == {"sd": 0.0, "runs": 0, "dof": 0}  # the baseline's first run on this machine
    assert "benchmark" in r.stderr  # the progress bar


@pytest.mark.parametrize("args, expect", [
    (["export", "--weights", "missing.pt", "--out", "x.onnx"], "missing.pt"),
    (["evaluate", "--model", "x.onnx", "--data", "d.yaml"], "x.onnx"),
    (["benchmark", "--model", "x.onnx"], "x.onnx"),
])
def test_bad_input_is_one_line_and_exit_2(args, expect, tmp_path):
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0]
    assert "Traceback" not in r.stderr


def test_bad_dataset_is_one_line(tiny_pt, tmp_path):
    (tmp_path / "d.yaml").write_text("train: a\nval: b\nnames: [x, y]\n")
    r = run_cli("evaluate", "--model", tiny_pt, "--data", tmp_path / "d.yaml", "--imgsz", 64)
    assert r.returncode == 2 and "holds no images" in r.stderr and "Traceback" not in r.stderr


def test_imgsz_off_stride_warns_and_rounds(tiny_pt, tmp_path):
    r = run_cli("export", "--weights", tiny_pt, "--imgsz", 70, "--out", tmp_path / "m.onnx")
    assert r.returncode == 0, r.stderr
    assert "warning: imgsz=70 is not a multiple of the model stride 32; using 96" in r.stderr


def test_a_height_and_width_go_from_export_to_evaluate_and_benchmark(tiny_pt, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_COMPRESS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "wide.onnx"
    r = run_cli("export", "--weights", tiny_pt, "--imgsz", "64,96", "--out", out)
    assert r.returncode == 0, r.stderr
    r = run_cli("evaluate", "--model", out, "--data", tiny_data)  # at the file's own size
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["images"] == 4
    r = run_cli("benchmark", "--model", out, "--runs", 30)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["imgsz"] == [64, 96]
    r = run_cli("evaluate", "--model", out, "--data", tiny_data, "--imgsz", 64)
    assert r.returncode == 2 and "fixed input of 64x96 px, but imgsz=64 was asked" in r.stderr


@pytest.mark.parametrize("bad", ["64x", "0,64", "a,b", "64,96,128"])
def test_a_bad_input_size_is_refused_before_anything_runs(bad, tmp_path):
    r = run_cli("export", "--weights", "missing.pt", "--imgsz", bad, "--out", tmp_path / "m.onnx")
    assert r.returncode == 2 and "height,width" in r.stderr and "Traceback" not in r.stderr
