"""Recovery training of a (pruned) student against its frozen FP32 teacher: task loss plus distillation.

    loss = (1 - kd_alpha) * task_loss + kd_alpha * kd_loss

``task_loss`` is the family's own detection loss (:func:`compression.models.task_loss`). With ``s``/``t`` the
student/teacher train-mode outputs seen through :func:`compression.models.raw_view`, ``T`` the temperature,
``sig`` the sigmoid and ``BCE(x, q)`` binary cross-entropy of logits ``x`` against soft targets ``q``:

    kd_loss = T^2 * [cls + obj] + box + beta * feat
    cls = sum_a w_a * mean_c KL(s_cls/T, t_cls/T) / sum_a w_a,   w_a = sig(t_obj) (1 for heads without obj)
    obj = mean_a KL(s_obj/T, t_obj/T)                           (0 for heads without objectness)
    KL(x, y) = BCE(x, sig(y)) - BCE(y, sig(y))                  (Bernoulli KL divergence, 0 when x = y)
    box = sum_a c_a * |s_box - t_box|^2 / sum_a c_a,                 c_a = teacher confidence of anchor a

    feat = mean_l mean((s_l - t_l[kept_l])^2) / mean(t_l^2)      (beta = kd_feature)

with ``s_l``/``t_l`` the outputs of every Conv block ``l`` (conv, BN, activation) and ``kept_l`` the teacher channels
the pruned student kept there (recorded by :func:`compression.prune.prune`; all of them when unpruned), over all
anchors ``a`` of the batch. Class logits are weighted by the teacher's objectness because YOLOv5 trains them only on
object anchors; box regression is pulled towards the teacher where the teacher is confident; the feature term gives
every pruned layer a dense target. Unlike the task losses, kd_loss is not multiplied by the batch size: measured on
YOLOv5n pruned by 0.2, its gradient norm is then ~18 (outputs) and ~6 (features) against ~11 for the task loss,
instead of ~30x the clipping norm (10), where every step was clipped to almost nothing.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from compression.data import build_dataset, build_loader
from compression.evaluate import evaluate
from compression.models import raw_view, task_loss
from compression.runtime import select_device


@dataclass
class DistillConfig:
    kd_epochs: int = 10  # passes over the train split, 0 = no training
    kd_temperature: float = 4.0  # softening of teacher and student logits, 1 <= T <= 20
    kd_alpha: float = 0.7  # weight of kd_loss against the task loss, 0..1 (1 = distillation only, no labels needed)
    lr: float = 0.001  # peak learning rate, 0 < lr <= 1
    freeze_bn: bool = True  # BN layers use their running statistics while training (small-data fine-tuning)
    optimizer: str = "sgd"  # "sgd" (nesterov, momentum 0.937) | "adamw" (betas 0.937/0.999)
    batch: int = 16  # images per step
    warmup_epochs: float = 1.0  # linear LR warm-up, in epochs
    mosaic: float = 0.0  # ultralytics mosaic probability for the train split, 0..1
    kd_feature: float = 1.0  # weight of the per-layer feature term inside kd_loss, >= 0
    kd_images: str | None = None  # extra folder of unlabeled images; on them only kd_loss counts
    train_imgsz: int = 0  # training image size (0 = the evaluation size); smaller = more steps per CPU minute
    device: str = "auto"  # auto (CUDA if present) | cpu | cuda[:N]
    workers: int = 2  # dataloader workers
    seed: int = 0

    def __post_init__(self):
        checks = {"kd_epochs": 0 <= self.kd_epochs <= 1000, "kd_temperature": 1 <= self.kd_temperature <= 20,
                  "kd_alpha": 0 <= self.kd_alpha <= 1, "lr": 0 < self.lr <= 1, "batch": 1 <= self.batch <= 1024,
                  "warmup_epochs": 0 <= self.warmup_epochs, "kd_feature": 0 <= self.kd_feature,
                  "mosaic": 0 <= self.mosaic <= 1, "train_imgsz": 0 <= self.train_imgsz <= 4096}
        ranges = {"kd_epochs": "0..1000", "kd_temperature": "1..20", "kd_alpha": "0..1", "lr": "(0, 1]",
                  "batch": "1..1024", "warmup_epochs": ">= 0", "kd_feature": ">= 0", "mosaic": "0..1",
                  "train_imgsz": "0..4096"}
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be one of ('sgd', 'adamw'), got {self.optimizer!r}")
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name} must be in {ranges[name]}, got {getattr(self, name)}")


@dataclass
class DistillResult:
    epochs: list[dict] = field(default_factory=list)  # per epoch: epoch, loss, mAP50, mAP50_95, seconds
    best_epoch: int = 0  # 0 = the untrained input stayed best
    start_mAP50_95: float | None = None  # val mAP of the input, before training
    skipped_steps: int = 0  # steps whose loss or gradient was not finite
    seconds: float = 0.0


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Binary entropy of sigmoid(logits): the least BCE against these soft targets."""
    return F.binary_cross_entropy_with_logits(logits, logits.sigmoid(), reduction="none")


