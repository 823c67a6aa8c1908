"""Structured pruning: low-rank factorisation of Conv blocks (the default), or channels and residual blocks removed on
Torch-Pruning's DepGraph.

Residual adds (C3 bottlenecks), concats (the neck) and the SPPF stay consistent because every group of coupled
channels is removed together; the head's output convolutions keep their shapes so the decode is unchanged. The
low-rank method (:mod:`compression.lowrank`) changes no width at all.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compression.benchmark import count_params_and_macs
from compression.lowrank import factorize_to_, in_channels, set_ranks_
from compression.models import bernoulli_kl, family, raw_view

IMPORTANCE = ("l1", "l2", "bn_scale")
METHODS = ("lowrank", "channels", "blocks", "both")
LEVELS = (0.125, 0.25, 0.375, 0.5)  # fractions of a group's channels whose removal is measured


@dataclass
class PruneConfig:
    sparsity: float = 0.0  # fraction of the model's MACs to remove (at the evaluation imgsz), 0 <= sparsity < 0.9
    method: str = "lowrank"  # "lowrank" (each Conv block's leading directions, compression.lowrank) | "channels"
    # (filters) | "blocks" (whole residual bottlenecks) | "both" (channels and blocks). At sparsity 0.2 on coco1k
    # lowrank left held-out mAP50-95 0.18 before training (0.14 without input projections), channels 0.047 after
    # reconstruction (README)
    importance: str = "l2"  # which channels of a group go first: "l1" | "l2" (filter norms) | "bn_scale" (|gamma|)
    rounds: int = 1  # progressive steps to the target, each followed by the caller's recovery
    # (coco1k held-out: channels at 0.1, 1 round beat 4, 0.132 vs 0.100 before the main recovery; lowrank at 0.2,
    # 1 round of 150 steps beat 2 of 75, 0.235 vs 0.174; README)
    round_to: int = 8  # kept widths (lowrank: ranks) are multiples of this where the group's width is
    min_channels: int = 8  # no group is pruned below this width, no rank below it
    max_group_sparsity: float = 0.5  # at most this fraction of a group's original channels is removed
    sensitivity_images: int = 8  # calibration images for the sensitivity measurement (not lowrank: its activation
    # statistics read every image given, compression.lowrank.STATS_IMAGES in a trial)

    def __post_init__(self):
        if not 0 <= self.sparsity < 0.9:
            raise ValueError(f"sparsity must be in [0, 0.9), got {self.sparsity}")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {IMPORTANCE}, got {self.importance!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 1 <= self.rounds <= 64:
            raise ValueError(f"rounds must be in 1..64, got {self.rounds}")
        if self.round_to < 1 or self.min_channels < 1:
            raise ValueError(f"round_to and min_channels must be >= 1, got {self.round_to}, {self.min_channels}")
        if not 0 < self.max_group_sparsity < 1:
            raise ValueError(f"max_group_sparsity must be in (0, 1), got {self.max_group_sparsity}")
        if self.sensitivity_images < 1:
            raise ValueError(f"sensitivity_images must be >= 1, got {self.sensitivity_images}")


@dataclass
class Structure:
    """What pruning kept, in the teacher's terms: enough to rebuild the student's shapes from the teacher."""

    kept: dict[str, list[int]] = field(default_factory=dict)  # BatchNorm name -> the teacher channels it keeps
    removed_blocks: list[str] = field(default_factory=list)  # residual bottlenecks replaced by their shortcut
    ranks: dict[str, int] = field(default_factory=dict)  # Conv block name -> output rank of its factorised convolution
    in_ranks: dict[str, int] = field(default_factory=dict)  # Conv block name -> width of its input projection


@dataclass
class PruneResult:
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    seconds: float
    structure: Structure = field(default_factory=Structure)
    rounds: list[dict] = field(default_factory=list)  # per round: target and reached MACs ratio, what was cut


def _importance(name: str):
    import torch_pruning as tp

    return {"l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
            "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
            "bn_scale": lambda: tp.importance.BNScaleImportance()}[name]()


def _never_pruned(model: nn.Module) -> list[nn.Module]:
    return family(model).never_pruned(model)


def residual_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Bottlenecks with a shortcut (``x + f(x)``, C3/C2f members): removing one leaves its shortcut, ``x``."""
    return {name: m for name, m in model.named_modules()
            if getattr(m, "add", False) is True and hasattr(m, "cv1") and hasattr(m, "cv2")}


