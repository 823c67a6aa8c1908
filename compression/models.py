"""Load YOLO detectors of two families behind one interface.

Families differ only in loading, the head decode and the training loss:

- ``ultralytics``: ultralytics checkpoints and model YAMLs (``yolov5su.pt``, ``yolov5s.yaml``, ...), loaded
  through ultralytics with its restricted (allow-listed) unpickler.
- ``yolov5``: original ultralytics/yolov5 checkpoints (``models.yolo.Model`` pickles), rebuilt on
  ``ultralytics.nn.modules`` plus the anchor-based :class:`AnchorDetect` head below. The pickle is read by
  torch's ``weights_only`` unpickler with an allow-list, so no code in the file runs.

Every loaded model has ``nc``, ``names``, ``stride`` and ``family``; in train mode it returns the raw outputs its
family's loss needs, in eval mode one decoded tensor ``[batch, 4 + nc, anchors]`` (xywh in input pixels, then class
confidences), so NMS, evaluation and export never branch on the family.
"""

from __future__ import annotations

import copy
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from compression.errors import UserError

# Classes an original YOLOv5 checkpoint may name. The yolov5 ones load as inert records (their state is read,
# never their code); the torch ones are plain layers. Anything else makes the load fail before it runs.
YOLOV5_CLASSES = ("Model", "Detect", "Conv", "C3", "Bottleneck", "SPPF", "Concat", "DetectionModel")
TORCH_LAYERS = (
    nn.Conv2d, nn.BatchNorm2d, nn.SiLU, nn.ReLU, nn.LeakyReLU, nn.Hardswish, nn.Identity, nn.MaxPool2d,
    nn.Upsample, nn.Sequential, nn.ModuleList,
)


class _Record:
    """Stand-in for a yolov5 class while unpickling: keeps the pickled attributes, has no behaviour."""

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {})


def _yolov5_allow_list() -> list:
    records = []
    for module in ("models.common", "models.yolo"):
        for name in YOLOV5_CLASSES:
            records.append((type(name, (_Record,), {}), f"{module}.{name}"))
    return records + list(TORCH_LAYERS) + [set]


def checkpoint_globals(path: Path) -> list[str]:
    """Names of the classes and functions a torch checkpoint's pickle refers to, read without unpickling."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (RuntimeError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise UserError(f"weights '{path}' is not a readable torch checkpoint (empty, truncated or not a .pt): {e}") from None


def _refuse_unknown(path: Path, names: list[str], allowed: set[str]) -> None:
    bad = [n for n in names if n not in allowed]
    if bad:
        raise UserError(
            f"weights '{path}' refused: its pickle names {', '.join(sorted(bad)[:3])}, which is not on the allow-list "
            "of model classes (nothing in the file was run)"
        )


def _state_of(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flatten the parameters and buffers of an unpickled module tree (records or torch modules) by name."""
    attrs = vars(obj)
    state, transient = {}, attrs.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for k, v in (attrs.get(group) or {}).items():
            if v is not None and k not in transient:
                state[prefix + k] = v.detach()
    for k, child in (attrs.get("_modules") or {}).items():
        if child is not None:
            state.update(_state_of(child, f"{prefix}{k}."))
    return state


def _modules_of(obj, prefix: str = ""):
    """``(name, module)`` for every node of an unpickled module tree (records or torch modules), like named_modules."""
    yield prefix.rstrip("."), obj
    for k, child in (vars(obj).get("_modules") or {}).items():
        if child is not None:
            yield from _modules_of(child, f"{prefix}{k}.")


