"""Shared fixtures: tiny datasets written by the tests, tiny models built from yaml, real assets when present."""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

SHARED = Path(__file__).resolve().parents[2] / "shared"
COCO128 = SHARED / "datasets" / "coco128" / "data.yaml"
YOLOV5N_PT = SHARED / "weights" / "yolov5n.pt"

needs_shared = pytest.mark.skipif(not YOLOV5N_PT.is_file(), reason="../shared (real weights and COCO128) is absent")

# The YOLOv5n architecture as the original ultralytics/yolov5 repository describes it (v6.0 layout).
YOLOV5N_ARCH = {
    "nc": 80, "depth_multiple": 0.33, "width_multiple": 0.25,
    "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
    "backbone": [[-1, 1, "Conv", [64, 6, 2, 2]], [-1, 1, "Conv", [128, 3, 2]], [-1, 3, "C3", [128]],
                 [-1, 1, "Conv", [256, 3, 2]], [-1, 6, "C3", [256]], [-1, 1, "Conv", [512, 3, 2]],
                 [-1, 9, "C3", [512]], [-1, 1, "Conv", [1024, 3, 2]], [-1, 3, "C3", [1024]],
                 [-1, 1, "SPPF", [1024, 5]]],
    "head": [[-1, 1, "Conv", [512, 1, 1]], [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],
             [[-1, 6], 1, "Concat", [1]], [-1, 3, "C3", [512, False]], [-1, 1, "Conv", [256, 1, 1]],
             [-1, 1, "nn.Upsample", ["None", 2, "nearest"]], [[-1, 4], 1, "Concat", [1]],
             [-1, 3, "C3", [256, False]], [-1, 1, "Conv", [256, 3, 2]], [[-1, 14], 1, "Concat", [1]],
             [-1, 3, "C3", [512, False]], [-1, 1, "Conv", [512, 3, 2]], [[-1, 10], 1, "Concat", [1]],
             [-1, 3, "C3", [1024, False]], [[17, 20, 23], 1, "Detect", ["nc", "anchors"]]],
}


def yolov5_arch(nc: int = 2) -> dict:
    arch = copy.deepcopy(YOLOV5N_ARCH)
    arch["nc"] = nc
    return arch


def _fake_yolov5_modules() -> dict[str, type]:
    """Classes named like the original repository's (models.common.Conv, models.yolo.Model, ...)."""
    if "models.common" not in sys.modules:
        for name in ("models", "models.common", "models.yolo"):
            sys.modules[name] = types.ModuleType(name)
        for mod, names in (("models.common", ("Conv", "C3", "Bottleneck", "SPPF", "Concat")),
                           ("models.yolo", ("Detect", "Model"))):
            for n in names:
                setattr(sys.modules[mod], n, type(n, (torch.nn.Module,), {"__module__": mod}))
    return {n: getattr(sys.modules[m], n) for m, ns in (("models.common", ("Conv", "C3", "Bottleneck", "SPPF",
                                                                          "Concat")), ("models.yolo", ("Detect", "Model")))
            for n in ns}


def write_yolov5_checkpoint(model, path: Path, extra: dict | None = None) -> Path:
    """Save a YOLOv5Model the way the original repository pickles it (class names, FP16 weights, yaml)."""
    fake = _fake_yolov5_modules()
    original = copy.deepcopy(model).half()
    for m in original.modules():
        kind = {"AnchorDetect": "Detect"}.get(type(m).__name__, type(m).__name__)
        if kind in fake and kind != "Model":
            m.__class__ = fake[kind]
    original.__class__ = fake["Model"]
    torch.save({"epoch": -1, "model": original, "ema": None, **(extra or {})}, path)
    return path


def write_shapes_dataset(root: Path, width: int = 96, height: int = 96) -> Path:
    """A 2-class dataset of 8 train and 4 val ``width`` x ``height`` images: bright squares (class 0) and dark discs
    (class 1); returns its data.yaml."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            img = np.full((height, width, 3), 90, np.uint8) + rng.integers(0, 20, (height, width, 3), dtype=np.uint8)
            lines = []
            for cls in (0, 1):
                s = int(rng.integers(16, 32))
                x, y = (int(v) for v in rng.integers(4, min(width, height) - s - 4, 2))
                if cls == 0:
                    cv2.rectangle(img, (x, y), (x + s, y + s), (240, 240, 240), -1)
                else:
                    cv2.circle(img, (x + s // 2, y + s // 2), s // 2, (20, 20, 20), -1)
                lines.append(f"{cls} {(x + s / 2) / width:.4f} {(y + s / 2) / height:.4f} {s / width:.4f} "
                             f"{s / height:.4f}")
            cv2.imwrite(str(root / "images" / split / f"{i}.jpg"), img)
            (root / "labels" / split / f"{i}.txt").write_text("\n".join(lines) + "\n")
    cfg = {"train": "images/train", "val": "images/val", "names": {0: "square", 1: "disc"}}
    (root / "data.yaml").write_text(yaml.safe_dump(cfg))
    return root / "data.yaml"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A 2-class dataset of 8 train and 4 val 96x96 images: bright squares (class 0) and dark discs (class 1)."""
    return write_shapes_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def wide_data(tmp_path_factory) -> Path:
    """The same kind of dataset with 128 x 96 (4:3 landscape) images."""
    return write_shapes_dataset(tmp_path_factory.mktemp("wide"), width=128, height=96)


@pytest.fixture(scope="session")
def tiny_yolov5():
    """A YOLOv5n-shaped model of the original family with random weights and 2 classes."""
    from compression.models import YOLOv5Model

    torch.manual_seed(0)
    return YOLOv5Model(yolov5_arch(2), {0: "square", 1: "disc"}).eval()


@pytest.fixture(scope="session")
def tiny_ultralytics():
    """An ultralytics yolov5n (anchor-free head) from its yaml, random weights, 2 classes."""
    from compression.models import load_model

    torch.manual_seed(0)
    model = load_model("yolov5n.yaml", nc=2)
    model.names = {0: "square", 1: "disc"}
    return model


def lively(model, images: torch.Tensor):
    """A copy of ``model`` whose BN statistics are those of ``images``: random weights with the default statistics
    shrink activations layer by layer to nothing, and every deep tensor then looks like every other."""
    model = copy.deepcopy(model).train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches
    with torch.no_grad():
        model(images)
    return model.eval()


class _RecordingSession:
    """An ONNX Runtime session that notes the shape of every input it is run on."""

    def __init__(self, session, shapes: set):
        self._session, self._shapes = session, shapes

    def run(self, outputs, feeds):
        self._shapes.update(tuple(x.shape) for x in feeds.values())
        return self._session.run(outputs, feeds)

    def __getattr__(self, name):
        return getattr(self._session, name)


def record_feeds(monkeypatch) -> dict[str, set]:
    """Make compression.benchmark's sessions note what they were fed: {file path: {input shapes}}."""
    import compression.benchmark as bench

    fed: dict[str, set] = {}
    real = bench.onnx_session

    def session(path, threads=None):
        return _RecordingSession(real(path, threads), fed.setdefault(str(path), set()))

    monkeypatch.setattr(bench, "onnx_session", session)
    return fed


@pytest.fixture(scope="session")
def tiny_yolov5_relu(tiny_yolov5):
    """``tiny_yolov5`` with ReLU in place of SiLU in its first three blocks (``relu_blocks=3``)."""
    from compression.relu import swap_relu_

    model = copy.deepcopy(tiny_yolov5)
    swap_relu_(model, 3)
    return model
