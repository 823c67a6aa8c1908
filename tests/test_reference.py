import json

import pytest

from compression.reference import reference_curves, reference_sizes
from conftest import record_feeds, write_yolov5_checkpoint


def test_reference_sizes_run_from_half_the_base_size_up_to_it_in_stride_multiples():
    assert reference_sizes(640, 32) == [320, 384, 448, 512, 576, 640]
    assert reference_sizes(128, 32) == [64, 128]
    assert reference_sizes(416, 32) == [224, 288, 352, 416]


@pytest.mark.slow
def test_reference_curves_measure_fp32_and_int8_at_each_size_once(tiny_yolov5, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_COMPRESS_CACHE", str(tmp_path / "cache"))
    weights = write_yolov5_checkpoint(tiny_yolov5, tmp_path / "tiny.pt")
    fed = record_feeds(monkeypatch)
    points = reference_curves(weights, tiny_data, 128, progress=False)
    assert [(p.imgsz, p.precision) for p in points] == [(64, "fp32"), (64, "int8"), (128, "fp32"), (128, "int8")]
    for p in points:
        assert 0 <= p.mAP50_95 <= 1 and p.latency_ratio_interval[0] <= p.latency_ratio <= p.latency_ratio_interval[1]
    sizes = {(p.imgsz, p.precision): p.size_mb for p in points}
    assert sizes[(128, "int8")] < 0.5 * sizes[(128, "fp32")]  # the INT8 points are really quantized files
    # each point's file was timed at its own size against the base size (what was timed, not how fast)
    assert all(len(shapes) == 1 for shapes in fed.values()), fed
    timed = sorted(next(iter(shapes))[2] for shapes in fed.values())
    assert timed.count(64) >= 2 and set(timed) == {64, 128}, fed  # FP32 and INT8 at 64 (and baselines), vs 128
    cached = list((tmp_path / "cache" / "reference").glob("*.json"))
    assert len(cached) == 1 and len(json.loads(cached[0].read_text())) == 4
    again = reference_curves(weights, tiny_data, 128, progress=False)  # from the cache: the same figures
    assert again == points


def test_reference_for_a_report_whose_weights_are_elsewhere_is_one_line(tmp_path):
    from compression.errors import UserError
    from compression.reference import reference_for_report

    with pytest.raises(UserError, match="weights '.*missing.pt', not found here"):
        reference_for_report({"weights": str(tmp_path / "missing.pt"), "data": "d.yaml", "imgsz": 640})


@pytest.mark.slow
def test_reference_curves_shaped_like_the_train_images(tiny_yolov5, wide_data, tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_COMPRESS_CACHE", str(tmp_path / "cache"))
    weights = write_yolov5_checkpoint(tiny_yolov5, tmp_path / "tiny.pt")
    fed = record_feeds(monkeypatch)
    points = reference_curves(weights, wide_data, 128, progress=False, rect=True)
    # 128 x 96 photos: 64 -> 48 rounds up to a 64 square; 128 -> 96 x 128
    assert [(p.imgsz, p.precision, p.rect) for p in points] == [
        (64, "fp32", True), (64, "int8", True), ([96, 128], "fp32", True), ([96, 128], "int8", True)]
    assert {next(iter(shapes))[2:] for shapes in fed.values()} >= {(96, 128), (128, 128)}  # timed at their shapes
    square = reference_curves(weights, wide_data, 128, progress=False)
    assert [(p.imgsz, p.rect) for p in square] == [(64, False)] * 2 + [(128, False)] * 2  # cached apart
