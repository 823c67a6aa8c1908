"""Low-rank factorisation of Conv blocks (``prune_method="lowrank"``): pruning each layer in its own basis.

An ultralytics Conv block computes ``act(bn(conv(x)))``. On calibration images its BN output ``z`` (the normalised
pre-activation) has mean ``mu`` and covariance ``U diag(ev) U^T``; keeping the ``r`` leading directions,
``z ~ mu + U_r U_r^T (z - mu)``, which with ``D = diag(gamma / sqrt(var + eps))`` and ``m`` the mean of the conv
output is one smaller convolution and a 1x1 one:

    conv(x) = W * x  ->  B (A * x) + b,   A = U_r^T D W,   B = D^-1 U_r,   b = m - B U_r^T D m

The block's output width is unchanged (BN and activation follow ``B``), so nothing downstream changes shape; the
``k x k`` convolution computes ``r`` channels instead of ``c_out``. MACs fall when ``r (k^2 c_in + c_out) <
k^2 c_in c_out``: for a 3x3 conv any ``r`` below ~0.9 ``c_out``, for a 1x1 conv only below ``c_in c_out /
(c_in + c_out)``.

Ranks are allocated where dropping directions costs least: the cost of rank ``r`` in a layer is the fraction of that
layer's pre-activation energy the dropped directions hold (measured on the calibration images); each layer takes the
rank minimising ``cost - lambda * MACs saved``, and ``lambda`` is bisected to the MACs to remove.

Why, measured on YOLOv5n (coco1k, 0.8x MACs, 64 held-out train images, teacher 0.304): channel pruning leaves
mAP50-95 0.002 (0.047 after least-squares reconstruction); this factorisation leaves 0.14 before any training.
YOLOv5n's channels are not linearly redundant, but each layer's output has directions of little energy.
"""

from __future__ import annotations

import torch
from torch import nn

# Calibration images of the activation statistics, at the deployment size (sparsity 0.2, YOLOv5n: 8 images left
# held-out mAP50-95 0.123 before training, 16 images 0.142)
STATS_IMAGES = 16


def conv_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The Conv blocks (conv, BN, activation) whose convolution can be factorised: ungrouped, or factorised already."""
    out = {}
    for name, m in model.named_modules():
        conv, bn = getattr(m, "conv", None), getattr(m, "bn", None)
        if not isinstance(bn, nn.BatchNorm2d):
            continue
        if isinstance(conv, nn.Conv2d) and conv.groups == 1 or is_factorized(m):
            out[name] = m
    return out


def is_factorized(block: nn.Module) -> bool:
    conv = getattr(block, "conv", None)
    return isinstance(conv, nn.Sequential) and len(conv) == 2 and all(isinstance(c, nn.Conv2d) for c in conv)


def rank(block: nn.Module) -> int:
    """The block's rank: the inner width of a factorised convolution, else its output width."""
    return block.conv[0].out_channels if is_factorized(block) else block.conv.out_channels


def _first(block: nn.Module) -> nn.Conv2d:
    return block.conv[0] if is_factorized(block) else block.conv


def block_macs(block: nn.Module, area: int, r: int | None = None) -> int:
    """MACs of the block's convolution(s) over ``area`` output positions, at rank ``r`` (default: as it is)."""
    first = _first(block)
    k2 = first.kernel_size[0] * first.kernel_size[1]
    co = block.bn.num_features
    r = rank(block) if r is None else r
    if r >= co and not is_factorized(block):
        return area * k2 * first.in_channels * co
    return area * (k2 * first.in_channels * r + r * co)


def linear_map(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, b)`` in float64: the block's convolution(s) as one convolution, weight ``[c_out, c_in, kh, kw]``."""
    last = block.conv[-1] if is_factorized(block) else block.conv
    w = last.weight.detach().double()
    if is_factorized(block):
        w = torch.einsum("or,rikl->oikl", w[:, :, 0, 0], block.conv[0].weight.detach().double())
    bias = last.bias.detach().double() if last.bias is not None else torch.zeros(len(w), dtype=torch.float64)
    return w, bias


def activation_stats(model: nn.Module, images: torch.Tensor, names: list[str], per_image: int = 2000,
                     batch: int = 4) -> dict[str, dict]:
    """Per block: mean and covariance of its BN output over ``per_image`` random positions of each image."""
    sums: dict[str, list] = {}
    gen = torch.Generator().manual_seed(0)

    def hook(name):
        def record(_m, _inp, out):
            n, c, h, w = out.shape
            pick = torch.randint(h * w, (n, min(per_image, h * w)), generator=gen)
            z = torch.gather(out.flatten(2), 2, pick.unsqueeze(1).expand(-1, c, -1).to(out.device))
            z = z.permute(1, 0, 2).flatten(1).double().cpu()
            acc = sums.setdefault(name, [0.0, 0.0, 0])
            acc[0] = acc[0] + z.sum(1)
            acc[1] = acc[1] + z @ z.T
            acc[2] += z.shape[1]
        return record

    modules = dict(model.named_modules())
    handles = [modules[n].bn.register_forward_hook(hook(n)) for n in names]
    was = model.training
    try:
        with torch.no_grad():
            model.eval()
            for x in images.split(batch):
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    stats = {}
    for name, (s, ss, count) in sums.items():
        mean = s / count
        cov = ss / count - torch.outer(mean, mean)
        ev, vecs = torch.linalg.eigh(cov)
        stats[name] = {"mean": mean, "ev": ev.flip(0).clamp(min=0), "U": vecs.flip(1),
                       "energy": float(ss.diagonal().sum() / count)}
    return stats