def remove_blocks_(model: nn.Module, names: list[str]) -> nn.Module:
    """Replace the named residual bottlenecks by ``nn.Identity`` (their shortcut), in place; names stay stable."""
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Identity())
    return model


class _Groups:
    """Torch-Pruning's groups of coupled channels of ``model``, with what removing some of their channels saves.

    Per group: the Conv blocks whose outputs it narrows, its BatchNorms, the channels in the order they would go
    (least important first), the MACs one channel costs at ``imgsz`` (exact for a lone group) and the channel
    counts whose removal is measured (multiples of ``round_to`` where the widths are, never below the floor).
    """

    def __init__(self, model: nn.Module, cfg: PruneConfig, imgsz: int, original: dict[str, int]):
        import torch_pruning as tp

        stride = int(max(model.stride))
        self.model = model
        self.dg = tp.DependencyGraph().build_dependency(model, torch.zeros(1, 3, 2 * stride, 2 * stride))
        names = {m: n for n, m in model.named_modules()}
        area = _output_areas(model, imgsz)
        imp = _importance(cfg.importance)
        self.groups = []
        for group in self.dg.get_all_groups(ignored_layers=_never_pruned(model), root_module_types=[nn.Conv2d]):
            outs, bns, macs_per_channel = [], [], 0
            for dep, _ in group:
                m = dep.target.module
                if isinstance(m, nn.BatchNorm2d):
                    bns.append(names[m])
                if not isinstance(m, nn.Conv2d):
                    continue
                k = m.kernel_size[0] * m.kernel_size[1] * area[m]
                if self.dg.is_out_channel_pruning_fn(dep.handler):
                    outs.append(names[m])
                    macs_per_channel += m.in_channels // m.groups * k
                elif self.dg.is_in_channel_pruning_fn(dep.handler):
                    macs_per_channel += m.out_channels // m.groups * k
            width = len(group[0].idxs)
            blocks = [n.rpartition(".")[0] for n in outs]
            if not bns or any(not _is_conv_block(model, b) or model.get_submodule(b).conv.groups != 1 for b in blocks):
                continue  # only Conv blocks (conv, BN, activation) are measured by masking their outputs
            full = max(original.get(b, width) for b in bns)  # the teacher's width of this group
            step = cfg.round_to if width % cfg.round_to == 0 and full % cfg.round_to == 0 else 1
            floor = max(cfg.min_channels, math.ceil((1 - cfg.max_group_sparsity) * full))
            floor = -(-floor // step) * step
            counts = sorted({c for c in (round(f * full / step) * step for f in LEVELS) if 0 < c <= width - floor})
            if counts:
                self.groups.append({"root": outs[0], "blocks": blocks, "bns": bns, "counts": counts,
                                    "order": torch.argsort(imp(group).cpu()).tolist(),
                                    "macs_per_channel": int(macs_per_channel), "width": width})

    def removal(self, group: dict, count: int):
        """Torch-Pruning's group that removes the ``count`` least important channels of ``group``."""
        conv = self.model.get_submodule(group["root"])
        return self.dg.get_pruning_group(conv, self.dg.get_pruner_of_module(conv).prune_out_channels,
                                         sorted(group["order"][:count]))

    def masks(self, group: dict, count: int) -> dict[str, list[int]]:
        """Conv block name -> its output channels that the removal zeroes (what pruning them computes)."""
        names = {m: n for n, m in self.model.named_modules()}
        return {names[dep.target.module].rpartition(".")[0]: list(idxs) for dep, idxs in self.removal(group, count)
                if isinstance(dep.target.module, nn.Conv2d) and self.dg.is_out_channel_pruning_fn(dep.handler)}


def _is_conv_block(model: nn.Module, name: str) -> bool:
    """An ultralytics Conv block: ``act(bn(conv(x)))``."""
    try:
        m = model.get_submodule(name)
    except AttributeError:
        return False
    return isinstance(getattr(m, "conv", None), nn.Conv2d) and isinstance(getattr(m, "bn", None), nn.BatchNorm2d)


def _output_areas(model: nn.Module, imgsz: int) -> dict[nn.Module, int]:
    """Output height x width of every Conv2d for one ``imgsz`` image."""
    area, handles = {}, []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(
                lambda mod, _i, out: area.__setitem__(mod, out.shape[-2] * out.shape[-1])))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, imgsz, imgsz, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return area


