import json
import subprocess
import sys

import cv2
import pytest

from compression.export import export_onnx
from compression.infer import infer
from conftest import write_yolov5_checkpoint


@pytest.fixture(scope="module")
def models(tiny_yolov5, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    onnx_path = tmp / "tiny.onnx"
    export_onnx(tiny_yolov5, 64, onnx_path)
    return {"pt": write_yolov5_checkpoint(tiny_yolov5, tmp / "tiny.pt"), "onnx": onnx_path}


@pytest.mark.parametrize("kind", ["pt", "onnx"])
def test_infer_draws_every_image_and_writes_json(models, tiny_data, tmp_path, kind):
    source = tiny_data.parent / "images" / "val"
    res = infer(models[kind], source, tmp_path, imgsz=64, conf=0.001, progress=False)
    dets = json.loads((tmp_path / "detections.json").read_text())
    assert res["images"] == 4 and sorted(dets) == sorted(p.name for p in source.iterdir())
    for name, boxes in dets.items():
        img = cv2.imread(str(tmp_path / name))
        assert img is not None and img.shape == cv2.imread(str(source / name)).shape
        for d in boxes:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= 96 and 0 <= y1 <= y2 <= 96 and d["name"] in ("square", "disc")
    assert res["detections"] == sum(len(v) for v in dets.values()) > 0


def test_infer_bad_source_is_one_line(models, tmp_path):
    r = subprocess.run([sys.executable, "-m", "compression", "infer", "--model", str(models["onnx"]), "--source",
                        str(tmp_path / "nothing"), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "neither an image nor a folder" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
