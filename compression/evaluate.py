"""mAP of a torch model or an ONNX file on a dataset's ``val`` split, through ultralytics' validator code."""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from compression.data import build_dataset, build_loader, load_data_config
from compression.errors import UserError
from compression.runtime import Predictor


@dataclass
class EvalResult:
    mAP50: float
    mAP50_95: float
    images: int


def check_imgsz(imgsz: int, stride: int) -> int:
    """Round ``imgsz`` up to a multiple of ``stride`` with a one-line warning, as ultralytics does."""
    if not isinstance(imgsz, int) or imgsz <= 0:
        raise UserError(f"imgsz must be a positive integer, got {imgsz!r}")
    rounded = -(-imgsz // stride) * stride
    if rounded != imgsz:
        warnings.warn(f"imgsz={imgsz} is not a multiple of the model stride {stride}; using {rounded}", stacklevel=2)
    return rounded


def evaluate(model: nn.Module | str | Path | Predictor, data: str | Path | dict, imgsz: int = 640, batch: int = 16,
             conf: float = 0.001, iou: float = 0.6, max_det: int = 300, device: str = "auto",
             progress: bool = True) -> EvalResult:
    """Evaluate on the ``val`` split: square letterbox, NMS (conf, IoU, max_det) and mAP by ultralytics' validator.

    A torch model and its ONNX export go through exactly the same preprocessing, NMS and matching.

    Args:
        model: torch model, ``.pt``/``.yaml``/``.onnx`` path, or a :class:`Predictor`.
        data: dataset YAML path or a config from :func:`load_data_config`.
        imgsz: square input size (rounded up to the model stride).

    Example:
        >>> evaluate("../shared/weights/yolov5n.pt", "../shared/datasets/coco128/data.yaml", 640).mAP50_95  # 0.328
    """
    from ultralytics.models.yolo.detect import DetectionValidator

    predictor = model if isinstance(model, Predictor) else Predictor(model, device=device)
    data = data if isinstance(data, dict) else load_data_config(data)
    if predictor.nc != data["nc"]:
        raise UserError(f"model has {predictor.nc} classes but dataset '{data['yaml_file']}' has {data['nc']} names")
    imgsz = check_imgsz(imgsz, predictor.stride)
    if predictor.imgsz is not None and predictor.imgsz != imgsz:
        raise UserError(f"ONNX model has a fixed input of {predictor.imgsz} px, but imgsz={imgsz} was asked")

    dataset = build_dataset(data, "val", imgsz, batch=batch, stride=predictor.stride)
    loader = build_loader(dataset, batch)
    # An explicit save_dir: left to itself the validator makes runs/detect/train-N in the current folder each time.
    with tempfile.TemporaryDirectory(prefix="yc-val-") as scratch:
        validator = DetectionValidator(
            dataloader=loader, save_dir=Path(scratch),
            args=dict(conf=conf, iou=iou, max_det=max_det, plots=False, save_json=False, verbose=False,
                      data=data["yaml_file"]))
        validator.device, validator.data, validator.training = torch.device("cpu"), data, False
        validator.init_metrics(predictor)
        for batch_ in tqdm(loader, desc="evaluate", unit="batch", disable=not progress, leave=False):
            batch_ = validator.preprocess(batch_)
            preds = validator.postprocess(predictor(batch_["img"]).cpu())
            validator.update_metrics(preds, batch_)
        stats = validator.get_stats()
    return EvalResult(
        mAP50=float(stats["metrics/mAP50(B)"]), mAP50_95=float(stats["metrics/mAP50-95(B)"]), images=len(dataset)
    )
