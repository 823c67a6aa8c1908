import copy
import os
import pickle

import pytest
import torch

from compression.errors import UserError
from compression.models import AnchorDetect, YOLOv5Model, family, head_output_convs, load_model
from conftest import YOLOV5N_PT, needs_shared, write_yolov5_checkpoint


class _Payload:
    """Unpickling this would create a file: the proof that the loader ran nothing is that it does not exist."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_original_yolov5_checkpoint_round_trips(tiny_yolov5, tmp_path):
    path = write_yolov5_checkpoint(tiny_yolov5, tmp_path / "v5.pt")
    model = load_model(path)
    assert isinstance(model, YOLOv5Model) and model.family == "yolov5"
    assert model.nc == 2 and model.names == {0: "square", 1: "disc"}
    x = torch.rand(1, 3, 64, 64)
    ref = tiny_yolov5.half().float()(x)  # the checkpoint stores FP16 weights
    torch.testing.assert_close(model(x), ref, rtol=1e-3, atol=1e-3)


def test_original_checkpoint_keeps_its_batchnorm_eps_and_momentum(tiny_yolov5, tmp_path):
    source = copy.deepcopy(tiny_yolov5)
    for m in source.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps, m.momentum = 1e-3, 0.03  # what YOLOv5 trains with (torch's defaults are 1e-5 / 0.1)
    model = load_model(write_yolov5_checkpoint(source, tmp_path / "v5.pt"))
    assert {(m.eps, m.momentum) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {(1e-3, 0.03)}


def test_ultralytics_models_use_yolov5_batchnorm_settings(tiny_ultralytics):
    assert {(m.eps, m.momentum) for m in tiny_ultralytics.modules() if isinstance(m, torch.nn.BatchNorm2d)} \
        == {(1e-3, 0.03)}


def test_eval_output_is_decoded_boxes_and_confidences(tiny_yolov5, tiny_ultralytics):
    x = torch.rand(2, 3, 64, 64)
    for model in (tiny_yolov5, tiny_ultralytics):
        y = model.eval()(x)
        assert y.shape[:2] == (2, 4 + 2)
        assert 0 <= y[:, 4:].min() and y[:, 4:].max() <= 1  # confidences, not logits
    anchors_per_cell = 3
    assert tiny_yolov5(x).shape[2] == anchors_per_cell * (8 * 8 + 4 * 4 + 2 * 2)


def test_train_output_is_raw_per_level(tiny_yolov5):
    raw = tiny_yolov5.train()(torch.rand(1, 3, 64, 64))
    tiny_yolov5.eval()
    assert [tuple(r.shape) for r in raw] == [(1, 3, 8, 8, 7), (1, 3, 4, 4, 7), (1, 3, 2, 2, 7)]


def test_head_output_convs_are_the_last_convs(tiny_yolov5, tiny_ultralytics):
    assert [c.out_channels for c in head_output_convs(tiny_yolov5)] == [21, 21, 21]
    assert len(head_output_convs(tiny_ultralytics)) == 6


def test_the_family_is_told_by_the_head_and_fixes_what_is_never_pruned(tiny_yolov5, tiny_ultralytics):
    assert (family(tiny_yolov5).name, family(tiny_ultralytics).name) == ("yolov5", "ultralytics")
    assert family(tiny_yolov5).never_pruned(tiny_yolov5) == head_output_convs(tiny_yolov5)
    fixed = family(tiny_ultralytics).never_pruned(tiny_ultralytics)
    dfl = tiny_ultralytics.model[-1].dfl.conv  # frozen: its weights are the bin indices of the decode
    assert fixed[:6] == head_output_convs(tiny_ultralytics) and fixed[6:] == [dfl]


def test_yolov5_pickle_with_payload_is_refused_and_nothing_runs(tiny_yolov5, tmp_path):
    marker = tmp_path / "pwned"
    path = write_yolov5_checkpoint(tiny_yolov5, tmp_path / "evil.pt", extra={"x": _Payload(marker)})
    with pytest.raises(UserError, match="os.system|posix.system"):
        load_model(path)
    assert not marker.exists()


def test_ultralytics_pickle_with_payload_is_refused_and_nothing_runs(tiny_ultralytics, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": tiny_ultralytics, "train_args": {"x": _Payload(marker)}}, path)
    with pytest.raises(UserError, match="system"):
        load_model(path)
    assert not marker.exists()


def test_plain_pickle_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UserError):
        load_model(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"not a checkpoint"])
def test_unreadable_weights_give_one_line_error(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        load_model(path)
    assert "bad.pt" in str(e.value) and "\n" not in str(e.value)


def test_truncated_real_checkpoint_is_refused(tiny_yolov5, tmp_path):
    good = write_yolov5_checkpoint(tiny_yolov5, tmp_path / "v5.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="cut.pt"):
        load_model(tmp_path / "cut.pt")


def test_missing_weights_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(UserError, match="yaml"):
        load_model(tmp_path / "nope.yaml")


def test_anchor_detect_decode_matches_yolov5_formula():
    head = AnchorDetect(1, [[10, 13, 16, 30, 33, 23]], [4], torch.tensor([8.0])).eval()
    torch.nn.init.zeros_(head.m[0].weight)
    torch.nn.init.zeros_(head.m[0].bias)  # every logit 0 -> sigmoid 0.5
    y = head([torch.zeros(1, 4, 2, 2)])  # [1, 4 + 1, 3 anchors * 4 cells]
    # xy = (0.5 * 2 - 0.5 + grid) * 8, wh = (0.5 * 2) ** 2 * anchor, conf = 0.5 * 0.5
    assert y[0, :2, 0].tolist() == [4.0, 4.0]
    assert y[0, 2:4, 0].tolist() == [10.0, 13.0]
    assert y[0, 4].unique().tolist() == [0.25]


@pytest.mark.slow
@needs_shared
def test_real_yolov5n_loads():
    model = load_model(YOLOV5N_PT)
    assert model.nc == 80 and model.names[0] == "person"
    assert sum(p.numel() for p in model.parameters()) == 1_872_157
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    assert {(m.eps, m.momentum) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {(1e-3, 0.03)}