class AnchorDetect(nn.Module):
    """The anchor-based YOLOv5 head: one 1x1 conv per level predicting (xywh, objectness, classes) per anchor.

    Args:
        nc: number of classes.
        anchors: per level, anchor (w, h) pairs in input pixels, e.g. ``[[10, 13, 16, 30, 33, 23], ...]``.
        ch: input channels per level.
        stride: per level, input pixels per feature cell.
    """

    def __init__(self, nc: int, anchors: list, ch: list[int], stride: torch.Tensor):
        super().__init__()
        self.nc, self.no, self.nl, self.na = nc, nc + 5, len(anchors), len(anchors[0]) // 2
        self.register_buffer("stride", stride.float(), persistent=False)  # yolov5 pickles it as a plain attribute
        self.register_buffer("anchors", torch.tensor(anchors).float().view(self.nl, -1, 2) / self.stride.view(-1, 1, 1))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)

    def forward(self, x: list[torch.Tensor]):
        """Train mode: per level ``[b, na, h, w, 5 + nc]`` logits. Eval mode: ``[b, 4 + nc, anchors]`` decoded."""
        if self.training:
            return [self.m[i](x[i]).view(x[i].shape[0], self.na, self.no, *x[i].shape[2:]).permute(0, 1, 3, 4, 2)
                    .contiguous() for i in range(self.nl)]
        return torch.cat([self.decode(self.m[i](x[i]), i) for i in range(self.nl)], 2)

    def decode(self, p: torch.Tensor, i: int) -> torch.Tensor:
        """Level ``i`` conv output ``[b, na*no, h, w]`` -> ``[b, 4 + nc, na*h*w]``: xywh pixels, objectness x class.

        Decoded channel-first, so that no step transposes the 85-wide rows of every anchor (anchor order is the
        same as YOLOv5's: anchor, then row, then column); this halves the decode's time in ONNX Runtime. The map's
        height and width are Python numbers and the batch is -1, so an export (fixed input size, any batch) holds
        the grid as a constant and computes no shapes (YOLOv5n: 325 nodes instead of 538; INT8 at 448 px 2-4 %
        faster in ONNX Runtime, FP32 at 640 px 0.5-3 %).
        """
        h, w = int(p.shape[2]), int(p.shape[3])
        p = p.reshape(-1, self.na, self.no, h * w).sigmoid()
        ys, xs = torch.meshgrid(torch.arange(h, device=p.device), torch.arange(w, device=p.device), indexing="ij")
        grid = torch.stack((xs.flatten(), ys.flatten())).view(1, 1, 2, h * w).to(p.dtype)
        anchor_px = (self.anchors[i] * self.stride[i]).view(1, self.na, 2, 1)
        xy = (p[:, :, :2] * 2 - 0.5 + grid) * self.stride[i]
        wh = (p[:, :, 2:4] * 2) ** 2 * anchor_px
        conf = p[:, :, 4:5] * p[:, :, 5:]
        return torch.cat((xy, wh, conf), 2).transpose(1, 2).reshape(-1, 4 + self.nc, self.na * h * w)


class YOLOv5Model(nn.Module):
    """An original YOLOv5 architecture (its model YAML dict) built on ``ultralytics.nn.modules``."""

    family = "yolov5"

    def __init__(self, cfg: dict, names: dict[int, str] | None = None):
        super().__init__()
        from ultralytics.nn.tasks import parse_model

        self.yaml = copy.deepcopy(cfg)
        d = copy.deepcopy(cfg)
        head_from, _, head_name, _ = d["head"].pop()
        if head_name not in ("Detect", "models.yolo.Detect"):
            raise UserError(f"YOLOv5 model yaml: last layer is '{head_name}', expected Detect")
        layers, save = parse_model(d, ch=d.get("ch", 3), verbose=False)
        self.nc = int(d["nc"])
        anchors = d["anchors"]
        if isinstance(anchors, int):
            raise UserError("YOLOv5 model yaml: integer 'anchors' (autoanchor) is not supported; give anchor sizes")
        # Probe the feature maps once to learn the head's input channels and strides.
        probe = 256
        _, feats = self._run(layers, set(save) | set(head_from), torch.zeros(1, d.get("ch", 3), probe, probe))
        ch = [feats[j].shape[1] for j in head_from]
        stride = torch.tensor([probe / feats[j].shape[-2] for j in head_from])
        detect = AnchorDetect(self.nc, anchors, ch, stride)
        detect.i, detect.f, detect.type = len(layers), list(head_from), "AnchorDetect"
        self.model = nn.Sequential(*layers, detect)
        self.save = sorted(set(save) | set(head_from))
        self.stride = stride
        self.names = names or {i: str(i) for i in range(self.nc)}

    @staticmethod
    def _run(layers, save, x):
        """YOLOv5's layer walk: each layer reads the outputs named by its ``f``; only ``save`` outputs are kept."""
        y = {}
        for m in layers:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            if m.i in save:
                y[m.i] = x
        return x, y

    def forward(self, x: torch.Tensor):
        return self._run(self.model, self.save, x)[0]


