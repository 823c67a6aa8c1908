"""The line every trial has to beat: the unpruned model at smaller inputs, FP32 and INT8 (PTQ), with no training.

For each input size, the FP32 export and the INT8 file a trial with ``sparsity=0 relu_blocks=0 ptq_fit_steps=0``
would ship (the default ``TrialConfig``'s calibration and fallback, chosen on the held-out train images; no rounding
fit, which would add minutes per size to the first report): mAP50-95 on val and latency
relative to the FP32 model at the base size, timed in the same run. Measured once per weights, dataset and sizes
(cached), so that every report of an experiment draws the same curves. Trials that run shaped like their train images
(``deploy_rect``) get the same curves at those shapes beside the square ones: shrinking a square input is not the
line such a trial has to beat.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

REFERENCE_VERSION = 1  # bump when what a reference point measures changes


@dataclass
class ReferencePoint:
    imgsz: int | list[int]  # a square's side, or [height, width]
    precision: str  # "fp32" | "int8"
    mAP50_95: float  # val
    latency_ratio: float  # latency / latency of the FP32 model at the base size, timed in the same run
    latency_ratio_interval: list[float]  # where a re-run's ratio should land (benchmark.ratio_interval)
    size_mb: float
    rect: bool = False  # shaped like the train images (compression.data.train_shape), not square


def reference_sizes(base_imgsz: int, stride: int) -> list[int]:
    """The base size and every 64 px below it down to half of it (640: 640, 576, ..., 320), stride multiples."""
    sizes = [s - s % stride for s in range(base_imgsz, base_imgsz // 2 - 1, -64)]
    return sorted({s for s in sizes if s >= stride} | {base_imgsz})


def reference_curves(weights: str | Path, data_path: str | Path, base_imgsz: int, sizes: list[int] | None = None,
                     progress: bool = True, rect: bool = False) -> list[ReferencePoint]:
    """FP32 and INT8 points of the unpruned ``weights`` at each of ``sizes`` (default :func:`reference_sizes`); with
    ``rect``, each size the long side of an input shaped like the train images.

    Example:
        >>> [(p.imgsz, p.precision, p.mAP50_95) for p in reference_curves("yolov5n.pt", "coco1k.yaml", 640)]
    """
    from tqdm import tqdm

    from compression.benchmark import benchmark_pair, ratio_interval
    from compression.chain import _atomic_json, quantize_stage
    from compression.config import TrialConfig
    from compression.data import data_key, holdout_split, load_data_config, train_shape
    from compression.evaluate import check_imgsz, evaluate
    from compression.export import EXPORT_VERSION
    from compression.measure import baseline
    from compression.models import load_model
    from compression.runtime import as_size, cache_dir, file_key, hw

    teacher = load_model(weights)
    stride = int(max(teacher.stride))
    base_imgsz = check_imgsz(base_imgsz, stride)
    sizes = sorted({check_imgsz(s, stride) for s in sizes}) if sizes else reference_sizes(base_imgsz, stride)
    cfg = TrialConfig(ptq_fit_steps=0)  # plain PTQ: the curves need no student
    data = load_data_config(data_path, ("train", "val"))
    key = json.dumps([REFERENCE_VERSION, EXPORT_VERSION, file_key(weights), data_key(data), base_imgsz, sizes,
                      asdict(cfg.quant_config()), cfg.holdout_images] + (["rect"] if rect else []))
    entry = cache_dir() / "reference" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
    if entry.is_file():
        return [ReferencePoint(**p) for p in json.loads(entry.read_text())]
    train, holdout = holdout_split(data, cfg.holdout_images, cfg.seed)
    if rect:  # the shapes a deploy_rect trial of each size runs at (its train split without the held-out images)
        sizes = sorted({tuple(hw(train_shape(train, s, stride))) for s in sizes}, key=lambda hw_: hw_[0] * hw_[1])
    _, base_onnx = baseline(teacher, weights, data, base_imgsz, progress=progress)
    points = []
    with tempfile.TemporaryDirectory(prefix="yc-reference-") as tmp:
        for size in tqdm(sizes, desc="reference curves", disable=not progress):
            fp32, fp32_onnx = baseline(teacher, weights, data, size, progress=progress)
            int8_onnx = Path(tmp) / f"int8_{'x'.join(map(str, hw(size)))}.onnx"
            quantize_stage(None, teacher, fp32_onnx, int8_onnx, train, holdout, size, cfg, lambda *_: None, progress)
            int8_map = evaluate(int8_onnx, data, size, progress=progress).mAP50_95
            for precision, path, mAP in (("fp32", fp32_onnx, fp32.mAP50_95), ("int8", int8_onnx, int8_map)):
                res, base = benchmark_pair(path, base_onnx, runs=60, progress=progress)
                shown = as_size(*hw(size))
                points.append(ReferencePoint(shown if isinstance(shown, int) else list(shown), precision, mAP,
                                             res.latency_ms / base.latency_ms, list(ratio_interval(res, base)),
                                             res.size_mb, rect))
    entry.parent.mkdir(parents=True, exist_ok=True)
    _atomic_json(entry, [asdict(p) for p in points])
    return points


def reference_for_report(report: dict, progress: bool = True, rect: bool = False) -> list[ReferencePoint]:
    """The curves for the weights, dataset and base size of a trial's ``report.json`` (with ``rect``, the curves
    shaped like the train images after the square ones); raises ``UserError`` (one line) when the weights or dataset
    it names are not on this machine."""
    from compression.errors import UserError

    for what in ("weights", "data"):
        if not Path(report[what]).is_file():
            raise UserError(f"reference curves need the trial's {what} '{report[what]}', not found here "
                            f"(run from the folder the trials ran in, or pass --no-reference)")
    square = reference_curves(report["weights"], report["data"], report["imgsz"], progress=progress)
    return square + (reference_curves(report["weights"], report["data"], report["imgsz"], progress=progress,
                                      rect=True) if rect else [])