def _block_macs(block: nn.Module, area: dict[nn.Module, int]) -> int:
    return int(sum(m.out_channels * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] * area[m]
                   for m in block.modules() if isinstance(m, nn.Conv2d)))


class _RawMode:
    """Within: ``model`` in train mode (raw head outputs) with BatchNorm on its running statistics, no gradients."""

    def __init__(self, model: nn.Module):
        self.model, self.was = model, model.training

    def __enter__(self):
        self.model.train()
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        self.grad = torch.no_grad()
        self.grad.__enter__()

    def __exit__(self, *exc):
        self.grad.__exit__(*exc)
        self.model.train(self.was)


def raw_outputs(model: nn.Module, x: torch.Tensor) -> dict:
    """The head's raw outputs (:func:`compression.models.raw_view`) with BatchNorm on its running statistics."""
    with _RawMode(model):
        return raw_view(model, model(x))


def detection_error(student: dict, teacher: dict) -> torch.Tensor:
    """How far ``student``'s raw outputs are from ``teacher``'s where either is confident (:func:`raw_view` dicts).

    Per anchor, the Bernoulli KL divergence of objectness and of every class (mean) plus the squared box offset,
    weighted by ``max(teacher confidence, student confidence)``: a detection either model would report counts, the
    many background anchors do not (an unweighted mean is ~95 % stride-8 background, and rated the stride-32 layers,
    which find the large objects, nearly free to prune).
    """
    def conf(view):
        c = view["cls"].sigmoid().amax(-1)
        return c * view["obj"].sigmoid() if view["obj"] is not None else c

    weight = torch.maximum(conf(student), conf(teacher))
    box = (student["box"] - teacher["box"]).pow(2).sum(-1)
    per_anchor = bernoulli_kl(student["cls"], teacher["cls"]).mean(-1) + box
    if teacher["obj"] is not None:
        per_anchor = per_anchor + bernoulli_kl(student["obj"], teacher["obj"])
    return (weight * per_anchor).sum() / weight.sum().clamp(min=1e-9)


def _output_error(model: nn.Module, images: torch.Tensor, reference: list[dict], hooks: dict) -> float:
    """:func:`detection_error` of ``model`` with forward ``hooks`` ({module name: hook}) against ``reference``."""
    handles = [model.get_submodule(name).register_forward_hook(h) for name, h in hooks.items()]
    try:
        with _RawMode(model):
            return sum(float(detection_error(raw_view(model, model(x)), ref))
                       for x, ref in zip(images.split(8), reference))
    finally:
        for h in handles:
            h.remove()


def _zero_channels(idx: list[int]):
    index = torch.tensor(idx)
    return lambda _m, _i, out: out.index_fill(1, index.to(out.device), 0.0)


def _shortcut_only(_m, inp, _out):
    return inp[0]


def sensitivity(model: nn.Module, groups: _Groups | None, blocks: dict[str, nn.Module], images: torch.Tensor,
                progress: bool = False) -> tuple[list[list[float]], dict[str, float]]:
    """Output error against ``model`` itself when each group loses each measured channel count, and when each
    residual block is replaced by its shortcut: ``(per group, per count), {block: error}``.

    Removing channels gives the same outputs as zeroing them after their Conv block's activation, so each case is
    one forward pass with a mask, on ``images`` (a few calibration images), without copying the model.
    """
    from tqdm import tqdm

    reference = [raw_outputs(model, x) for x in images.split(8)]
    cases = [(i, c) for i, g in enumerate(groups.groups if groups else []) for c in g["counts"]]
    group_err = [[0.0] * len(g["counts"]) for g in (groups.groups if groups else [])]
    bar = tqdm(total=len(cases) + len(blocks), desc="sensitivity", disable=not progress, leave=False)
    for i, c in cases:
        g = groups.groups[i]
        hooks = {block: _zero_channels(idx) for block, idx in groups.masks(g, c).items()}
        group_err[i][g["counts"].index(c)] = _output_error(model, images, reference, hooks)
        bar.update()
    block_err = {}
    for name in blocks:
        block_err[name] = _output_error(model, images, reference, {name: _shortcut_only})
        bar.update()
    bar.close()
    return group_err, block_err


