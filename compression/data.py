"""Ultralytics-style dataset YAMLs and the ultralytics dataset/dataloader built on them.

A dataset YAML has ``train``, ``val``, ``names`` and an optional ``path``. ``train``/``val`` may be image
folders, lists of folders or ``.txt`` files of image paths, relative to ``path``. Without ``path`` they resolve
against the YAML's own folder; a relative ``path`` resolves against the YAML's folder too (then the current
directory), so a dataset folder can be moved as a whole.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import yaml
from ultralytics.data.dataset import YOLODataset

from compression.errors import UserError
from compression.runtime import Size, as_size, cache_dir, file_key, hw, write_atomic

IMG_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def _resolve_root(data: dict, yaml_path: Path) -> Path:
    root = data.get("path")
    if not root:
        return yaml_path.parent
    root = Path(root).expanduser()
    if root.is_absolute():
        return root
    beside = (yaml_path.parent / root).resolve()
    return beside if beside.exists() else root.resolve()


def _image_files(source: Path) -> list[Path]:
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in IMG_SUFFIXES)
    if source.suffix == ".txt" and source.is_file():
        base = source.parent
        lines = [ln.strip() for ln in source.read_text().splitlines() if ln.strip()]
        return [(base / ln).resolve() if not Path(ln).is_absolute() else Path(ln) for ln in lines]
    return []


def label_file(image: Path) -> Path:
    """YOLO convention: ``.../images/x.jpg`` -> ``.../labels/x.txt``."""
    parts = list(image.parts)
    idx = len(parts) - 1 - parts[::-1].index("images") if "images" in parts else None
    if idx is not None:
        parts[idx] = "labels"
    return Path(*parts).with_suffix(".txt")


def check_labels(images: list[Path], nc: int) -> None:
    """Raise a one-line error for the first malformed label line or class id outside ``[0, nc)``."""
    for image in images:
        lbl = label_file(image)
        if not lbl.is_file():
            continue
        for n, line in enumerate(lbl.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            try:
                cls, coords = int(float(fields[0])), [float(v) for v in fields[1:5]]
            except ValueError:
                raise UserError(f"label {lbl}:{n}: cannot parse '{line.strip()}', expected 'class cx cy w h'") from None
            if len(coords) < 4:
                raise UserError(f"label {lbl}:{n}: expected 'class cx cy w h', got '{line.strip()}'")
            if not 0 <= cls < nc:
                raise UserError(f"label {lbl}:{n}: class id {cls} is outside 0..{nc - 1} (the dataset has {nc} names)")


def load_data_config(path: str | Path, check_splits: tuple[str, ...] = ("val",)) -> dict:
    """Read and check a dataset YAML; return it with absolute ``train``/``val`` paths, ``names`` dict and ``nc``.

    Args:
        path: the dataset YAML.
        check_splits: splits that must hold images (and whose labels are checked against ``nc``).
    """
    yaml_path = Path(path)
    if not yaml_path.is_file():
        raise UserError(f"dataset yaml '{path}' not found")
    try:
        data = yaml.safe_load(yaml_path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"dataset yaml '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or "names" not in data:
        raise UserError(f"dataset yaml '{path}' must be a mapping with 'train', 'val' and 'names'")
    names = data["names"]
    names = dict(enumerate(names)) if isinstance(names, list) else {int(k): str(v) for k, v in names.items()}
    root = _resolve_root(data, yaml_path)
    out = {**data, "path": str(root), "names": names, "nc": len(names), "yaml_file": str(yaml_path.resolve())}
    for split in ("train", "val"):
        if data.get(split):
            entries = data[split] if isinstance(data[split], list) else [data[split]]
            out[split] = [str((root / e).resolve()) for e in entries]
            out[split] = out[split][0] if len(out[split]) == 1 else out[split]
    if data.get("download") and any(data.get(s) and not split_images(out, s) for s in check_splits):
        _download(data["download"], root, path)
    for split in check_splits:
        if not data.get(split):
            raise UserError(f"dataset yaml '{path}' has no '{split}' entry")
        images = split_images(out, split)
        if not images:
            raise UserError(f"dataset yaml '{path}': '{split}' ({out[split]}) holds no images")
        check_labels(images, out["nc"])
    return out


def data_key(data: dict) -> str:
    """What a cache entry made from a loaded dataset should be keyed on, instead of its YAML's path: its class names
    and, per split, each image's path inside the dataset folder and size with its label file's contents (SHA-1). A
    copy of the dataset elsewhere finds the entries made before; an edited label file, an image added or removed,
    misses them. An image rewritten in place at the same size is not seen (its contents are not read: a large
    dataset would cost every trial a pass over its images)."""
    root = Path(data["path"])
    splits = {}
    for split in ("train", "val"):
        if not data.get(split):
            continue
        entries = []
        for image in split_images(data, split):
            label = label_file(image)
            where = image.relative_to(root) if image.is_relative_to(root) else image
            entries.append([str(where), image.stat().st_size, file_key(label)[0] if label.is_file() else None])
        splits[split] = entries
    text = json.dumps([data["names"], splits], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()


def _download(url: str, root: Path, yaml_path) -> None:
    """Fetch and unzip a dataset archive into ``root``'s parent (ultralytics' downloader); one line if offline."""
    from ultralytics.utils.downloads import safe_download

    try:
        safe_download(url, dir=root.parent, unzip=True, delete=True, retry=1)
    except Exception as e:  # ultralytics raises ConnectionError, OSError, ... depending on how it failed
        raise UserError(
            f"dataset yaml '{yaml_path}': images not found under {root} and the download failed "
            f"({type(e).__name__}); offline, point --data at a local dataset yaml"
        ) from None


def split_images(data: dict, split: str) -> list[Path]:
    """All image files of one split of a loaded dataset config."""
    entries = data[split] if isinstance(data[split], list) else [data[split]]
    return [f for e in entries for f in _image_files(Path(e))]


class _Dataset(YOLODataset):
    """``YOLODataset`` whose label cache lives in our cache folder, never inside the user's (maybe read-only) dataset."""

    def __init__(self, *args, unlabeled: bool = False, shape: tuple[int, int] | None = None, **kwargs):
        self.unlabeled = unlabeled
        self.shape = shape  # (height, width) of the letterbox without augmentation; None: square at imgsz
        super().__init__(*args, **kwargs)

    def build_transforms(self, hyp=None):
        transforms = super().build_transforms(hyp)
        if self.shape and not self.augment:
            for t in transforms.transforms:
                if hasattr(t, "new_shape"):  # ultralytics' LetterBox
                    t.new_shape = self.shape
        return transforms

    def get_labels(self) -> list[dict]:
        if not self.unlabeled:
            return super().get_labels()
        import numpy as np
        from PIL import Image

        self.label_files = []
        labels = []
        for f in self.im_files:  # images only: no objects known, the teacher supplies the targets
            with Image.open(f) as im:
                w, h = im.size
            labels.append({"im_file": f, "shape": (h, w), "cls": np.zeros((0, 1), np.float32),
                           "bboxes": np.zeros((0, 4), np.float32), "segments": [], "keypoints": None,
                           "normalized": True, "bbox_format": "xywh"})
        return labels

    def _load_or_scan_cache(self, cache_path: Path, cache_hash: str):
        key = hashlib.sha1(str(Path(cache_path).resolve()).encode()).hexdigest()[:16]
        return super()._load_or_scan_cache(cache_dir() / "labels" / f"{Path(cache_path).stem}-{key}.cache", cache_hash)


