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

A ``k x k`` convolution's input can be cut the same way (Tucker-2 with the output side): ``x ~ mu_x + A P (x -
mu_x)`` puts a 1x1 convolution ``P`` (``c_in -> s``) in front and ``W A`` reads ``s`` channels; ``A``/``P`` keep
the input directions that carry the most BN-output energy through ``D W`` (:func:`input_directions`, a whitened
SVD: the input's own energy says nothing of what the weights read), and ``W (mu_x - A P mu_x)`` goes into the bias.

Ranks are allocated where dropping directions costs least: the cost of ranks ``(s, r)`` in a layer is the fraction
of that layer's pre-activation energy the dropped directions hold (measured on the calibration images; the two
sides' losses add); each layer takes the ranks minimising ``cost - lambda * MACs saved``, and ``lambda`` is
bisected to the MACs to remove.

Why, measured on YOLOv5n (coco1k, 0.8x MACs, 64 held-out train images, teacher 0.304): channel pruning leaves
mAP50-95 0.002 (0.047 after least-squares reconstruction); the output side alone leaves 0.142 before any training,
both sides 0.185. YOLOv5n's channels are not linearly redundant, but each layer's output has directions of little
energy, and so has what each 3x3 convolution reads of its input.
"""

from __future__ import annotations

import torch
from torch import nn

# Calibration images of the activation statistics, at the deployment size. YOLOv5n, sparsity 0.2, both sides,
# held-out mAP50-95 before training on 253 coco1k train images: 16 images 0.164, 64 0.169, 128 0.174, 256 0.174,
# 512 0.175 (prune 3 / 4 / 7 / 15 / 29 s on 2 cores; 128 images at 640 px take 630 MB)
STATS_IMAGES = 128


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
    return isinstance(conv, nn.Sequential) and len(conv) in (2, 3) and all(isinstance(c, nn.Conv2d) for c in conv)


def parts(block: nn.Module) -> tuple[nn.Conv2d | None, nn.Conv2d, nn.Conv2d | None]:
    """``(input projection, core, output expansion)`` of a block's convolution; the 1x1 ends are ``None`` if absent.

    The core is the ``k x k`` convolution; only a ``k x k`` core (k > 1) ever gets an input projection, so the parts
    follow from the kernel sizes."""
    if not is_factorized(block):
        return None, block.conv, None
    convs = list(block.conv)
    core = next((i for i, c in enumerate(convs) if c.kernel_size != (1, 1)), 0)
    return (convs[0] if core == 1 else None), convs[core], (convs[core + 1] if core + 1 < len(convs) else None)


def rank(block: nn.Module) -> int:
    """The block's output rank: the core's width (below the block's output width when it is factorised there)."""
    return parts(block)[1].out_channels


def in_rank(block: nn.Module) -> int:
    """The block's input rank: the width of its input projection, else its input width."""
    inp, core, _ = parts(block)
    return inp.out_channels if inp is not None else core.in_channels


def in_channels(block: nn.Module) -> int:
    """The width of the block's input."""
    inp, core, _ = parts(block)
    return (inp if inp is not None else core).in_channels


def _core(block: nn.Module) -> nn.Conv2d:
    return parts(block)[1]


def block_macs(block: nn.Module, area: int, r: int | None = None, s: int | None = None) -> int:
    """MACs of the block's convolution(s) over ``area`` output positions, at output rank ``r`` and input rank ``s``
    (default: as it is). An input projection runs at the input's resolution (``stride^2`` times ``area``)."""
    inp, core, out = parts(block)
    k2 = core.kernel_size[0] * core.kernel_size[1]
    ci, co = in_channels(block), block.bn.num_features
    has_in = inp is not None if s is None else s < ci
    has_out = out is not None if r is None else r < co
    r = rank(block) if r is None else r
    s = in_rank(block) if s is None else s
    in_area = area * core.stride[0] * core.stride[1]
    return (in_area * ci * s if has_in else 0) + area * k2 * s * r + (area * r * co if has_out else 0)


def linear_map(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, b)`` in float64: the block's convolution(s) as one convolution, weight ``[c_out, c_in, kh, kw]``."""
    inp, core, out = parts(block)
    w = core.weight.detach().double()
    bias = core.bias.detach().double() if core.bias is not None else torch.zeros(len(w), dtype=torch.float64)
    if inp is not None:  # no bias: the input's mean is folded into the core's
        w = torch.einsum("oskl,si->oikl", w, inp.weight.detach().double()[:, :, 0, 0])
    if out is not None:
        o = out.weight.detach().double()[:, :, 0, 0]
        w, bias = torch.einsum("or,rikl->oikl", o, w), o @ bias + out.bias.detach().double()
    return w, bias


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """``D``'s diagonal, ``gamma / sqrt(var + eps)``, in float64."""
    return (bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)).double().cpu()


def projectable(block: nn.Module, floor: int) -> bool:
    """Whether the block's input may be projected: a ``k x k`` core (k > 1) reading at least ``2 * floor`` channels."""
    return _core(block).kernel_size != (1, 1) and in_channels(block) >= 2 * floor


def _moments(acc: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, covariance and mean energy (second moment) from the sums ``[sum, sum of outer products, count]``."""
    s, ss, count = acc
    mean = s / count
    return mean, ss / count - torch.outer(mean, mean), ss.diagonal().sum() / count


def activation_stats(model: nn.Module, images: torch.Tensor, names: list[str], per_image: int = 2000,
                     batch: int = 4, inputs: list[str] = ()) -> dict[str, dict]:
    """Per block: mean and covariance of its BN output over ``per_image`` random positions of each image; for the
    blocks in ``inputs`` also of its convolution's input (``"input": (mean, covariance)``)."""
    sums: dict[tuple[str, str], list] = {}
    gen = torch.Generator().manual_seed(0)

    def record(key, t):
        n, c, h, w = t.shape
        pick = torch.randint(h * w, (n, min(per_image, h * w)), generator=gen)
        z = torch.gather(t.flatten(2), 2, pick.unsqueeze(1).expand(-1, c, -1).to(t.device))
        z = z.permute(1, 0, 2).flatten(1).double().cpu()
        acc = sums.setdefault(key, [0.0, 0.0, 0])
        acc[0] = acc[0] + z.sum(1)
        acc[1] = acc[1] + z @ z.T
        acc[2] += z.shape[1]

    modules = dict(model.named_modules())
    handles = [modules[n].bn.register_forward_hook(lambda _m, _i, out, n=n: record((n, "out"), out)) for n in names]
    handles += [modules[n].conv.register_forward_pre_hook(lambda _m, inp, n=n: record((n, "in"), inp[0]))
                for n in inputs]
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
    for name in names:
        mean, cov, energy = _moments(sums[(name, "out")])
        ev, vecs = torch.linalg.eigh(cov)
        stats[name] = {"mean": mean, "ev": ev.flip(0).clamp(min=0), "U": vecs.flip(1), "energy": float(energy)}
        if (name, "in") in sums:
            stats[name]["input"] = _moments(sums[(name, "in")])[:2]
    return stats


def input_directions(block: nn.Module, stats: dict) -> dict:
    """The input projection of least output error: ``x ~ mu + A B (x - mu)`` with ``A = S V_s``, ``B = V_s^T S^-1``.

    ``S`` is the input covariance's square root and ``V`` the right singular vectors of ``H S``, ``H^2`` the sum
    over kernel taps of ``W_t^T D^2 W_t`` (``D`` as in the module docstring): dropping ``V``'s trailing directions
    loses the least BN-output energy, ``tail[s]`` of it at input rank ``s`` (correlations between taps ignored).
    """
    mean, cov = stats["input"]
    ev, vecs = torch.linalg.eigh(cov + 1e-6 * cov.diagonal().mean().clamp(min=1e-12) * torch.eye(len(cov),
                                                                                                 dtype=cov.dtype))
    ev = ev.clamp(min=1e-12)
    root, inv_root = vecs @ torch.diag(ev.sqrt()) @ vecs.T, vecs @ torch.diag(ev.rsqrt()) @ vecs.T
    w = linear_map(block)[0] * _bn_scale(block.bn).view(-1, 1, 1, 1)
    gram = torch.einsum("oikl,ojkl->ij", w, w)
    gev, gvec = torch.linalg.eigh(gram)
    h = gvec @ torch.diag(gev.clamp(min=0).sqrt()) @ gvec.T
    _, sv, vt = torch.linalg.svd(h @ root)
    return {"mean": mean, "root": root, "inv_root": inv_root, "V": vt.T,
            "tail": torch.cat([(sv ** 2).flip(0).cumsum(0).flip(0), sv.new_zeros(1)])}


def _grid(width: int, below: int, step: int, floor: int) -> list[int]:
    """Ranks under ``below`` on the grid: multiples of ``step`` where ``width`` is one, never below ``floor``."""
    step = step if width % step == 0 else 1
    return list(range(max(floor, step), below, step))


def rank_options(block: nn.Module, stats: dict, area: int, step: int = 1,
                 floor: int = 1) -> list[tuple[tuple[int, int], int, float]]:
    """``((input rank, output rank), MACs saved, energy fraction lost)`` of every factorisation that saves MACs.

    The output rank keeps the leading directions of the BN output (its dropped eigenvalues are lost); the input
    rank, where ``stats`` has the block's input statistics, the leading ones of :func:`input_directions`. Ranks
    are multiples of ``step`` (where the width is), never below ``floor``; losses of the two sides add."""
    co, ci = block.bn.num_features, in_channels(block)
    r_now, s_now = rank(block), in_rank(block)
    now = block_macs(block, area)
    out_tail = stats["ev"].flip(0).cumsum(0).flip(0)  # out_tail[r]: the energy of the directions from r on
    in_tail = input_directions(block, stats)["tail"] if "input" in stats else None
    energy = max(stats["energy"], 1e-12)
    options = []
    for s in [s_now] + (_grid(ci, s_now, step, floor) if in_tail is not None else []):
        for r in [r_now] + _grid(co, r_now, step, floor):
            saved = now - block_macs(block, area, r, s)
            if saved > 0:
                lost = (float(out_tail[r]) if r < co else 0.0) + (float(in_tail[s]) if s < ci else 0.0)
                options.append(((s, r), int(saved), lost / energy))
    return options


def allocate_ranks(options: dict[str, list[tuple]], need: int) -> dict[str, tuple]:
    """The options that save at least ``need`` MACs at the least summed energy lost (Lagrangian, bisected).

    Each block takes the option minimising ``lost - lambda * saved`` (or stays as it is); the smallest ``lambda``
    whose choice saves ``need`` wins. Returns {block: option key} for the blocks that change; fewer MACs than
    ``need`` when even every block's largest saving does not save as much.
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
        return {name: max(opts, key=lambda o: o[1])[0] for name, opts in options.items() if opts}
    lo, hi = 0.0, 1e-9
    while choose(hi)[1] < need:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if choose(mid)[1] >= need else (mid, hi)
    return choose(hi)[0]


def _shaped(block: nn.Module, r: int, s: int | None = None) -> nn.Sequential:
    """Untrained parts of the given ranks: ``[1x1 c_in -> s,] k x k s -> r[, 1x1 r -> c_out]``."""
    core, ci, co = _core(block), in_channels(block), block.bn.num_features
    s = ci if s is None else s
    convs = [nn.Conv2d(ci, s, 1, bias=False)] if s < ci else []
    convs.append(nn.Conv2d(s, r, core.kernel_size, core.stride, core.padding, core.dilation, bias=r >= co))
    if r < co:
        convs.append(nn.Conv2d(r, co, 1, bias=True))
    return nn.Sequential(*convs).to(core.weight.device)


def factorize_(block: nn.Module, r: int, stats: dict, s: int | None = None) -> nn.Module:
    """Replace the block's convolution by its factorisation to output rank ``r`` (``stats``' leading directions)
    and input rank ``s`` (default: no input projection; one needs ``stats``' input statistics)."""
    bn = block.bn
    w, bias = linear_map(block)
    ci = w.shape[1]
    s = ci if s is None else s
    proj_in = None
    if s < ci:
        p = input_directions(block, stats)
        v = p["V"][:, :s]
        a_in, proj_in = p["root"] @ v, v.T @ p["inv_root"]  # x ~ mu + a_in proj_in (x - mu)
        bias = bias + torch.einsum("oikl,i->o", w, p["mean"] - a_in @ (proj_in @ p["mean"]))
        w = torch.einsum("oikl,is->oskl", w, a_in)
    new = _shaped(block, r, s)
    parts_ = list(new)
    with torch.no_grad():
        if proj_in is not None:
            parts_.pop(0).weight.copy_(proj_in[:, :, None, None].to(new[0].weight.dtype))
        if r < block.bn.num_features:
            d = _bn_scale(bn)
            d = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
            u = stats["U"][:, :r]
            m = bn.running_mean.double().cpu() + (stats["mean"] - bn.bias.detach().double().cpu()) / d  # E[conv(x)]
            proj = u.T * d  # U_r^T D
            b = u / d.unsqueeze(1)
            offset = m - b @ (proj @ m) + b @ (proj @ bias)  # conv(x) = W*x + bias: B A (W*x) keeps its projection
            parts_[0].weight.copy_(torch.einsum("ro,oikl->rikl", proj, w).to(parts_[0].weight.dtype))
            parts_[1].weight.copy_(b.reshape(parts_[1].weight.shape).to(parts_[1].weight.dtype))
            parts_[1].bias.copy_(offset.to(parts_[1].bias.dtype))
        else:
            parts_[0].weight.copy_(w.to(parts_[0].weight.dtype))
            parts_[0].bias.copy_(bias.to(parts_[0].bias.dtype))
    block.conv = new if len(new) > 1 else new[0]
    return block


def set_ranks_(model: nn.Module, ranks: dict[str, int], in_ranks: dict[str, int] | None = None) -> nn.Module:
    """Give the named blocks factorised convolutions of these output and input ranks (shapes only, for loading a
    saved state)."""
    in_ranks = in_ranks or {}
    for name in {**ranks, **in_ranks}:
        block = model.get_submodule(name)
        new = _shaped(block, ranks.get(name, block.bn.num_features), in_ranks.get(name))
        block.conv = new if len(new) > 1 else new[0]
    return model


def factorize_to_(model: nn.Module, need: int, images: torch.Tensor, areas: dict[nn.Module, int], step: int = 8,
                  floor: int = 8) -> dict[str, tuple[int, int]]:
    """Factorise ``model``'s Conv blocks in place to save at least ``need`` MACs; returns {block: (s, r)}, the new
    input and output ranks.

    ``areas``: output positions of every Conv2d at the size MACs are counted at; ``images``: calibration images.
    """
    blocks = conv_blocks(model)
    stats = activation_stats(model, images, list(blocks),
                             inputs=[n for n, b in blocks.items() if projectable(b, floor)])
    options = {n: rank_options(b, stats[n], areas[_core(b)], step, floor) for n, b in blocks.items() if n in stats}
    ranks = allocate_ranks(options, need)
    for name, (s, r) in ranks.items():
        factorize_(blocks[name], r, stats[name], s)
    return ranks
