import numpy as np
import onnx
import pytest
import torch

from compression.errors import UserError
from compression.export import export_onnx
from compression.runtime import onnx_session


@pytest.mark.parametrize("fixture", ["tiny_yolov5", "tiny_ultralytics"])
def test_export_matches_torch_with_dynamic_batch(fixture, request, tmp_path):
    model = request.getfixturevalue(fixture)
    result = export_onnx(model, 96, tmp_path / "m.onnx")
    assert result.max_abs_diff < 1e-2
    x = torch.rand(3, 3, 96, 96)
    got = onnx_session(result.onnx_path).run(None, {"images": x.numpy()})[0]
    with torch.inference_mode():
        ref = model.eval()(x).numpy()
    assert got.shape == ref.shape == (3, 6, ref.shape[2])
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)
    if fixture == "tiny_yolov5":  # our decode: only the batch is dynamic, ONNX Runtime computes no shapes
        assert not {n.op_type for n in onnx.load(result.onnx_path).graph.node} & {"Shape", "Range", "Expand"}


def test_export_records_opset_and_class_names(tiny_yolov5, tmp_path):
    proto = onnx.load(export_onnx(tiny_yolov5, 64, tmp_path / "m.onnx").onnx_path)
    assert proto.opset_import[0].version >= 17
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["names"] == "{0: 'square', 1: 'disc'}" and meta["imgsz"] == "64"


def test_failed_check_leaves_no_file(tiny_yolov5, tmp_path, monkeypatch):
    import compression.export as export

    real = export.onnx_session

    class Broken:
        def __init__(self, path):
            self.s = real(path)

        def run(self, names, feeds):
            return [self.s.run(names, feeds)[0] + 1.0]

    monkeypatch.setattr(export, "onnx_session", Broken)
    with pytest.raises(UserError, match="differ from torch"):
        export_onnx(tiny_yolov5, 64, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_unreadable_check_image_is_one_line(tiny_yolov5, tmp_path):
    (tmp_path / "x.jpg").write_text("not an image")
    with pytest.raises(UserError, match="x.jpg"):
        export_onnx(tiny_yolov5, 64, tmp_path / "m.onnx", check_image=tmp_path / "x.jpg")