def allocate(groups: list[dict], group_err: list[list[float]], block_macs: dict[str, int],
             block_err: dict[str, float], need: int) -> tuple[dict[int, int], list[str]]:
    """Choose what to remove for at least ``need`` MACs at the least summed output error (greedy by error per MAC).

    Each step takes the cheapest move: a group from its current count to any larger measured count, or a whole
    block; groups lying inside a removed block drop out. Returns ``({group index: channels}, [blocks])``.
    """
    level = [0] * len(groups)  # index into [0] + counts
    curve = [[(0, 0.0)] + [(c * g["macs_per_channel"], e) for c, e in zip(g["counts"], errs)]
             for g, errs in zip(groups, group_err)]
    gone = {i for i, g in enumerate(groups) if not g["macs_per_channel"]}
    chosen, saved = [], 0
    while saved < need:
        best = None
        for i, points in enumerate(curve):
            if i in gone:
                continue
            m0, e0 = points[level[i]]
            for j in range(level[i] + 1, len(points)):
                m, e = points[j]
                cost = max(e - e0, 0.0) / max(min(m - m0, need - saved), 1)  # MACs past the need buy nothing
                if best is None or cost < best[0]:
                    best = (cost, "group", i, j)
        for name, macs in block_macs.items():
            if name not in chosen and macs:
                cost = max(block_err[name], 0.0) / min(macs, need - saved)
                if best is None or cost < best[0]:
                    best = (cost, "block", name, None)
        if best is None:
            break  # nothing left to remove: the target is out of reach
        _, kind, key, j = best
        if kind == "group":
            saved += curve[key][j][0] - curve[key][level[key]][0]
            level[key] = j
        else:
            chosen.append(key)
            saved += block_macs[key]
            for i, g in enumerate(groups):  # groups wholly inside the block go with it
                if all(b.startswith(key + ".") for b in g["blocks"]):
                    saved -= curve[i][level[i]][0]
                    level[i] = 0
                    gone.add(i)
    return {i: groups[i]["counts"][lv - 1] for i, lv in enumerate(level) if lv}, chosen


def _prune_group_(dg, conv: nn.Module, count: int, importance, names: dict) -> dict[str, list[int]]:
    """Remove the ``count`` least important channels of ``conv``'s group; returns {BatchNorm name: removed}."""
    fn = dg.get_pruner_of_module(conv).prune_out_channels
    order = torch.argsort(importance(dg.get_pruning_group(conv, fn, list(range(conv.out_channels)))).cpu())
    group = dg.get_pruning_group(conv, fn, sorted(order[:count].tolist()))
    if not dg.check_pruning_group(group):
        return {}
    removed = {names[dep.target.module]: sorted(int(i) for i in idxs) for dep, idxs in group
               if isinstance(dep.target.module, nn.BatchNorm2d)}
    group.prune()
    return removed


def _record(structure: Structure, removed: dict[str, list[int]], widths: dict[str, int]) -> None:
    """Compose this step's removals (current indices) into the teacher's channel indices."""
    for bn, idxs in removed.items():
        prev = structure.kept.get(bn, list(range(widths[bn])))
        gone = set(idxs)
        structure.kept[bn] = [c for i, c in enumerate(prev) if i not in gone]


def _prune_to_(model: nn.Module, target: int, base_macs: int, cfg: PruneConfig, imgsz: int, images: torch.Tensor,
               structure: Structure, original: dict[str, int], progress: bool) -> dict:
    """Prune ``model`` in place until its MACs are at most ``target`` (or nothing is left to remove)."""
    import torch_pruning as tp

    cut: dict[str, int] = {}
    blocks_cut: list[str] = []
    if cfg.method == "lowrank":
        return _factorize_to_(model, target, cfg, imgsz, images, structure)
    for _ in range(3):  # the greedy plan's MACs are exact per group; overlaps may leave a little to remove again
        macs = count_params_and_macs(model, imgsz)[1]
        if macs <= target + 0.002 * base_macs:
            break
        groups = _Groups(model, cfg, imgsz, original) if cfg.method != "blocks" else None
        blocks = residual_blocks(model) if cfg.method != "channels" else {}
        area = _output_areas(model, imgsz)
        group_err, block_err = sensitivity(model, groups, blocks, images, progress)
        counts, chosen = allocate(groups.groups if groups else [], group_err,
                                  {n: _block_macs(b, area) for n, b in blocks.items()}, block_err, macs - target)
        if not counts and not chosen:
            break
        remove_blocks_(model, chosen)
        structure.removed_blocks.extend(chosen)
        blocks_cut.extend(chosen)
        stride = int(max(model.stride))
        dg = groups.dg if groups and not chosen else tp.DependencyGraph().build_dependency(
            model, torch.zeros(1, 3, 2 * stride, 2 * stride))
        names = {m: n for n, m in model.named_modules()}
        widths = {n: m.num_features for m, n in names.items() if isinstance(m, nn.BatchNorm2d)}
        importance = _importance(cfg.importance)
        for i, count in counts.items():
            g = groups.groups[i]
            block = next((b for b in g["blocks"] if _is_conv_block(model, b)), None)
            if block is None:
                continue  # inside a removed block
            removed = _prune_group_(dg, model.get_submodule(block).conv, count, importance, names)
            _record(structure, removed, {**original, **widths})
            cut[g["root"]] = cut.get(g["root"], 0) + count
    return {"groups": cut, "blocks": blocks_cut}


