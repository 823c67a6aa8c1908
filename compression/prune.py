"""Dependency-aware structured channel pruning on Torch-Pruning's DepGraph.

Residual adds (C3 bottlenecks), concats (the neck) and the SPPF stay consistent because every group of coupled
channels is removed together; the head's output convolutions keep their shapes so the decode is unchanged.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
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
    pruner.step()
    for p in model.parameters():
        p.requires_grad_(True)
    params_after, macs_after = count_params_and_macs(model, imgsz)
    return model, PruneResult(params, params_after, macs, macs_after, time.perf_counter() - t0)