def build_dataset(data: dict, split: str, imgsz: Size, augment: bool = False, batch: int = 16, stride: int = 32,
                  hyp=None, unlabeled: bool = False):
    """Ultralytics' ``YOLODataset`` for one split: letterbox to ``imgsz`` (a square side or ``(height, width)``)
    when ``augment`` is off, its mosaic pipeline (square, at the long side) when on.

    Label caches go to :func:`cache_dir`, so the dataset folder is only read. ``unlabeled`` reads images alone
    (every image has no objects), for distillation on photos nobody labelled.
    """
    from ultralytics.cfg import get_cfg
    from ultralytics.utils import DEFAULT_CFG

    (cache_dir() / "labels").mkdir(exist_ok=True)
    h, w = hw(imgsz)
    return _Dataset(
        img_path=data[split], imgsz=max(h, w), shape=(h, w) if h != w else None, augment=augment,
        hyp=hyp or get_cfg(DEFAULT_CFG), rect=False, batch_size=batch, stride=stride, pad=0.0, data=data,
        task="detect", prefix=f"{split}: ", unlabeled=unlabeled,
    )


def build_loader(dataset, batch: int, shuffle: bool = False, workers: int = 0):
    """Ultralytics' dataloader (its collate_fn) over a dataset from :func:`build_dataset`."""
    from ultralytics.data.build import build_dataloader

    return build_dataloader(dataset, batch=batch, workers=workers, shuffle=shuffle)


