"""ReLU in place of SiLU in the first blocks, fitted back to the teacher's feature maps.

In an INT8 file ONNX Runtime runs SiLU as an 8-bit sigmoid and an 8-bit product, small ops that scale poorly over
threads and took 27 % of YOLOv5n's INT8 time at 448 px on 2 cores; a ReLU costs nothing there (the quantizer drops
it into the convolution's output range). The largest feature maps are the first blocks', so those are where SiLU
costs most: ReLU in model.0-2 made the INT8 file 2.29x faster than FP32 at 640 instead of 2.13x (same run, 448 px).

Swapping alone costs accuracy (held-out mAP50-95 0.253 -> 0.207 for model.0-2). :func:`fit_relu` wins it back
without labels. First (with ``match``) each swapped channel's BatchNorm is scaled and shifted so that the ReLU comes
closest to the SiLU it replaces (:func:`match_relu_`: 0.207 -> 0.236 before any training). Then two fits of
``epochs`` passes over the train images each, both on the outputs of blocks that keep SiLU, so that the ReLU blocks
are free to find their own features: first the swapped blocks and the block after them learn to reproduce that
block's output, then every block before the head learns to reproduce the teacher's later backbone outputs and the
head's inputs (each block's squared error divided by the variance of the teacher's output there), with BatchNorm
statistics frozen (they fold into the INT8 weights). Fitting the swapped blocks' own outputs instead, as the first
version did, left YOLOv5n with ReLU in model.0-4 at 0.2467 (448 px, held-out FP32); this recipe reaches 0.2528
(teacher 0.2531).
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from compression.data import letterbox, read_image, split_images
from compression.errors import UserError
from compression.runtime import Size, select_device


@dataclass
class ReluConfig:
    blocks: int = 3  # leading blocks (model.0 ..) whose SiLU become ReLU, 0 = none; 3: YOLOv5's stem and first C3
    # (YOLOv5n at 448, held-out INT8 mAP50-95: 0.2522 with 3, 0.2511 with 5, 0.2513 with SiLU; INT8 2.29x faster
    # than FP32 at 640 with 3, 2.38x with 5, 2.13x with SiLU, same run)
    epochs: int = 8  # passes over the train images of each of the two fits, 0 = swap without fitting (YOLOv5n at 448,
    # blocks=5, held-out FP32 mAP50-95: 4 epochs 0.2528, 8 epochs 0.2553; 10 min on 2 cores)
    lr: float = 0.001  # Adam's peak learning rate of the first fit (the second fit takes a tenth)
    match: bool = False  # scale and shift each swapped BatchNorm to suit the ReLU before the fits (match_relu_);
    # YOLOv5n at 448, held-out FP32 mAP50-95 after the fits, matched / not: blocks=3 0.2508 / 0.2502, 5 0.2501 /
    # 0.2553, 7 0.2361 / collapsed (0.0127): off unless the ReLU goes past model.4
    batch: int = 8  # images per step
    device: str = "auto"  # auto (CUDA if present) | cpu | cuda[:N]
    seed: int = 0

    def __post_init__(self):
        checks = {"blocks": (0 <= self.blocks <= 1000, "0..1000"), "epochs": (0 <= self.epochs <= 1000, "0..1000"),
                  "lr": (0 < self.lr <= 1, "(0, 1]"), "batch": (1 <= self.batch <= 1024, "1..1024")}
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"{name} must be in {allowed}, got {getattr(self, name)}")


MATCH_IMAGES = 32  # train images whose values before each swapped SiLU set that channel's scale and shift
MATCH_SAMPLES = 8192  # values per channel drawn from them
MATCH_STEPS = 300  # Adam steps of the per-channel least squares


@dataclass
class ReluResult:
    swapped: int = 0  # SiLU modules replaced
    matched: int = 0  # of those, how many had their BatchNorm scaled and shifted to suit the ReLU (match_relu_)
    fits: list[dict] = field(default_factory=list)  # per fit: blocks trained, steps, first and last epoch's mean loss
    seconds: float = 0.0


def _check_blocks(model: nn.Module, blocks: int) -> None:
    if blocks > len(model.model) - 1:
        raise UserError(f"relu_blocks={blocks}: the model has {len(model.model) - 1} blocks before its head")


def swap_relu_(model: nn.Module, blocks: int) -> int:
    """Replace every SiLU activation inside ``model.model[:blocks]`` by ReLU, in place; returns how many."""
    _check_blocks(model, blocks)
    swapped = 0
    for layer in model.model[:blocks]:
        for module in layer.modules():
            if isinstance(getattr(module, "act", None), nn.SiLU):
                module.act = nn.ReLU()
                swapped += 1
    return swapped


def _silu_convs(model: nn.Module, blocks: int) -> list[nn.Module]:
    """The convolutions of ``model.model[:blocks]`` whose activation is SiLU and whose BatchNorm is kept apart."""
    return [m for layer in model.model[:blocks] for m in layer.modules()
            if isinstance(getattr(m, "act", None), nn.SiLU) and isinstance(getattr(m, "bn", None), nn.BatchNorm2d)]


def _relu_like_silu(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``x`` (a channel's values), ``a > 0`` and ``b`` with ReLU(a x + b) closest to SiLU(x) (least squares;
    from a = 1, b = 0, i.e. a plain ReLU)."""
    target = nn.functional.silu(x)
    log_a = torch.zeros(len(x), 1, device=x.device, requires_grad=True)
    b = torch.zeros(len(x), 1, device=x.device, requires_grad=True)
    opt = torch.optim.Adam([log_a, b], lr=0.02)
    for _ in range(MATCH_STEPS):
        loss = ((torch.relu(log_a.exp() * x + b) - target) ** 2).mean(1).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return log_a.detach().exp().squeeze(1), b.detach().squeeze(1)


