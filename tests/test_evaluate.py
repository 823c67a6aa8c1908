import types

import pytest
import torch
from ultralytics.utils import nms

from compression.data import build_dataset, build_loader, load_data_config
from compression.errors import UserError
from compression.evaluate import check_imgsz, evaluate, map_drop_sd
from compression.export import export_onnx
from compression.models import load_model
from compression.runtime import Predictor
from conftest import COCO128, YOLOV5N_PT, needs_shared


class _OraclePredictor(Predictor):
    """Predicts each val image's ground-truth boxes (optionally shifted: by one amount, or one per image), in loader
    order."""

    def __init__(self, data, imgsz, shift=0.0, pad_x=0):
        self.names, self.stride, self.imgsz, self.device = data["names"], 32, None, torch.device("cpu")
        self.labels = build_dataset(data, "val", imgsz).labels
        self.seen, self.shift, self.pad_x = 0, shift, pad_x
        self.size = min(imgsz) if isinstance(imgsz, tuple) else imgsz  # 96 px squares: scaled to the short side

    def __call__(self, img):
        out = torch.zeros(img.shape[0], 4 + len(self.names), 10)
        for b in range(img.shape[0]):
            lab = self.labels[self.seen]
            shift = self.shift[self.seen] if isinstance(self.shift, list) else self.shift
            self.seen += 1
            for j, (cls, box) in enumerate(zip(lab["cls"].flatten(), lab["bboxes"])):
                xywh = torch.tensor(box) * self.size  # 96 px squares letterboxed to imgsz: scale (and pad_x) only
                xywh[0] += shift * xywh[2] + self.pad_x
                out[b, :4, j] = xywh
                out[b, 4 + int(cls), j] = 0.9
        return out


def test_perfect_predictions_score_one_and_shifted_ones_less(tiny_data):
    data = load_data_config(tiny_data)
    perfect = evaluate(_OraclePredictor(data, 64), data, 64, progress=False)
    assert perfect.mAP50 > 0.99 and perfect.mAP50_95 > 0.95
    shifted = evaluate(_OraclePredictor(data, 64, shift=0.2), data, 64, progress=False)
    assert shifted.mAP50 > 0.99 and shifted.mAP50_95 < 0.7  # IoU ~0.67: counts at 0.5, not at 0.7+


def test_a_rectangular_input_maps_boxes_back_through_its_padding(tiny_data):
    data = load_data_config(tiny_data)  # 96x96 photos into 64 high x 96 wide: 64x64, 16 px of padding each side
    perfect = evaluate(_OraclePredictor(data, (64, 96), pad_x=16), data, (64, 96), progress=False)
    assert perfect.mAP50 > 0.99 and perfect.mAP50_95 > 0.95
    unpadded = evaluate(_OraclePredictor(data, (64, 96)), data, (64, 96), progress=False)
    assert unpadded.mAP50_95 < 0.7  # boxes read without the padding are 16 px off


def test_a_slow_nms_loses_no_image_of_a_batch(tiny_data, monkeypatch):
    clock = iter(range(0, 10**6, 100))  # every reading of NMS's clock is 100 s after the last: always past its limit
    monkeypatch.setattr(nms, "time", types.SimpleNamespace(time=lambda: float(next(clock))))
    data = load_data_config(tiny_data)
    result = evaluate(_OraclePredictor(data, 64), data, 64, batch=4, progress=False)
    assert result.images == 4 and result.mAP50 > 0.99 and result.mAP50_95 > 0.95


def test_the_spread_of_a_drop_comes_from_the_images_that_lose(tiny_data):
    data = load_data_config(tiny_data)
    perfect = evaluate(_OraclePredictor(data, 64), data, 64, progress=False, keep_images=True)
    assert len(perfect.per_image["names"]) == len(perfect.per_image["tp"]) == 4
    assert evaluate(_OraclePredictor(data, 64), data, 64, progress=False).per_image is None  # only when asked
    assert map_drop_sd(perfect.per_image, perfect.per_image) == 0.0
    everywhere = evaluate(_OraclePredictor(data, 64, shift=0.2), data, 64, progress=False, keep_images=True)
    one_image = evaluate(_OraclePredictor(data, 64, shift=[0.4, 0, 0, 0]), data, 64, progress=False,
                         keep_images=True)
    assert perfect.mAP50_95 - everywhere.mAP50_95 > 0.3 and perfect.mAP50_95 - one_image.mAP50_95 > 0.05
    # every image loses alike: any draw of them loses the same; one image loses: the draws disagree
    assert map_drop_sd(perfect.per_image, everywhere.per_image) < 0.01
    assert map_drop_sd(perfect.per_image, one_image.per_image) > 0.05
    reordered = {k: v[::-1] for k, v in one_image.per_image.items()}
    with pytest.raises(ValueError, match="same images"):
        map_drop_sd(perfect.per_image, reordered)


def test_torch_and_onnx_predict_the_same_on_val_images(tiny_yolov5, tiny_data, tmp_path):
    onnx_path = export_onnx(tiny_yolov5, 64, tmp_path / "m.onnx").onnx_path
    data = load_data_config(tiny_data)
    batch = next(iter(build_loader(build_dataset(data, "val", 64), 4)))
    img = batch["img"].float() / 255
    torch.testing.assert_close(Predictor(onnx_path)(img), Predictor(tiny_yolov5, device="cpu")(img),
                               rtol=1e-3, atol=1e-3)


def test_class_count_mismatch_is_refused(tiny_data):
    model = load_model("yolov5n.yaml", nc=3)
    with pytest.raises(UserError, match="3 classes"):
        evaluate(model, tiny_data, 64, progress=False)


def test_onnx_fixed_size_must_match(tiny_yolov5, tiny_data, tmp_path):
    onnx_path = export_onnx(tiny_yolov5, 64, tmp_path / "m.onnx").onnx_path
    with pytest.raises(UserError, match="fixed input of 64"):
        evaluate(onnx_path, tiny_data, 96, progress=False)
    wide = export_onnx(tiny_yolov5, (64, 96), tmp_path / "wide.onnx").onnx_path
    assert Predictor(wide).imgsz == (64, 96)
    with pytest.raises(UserError, match="fixed input of 64x96 px, but imgsz=96x64"):
        evaluate(wide, tiny_data, (96, 64), progress=False)
    assert evaluate(wide, tiny_data, (64, 96), progress=False).images == 4


def test_imgsz_rounds_up_to_stride_with_warning():
    with pytest.warns(UserWarning, match="using 128"):
        assert check_imgsz(100, 32) == 128
    with pytest.warns(UserWarning, match="using 96x128"):
        assert check_imgsz((72, 128), 32) == (96, 128)
    assert check_imgsz((64, 64), 32) == 64
    with pytest.raises(UserError):
        check_imgsz(0, 32)


@pytest.mark.slow
@needs_shared
def test_yolov5n_coco128_map_torch_and_onnx(tmp_path):
    model = load_model(YOLOV5N_PT)
    torch_map = evaluate(model, COCO128, 640, progress=False).mAP50_95
    onnx_map = evaluate(export_onnx(model, 640, tmp_path / "m.onnx").onnx_path, COCO128, 640, progress=False).mAP50_95
    assert torch_map >= 0.320 and onnx_map >= 0.320
    assert abs(torch_map - onnx_map) <= 0.003


def test_evaluate_leaves_nothing_in_the_current_folder(tiny_yolov5, tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evaluate(tiny_yolov5, tiny_data, 64, progress=False)
    assert list(tmp_path.iterdir()) == []  # ultralytics' validator would make runs/detect/train-N here
