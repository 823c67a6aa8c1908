"""Detections on images with a ``.pt`` or ``.onnx`` model: letterbox, inference, NMS, boxes drawn, JSON per image."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from compression.data import IMG_SUFFIXES, letterbox, read_image
from compression.errors import UserError
from compression.runtime import Predictor, Size, check_fixed_size, write_atomic


@dataclass
class Detection:
    cls: int
    name: str
    conf: float
    box: list[float]  # x1, y1, x2, y2 in pixels of the original image


def _images(source: str | Path) -> list[Path]:
    source = Path(source)
    if source.is_file():
        return [source]
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMG_SUFFIXES)
        if not files:
            raise UserError(f"no images ({', '.join(sorted(IMG_SUFFIXES))}) in folder '{source}'")
        return files
    raise UserError(f"--source '{source}' is neither an image nor a folder")


def _color(cls: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(cls)
    return tuple(int(c) for c in rng.integers(64, 256, 3))


def draw(img: np.ndarray, dets: list[Detection]) -> np.ndarray:
    """Boxes with class names and confidences on a copy of a BGR image (OpenCV's own font: nothing to download)."""
    import cv2

    out = img.copy()
    thick = max(1, round(sum(img.shape[:2]) / 600))
    for d in dets:
        x1, y1, x2, y2 = (int(round(v)) for v in d.box)
        color = _color(d.cls)
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thick, cv2.LINE_AA)
        label = f"{d.name} {d.conf:.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, max(1, thick - 1))
        top = max(y1, th + base + 2)
        cv2.rectangle(out, (x1, top - th - base - 2), (x1 + tw + 2, top), color, -1)
        cv2.putText(out, label, (x1 + 1, top - base - 1), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, (0, 0, 0),
                    max(1, thick - 1), cv2.LINE_AA)
    return out


def detect(predictor: Predictor, img: np.ndarray, imgsz: Size, conf: float = 0.25, iou: float = 0.45,
           max_det: int = 300) -> list[Detection]:
    """One BGR image -> its detections in original-image pixels."""
    from ultralytics.utils.nms import non_max_suppression
    from ultralytics.utils.ops import scale_boxes

    x = letterbox(img, imgsz)
    with torch.no_grad():
        pred = non_max_suppression(predictor(x).cpu(), conf, iou, max_det=max_det)[0].clone()
        if len(pred):
            pred[:, :4] = scale_boxes(x.shape[2:], pred[:, :4], img.shape[:2])
    names = predictor.names or {}
    return [Detection(int(c), str(names.get(int(c), int(c))), round(float(s), 4), [round(float(v), 1) for v in b])
            for *b, s, c in pred.tolist()]


def infer(model: str | Path, source: str | Path, out: str | Path, imgsz: Size | None = None, conf: float = 0.25,
          iou: float = 0.45, device: str = "auto", progress: bool = True) -> dict:
    """Run ``model`` on an image or a folder; write ``out/<image>`` with boxes and ``out/detections.json``.

    Example:
        >>> infer("best.onnx", "../shared/datasets/coco128/images/val2017", "runs/infer")["images"]  # 128
    """
    if not Path(model).is_file():
        raise UserError(f"model '{model}' not found")
    if not 0 < conf < 1 or not 0 < iou < 1:
        raise UserError(f"conf and iou must be in (0, 1), got {conf} and {iou}")
    files = _images(source)
    predictor = Predictor(model, device=device)
    imgsz = imgsz or predictor.imgsz or 640
    check_fixed_size(predictor.imgsz, imgsz)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    import cv2

    results, total = {}, 0
    for f in tqdm(files, desc="infer", unit="img", disable=not progress or len(files) == 1, leave=False):
        img = read_image(f)
        dets = detect(predictor, img, imgsz, conf, iou)
        total += len(dets)
        cv2.imwrite(str(out / f.name), draw(img, dets))
        results[f.name] = [asdict(d) for d in dets]
    write_atomic(out / "detections.json", json.dumps(results, indent=1))
    return {"images": len(files), "detections": total, "out": str(out), "json": str(out / "detections.json")}
