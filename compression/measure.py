"""One model's figures: export to ONNX, mAP of the ONNX file, its latency and size, torch params and MACs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from torch import nn

from compression.benchmark import benchmark
from compression.data import data_key
from compression.evaluate import IMAGE_STATS, EvalResult, evaluate
from compression.export import EXPORT_VERSION, export_onnx
from compression.runtime import cache_dir, file_key, temp_sibling, write_atomic


@dataclass
class Measurement:
    mAP50: float
    mAP50_95: float
    latency_ms: float
    size_mb: float
    params: int
    macs: int


def measure(model: nn.Module, data: dict, imgsz: int, onnx_path: str | Path, progress: bool = True) -> Measurement:
    """Export ``model`` to ``onnx_path`` and measure that file (accuracy and speed of what is shipped)."""
    path = export_onnx(model, imgsz, onnx_path).onnx_path
    acc = evaluate(path, data, imgsz, progress=progress)
    speed = benchmark(path, imgsz, model=model, progress=progress)
    return Measurement(acc.mAP50, acc.mAP50_95, speed.latency_ms, speed.size_mb, speed.params, speed.macs)


def baseline(model: nn.Module, weights: str, data: dict, imgsz: int,
             progress: bool = True) -> tuple[Measurement, Path]:
    """The FP32 model's figures and ONNX file, cached per (weights file, dataset, imgsz).

    The ONNX file is renamed into place before the JSON entry is, and each atomically, so concurrent trials never
    read half an entry. Latency is machine-state dependent: compare it only with a figure timed in the same run.
    """
    key = json.dumps([EXPORT_VERSION, *file_key(weights), data_key(data), imgsz])
    entry = cache_dir() / "baselines" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
    onnx_path = entry.with_suffix(".onnx")
    if entry.is_file() and onnx_path.is_file():
        return Measurement(**json.loads(entry.read_text())), onnx_path
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp_onnx = temp_sibling(entry.with_suffix(".onnx"))
    result = measure(model, data, imgsz, tmp_onnx, progress)
    tmp_onnx.replace(onnx_path)
    write_atomic(entry, json.dumps(asdict(result)))
    return result, onnx_path


def baseline_map(onnx_path: Path, data: dict, imgsz: int, progress: bool = True) -> EvalResult:
    """The baseline's ONNX file on ``data``'s val entry (the held-out train images of a trial), with each image's
    matches (``per_image``), cached per (file, images, imgsz): every trial of an experiment holds out the same
    images."""
    key = json.dumps([*file_key(onnx_path), data["val"], imgsz])
    entry = cache_dir() / "baseline-maps" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
    arrays = entry.with_suffix(".npz")
    if entry.is_file() and arrays.is_file():
        head = json.loads(entry.read_text())
        with np.load(arrays) as z:
            per_image = {k: np.split(z[k], np.cumsum(z[f"{k}_counts"])[:-1]) for k in IMAGE_STATS}
        return EvalResult(head["mAP50"], head["mAP50_95"], len(head["names"]), per_image | {"names": head["names"]})
    res = evaluate(onnx_path, data, imgsz, progress=progress, keep_images=True)
    entry.parent.mkdir(parents=True, exist_ok=True)
    stats = res.per_image
    tmp = temp_sibling(arrays)
    with open(tmp, "wb") as f:  # an open file: np.savez would add ".npz" to a path
        np.savez(f, **{k: np.concatenate(stats[k], 0) for k in IMAGE_STATS},
                 **{f"{k}_counts": np.array([len(v) for v in stats[k]]) for k in IMAGE_STATS})
    tmp.replace(arrays)  # the arrays first: an entry is only read with its arrays beside it
    write_atomic(entry, json.dumps({"mAP50": res.mAP50, "mAP50_95": res.mAP50_95, "names": stats["names"]}))
    return res