def _load_yolov5(path: Path, names_in_file: list[str]) -> YOLOv5Model:
    allow = _yolov5_allow_list()
    allowed_names = {a[1] if isinstance(a, tuple) else f"{a.__module__}.{a.__qualname__}" for a in allow}
    allowed_names |= {f"torch.nn.modules.{m.__module__.split('.')[-1]}.{m.__name__}" for m in TORCH_LAYERS}
    allowed_names |= {"builtins.set", "__builtin__.set"}
    _refuse_unknown(path, names_in_file, allowed_names)
    with torch.serialization.safe_globals(allow):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UserError(f"weights '{path}' refused by the safe unpickler: {str(e).splitlines()[0]}") from None
    record = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else None
    if record is None or not hasattr(record, "yaml"):
        raise UserError(f"weights '{path}': no YOLOv5 model (keys 'model'/'ema' with a yaml) in the checkpoint")
    names = getattr(record, "names", None)
    names = dict(enumerate(names)) if isinstance(names, (list, tuple)) else names
    model = YOLOv5Model(record.yaml, names)
    state = {k: v.float() for k, v in _state_of(record).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"weights '{path}': checkpoint does not match its own yaml (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    # YOLOv5 trains with BatchNorm eps 1e-3 / momentum 0.03, not torch's 1e-5 / 0.1: take them from the file
    # (measured on YOLOv5n, COCO128 val: mAP50-95 0.330 with torch's eps, 0.334 with the checkpoint's).
    pickled = dict(_modules_of(record))
    for name, bn in model.named_modules():
        if isinstance(bn, nn.BatchNorm2d) and isinstance(pickled.get(name), nn.BatchNorm2d):
            bn.eps, bn.momentum = pickled[name].eps, pickled[name].momentum
    return model.eval()


TRUSTED_PREFIXES = ("torch.", "ultralytics.", "collections.", "builtins.", "__builtin__.", "numpy.", "_codecs.",
                    "pathlib.", "datetime.", "models.common.", "models.yolo.")


def _load_ultralytics(weights: str, nc: int | None = None) -> nn.Module:
    from ultralytics.nn.tasks import DetectionModel, torch_safe_load

    if weights.endswith((".yaml", ".yml")):
        try:
            model = DetectionModel(weights, nc=nc, verbose=False)
        except FileNotFoundError:
            raise UserError(f"model yaml '{weights}' not found (neither a file nor an ultralytics model yaml)") from None
    else:
        try:
            ckpt, _ = torch_safe_load(weights, safe_only=True)
        except TypeError as e:  # ultralytics' one-line refusals for bad or unsafe files
            if Path(weights).is_file():  # name what made the allow-list refuse it
                _refuse_unknown(Path(weights), [n for n in checkpoint_globals(Path(weights))
                                                if not n.startswith(TRUSTED_PREFIXES)], set())
            raise UserError(f"weights '{weights}' refused: {str(e).splitlines()[0].replace('ERROR ❌️ ', '')}") from None
        except Exception as e:  # a bare name ultralytics could not download
            raise UserError(
                f"weights '{weights}' is not a local file and could not be downloaded ({type(e).__name__}); "
                "offline, pass a local path such as ../shared/weights/yolov5n.pt"
            ) from None
        model = (ckpt.get("ema") or ckpt["model"]).float()
        if not isinstance(model, DetectionModel):
            raise UserError(f"weights '{weights}' holds a {type(model).__name__}, not a detection model")
    head = model.model[-1]
    head.export = True  # eval mode returns only the decoded [b, 4 + nc, anchors] tensor
    model.nc, model.family = head.nc, "ultralytics"
    model.names = getattr(model, "names", None) or {i: str(i) for i in range(head.nc)}
    return model.eval()


def load_model(weights: str | Path, nc: int | None = None) -> nn.Module:
    """Load a detector from an original YOLOv5 checkpoint, an ultralytics checkpoint or an ultralytics model yaml.

    Args:
        weights: a ``.pt`` file (format detected from its pickle), a model yaml, or an ultralytics model name.
        nc: number of classes for a model built from a yaml (default: the yaml's).

    Example:
        >>> model = load_model("../shared/weights/yolov5n.pt")  # YOLOv5Model, family "yolov5"
        >>> model(torch.zeros(1, 3, 640, 640)).shape  # torch.Size([1, 84, 25200])
    """
    path = Path(weights)
    if path.suffix in (".yaml", ".yml") or not path.exists():
        if path.suffix not in (".pt", ".yaml", ".yml"):
            raise UserError(f"weights '{weights}' not found: expected a .pt checkpoint or a model .yaml")
        return _load_ultralytics(str(weights), nc)
    if path.is_dir():
        raise UserError(f"weights '{weights}' is a folder, expected a .pt file")
    names = checkpoint_globals(path)
    if any(n.startswith(("models.yolo.", "models.common.")) for n in names):
        return _load_yolov5(path, names)
    return _load_ultralytics(str(path))


def detect_head(model: nn.Module) -> nn.Module:
    """The detection head, the last layer in both families."""
    return model.model[-1]


class Family:
    """What differs between the checkpoint families (original YOLOv5, ultralytics) after loading, behind one
    interface: which convolutions the decode fixes, the detection loss, and the raw outputs seen alike. Pruning,
    distillation and quantization ask :func:`family`; none of them branches on the family itself."""

    name = ""

    def output_convs(self, head: nn.Module) -> list[nn.Conv2d]:
        """The head's final convolutions, whose output shapes the decode fixes."""
        raise NotImplementedError

    def task_loss(self, model: nn.Module, imgsz: int):
        raise NotImplementedError

    def raw_view(self, head: nn.Module, raw) -> dict[str, torch.Tensor | None]:
        raise NotImplementedError

    def never_pruned(self, model: nn.Module) -> list[nn.Module]:
        """Convolutions whose output width is fixed: the head's outputs and frozen ones (ultralytics' DFL)."""
        head = detect_head(model)
        return self.output_convs(head) + [m for m in head.modules() if isinstance(m, nn.Conv2d)
                                          and not any(p.requires_grad for p in m.parameters())]


class _YOLOv5(Family):
    name = "yolov5"

    def output_convs(self, head):
        return list(head.m)

    def task_loss(self, model, imgsz):
        return YOLOv5Loss(detect_head(model), imgsz)

    def raw_view(self, head, raw):
        p = torch.cat([r.view(r.shape[0], -1, head.no) for r in raw], 1)
        return {"cls": p[..., 5:], "obj": p[..., 4], "box": p[..., :4].sigmoid()}


class _Ultralytics(Family):
    name = "ultralytics"

    def output_convs(self, head):
        return [seq[-1] for branch in (head.cv2, head.cv3) for seq in branch if isinstance(seq[-1], nn.Conv2d)]

    def task_loss(self, model, imgsz):
        from ultralytics.cfg import get_cfg
        from ultralytics.utils import DEFAULT_CFG

        if not hasattr(model, "args") or not hasattr(model.args, "box"):
            model.args = get_cfg(DEFAULT_CFG)  # the loss reads its gains (box, cls, dfl) from model.args
        criterion = model.init_criterion()

        def loss(raw, batch):
            total, items = criterion(raw, batch)
            return total.sum(), items

        return loss

    def raw_view(self, head, raw):
        raw = raw.get("one2many", raw)
        b, _, a = raw["boxes"].shape
        dist = raw["boxes"].view(b, 4, -1, a).softmax(2)
        bins = torch.arange(dist.shape[2], device=dist.device, dtype=dist.dtype).view(1, 1, -1, 1)
        return {"cls": raw["scores"].transpose(1, 2), "obj": None, "box": (dist * bins).sum(2).transpose(1, 2)}


def family(model: nn.Module) -> Family:
    """The model's family, told by its head: the anchor-based head is the original YOLOv5's."""
    return _YOLOv5() if isinstance(detect_head(model), AnchorDetect) else _Ultralytics()


def head_output_convs(model: nn.Module) -> list[nn.Conv2d]:
    """The head's final convolutions, whose output shapes are fixed by the decode (never pruned or quantized away)."""
    return family(model).output_convs(detect_head(model))


class YOLOv5Loss:
    """The YOLOv5 detection loss: anchor matching, CIoU box loss, objectness BCE towards IoU, class BCE.

    A target is assigned to every anchor whose width and height ratios to it are within ``anchor_t``, in its own
    grid cell and in the two neighbouring cells nearest to its centre. Per level, objectness is weighted by
    ``balance`` (the fine level counts most). Gains follow YOLOv5's defaults, scaled for the number of levels,
    classes and the image size.

    Args:
        head: the model's :class:`AnchorDetect`.
        imgsz: training image size (objectness gain scales with the cell count).
    """

    def __init__(self, head: AnchorDetect, imgsz: int = 640, box: float = 0.05, obj: float = 1.0, cls: float = 0.5,
                 anchor_t: float = 4.0, balance: tuple[float, ...] = (4.0, 1.0, 0.4)):
        self.head, self.anchor_t, self.balance = head, anchor_t, balance
        levels = 3 / head.nl
        self.gain_box = box * levels
        self.gain_obj = obj * (imgsz / 640) ** 2 * levels
        self.gain_cls = cls * head.nc / 80 * levels
        self.bce = nn.BCEWithLogitsLoss()

    def _match(self, targets: torch.Tensor, level: int, h: int, w: int):
        """Targets ``[n, 6]`` (image, class, cx, cy, w, h normalised) -> (image, anchor, gy, gx, target box in cell)."""
        anchors = self.head.anchors[level]  # [na, 2] in grid cells
        na = anchors.shape[0]
        t = targets[:, 2:6] * torch.tensor([w, h, w, h], device=targets.device, dtype=targets.dtype)
        ratio = t[None, :, 2:4] / anchors[:, None]  # [na, n, 2]
        fit = torch.max(ratio, 1 / ratio).max(2).values < self.anchor_t  # [na, n]
        a_idx, t_idx = fit.nonzero(as_tuple=True)
        t, img, cls = t[t_idx], targets[t_idx, 0].long(), targets[t_idx, 1].long()
        cx, cy = t[:, 0], t[:, 1]
        gx, gy = cx.long().clamp(0, w - 1), cy.long().clamp(0, h - 1)
        # Own cell, then the horizontal and vertical neighbour the centre is closest to (centre offsets in (-0.5, 1.5)).
        nx = torch.where(cx % 1 < 0.5, gx - 1, gx + 1)
        ny = torch.where(cy % 1 < 0.5, gy - 1, gy + 1)
        cells = [(gx, gy, torch.ones_like(gx, dtype=torch.bool)), (nx, gy, (nx >= 0) & (nx < w)),
                 (gx, ny, (ny >= 0) & (ny < h))]
        out = []
        for cxs, cys, ok in cells:
            box = torch.cat((torch.stack((cx - cxs, cy - cys), 1), t[:, 2:4]), 1)
            out.append((img[ok], a_idx[ok], cys[ok], cxs[ok], box[ok], cls[ok]))
        return [torch.cat(parts) for parts in zip(*out)] + [anchors]

    def __call__(self, raw: list[torch.Tensor], batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (loss x batch size, detached [box, obj, cls]) for train-mode outputs and an ultralytics batch."""
        from ultralytics.utils.metrics import bbox_iou

        device = raw[0].device
        targets = torch.cat((batch["batch_idx"].view(-1, 1), batch["cls"].view(-1, 1), batch["bboxes"]), 1).to(device)
        lbox, lobj, lcls = (torch.zeros((), device=device) for _ in range(3))
        for i, p in enumerate(raw):
            b, _, h, w, _ = p.shape
            tobj = torch.zeros(p.shape[:4], device=device, dtype=p.dtype)
            img, a, gy, gx, tbox, tcls, anchors = self._match(targets, i, h, w)
            if img.numel():
                ps = p[img, a, gy, gx]
                pxy = ps[:, :2].sigmoid() * 2 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * anchors[a]
                iou = bbox_iou(torch.cat((pxy, pwh), 1), tbox, xywh=True, CIoU=True).squeeze(-1)
                lbox = lbox + (1 - iou).mean()
                tobj[img, a, gy, gx] = iou.detach().clamp(0).to(tobj.dtype)
                if self.head.nc > 1:
                    onehot = torch.zeros_like(ps[:, 5:])
                    onehot[torch.arange(len(tcls)), tcls] = 1.0
                    lcls = lcls + self.bce(ps[:, 5:], onehot)
            lobj = lobj + self.bce(p[..., 4], tobj) * self.balance[i]
        items = torch.stack((lbox * self.gain_box, lobj * self.gain_obj, lcls * self.gain_cls))
        return items.sum() * raw[0].shape[0], items.detach()


def task_loss(model: nn.Module, imgsz: int = 640):
    """The family's own detection loss: ``loss(raw_outputs, batch) -> (loss x batch size, detached items)``."""
    return family(model).task_loss(model, imgsz)


def raw_view(model: nn.Module, raw) -> dict[str, torch.Tensor | None]:
    """Train-mode outputs as ``cls`` logits ``[b, A, nc]``, ``obj`` logits ``[b, A]`` (or None), ``box`` ``[b, A, 4]``.

    ``box`` is what the head regresses before the pixel decode: YOLOv5's sigmoid xywh offsets, or the expected
    DFL distances (grid cells) of an ultralytics head. Distillation compares student and teacher through this.
    """
    return family(model).raw_view(detect_head(model), raw)


def _softplus(x: torch.Tensor) -> torch.Tensor:
    # max(x, 0) + log1p(e^-|x|), with log1p(u) = u log(w) / (w - 1), w = 1 + u (Goldberg's accurate form): torch's
    # CPU log1p and softplus are not vectorised, log is
    u = torch.exp(-x.abs())
    w = 1 + u
    return x.clamp(min=0) + torch.where(w == 1, u, torch.log(w) * u / (w - 1))


class _BernoulliKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        q = t.sigmoid()
        ctx.save_for_backward(s, q)
        return _softplus(s) - _softplus(t) - q * (s - t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        s, q = ctx.saved_tensors
        return grad * (s.sigmoid() - q), None


def bernoulli_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(sig(t) || sig(s)) of logits ``s`` (student) and ``t`` (target, no gradient): 0 where equal.

    The same as ``BCE(s, sig(t)) - BCE(t, sig(t))``, forward and backward in ~0.75x the time: that took ~15 % of a
    CPU distillation step (the class logits' KL, 16 x 6300 x 80 of them at 320 px).
    """
    # at least float32 under CUDA autocast too (a custom Function is not cast; BCE was): fp16 would round sig(s) - q
    dtype = torch.promote_types(s.dtype, torch.float32)
    return _BernoulliKL.apply(s.to(dtype), t.detach().to(dtype))