def _width(block: nn.Module) -> int:
    """Output channels of an ultralytics Conv block (BN folded or not, fake-quantized or not)."""
    if hasattr(block, "bn"):
        return block.bn.num_features
    return getattr(block.conv, "conv", block.conv).out_channels


class FeatureTaps:
    """Forward hooks on the Conv blocks of a student and its teacher, and the feature term between them."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        from ultralytics.nn.modules import Conv

        kept = getattr(student, "kept_channels", {})
        t_mods = dict(teacher.named_modules())
        self.pairs, self.out, self.handles = [], {}, []
        for name, m in student.named_modules():
            t = t_mods.get(name)
            if not isinstance(m, Conv) or not isinstance(t, Conv):
                continue
            idx = kept.get(f"{name}.bn")
            if idx is None and _width(m) != _width(t):
                continue  # no channel correspondence known
            idx = None if idx is None else torch.tensor(idx)
            self.pairs.append((name, idx))
            for side, mod in (("s", m), ("t", t)):
                self.handles.append(mod.register_forward_hook(self._hook((side, name))))

    def _hook(self, key):
        def hook(_module, _inp, output):
            self.out[key] = output
        return hook

    def loss(self) -> torch.Tensor:
        terms = []
        for name, idx in self.pairs:
            s, t = self.out[("s", name)], self.out[("t", name)]
            if idx is not None:
                t = t.index_select(1, idx.to(t.device))
            terms.append((s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp(min=1e-6))
        self.out.clear()
        return torch.stack(terms).mean() if terms else torch.zeros(())

    def remove(self):
        for h in self.handles:
            h.remove()


def kd_loss(student: dict, teacher: dict, temperature: float, feat: torch.Tensor | None = None,
            feat_weight: float = 0.0) -> torch.Tensor:
    """The distillation term of one batch (see the module docstring)."""
    t = temperature
    if teacher["obj"] is not None:
        obj_w = teacher["obj"].sigmoid()
        obj = F.binary_cross_entropy_with_logits(student["obj"] / t, (teacher["obj"] / t).sigmoid())
        obj = obj - _entropy(teacher["obj"] / t).mean()
        conf = obj_w * teacher["cls"].sigmoid().amax(-1)
    else:
        obj_w = torch.ones_like(teacher["cls"][..., 0])
        obj = torch.zeros((), device=obj_w.device)
        conf = teacher["cls"].sigmoid().amax(-1)
    cls_per_anchor = F.binary_cross_entropy_with_logits(
        student["cls"] / t, (teacher["cls"] / t).sigmoid(), reduction="none").mean(-1)
    cls_per_anchor = cls_per_anchor - _entropy(teacher["cls"] / t).mean(-1)  # BCE - H(teacher): 0 when equal
    cls = (obj_w * cls_per_anchor).sum() / obj_w.sum().clamp(min=1e-6)
    box = (conf * (student["box"] - teacher["box"]).pow(2).sum(-1)).sum() / conf.sum().clamp(min=1e-6)
    extra = feat_weight * feat if feat is not None and feat_weight else 0.0
    return t * t * (cls + obj) + box + extra


def _optimizer(model: nn.Module, lr: float, kind: str = "sgd") -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on BN and biases
    groups = [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.937, 0.999))
    return torch.optim.SGD(groups, lr=lr, momentum=0.937, nesterov=True)


def distill(student: nn.Module, teacher: nn.Module, data: dict, cfg: DistillConfig, imgsz: int = 640,
            on_epoch: Callable[[dict], None] | None = None, progress: bool = True) -> tuple[nn.Module, DistillResult]:
    """Train a copy of ``student`` on ``data``'s train split against the frozen ``teacher``; keep the best epoch.

    After each epoch the EMA weights are evaluated on the val split and ``on_epoch({"epoch", "loss", "mAP50",
    "mAP50_95", "seconds"})`` is called (the NNI trial reports it as an intermediate result).

    Args:
        student: the model to train (left unchanged; a trained copy is returned).
        teacher: the unpruned FP32 model, frozen.
        data: a dataset config from :func:`compression.data.load_data_config`.
        cfg: epochs, KD temperature and weight, optimiser settings.

    Example:
        >>> small, result = distill(pruned, model, load_data_config("coco128.yaml"), DistillConfig(kd_epochs=10))
    """
    from ultralytics.cfg import get_cfg
    from ultralytics.utils import DEFAULT_CFG
    from ultralytics.utils.torch_utils import ModelEMA

    t0 = time.perf_counter()
    result = DistillResult()
    student = copy.deepcopy(student)
    if cfg.kd_epochs == 0:
        return student, result
    torch.manual_seed(cfg.seed)
    device = select_device(cfg.device)
    student = student.to(device).float()
    teacher = copy.deepcopy(teacher).to(device).float().train()  # train mode: raw outputs; BN frozen below
    for m in teacher.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    teacher.requires_grad_(False)

    hyp = get_cfg(DEFAULT_CFG, {"mosaic": cfg.mosaic, "close_mosaic": 0})
    stride = int(max(student.stride))
    train_size = max(stride, round((cfg.train_imgsz or imgsz) / stride) * stride)
    # kd_alpha = 1 needs no labels: the train split is then read as images alone.
    loader = build_loader(build_dataset(data, "train", train_size, augment=True, batch=cfg.batch, stride=stride,
                                        hyp=hyp, unlabeled=cfg.kd_alpha == 1),
                          cfg.batch, shuffle=True, workers=cfg.workers)
    unlabeled = None
    if cfg.kd_images:
        extra = {**data, "train": cfg.kd_images}
        unlabeled = itertools.cycle(build_loader(
            build_dataset(extra, "train", train_size, augment=True, batch=cfg.batch, stride=stride, hyp=hyp,
                          unlabeled=True), cfg.batch, shuffle=True, workers=cfg.workers))
    criterion = task_loss(student, train_size)
    optimizer = _optimizer(student, cfg.lr, cfg.optimizer)
    steps = cfg.kd_epochs * len(loader)
    warmup = max(1, round(cfg.warmup_epochs * len(loader))) if cfg.warmup_epochs else 0
    # ultralytics' EMA ramps its decay up to 0.9999 over ~2000 steps; a recovery run is often under 100 steps,
    # so average over about a fifth of the run instead.
    ema = ModelEMA(student, decay=min(0.9999, 1 - 5 / steps), tau=max(1, steps / 10))
    taps = FeatureTaps(student, teacher) if cfg.kd_feature and cfg.kd_alpha else None  # after the EMA copy
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def lr_at(step: int) -> float:
        cosine = 0.01 + 0.99 * (1 + math.cos(math.pi * step / steps)) / 2  # one cycle down to 1% of lr
        return cfg.lr * cosine * (min(1.0, (step + 1) / warmup) if warmup else 1.0)

    def step_loss(batch, labeled: bool) -> torch.Tensor:
        img = batch["img"].to(device, non_blocking=True).float() / 255
        with torch.autocast(device.type, enabled=amp):
            raw = student(img)
            with torch.no_grad():
                t_raw = teacher(img)
            kd = kd_loss(raw_view(student, raw), raw_view(teacher, t_raw), cfg.kd_temperature,
                         taps.loss() if taps else None, cfg.kd_feature)
            if not labeled or cfg.kd_alpha == 1:
                return kd
            task, _ = criterion(raw, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
            return (1 - cfg.kd_alpha) * task + cfg.kd_alpha * kd

    # The input is a candidate too: a short run on few images can end below where it started.
    start = evaluate(student, data, imgsz, batch=cfg.batch, device=str(device), progress=False)
    result.start_mAP50_95 = start.mAP50_95
    best_map, best_state, step = start.mAP50_95, copy.deepcopy(student.state_dict()), 0
    for epoch in range(1, cfg.kd_epochs + 1):
        student.train()
        if cfg.freeze_bn:  # keep BN running statistics (the teacher's, for the kept channels); affine still trains
            for m in student.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        e0, total = time.perf_counter(), 0.0
        bar = tqdm(loader, desc=f"distill {epoch}/{cfg.kd_epochs}", disable=not progress, leave=False)
        for batch in bar:
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step)
            loss = step_loss(batch, labeled=True)
            if unlabeled is not None:
                loss = loss + step_loss(next(unlabeled), labeled=False)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if not torch.isfinite(loss):  # a diverging step must not poison the weights (seen at lr 0.01)
                result.skipped_steps += 1
                continue
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            if not torch.isfinite(nn.utils.clip_grad_norm_(student.parameters(), max_norm=10.0)) and not amp:
                result.skipped_steps += 1
                continue
            scaler.step(optimizer)
            scaler.update()
            ema.update(student)
            total += loss.item()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        metrics = evaluate(ema.ema, data, imgsz, batch=cfg.batch, device=str(device), progress=False)
        record = {"epoch": epoch, "loss": total / len(loader), "mAP50": metrics.mAP50,
                  "mAP50_95": metrics.mAP50_95, "seconds": time.perf_counter() - e0}
        result.epochs.append(record)
        if on_epoch:
            on_epoch(record)
        if metrics.mAP50_95 > best_map:
            best_map, best_state, result.best_epoch = metrics.mAP50_95, copy.deepcopy(ema.ema.state_dict()), epoch
    if taps:
        taps.remove()
    student.load_state_dict(best_state)
    result.seconds = time.perf_counter() - t0
    return student.cpu().eval(), result
