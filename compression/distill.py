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
the pruned student kept there (``Structure.kept`` from :func:`compression.prune.prune`; all of them when unpruned),
over all anchors ``a`` of the batch. Class logits are weighted by the teacher's objectness because YOLOv5 trains them only on
object anchors; box regression is pulled towards the teacher where the teacher is confident; the feature term gives
every pruned layer a dense target. Unlike the task losses, kd_loss is not multiplied by the batch size: measured on
YOLOv5n pruned by 0.2, its gradient norm is then ~18 (outputs) and ~6 (features) against ~11 for the task loss,
instead of ~30x the clipping norm (10), where every step was clipped to almost nothing.

The budget is counted in optimizer steps, not epochs of whatever the train split holds. Images go through
ultralytics' augmentation at the deployment size (mosaic, scale 0.5, flips, HSV: YOLOv5's fine-tuning defaults) and
are trained on as random ``crop`` x ``crop`` windows: objects keep the scale they have at ``imgsz``, a step costs a
quarter of a whole 640 px image. Warm-up ramps the LR from 0 and the momentum from 0.8 to 0.937 (YOLOv5's), then
the LR follows one cosine down to 1 %.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from compression.data import build_dataset, build_loader
from compression.evaluate import evaluate
from compression.models import bernoulli_kl, raw_view, task_loss
from compression.runtime import select_device


@dataclass
class DistillConfig:
    steps: int = 1200  # optimizer steps of ``batch`` images each (the main recovery), 0 = no training (sparsity 0.2
    # on coco1k, 2 cores: val mAP50-95 0.205 in 17 minutes; 500 steps scored 0.012 less; README)
    kd_temperature: float = 1.0  # softening of teacher and student logits, 1 <= T <= 20
    kd_alpha: float = 1.0  # weight of kd_loss against the task loss, 0..1 (1 = distillation only, no labels needed)
    lr: float = 0.003  # peak learning rate, 0 < lr <= 1 (0.01 and more undo the reconstruction: loss 0.10 -> 0.36 in
    # 40 steps)
    freeze_bn: bool = True  # BN layers use their running statistics while training (small-data fine-tuning)
    optimizer: str = "sgd"  # "sgd" (nesterov, momentum 0.937) | "adamw" (betas 0.937/0.999)
    batch: int = 16  # images per step
    warmup_steps: int = 100  # linear LR warm-up (and momentum 0.8 -> 0.937), at most a quarter of the run
    mosaic: float = 0.0  # ultralytics mosaic probability for the train split, 0..1 (scale 0.5, flips, HSV as well;
    # 0: recovery learns the teacher on real images)
    crop: int = 320  # side of the random crop each image is trained on (0 = whole images): same object scale as
    # at imgsz, a quarter of the compute at 640
    kd_feature: float = 1.0  # weight of the per-layer feature term inside kd_loss, >= 0
    kd_images: str | None = None  # extra folder of unlabeled images; on them only kd_loss counts
    evals: int = 4  # held-out evaluations over the run (the best checkpoint, or the input, is kept); 0 = keep the last
    device: str = "auto"  # auto (CUDA if present) | cpu | cuda[:N]
    workers: int = 2  # dataloader workers
    seed: int = 0

    def __post_init__(self):
        checks = {"steps": (0 <= self.steps <= 1_000_000, "0..1000000"),
                  "kd_temperature": (1 <= self.kd_temperature <= 20, "1..20"),
                  "kd_alpha": (0 <= self.kd_alpha <= 1, "0..1"), "lr": (0 < self.lr <= 1, "(0, 1]"),
                  "batch": (1 <= self.batch <= 1024, "1..1024"), "warmup_steps": (0 <= self.warmup_steps, ">= 0"),
                  "kd_feature": (0 <= self.kd_feature, ">= 0"), "mosaic": (0 <= self.mosaic <= 1, "0..1"),
                  "crop": (0 <= self.crop <= 4096, "0..4096"),
                  "evals": (0 <= self.evals <= 1000, "0..1000")}
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be one of ('sgd', 'adamw'), got {self.optimizer!r}")
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"{name} must be in {allowed}, got {getattr(self, name)}")


@dataclass
class DistillResult:
    # per held-out evaluation: step, loss, mAP50, mAP50_95, seconds (and output_error when that chooses)
    evals: list[dict] = field(default_factory=list)
    best_step: int = 0  # 0 = the untrained input stayed best
    start_mAP50_95: float | None = None  # held-out mAP of the input, before training
    start_output_error: float | None = None  # the input's output error, when checkpoints are chosen by it
    steps: int = 0
    images: int = 0  # training images seen (labeled and unlabeled)
    skipped_steps: int = 0  # steps whose loss or gradient was not finite
    seconds: float = 0.0