def read_image(path: str | Path):
    """A BGR image from disk, or a one-line error naming the file."""
    import cv2

    img = cv2.imread(str(path))
    if img is None:
        raise UserError(f"image '{path}' cannot be read (missing, empty or not an image)")
    return img


def letterbox(img, imgsz: Size):
    """BGR ``HxWx3`` uint8 -> RGB float tensor ``[1, 3, height, width]`` in ``[0, 1]``, ultralytics' letterbox to
    ``imgsz`` (a square side or ``(height, width)``)."""
    import numpy as np
    import torch
    from ultralytics.data.augment import LetterBox

    boxed = LetterBox(hw(imgsz), auto=False)(image=img)
    chw = np.ascontiguousarray(boxed[..., ::-1].transpose(2, 0, 1))
    return torch.from_numpy(chw).float().unsqueeze(0) / 255


def _list_file(files: list[Path]) -> str:
    """A list file of image paths (what ultralytics' datasets read as a split), in the cache, named by its content."""
    text = "\n".join(str(f) for f in files) + "\n"
    path = cache_dir() / "splits" / f"{hashlib.sha1(text.encode()).hexdigest()[:16]}.txt"
    if not path.is_file():
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, text)
    return str(path)


def holdout_split(data: dict, count: int, seed: int = 0) -> tuple[dict, dict | None]:
    """Split the train split into (train, held-out) dataset configs; ``count`` images (a seeded choice) are held out.

    The held-out images are only ever evaluated, never trained on: checkpoints, epochs and fallback rounds are chosen
    on them (as the held-out config's ``val``), so the val split whose mAP is reported stays out of every choice.
    A tiny train split keeps at least three quarters of its images to train on.

    Example:
        >>> train, held = holdout_split(load_data_config("coco1k.yaml", ("train", "val")), 64)
        >>> evaluate(model, held, 640)  # mAP on 64 train images that training never sees
    """
    files = split_images(data, "train")
    count = min(count, len(files) // 4)
    if count <= 0:
        return data, None
    held = set(random.Random(seed).sample(range(len(files)), count))
    train = _list_file([f for i, f in enumerate(files) if i not in held])
    return {**data, "train": train}, {**data, "val": _list_file([files[i] for i in sorted(held)])}


def train_images(data: dict, count: int, imgsz: Size, seed: int = 0):
    """``count`` images of the train split (a seeded random choice), letterboxed: ``[count, 3, height, width]``."""
    import torch

    files = split_images(data, "train")
    if not files:
        raise UserError(f"the train split of '{data.get('yaml_file', 'the dataset')}' has no images")
    files = random.Random(seed).sample(files, min(count, len(files)))
    return torch.cat([letterbox(read_image(f), imgsz) for f in files])


def train_shape(data: dict, side: int, stride: int) -> Size:
    """The input size shaped like the train split's images: ``side`` along their longer dimension, the other scaled by
    their median height/width (rounded up to ``stride``). A square letterbox pads a 4:3 photo by a quarter of its
    pixels: YOLOv5n on coco1k val (72 % landscape), FP32, mAP50-95 0.2453 at 448x448 and 0.2511 at 384x512, nearly
    the same pixels. Square (``side``) when the median image is square."""
    from PIL import Image

    files = split_images(data, "train")
    if not files:
        raise UserError(f"the train split of '{data.get('yaml_file', 'the dataset')}' has no images to take a shape "
                        "from")
    ratios = []
    for f in files:
        with Image.open(f) as im:  # reads the header only
            ratios.append(im.height / im.width)
    ratios.sort()
    ratio = ratios[len(ratios) // 2]
    short = -(-round(side * min(ratio, 1 / ratio)) // stride) * stride
    return as_size(short, side) if ratio < 1 else as_size(side, short)
