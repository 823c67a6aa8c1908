"""Export a detector to ONNX and prove that ONNX Runtime computes what torch computes."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from compression.data import letterbox, read_image
from compression.errors import UserError
from compression.runtime import Size, hw, onnx_session, temp_sibling


EXPORT_VERSION = 3  # bump when the exported graph changes (cached baselines are keyed by it); 2: channel-first
# decode; 3: YOLOv5's decode with constant shapes


@dataclass
class ExportResult:
    onnx_path: str
    max_abs_diff: float  # largest |onnx - torch| on the check image (boxes in px, scores in [0, 1])
    size_mb: float


def default_check_image() -> Path:
    """A real photo that ships with ultralytics (a bus and people), so the check needs no dataset."""
    from ultralytics.utils import ASSETS

    return ASSETS / "bus.jpg"


def _add_metadata(path: Path, model: nn.Module, imgsz: Size) -> None:
    proto = onnx.load(str(path))
    meta = {"names": str(dict(model.names)), "stride": str(int(max(model.stride))),
            "imgsz": str(imgsz if isinstance(imgsz, int) else list(hw(imgsz))),  # [height, width], as ultralytics
            "family": getattr(model, "family", "ultralytics")}
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(path))


def export_onnx(model: nn.Module, imgsz: Size, path: str | Path, opset: int = 17, check_image: str | Path | None = None,
                rtol: float = 1e-3, atol: float = 1e-3) -> ExportResult:
    """Export ``model`` (eval mode, CPU) to ONNX with a dynamic batch axis and check it against torch.

    The check runs the file in ONNX Runtime on a real letterboxed image and raises if any output differs by more
    than ``atol + rtol * |torch|``. The file is written to a temporary name and renamed only after it passed, so a
    failed export never leaves a file that looks valid.

    Args:
        model: a detector from :func:`compression.models.load_model` (or a pruned copy).
        imgsz: input size: a square side, or ``(height, width)``.
        path: output ``.onnx`` path.
        check_image: image for the check (default: ultralytics' bundled ``bus.jpg``).

    Example:
        >>> export_onnx(load_model("yolov5n.pt"), 640, "yolov5n.onnx").max_abs_diff  # ~1e-4
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    model = copy.deepcopy(model).cpu().float().eval()
    x = letterbox(read_image(check_image or default_check_image()), imgsz)
    try:
        with warnings.catch_warnings():  # the file is for this one input size: sizes read as constants are meant so
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                model, (torch.zeros(1, 3, *hw(imgsz)),), str(tmp), opset_version=opset, dynamo=False,
                input_names=["images"], output_names=["output0"],
                dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}}, do_constant_folding=True,
            )
        _add_metadata(tmp, model, imgsz)
        with torch.inference_mode():
            ref = model(x)
        got = torch.from_numpy(onnx_session(tmp).run(None, {"images": x.numpy()})[0])
        if got.shape != ref.shape:
            raise UserError(f"ONNX export check failed: output shape {tuple(got.shape)} != torch {tuple(ref.shape)}")
        diff = (got - ref).abs()
        bad = diff > atol + rtol * ref.abs()
        if bad.any():
            raise UserError(
                f"ONNX export check failed: {int(bad.sum())} outputs differ from torch (max |diff| {diff.max():.3g})"
            )
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(str(path), float(diff.max()), path.stat().st_size / 1e6)