def _width(block: nn.Module) -> int:
    """Output channels of an ultralytics Conv block (BN folded or not, fake-quantized or not)."""
    if hasattr(block, "bn"):
        return block.bn.num_features
    return getattr(block.conv, "conv", block.conv).out_channels


class FeatureTaps:
    """Forward hooks on the Conv blocks of a student and its teacher, and the feature term between them."""

    def __init__(self, student: nn.Module, teacher: nn.Module, kept: dict[str, list[int]] | None = None):
        from ultralytics.nn.modules import Conv

        kept = kept or {}
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

    def soft(logits):
        return logits if t == 1 else logits / t

    if teacher["obj"] is not None:
        obj_w = teacher["obj"].sigmoid()
        obj = bernoulli_kl(soft(student["obj"]), soft(teacher["obj"])).mean()
        conf = obj_w * teacher["cls"].sigmoid().amax(-1)
    else:
        obj_w = torch.ones_like(teacher["cls"][..., 0])
        obj = torch.zeros((), device=obj_w.device)
        conf = teacher["cls"].sigmoid().amax(-1)
    cls_per_anchor = bernoulli_kl(soft(student["cls"]), soft(teacher["cls"])).mean(-1)
    cls = (obj_w * cls_per_anchor).sum() / obj_w.sum().clamp(min=1e-6)
    box = (conf * (student["box"] - teacher["box"]).pow(2).sum(-1)).sum() / conf.sum().clamp(min=1e-6)
    extra = feat_weight * feat if feat is not None and feat_weight else 0.0
    return t * t * (cls + obj) + box + extra


def _optimizer(model: nn.Module, lr: float, kind: str = "sgd") -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on BN and biases
    groups = [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.937, 0.999))
    return torch.optim.SGD(groups, lr=lr, momentum=0.937, nesterov=True)


def crop_batch(batch: dict, size: int, generator: torch.Generator) -> dict:
    """A random ``size`` x ``size`` window of each image of an ultralytics batch, with its boxes cut to the window.

    A box is kept when at least 40 % of its area lies inside (YOLOv5's affine augmentation uses a similar rule).
    """
    img = batch["img"]
    n, _, h, w = img.shape
    if size >= min(h, w):
        return batch
    ys = torch.randint(0, h - size + 1, (n,), generator=generator)
    xs = torch.randint(0, w - size + 1, (n,), generator=generator)
    out = dict(batch, img=torch.stack([img[i, :, y:y + size, x:x + size] for i, (y, x) in enumerate(zip(ys, xs))]))
    if "bboxes" not in batch or not len(batch["bboxes"]):
        return out
    idx = batch["batch_idx"].long()
    box = batch["bboxes"] * torch.tensor([w, h, w, h], dtype=batch["bboxes"].dtype)
    x1y1, x2y2 = box[:, :2] - box[:, 2:] / 2, box[:, :2] + box[:, 2:] / 2
    offset = torch.stack((xs[idx], ys[idx]), 1).to(box.dtype)
    c1, c2 = (x1y1 - offset).clamp(0, size), (x2y2 - offset).clamp(0, size)
    inside = (c2 - c1).prod(1)
    keep = (inside >= 0.4 * box[:, 2:].prod(1).clamp(min=1e-9)) & ((c2 - c1) >= 2).all(1)
    xywh = torch.cat(((c1 + c2) / 2, c2 - c1), 1)[keep] / size
    out.update(bboxes=xywh, cls=batch["cls"][keep], batch_idx=batch["batch_idx"][keep])
    return out


def _forever(loader):
    """Batches without end: a new shuffled pass each time the loader is exhausted."""
    while True:
        yield from loader