def rank_options(block: nn.Module, stats: dict, area: int, step: int = 1,
                 floor: int = 1) -> list[tuple[int, int, float]]:
    """``(rank, MACs saved, energy fraction lost)`` of every rank below the block's own that saves MACs.

    Ranks are multiples of ``step`` (where the output width is), never below ``floor``."""
    co = block.bn.num_features
    step = step if co % step == 0 else 1
    now = block_macs(block, area)
    tail = stats["ev"].flip(0).cumsum(0).flip(0)  # tail[r]: the energy of the directions from r on
    options = []
    for r in range(max(floor, step), rank(block), step):
        saved = now - block_macs(block, area, r)
        if saved > 0:
            options.append((r, int(saved), float(tail[r]) / max(stats["energy"], 1e-12)))
    return options


def allocate_ranks(options: dict[str, list[tuple[int, int, float]]], need: int) -> dict[str, int]:
    """The ranks that save at least ``need`` MACs at the least summed energy lost (Lagrangian, bisected).

    Each block takes the option minimising ``lost - lambda * saved`` (or stays as it is); the smallest ``lambda``
    whose choice saves ``need`` wins. Returns {block: rank} for the blocks that change; fewer MACs than ``need`` when
    even every block's lowest rank does not save as much.
    """
    def choose(lam):
        ranks, saved = {}, 0
        for name, opts in options.items():
            best = min(opts, key=lambda o: o[2] - lam * o[1], default=None)
            if best is not None and best[2] - lam * best[1] < 0:
                ranks[name] = best[0]
                saved += best[1]
        return ranks, saved

    if need <= 0:
        return {}
    top = sum(max((o[1] for o in opts), default=0) for opts in options.values())
    if top < need:
        return {name: min(opts)[0] for name, opts in options.items() if opts}
    lo, hi = 0.0, 1e-9
    while choose(hi)[1] < need:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if choose(mid)[1] >= need else (mid, hi)
    return choose(hi)[0]


def _shaped(block: nn.Module, r: int) -> nn.Sequential:
    first = _first(block)
    a = nn.Conv2d(first.in_channels, r, first.kernel_size, first.stride, first.padding, first.dilation, bias=False)
    b = nn.Conv2d(r, block.bn.num_features, 1, bias=True)
    return nn.Sequential(a, b).to(first.weight.device)


def factorize_(block: nn.Module, r: int, stats: dict) -> nn.Module:
    """Replace the block's convolution by its rank-``r`` factorisation along ``stats``' leading directions."""
    bn = block.bn
    w, bias = linear_map(block)
    d = (bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)).double().cpu()
    d = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
    u = stats["U"][:, :r]
    m = bn.running_mean.double().cpu() + (stats["mean"] - bn.bias.detach().double().cpu()) / d  # mean of conv(x)
    proj = u.T * d  # U_r^T D
    a = torch.einsum("ro,oikl->rikl", proj, w)
    b = u / d.unsqueeze(1)
    offset = m - b @ (proj @ m) + b @ (proj @ bias)  # conv(x) = W*x + bias; B A (W*x) keeps the bias' projection
    new = _shaped(block, r)
    with torch.no_grad():
        new[0].weight.copy_(a.to(new[0].weight.dtype))
        new[1].weight.copy_(b.reshape(new[1].weight.shape).to(new[1].weight.dtype))
        new[1].bias.copy_(offset.to(new[1].bias.dtype))
    block.conv = new
    return block


def set_ranks_(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Give the named blocks factorised convolutions of these ranks (shapes only, for loading a saved state)."""
    for name, r in ranks.items():
        block = model.get_submodule(name)
        block.conv = _shaped(block, r)
    return model


def factorize_to_(model: nn.Module, need: int, images: torch.Tensor, areas: dict[nn.Module, int], step: int = 8,
                  floor: int = 8) -> dict[str, int]:
    """Factorise ``model``'s Conv blocks in place to save at least ``need`` MACs; returns {block: new rank}.

    ``areas``: output positions of every Conv2d at the size MACs are counted at; ``images``: calibration images.
    """
    blocks = conv_blocks(model)
    stats = activation_stats(model, images, list(blocks))
    options = {n: rank_options(b, stats[n], areas[_first(b)], step, floor) for n, b in blocks.items() if n in stats}
    ranks = allocate_ranks(options, need)
    for name, r in ranks.items():
        factorize_(blocks[name], r, stats[name])
    return ranks

