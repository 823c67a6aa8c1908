"""Dependency-aware structured channel pruning on Torch-Pruning's DepGraph.

Residual adds (C3 bottlenecks), concats (the neck) and the SPPF stay consistent because every group of coupled
channels is removed together; the head's output convolutions keep their shapes so the decode is unchanged.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compression.benchmark import count_params_and_macs
from compression.models import detect_head, head_output_convs

IMPORTANCE = ("l1", "l2", "bn_scale")


@dataclass
class PruneConfig:
    sparsity: float = 0.0  # fraction of channels removed from each prunable group, 0 <= sparsity < 0.9
    importance: str = "l1"  # channel ranking: "l1" (filter L1 norm) | "l2" | "bn_scale" (BN |gamma|)
    round_to: int = 8  # keep channel counts multiples of this (INT8 kernels like it)
    min_channels: int = 16  # no layer is pruned below this width

    def __post_init__(self):
        if not 0 <= self.sparsity < 0.9:
            raise ValueError(f"sparsity must be in [0, 0.9), got {self.sparsity}")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {IMPORTANCE}, got {self.importance!r}")
        if self.round_to < 1 or self.min_channels < 1:
            raise ValueError(f"round_to and min_channels must be >= 1, got {self.round_to}, {self.min_channels}")


@dataclass
class PruneResult:
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    seconds: float


def _importance(name: str):
    import torch_pruning as tp

    return {"l1": lambda: tp.importance.MagnitudeImportance(p=1), "l2": lambda: tp.importance.MagnitudeImportance(p=2),
            "bn_scale": lambda: tp.importance.BNScaleImportance()}[name]()


def prune(model: nn.Module, cfg: PruneConfig, imgsz: int = 640) -> tuple[nn.Module, PruneResult]:
    """Return a physically smaller copy of ``model`` with ``cfg.sparsity`` of its channels removed.

    Args:
        model: a detector from :func:`compression.models.load_model`.
        cfg: how much and by which criterion.
        imgsz: input size for the MACs count (the graph is traced at a small size).

    Example:
        >>> small, result = prune(model, PruneConfig(sparsity=0.2))
        >>> result.params_after / result.params_before  # ~0.6
    """
    import torch_pruning as tp

    t0 = time.perf_counter()
    model = copy.deepcopy(model).cpu().float().eval()
    params, macs = count_params_and_macs(model, imgsz)
    if cfg.sparsity == 0:
        return model, PruneResult(params, params, macs, macs, time.perf_counter() - t0)

    head = detect_head(model)
    # The head's output convs define the decode; ultralytics' DFL conv is a fixed projection.
    ignored = head_output_convs(model) + [m for m in head.modules() if isinstance(m, nn.Conv2d) and not
                                          any(p.requires_grad for p in m.parameters())]
    ratios = {}
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m not in ignored:
            if m.out_channels <= cfg.min_channels:
                ignored.append(m)
            else:
                ratios[m] = min(cfg.sparsity, 1 - cfg.min_channels / m.out_channels)
    stride = int(max(model.stride))
    example = torch.zeros(1, 3, 2 * stride, 2 * stride)
    pruner = tp.pruner.MetaPruner(
        model, example, importance=_importance(cfg.importance), pruning_ratio=cfg.sparsity,
        pruning_ratio_dict=ratios, ignored_layers=ignored, round_to=cfg.round_to,
    )
    # Record which of the original channels each BatchNorm keeps: distillation matches the student's features to
    # the teacher's at those channels (structured pruning keeps a subset, in order).
    bns = {m: name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    removed: dict[str, set[int]] = {}
    widths = {name: m.num_features for m, name in bns.items()}
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            layer = dep.target.module
            if layer in bns and dep.handler == tp.prune_batchnorm_out_channels:
                removed.setdefault(bns[layer], set()).update(int(i) for i in idxs)
        group.prune()
    model.kept_channels = {name: [c for c in range(widths[name]) if c not in gone] for name, gone in removed.items()}
    for m in model.modules():  # trainable again, except ultralytics' fixed DFL projection
        if type(m).__name__ != "DFL":
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
    params_after, macs_after = count_params_and_macs(model, imgsz)
    return model, PruneResult(params, params_after, macs, macs_after, time.perf_counter() - t0)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the tensor it wanted has been seen."""


def _conv_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the model's Conv2d modules in the order a forward pass runs them."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    order, handles = [], [m.register_forward_pre_hook(lambda m, _i: order.append(names[m])) for m in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))