def _freeze_bn_(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def distill(student: nn.Module, teacher: nn.Module, data: dict, cfg: DistillConfig, imgsz: int = 640,
            kept: dict[str, list[int]] | None = None, holdout: dict | None = None,
            on_eval: Callable[[dict], None] | None = None, progress: bool = True,
            output_error: Callable[[nn.Module], float] | None = None) -> tuple[nn.Module, DistillResult]:
    """Train a copy of ``student`` for ``cfg.steps`` steps against the frozen ``teacher``; keep the best checkpoint.

    Training reads ``data``'s train split. With ``holdout`` (a dataset config whose val split is held-out train
    images, :func:`holdout_split`), ``cfg.evals`` times over the run the EMA weights are evaluated there at
    ``imgsz`` and ``on_eval({"step", "loss", "mAP50", "mAP50_95", "seconds"})`` is called (the NNI trial reports it
    as an intermediate result); the best of these checkpoints and the untrained input is returned: the highest
    mAP50-95, or with ``output_error`` the lowest of that function of the model (each record gets it as
    ``"output_error"``; it must read held-out images only). Without ``holdout``, the last EMA weights. ``data``'s
    val split is never read here.

    Args:
        student: the model to train (left unchanged; a trained copy is returned).
        teacher: the unpruned FP32 model, frozen.
        data: a dataset config from :func:`compression.data.load_data_config` (its train split is trained on).
        cfg: steps, KD temperature and weight, optimiser and augmentation settings.
        imgsz: the deployment size: images are augmented at it, trained on as ``cfg.crop`` crops, evaluated at it.
        kept: BatchNorm name -> the teacher channels the student kept (:class:`compression.prune.Structure`).
        holdout: where checkpoints are chosen; never trained on.
        output_error: lower is better; chooses the checkpoint instead of the held-out mAP (QAT: how far the
            fake-quantized model's output is from the FP32 teacher's).

    Example:
        >>> small, result = distill(pruned, model, load_data_config("coco1k.yaml"), DistillConfig(steps=600))
    """
    t0 = time.perf_counter()
    result = DistillResult()
    student = copy.deepcopy(student)
    if cfg.steps == 0:
        return student, result
    run = _Recovery(student, teacher, data, cfg, imgsz, kept, result)
    holdout = holdout if cfg.evals else None

    def evaluate_checkpoint(model, step, loss):
        metrics = evaluate(model, holdout, imgsz, batch=cfg.batch, device=str(run.device), progress=False)
        record = {"step": step, "loss": loss, "mAP50": metrics.mAP50, "mAP50_95": metrics.mAP50_95}
        if output_error is not None:
            record["output_error"] = output_error(model)
        return {**record, "seconds": time.perf_counter() - t0}

    def merit(record):
        return -record["output_error"] if output_error is not None else record["mAP50_95"]

    best, best_state = -math.inf, None
    if holdout is not None:  # the input is a candidate too: a short run on few images can end below where it started
        start = evaluate_checkpoint(run.student, 0, None)
        result.start_mAP50_95, result.start_output_error = start["mAP50_95"], start.get("output_error")
        best, best_state = merit(start), copy.deepcopy(run.student.state_dict())
    marks = {max(1, round(cfg.steps * (i + 1) / cfg.evals)) for i in range(cfg.evals)} if holdout is not None else set()
    running, bar = 0.0, tqdm(range(1, cfg.steps + 1), desc="distill", disable=not progress, leave=False)
    for step in bar:
        loss = run.step(step)
        if loss is None:
            continue
        running = loss if step == 1 else 0.95 * running + 0.05 * loss
        bar.set_postfix(loss=f"{running:.3f}")
        if step in marks:
            record = evaluate_checkpoint(run.ema.ema, step, running)
            result.evals.append(record)
            if on_eval:
                on_eval(record)
            if merit(record) > best:
                best, result.best_step = merit(record), step
                best_state = copy.deepcopy(run.ema.ema.state_dict())
    run.close()
    student = run.student
    student.load_state_dict(best_state if best_state is not None else run.ema.ema.state_dict())
    result.seconds = time.perf_counter() - t0
    return student.cpu().eval(), result


def schedule(step: int, steps: int, warmup: int, lr: float) -> tuple[float, float]:
    """(learning rate, SGD momentum) at ``step`` (from 1) of ``steps``: YOLOv5's linear warm-up over ``warmup`` steps
    (LR from 0, momentum 0.8 -> 0.937), times one cosine cycle from ``lr`` down to 1 % of it."""
    ramp = min(1.0, step / warmup) if warmup else 1.0
    cosine = 0.01 + 0.99 * (1 + math.cos(math.pi * (step - 1) / steps)) / 2
    return lr * cosine * ramp, 0.8 + (0.937 - 0.8) * ramp


class _Recovery:
    """The state of one :func:`distill` run (models on the device, batch streams, loss, optimiser, EMA, feature
    taps) and its optimizer step."""

    def __init__(self, student: nn.Module, teacher: nn.Module, data: dict, cfg: DistillConfig, imgsz: int,
                 kept: dict[str, list[int]] | None, result: DistillResult):
        from ultralytics.utils.torch_utils import ModelEMA

        torch.manual_seed(cfg.seed)
        self.cfg, self.result = cfg, result
        self.device = device = select_device(cfg.device)
        self.student = student = student.to(device).float()
        self.teacher = copy.deepcopy(teacher).to(device).float().train()  # train mode: raw outputs; BN frozen below
        _freeze_bn_(self.teacher)
        self.teacher.requires_grad_(False)
        stride = int(max(student.stride))
        self.batches = _batches(data, cfg, imgsz, stride)
        self.unlabeled = _batches({**data, "train": cfg.kd_images}, cfg, imgsz, stride, True) if cfg.kd_images else None
        self.criterion = task_loss(student, cfg.crop or imgsz)
        self.optimizer = _optimizer(student, cfg.lr, cfg.optimizer)
        self.warmup = min(cfg.warmup_steps, cfg.steps // 4)
        # ultralytics' EMA ramps its decay up to 0.9999 over ~2000 steps; a recovery run is often a few hundred
        # steps, so average over about a fifth of the run instead.
        self.ema = ModelEMA(student, decay=min(0.9999, 1 - 5 / cfg.steps), tau=max(1, cfg.steps / 10))
        # after the EMA copy, so the EMA model carries no hooks
        self.taps = FeatureTaps(student, self.teacher, kept) if cfg.kd_feature and cfg.kd_alpha else None
        self.amp = device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def loss(self, batch: dict, labeled: bool) -> torch.Tensor:
        """The loss of one batch: kd_loss, plus the task loss on labeled batches when ``kd_alpha < 1``."""
        cfg, device = self.cfg, self.device
        batch = crop_batch(batch, cfg.crop, self.gen) if cfg.crop else batch
        img = batch["img"].to(device, non_blocking=True).float() / 255
        self.result.images += len(img)
        with torch.autocast(device.type, enabled=self.amp):
            raw = self.student(img)
            with torch.no_grad():
                t_raw = self.teacher(img)
            kd = kd_loss(raw_view(self.student, raw), raw_view(self.teacher, t_raw), cfg.kd_temperature,
                         self.taps.loss() if self.taps else None, cfg.kd_feature)
            if not labeled or cfg.kd_alpha == 1:
                return kd
            task, _ = self.criterion(raw, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
            return (1 - cfg.kd_alpha) * task + cfg.kd_alpha * kd

    def step(self, step: int) -> float | None:
        """One optimizer step (``step`` from 1); returns its loss, or None when the loss or the gradient was not
        finite (the step is skipped: a diverging step must not poison the weights, seen at lr 0.01)."""
        cfg, student, optimizer = self.cfg, self.student, self.optimizer
        student.train()
        if cfg.freeze_bn:  # keep BN running statistics (the teacher's, for the kept channels); affine still trains
            _freeze_bn_(student)
        lr, momentum = schedule(step, cfg.steps, self.warmup, cfg.lr)
        for g in optimizer.param_groups:
            g["lr"] = lr
            if "momentum" in g:
                g["momentum"] = momentum
        loss = self.loss(next(self.batches), labeled=True)
        if self.unlabeled is not None:
            loss = loss + self.loss(next(self.unlabeled), labeled=False)
        optimizer.zero_grad(set_to_none=True)
        self.result.steps = step
        if not torch.isfinite(loss):
            self.result.skipped_steps += 1
            return None
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)
        if not torch.isfinite(nn.utils.clip_grad_norm_(student.parameters(), max_norm=10.0)) and not self.amp:
            self.result.skipped_steps += 1
            return None
        self.scaler.step(optimizer)
        self.scaler.update()
        self.ema.update(student)
        return loss.item()

    def close(self) -> None:
        if self.taps:
            self.taps.remove()


def _batches(data: dict, cfg: DistillConfig, imgsz: int, stride: int, unlabeled: bool = False):
    """Endless augmented batches of ``data``'s train split at ``imgsz`` (ultralytics' pipeline, images in RAM)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.utils import DEFAULT_CFG

    hyp = get_cfg(DEFAULT_CFG, {"mosaic": cfg.mosaic, "close_mosaic": 0})
    # kd_alpha = 1 needs no labels: the train split is then read as images alone.
    dataset = build_dataset(data, "train", imgsz, augment=True, batch=cfg.batch, stride=stride, hyp=hyp,
                            unlabeled=unlabeled or cfg.kd_alpha == 1)
    return _forever(build_loader(dataset, cfg.batch, shuffle=True, workers=cfg.workers))