def match_relu_(model: nn.Module, blocks: int, images: torch.Tensor, batch: int = 8, seed: int = 0) -> int:
    """Scale and shift, channel by channel, the BatchNorm before each SiLU in ``model.model[:blocks]`` so that a ReLU
    put there by :func:`swap_relu_` afterwards comes closest to that SiLU on the values ``images`` (uint8) bring it;
    in place, on ``model``'s device; returns how many convolutions changed.

    Where a channel's values sit near zero, SiLU is far from ReLU (SiLU(1) = 0.73): unmatched, those gaps add up
    block after block. YOLOv5n at 448 px, held-out mAP50-95 of the swap before any training: model.0-2 0.2068 ->
    0.2364 matched; model.0-6 0.0127 -> 0.196 after the first fit (loss 0.60 -> 0.19).
    """
    convs = _silu_convs(model, blocks)
    if not convs:
        return 0
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    batches = -(-len(images) // batch)
    per_batch = -(-MATCH_SAMPLES // batches)
    seen: list[list[torch.Tensor]] = [[] for _ in convs]

    def keep(index):
        def hook(_module, _inputs, out):
            values = out.detach().transpose(0, 1).flatten(1)
            pick = torch.randint(values.shape[1], (per_batch,), generator=gen).to(values.device)
            seen[index].append(values[:, pick])
        return hook

    hooks = [m.bn.register_forward_hook(keep(i)) for i, m in enumerate(convs)]  # one SiLU may serve every Conv
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch):
                block_outputs(model, images[start:start + batch].to(device).float() / 255, [blocks - 1])
    finally:
        for h in hooks:
            h.remove()
    sizes = [m.bn.num_features for m in convs]
    scale, shift = _relu_like_silu(torch.cat([torch.cat(s, 1) for s in seen]))
    with torch.no_grad():
        for m, a, b in zip(convs, scale.split(sizes), shift.split(sizes)):
            m.bn.weight.mul_(a)
            m.bn.bias.mul_(a).add_(b)
    return len(convs)


def backbone_blocks(model: nn.Module) -> int:
    """How many leading blocks form the backbone (its model yaml's ``backbone`` list)."""
    yaml = getattr(model, "yaml", None) or {}
    return len(yaml.get("backbone", [])) or len(model.model) - 1


def _load_images(data: dict, imgsz: Size, seed: int) -> torch.Tensor:
    """Every train image, letterboxed to ``imgsz``, as uint8 (a quarter of float32's memory)."""
    files = split_images(data, "train")
    if not files:
        raise UserError(f"the train split of '{data.get('yaml_file', 'the dataset')}' has no images")
    random.Random(seed).shuffle(files)
    return torch.cat([(letterbox(read_image(f), imgsz) * 255).round().to(torch.uint8) for f in files])


class _Enough(Exception):
    """Raised by the last hook: the blocks after it (and the head) need not run."""


def head_inputs(model: nn.Module) -> list[int]:
    """The blocks whose outputs the detection head reads (YOLOv5n: 17, 20, 23)."""
    sources = getattr(model.model[-1], "f", [])
    return sorted(i for i in ([sources] if isinstance(sources, int) else sources) if i >= 0)


def fit_targets(model: nn.Module, blocks: int) -> list[int]:
    """The blocks whose outputs the second fit matches: the backbone's from the first SiLU one on, the head's inputs."""
    return sorted(set(range(blocks, backbone_blocks(model))) | set(head_inputs(model)))


def block_outputs(model: nn.Module, x: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
    """The outputs of ``model.model[i]`` for each ``i`` in ``blocks`` (ascending); the forward stops after the last."""
    outs, last = [], blocks[-1]

    def keep(index):
        def hook(_module, _inputs, out):
            outs.append(out)
            if index == last:
                raise _Enough
        return hook

    hooks = [model.model[i].register_forward_hook(keep(i)) for i in blocks]
    try:
        model(x)
    except _Enough:
        pass
    finally:
        for h in hooks:
            h.remove()
    return outs


def matching_loss(student: nn.Module, reference: nn.Module, x: torch.Tensor, blocks: list[int]) -> torch.Tensor:
    """How far ``student``'s outputs of ``blocks`` are from ``reference``'s for ``x``: each output's squared error
    over the reference's variance there, averaged over the blocks (gradients reach ``student`` only)."""
    with torch.no_grad():
        wanted = block_outputs(reference, x, blocks)
    outs = block_outputs(student, x, blocks)
    return sum(((s - t) ** 2).mean() / t.var().clamp_min(1e-12) for s, t in zip(outs, wanted)) / len(blocks)


def _fit(student, teacher, images, count: int, targets: list[int], cfg: ReluConfig, lr: float, device,
         progress: bool) -> dict:
    """Train ``student.model[:count]`` on the outputs of the blocks ``targets``."""
    params = [p for layer in student.model[:count] for p in layer.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    per_epoch = max(len(images) // cfg.batch, 1)
    steps = cfg.epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    bar = tqdm(total=steps, desc=f"relu fit model.0-{count - 1}", disable=not progress, leave=False)
    for _ in range(cfg.epochs):
        order, total = torch.randperm(len(images), generator=gen), 0.0
        for b in range(per_epoch):
            x = images[order[b * cfg.batch:(b + 1) * cfg.batch]].to(device).float() / 255
            if torch.rand(1, generator=gen) < 0.5:
                x = x.flip(3)
            loss = matching_loss(student, teacher, x, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        losses.append(total / per_epoch)
    bar.close()
    return {"blocks": count, "targets": targets, "steps": steps, "lr": lr, "loss_first_epoch": losses[0],
            "loss_last_epoch": losses[-1]}


def fit_relu(model: nn.Module, teacher: nn.Module, data: dict, cfg: ReluConfig, imgsz: Size,
             progress: bool = True) -> tuple[nn.Module, ReluResult]:
    """A copy of ``model`` with ReLU in its first ``cfg.blocks`` blocks, fitted to ``teacher``'s feature maps.

    Reads only ``data``'s train split (pass the one without held-out images), as whole letterboxed ``imgsz`` images
    with random flips. ``model`` and ``teacher`` must have the same structure up to the end of the backbone.

    Example:
        >>> student, result = fit_relu(teacher, teacher, train, ReluConfig(blocks=3), 448)
    """
    t0 = time.perf_counter()
    student = copy.deepcopy(model).eval()  # eval: BatchNorm keeps its statistics; weights and affine train
    if not cfg.blocks or not cfg.epochs:
        return student, ReluResult(swapped=swap_relu_(student, cfg.blocks))
    _check_blocks(student, cfg.blocks)  # before any image is read
    targets = fit_targets(student, cfg.blocks)
    if not targets:
        raise UserError(f"relu_blocks={cfg.blocks}: the model's head names no input blocks to fit to")
    before_head = len(student.model) - 1
    fits = [(cfg.blocks + 1, [cfg.blocks], cfg.lr)] if cfg.blocks < before_head else []  # the next block absorbs
    fits.append((before_head, targets, cfg.lr / 10 if fits else cfg.lr))
    device = select_device(cfg.device)
    images = _load_images(data, imgsz, cfg.seed)
    teacher = copy.deepcopy(teacher).eval().to(device)
    student.to(device)
    result = ReluResult(matched=match_relu_(student, cfg.blocks, images[:MATCH_IMAGES], cfg.batch, cfg.seed)
                        if cfg.match else 0)
    result.swapped = swap_relu_(student, cfg.blocks)
    for p in teacher.parameters():
        p.requires_grad_(False)
    for count, targets, lr in fits:
        result.fits.append(_fit(student, teacher, images, count, targets, cfg, lr, device, progress))
    result.seconds = time.perf_counter() - t0
    return student.cpu().eval(), result