def reconstruct_(student: nn.Module, teacher: nn.Module, images: torch.Tensor, samples: int = 512,
                ridge: float = 0.01, progress: bool = True, bias: bool = True) -> nn.Module:
    """Refit each conv of a pruned ``student`` by least squares so its output matches the teacher's kept channels.

    Layer by layer in execution order (channel-pruning "reconstruction"), with ``X`` the student's own input patches
    at that layer (so upstream errors are corrected too), ``Y`` the teacher's pre-BN conv output at the channels the
    student kept and ``W0`` the pruned weights, on ``samples`` random positions per image:

        W = argmin |W X - Y|^2 + lambda |W - W0|^2 = (Y X^T + lambda W0)(X X^T + lambda I)^-1,
        lambda = ridge * mean(diag(X X^T))

    With ``bias`` (the default), ``X`` gets a row of ones and ``W`` an offset column (ridge towards 0): the offset
    stands for what the removed input channels added on average (e.g. SiLU of their BN shift) and is folded into the
    conv's bias or, for the usual bias-free conv before a BN, into that BN's running mean (m -> m - offset).
    A fifth of the positions is held out; a layer keeps ``W0`` when the refit does not lower the held-out error.
    Returns the student, changed in place; grouped convs and layers without a known channel map are left as they are.
    """
    from tqdm import tqdm

    kept = getattr(student, "kept_channels", {})
    student.eval()
    teacher.eval()
    t_mods, s_mods = dict(teacher.named_modules()), dict(student.named_modules())
    order = _conv_order(student, images[:1])
    gen = torch.Generator().manual_seed(0)

    targets, handles = {}, []  # name -> (positions [n, k], teacher pre-BN output there [out, n*k])

    def record(name):
        def hook(_m, _inp, out):
            n, c, h, w = out.shape
            pick = torch.randint(h * w, (n, min(samples, h * w)), generator=gen)
            y = torch.gather(out.flatten(2), 2, pick.unsqueeze(1).expand(-1, c, -1)).permute(1, 0, 2).flatten(1)
            targets[name] = (pick, y)
        return hook

    for name in order:
        if name in t_mods:
            handles.append(t_mods[name].register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            teacher(images)
    finally:
        for h in handles:
            h.remove()

    def student_input(module):
        box = {}

        def hook(_m, inp):
            box["x"] = inp[0]
            raise _Stop

        h = module.register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                student(images)
        except _Stop:
            pass
        finally:
            h.remove()
        return box["x"]

    for name in tqdm(order, desc="reconstruct", disable=not progress, leave=False):
        s_conv, t_conv = s_mods[name], t_mods.get(name)
        if t_conv is None or name not in targets or s_conv.groups != 1 or t_conv.groups != 1:
            continue
        same = s_conv.out_channels == t_conv.out_channels
        out_idx = kept.get(f"{name.rsplit('.', 1)[0]}.bn", list(range(t_conv.out_channels)) if same else None)
        if out_idx is None:
            continue
        pick, y = targets[name]
        y = y[out_idx].double()
        if t_conv.bias is not None:
            y = y - t_conv.bias[out_idx].double().unsqueeze(1)
        cols = F.unfold(student_input(s_conv), s_conv.kernel_size, s_conv.dilation, s_conv.padding, s_conv.stride)
        x = torch.gather(cols, 2, pick.unsqueeze(1).expand(-1, cols.shape[1], -1)).permute(1, 0, 2).flatten(1).double()
        w0 = s_conv.weight.detach().flatten(1).double()
        bn = s_mods.get(f"{name.rsplit('.', 1)[0]}.bn")
        with_bias = bias and (s_conv.bias is not None or isinstance(bn, nn.BatchNorm2d))
        if with_bias:  # a constant input row: the offset stands for what the removed channels added on average
            x = torch.cat([x, torch.ones_like(x[:1])])
            w0 = torch.cat([w0, torch.zeros_like(w0[:, :1])], 1)
        held = torch.rand(x.shape[1], generator=gen) < 0.2
        xf, yf = x[:, ~held], y[:, ~held]
        gram = xf @ xf.T
        lam = ridge * gram.diagonal().mean() + 1e-12
        w = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), xf @ yf.T + lam * w0.T).T
        if (w @ x[:, held] - y[:, held]).pow(2).sum() < (w0 @ x[:, held] - y[:, held]).pow(2).sum():
            with torch.no_grad():
                if with_bias:
                    w, offset = w[:, :-1], w[:, -1].to(s_conv.weight.dtype)
                    if s_conv.bias is not None:
                        s_conv.bias.add_(offset)
                    else:
                        bn.running_mean.sub_(offset)  # BN(conv + b) with mean m == BN(conv) with mean m - b
                s_conv.weight.copy_(w.reshape(s_conv.weight.shape).to(s_conv.weight.dtype))
    return student
