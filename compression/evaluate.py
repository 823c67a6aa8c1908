"""mAP of a torch model or an ONNX file on a dataset's ``val`` split, through ultralytics' validator code."""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from compression.data import build_dataset, build_loader, load_data_config
from compression.errors import UserError
from compression.runtime import Predictor, Size, as_size, check_fixed_size, size_text


IMAGE_STATS = ("tp", "conf", "pred_cls", "target_cls")  # what the validator keeps of each image, mAP's inputs


@dataclass
class EvalResult:
    mAP50: float
    mAP50_95: float
    images: int
    per_image: dict | None = field(default=None, repr=False)  # with keep_images: IMAGE_STATS and "names", a list
    # each, one entry per image in the loader's order (map_drop_sd's input)


def check_imgsz(imgsz: Size, stride: int) -> Size:
    """Round ``imgsz`` (a square side, or ``(height, width)``) up to multiples of ``stride`` with a one-line warning,
    as ultralytics does."""
    sides = list(imgsz) if isinstance(imgsz, (tuple, list)) and len(imgsz) == 2 else [imgsz]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sides):
        raise UserError(f"imgsz must be a positive integer or a (height, width) pair of them, got {imgsz!r}")
    rounded = [-(-n // stride) * stride for n in sides]
    if rounded != sides:
        warnings.warn(f"imgsz={size_text(imgsz)} is not a multiple of the model stride {stride}; using "
                      f"{size_text(as_size(*rounded) if len(rounded) == 2 else rounded[0])}", stacklevel=2)
    return as_size(*rounded) if len(rounded) == 2 else rounded[0]


def evaluate(model: nn.Module | str | Path | Predictor, data: str | Path | dict, imgsz: Size | None = 640,
             batch: int = 16, conf: float = 0.001, iou: float = 0.6, max_det: int = 300, device: str = "auto",
             progress: bool = True, keep_images: bool = False) -> EvalResult:
    """Evaluate on the ``val`` split: letterbox, NMS (conf, IoU, max_det) and mAP by ultralytics' validator.

    A torch model and its ONNX export go through exactly the same preprocessing, NMS and matching.

    Args:
        model: torch model, ``.pt``/``.yaml``/``.onnx`` path, or a :class:`Predictor`.
        data: dataset YAML path or a config from :func:`load_data_config`.
        imgsz: input size, a square side or ``(height, width)`` (rounded up to the model stride); None: an ONNX
            file's own size, else 640.
        keep_images: also return each image's matches (``per_image``), for :func:`map_drop_sd`.

    Example:
        >>> evaluate("../shared/weights/yolov5n.pt", "../shared/datasets/coco128/data.yaml", 640).mAP50_95  # 0.328
    """
    from ultralytics.models.yolo.detect import DetectionValidator

    predictor = model if isinstance(model, Predictor) else Predictor(model, device=device)
    data = data if isinstance(data, dict) else load_data_config(data)
    if predictor.nc != data["nc"]:
        raise UserError(f"model has {predictor.nc} classes but dataset '{data['yaml_file']}' has {data['nc']} names")
    imgsz = check_imgsz(imgsz or predictor.imgsz or 640, predictor.stride)
    check_fixed_size(predictor.imgsz, imgsz)

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
            out = predictor(batch_["img"]).cpu()
            # one image per NMS call: ultralytics stops a call after 2 s + 0.05 s per image and leaves the rest of
            # the batch without detections, so on a busy machine a batch of 16 lost boxes and mAP moved with load
            preds = [p for i in range(len(out)) for p in validator.postprocess(out[i:i + 1])]
            validator.update_metrics(preds, batch_)
        per_image = ({k: list(validator.metrics.stats[k]) for k in IMAGE_STATS} | {"names": list(dataset.im_files)}
                     if keep_images else None)  # get_stats clears them
        stats = validator.get_stats()
    return EvalResult(mAP50=float(stats["metrics/mAP50(B)"]), mAP50_95=float(stats["metrics/mAP50-95(B)"]),
                      images=len(dataset), per_image=per_image)


def map_drop_sd(base: dict, other: dict, draws: int = 200, seed: int = 0) -> float:
    """How much the mAP50-95 drop from ``base`` to ``other`` (two :attr:`EvalResult.per_image`, the same images) moves
    with the images it is read on: its standard deviation over ``draws`` resamplings of the images with replacement,
    the same draw for both models (a paired bootstrap).

    A drop read on a few hundred images is itself a sample: YOLOv5n at 448 px lost 0.006 against 640 px on one set of
    253 coco1k train images and 0.014-0.029 on four others (README, The score).
    """
    from ultralytics.utils.metrics import ap_per_class

    if base["names"] != other["names"]:
        raise ValueError("map_drop_sd needs both models' figures on the same images, in the same order")
    count = len(base["names"])
    if count < 2:
        return 0.0

    def mean_ap(stats: dict, pick: np.ndarray) -> float:
        chosen = {k: np.concatenate([stats[k][i] for i in pick], 0) for k in IMAGE_STATS}
        if not len(chosen["target_cls"]):
            return 0.0
        return float(ap_per_class(chosen["tp"], chosen["conf"], chosen["pred_cls"], chosen["target_cls"])[5].mean())

    rng = np.random.default_rng(seed)
    drops = []
    for _ in range(draws):
        pick = rng.integers(count, size=count)
        drops.append(mean_ap(base, pick) - mean_ap(other, pick))
    return float(np.std(drops, ddof=1))