def _factorize_to_(model: nn.Module, target: int, cfg: PruneConfig, imgsz: int, images: torch.Tensor,
                   structure: Structure) -> dict:
    """Factorise ``model``'s Conv blocks in place until its MACs are at most ``target`` (:mod:`compression.lowrank`)."""
    ranks: dict[str, tuple[int, int]] = {}
    for _ in range(3):  # the plan's MACs are exact per block; the counter may see a little more left to remove
        macs = count_params_and_macs(model, imgsz)[1]
        if macs <= target:
            break
        step = factorize_to_(model, macs - target, images, _output_areas(model, imgsz), cfg.round_to,
                             cfg.min_channels)
        if not step:
            break
        ranks.update(step)
    blocks = dict(model.named_modules())
    for name, (s, r) in ranks.items():  # ranks only fall, so the last step's are the block's
        if r < blocks[name].bn.num_features:
            structure.ranks[name] = r
        if s < in_channels(blocks[name]):
            structure.in_ranks[name] = s
    return {"ranks": {name: list(sr) for name, sr in ranks.items()}}


def prune(model: nn.Module, cfg: PruneConfig, imgsz: int = 640, images: torch.Tensor | None = None,
          recover: Callable[[nn.Module, Structure, int], nn.Module] | None = None,
          progress: bool = False) -> tuple[nn.Module, PruneResult]:
    """Return a physically smaller copy of ``model`` with ``cfg.sparsity`` of its MACs removed, in ``cfg.rounds`` steps.

    Each step removes a share of the MACs: with ``method="lowrank"`` by factorising Conv blocks where the dropped
    directions hold the least of the layer's energy on ``images`` (:mod:`compression.lowrank`); otherwise where the
    measured output error per MAC saved is least (:func:`sensitivity`, :func:`allocate`): channels of Torch-Pruning's
    coupled groups (``"channels"``), whole residual bottlenecks (``"blocks"``), or both; then
    ``recover(student, structure, step)`` may train it before the next step measures again. The head's output
    convolutions keep their shapes, so the decode is unchanged.

    Args:
        model: a detector from :func:`compression.models.load_model` (left unchanged).
        cfg: how much, how, in how many steps.
        imgsz: the input size the MACs are counted at.
        images: calibration images for the sensitivity measurement (any size; a few, small, is enough; lowrank:
            at ``imgsz``, its activation statistics).
        recover: called after each step with the student and what was kept so far; returns the student to go on with.

    Example:
        >>> small, result = prune(model, PruneConfig(sparsity=0.2), 640, train_images(data, 16, 320))
        >>> result.macs_after / result.macs_before  # ~0.8
    """
    t0 = time.perf_counter()
    student = copy.deepcopy(model).cpu().float().eval()
    params, macs = count_params_and_macs(student, imgsz)
    result = PruneResult(params, params, macs, macs, 0.0)
    if cfg.sparsity == 0:
        result.seconds = time.perf_counter() - t0
        return student, result
    if images is None:
        raise ValueError("prune needs calibration images when sparsity > 0")
    images = (images if cfg.method == "lowrank" else images[:cfg.sensitivity_images]).cpu().float()
    original = {n: m.num_features for n, m in student.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for step in range(1, cfg.rounds + 1):
        r0 = time.perf_counter()
        target = int(macs * (1 - cfg.sparsity * step / cfg.rounds))
        cut = _prune_to_(student, target, macs, cfg, imgsz, images, result.structure, original, progress)
        _trainable_(student)
        p, m = count_params_and_macs(student, imgsz)
        record = {"round": step, "target_macs": target / macs, "macs": m / macs, "params": p / params, **cut,
                  "prune_seconds": time.perf_counter() - r0}
        if recover is not None:
            student = recover(student, result.structure, step)
        record["seconds"] = time.perf_counter() - r0
        result.rounds.append(record)
    result.params_after, result.macs_after = count_params_and_macs(student, imgsz)
    reached = result.macs_after / macs
    if reached > 1 - cfg.sparsity + 0.02:  # e.g. blocks: YOLOv5n has residual bottlenecks for 0.2 of its MACs only
        warnings.warn(f"sparsity={cfg.sparsity} asks for {1 - cfg.sparsity:.2f}x MACs; prune_method={cfg.method!r} "
                      f"reached {reached:.3f}x (nothing more it can remove)", stacklevel=2)
    result.seconds = time.perf_counter() - t0
    return student.eval(), result


def _trainable_(model: nn.Module) -> None:
    """Every parameter trainable again, except the never-pruned frozen convolutions (ultralytics' DFL)."""
    frozen = {p for m in _never_pruned(model) for p in m.parameters() if not p.requires_grad}
    for p in model.parameters():
        if p not in frozen:
            p.requires_grad_(True)


def apply_structure(model: nn.Module, structure: Structure) -> nn.Module:
    """A copy of ``model`` (the teacher) cut to ``structure``'s shapes: the student's architecture, untrained.

    Example:
        >>> student.load_state_dict(torch.load("state.pt"))  # after ``student = apply_structure(teacher, s)``
    """
    import torch_pruning as tp

    student = remove_blocks_(copy.deepcopy(model).cpu().float().eval(), structure.removed_blocks)
    stride = int(max(student.stride))
    dg = tp.DependencyGraph().build_dependency(student, torch.zeros(1, 3, 2 * stride, 2 * stride))
    names = {m: n for n, m in student.named_modules()}
    for group in list(dg.get_all_groups(ignored_layers=_never_pruned(student), root_module_types=[nn.Conv2d])):
        bn = next((names[d.target.module] for d, _ in group if names.get(d.target.module) in structure.kept), None)
        if bn is None:
            continue
        kept = set(structure.kept[bn])
        conv = group[0].dep.target.module
        removed = [i for i in range(student.get_submodule(bn).num_features) if i not in kept]
        dg.get_pruning_group(conv, dg.get_pruner_of_module(conv).prune_out_channels, removed).prune()
    set_ranks_(student, structure.ranks, structure.in_ranks)
    _trainable_(student)
    return student


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


def reconstruct_(student: nn.Module, teacher: nn.Module, images: torch.Tensor, kept: dict[str, list[int]] | None = None,
                samples: int = 512, ridge: float = 0.01, progress: bool = True, bias: bool = True) -> nn.Module:
    """Refit each conv of a pruned ``student`` by least squares so its output matches the teacher's kept channels.

    Layer by layer in execution order (channel-pruning "reconstruction"), with ``X`` the student's own input patches
    at that layer (so upstream errors are corrected too), ``Y`` the teacher's pre-BN conv output at the channels the
    student kept (``kept``: BatchNorm name -> teacher channels, :class:`Structure`) and ``W0`` the pruned weights, on
``samples`` random positions per image:

        W = argmin |W X - Y|^2 + lambda |W - W0|^2 = (Y X^T + lambda W0)(X X^T + lambda I)^-1,
        lambda = ridge * mean(diag(X X^T))

    With ``bias`` (the default), ``X`` gets a row of ones and ``W`` an offset column (ridge towards 0): the offset
    stands for what the removed input channels added on average (e.g. SiLU of their BN shift) and is folded into the
    conv's bias or, for the usual bias-free conv before a BN, into that BN's running mean (m -> m - offset).
    A fifth of the positions is held out; a layer keeps ``W0`` when the refit does not lower the held-out error.
    Returns the student, changed in place; grouped convs and layers without a known channel map are left as they are.
    """
    from tqdm import tqdm

    kept = kept or {}
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
