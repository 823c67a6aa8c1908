"""Run a torch model or an ONNX file the same way: images in ``[0, 1]`` in, ``[batch, 4 + nc, anchors]`` out."""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import secrets
import shutil
import socket
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compression.errors import UserError


SHARED_ENV = "YC_SHARED"  # the one variable naming a folder that every machine of an experiment mounts


def shared_dir() -> Path | None:
    """The folder all machines of an experiment share (``$YC_SHARED``), or None when trials run on one machine."""
    value = os.environ.get(SHARED_ENV, "").strip()
    return Path(value).expanduser() if value else None


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a file rewritten in place is read again
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def file_key(path: str | Path) -> list:
    """What a cache entry made from a file should be keyed on: the SHA-1 of its contents, so that a copy or a fresh
    download of the same weights finds the entries made before (a path with its size and time did not: weights
    copied in again with a new file time left every ReLU fit, baseline and reference curve to be made again); a path
    that is no file gives its resolved path."""
    p = Path(path)
    if not p.is_file():
        return [str(p.resolve()), None]
    st = p.stat()
    return [_digest(str(p.resolve()), st.st_size, st.st_mtime_ns)]


def cache_dir() -> Path:
    """Where label caches, FP32 baselines, pruned+distilled students and reference curves are kept.

    ``YOLO_COMPRESS_CACHE`` names it; else ``$YC_SHARED/cache``, so that trials on every machine reuse each other's
    entries; else ``~/.cache/yolo-compress``. Every entry is published by :func:`write_atomic` or a rename of a
    :func:`temp_sibling`, so readers on any machine see a whole entry or none.
    """
    shared = shared_dir()
    root = Path(os.environ.get("YOLO_COMPRESS_CACHE") or (shared / "cache" if shared else
                                                            Path.home() / ".cache" / "yolo-compress"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def temp_sibling(path: str | Path) -> Path:
    """A hidden name beside ``path``, with its suffix, that no other writer picks: host, process and random tag.

    The process id alone is not enough on a shared folder: two machines can run trials with the same pid.
    """
    path = Path(path)
    return path.with_name(f".{path.stem}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}{path.suffix}")


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``path`` whole or not at all: a :func:`temp_sibling`, then rename(2) over ``path``.

    rename within one folder is atomic on local POSIX filesystems and on NFS (the server renames), so a reader on
    any machine sees the old file or the new one, never a partial one; the last of two concurrent writers wins.
    """
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        (tmp.write_bytes if isinstance(data, bytes) else tmp.write_text)(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def copy_atomic(src: str | Path, dst: str | Path) -> None:
    """Copy ``src`` to ``dst`` as :func:`write_atomic` writes: whole or not at all."""
    tmp = temp_sibling(dst)
    try:
        shutil.copyfile(src, tmp)
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)


def select_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cpu``, ``cuda`` and ``cuda:N`` are taken as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' requested but CUDA is not available; use device=cpu or auto")
    return torch.device(device)


Size = int | tuple[int, int]  # an input size: the side of a square, or (height, width)


def hw(size: Size) -> tuple[int, int]:
    """``(height, width)`` of an input size: a square's side, or a ``(height, width)`` pair."""
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def as_size(height: int, width: int) -> Size:
    """The input size of ``height`` x ``width``: an int when square (every size stays as it always was written)."""
    return height if height == width else (height, width)


def size_text(size: Size) -> str:
    """``448`` or ``384x512`` (height x width)."""
    h, w = hw(size)
    return str(h) if h == w else f"{h}x{w}"


def check_fixed_size(fixed: Size | None, imgsz: Size | None, name: str = "ONNX model") -> None:
    """A one-line error when a file of fixed input size ``fixed`` is asked to run at another ``imgsz``."""
    if fixed and imgsz and hw(fixed) != hw(imgsz):
        raise UserError(f"{name} has a fixed input of {size_text(fixed)} px, but imgsz={size_text(imgsz)} was asked")


def fixed_size(session) -> Size | None:
    """The fixed input size of an ONNX Runtime session's first input, or None when its height or width is dynamic."""
    h, w = session.get_inputs()[0].shape[2:4]
    return as_size(h, w) if isinstance(h, int) and isinstance(w, int) else None


def onnx_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session with all graph optimisations and ``threads`` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        raise UserError(f"ONNX model '{path}' cannot be loaded by ONNX Runtime: {str(e).splitlines()[0]}") from None


class Predictor:
    """Callable over a torch detector or an ONNX file with the same output contract.

    Args:
        model: a loaded torch model, or a path to a ``.pt``/``.yaml``/``.onnx`` file.
        device: torch device for torch models (``auto`` = CUDA if present).
        threads: ONNX Runtime intra-op threads (default: all cores).

    Example:
        >>> pred = Predictor("model.onnx")
        >>> pred(torch.rand(2, 3, 640, 640)).shape  # torch.Size([2, 84, 25200])
    """

    def __init__(self, model: nn.Module | str | Path, device: str = "auto", threads: int | None = None):
        self.session = None
        self.imgsz = None  # fixed input size of an ONNX file (an int, or (height, width)), None for torch models
        if isinstance(model, (str, Path)) and str(model).endswith(".onnx"):
            if not Path(model).is_file():
                raise UserError(f"ONNX model '{model}' not found")
            self.session = onnx_session(model, threads)
            meta = self.session.get_modelmeta().custom_metadata_map
            self.names = ast.literal_eval(meta["names"]) if "names" in meta else None
            self.stride = int(meta.get("stride", 32))
            self.imgsz = fixed_size(self.session)
            self.device = torch.device("cpu")
            self.input_name = self.session.get_inputs()[0].name
        else:
            if isinstance(model, (str, Path)):
                from compression.models import load_model

                model = load_model(model)
            self.device = select_device(device) if isinstance(device, str) else device
            self.model = model.to(self.device).eval()
            self.names = model.names
            self.stride = int(max(model.stride))
        if self.names is None:
            raise UserError(f"model '{model}' carries no class names")

    @property
    def nc(self) -> int:
        return len(self.names)

    @torch.inference_mode()
    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.session is not None:
            out = self.session.run(None, {self.input_name: img.cpu().numpy().astype(np.float32)})[0]
            return torch.from_numpy(out)
        return self.model(img.to(self.device)).float()
