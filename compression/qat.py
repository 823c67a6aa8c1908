"""Quantization-aware training that starts where post-training quantization ends.

The fake quantization is read from the INT8 file PTQ shipped, not re-derived: every activation tensor that file
quantizes (its ``QuantizeLinear`` nodes: convolution outputs, SiLU's sigmoid and product, residual sums, pools,
upsamplings, the input) gets a fake-quantizer in torch with that file's scale and zero point, and every convolution
whose weights it holds in INT8 gets a BN-folded symmetric int8 weight fake-quantizer with ONNX Runtime's scale
(``max|w| / 127`` per output channel or per tensor). What the file keeps FP32 (the decode, the boundary convolutions,
the fallback's convolutions) stays FP32 here. Torch points are found by value: one image through the FP32 graph
PTQ quantized and through the torch model, each quantized ONNX tensor matched to the module output equal to it.

After training, the torch model is stripped back to the plain student (same modules, trained weights), exported, and
quantized by ONNX Runtime with the learned ranges written over the calibrated ones and the same FP32 convolutions:
with no training steps that reproduces the PTQ file within rounding.

Without QAT, the same twin serves PTQ's rounding fit (:func:`fit_rounding`): only the int8 weights' rounding
(:class:`LearnedRounding`) and the activation scales learn, on the calibration images, towards the FP32 model.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from compression.quantize import concat_groups

QMAX = 255  # uint8 activations


class ActQuant(nn.Module):
    """uint8 fake quantization with a learnable scale (LSQ) and the zero point of the PTQ file."""

    def __init__(self, scale: float, zero_point: int, tensors: list[str]):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([float(scale)]))  # shape [1]: what the learnable fake-quant op expects
        self.zero_point = nn.Parameter(torch.tensor([float(zero_point)]), requires_grad=False)
        self.tensors = list(tensors)  # the ONNX tensors this quantizer stands for

    def range(self) -> tuple[float, float]:
        """The (lo, hi) from which ONNX Runtime computes this scale and zero point again."""
        s, z = float(self.scale.detach().abs()), float(self.zero_point.detach())
        return (0 - z) * s, (QMAX - z) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grad = 1.0 / (x.numel() / x.shape[0] * QMAX) ** 0.5
        # In float32 also under mixed precision (CUDA autocast hands float16 activations to this op).
        return torch._fake_quantize_learnable_per_tensor_affine(
            x.float(), self.scale.abs() + 1e-9, self.zero_point, 0, QMAX, grad).to(x.dtype)

    # Hooks are bound methods of the quantizer (a submodule of the model), so a deepcopy of the model (distill's
    # copy, its EMA) calls its own quantizers, not the original's.
    def output_hook(self, _module, _inputs, output):
        return self(output)

    def input_hook(self, _module, inputs):
        return (self(inputs[0]), *inputs[1:])


class FoldedWeightQuant(nn.Module):
    """Parametrization of a convolution weight: folded with the frozen BN after it, fake-quantized as ONNX Runtime
    will quantize the exported (folded) weight (symmetric int8, or asymmetric uint8 for the fallback's convolutions),
    and unfolded again, so that conv -> BN computes the INT8 convolution. Without a BN the weight is quantized as is.
    ``file_scale`` (with ``weight``, the convolution's weight now): the PTQ file's int8 weight scale; how much wider
    it is than ``max|w| / 127`` (1 but where the fallback gave the convolution a pair-safe range) is kept while the
    weight trains."""

    def __init__(self, bn: nn.BatchNorm2d | None, per_channel: bool, signed: bool = True,
                 file_scale: np.ndarray | None = None, weight: torch.Tensor | None = None):
        super().__init__()
        object.__setattr__(self, "bn", bn)  # not a submodule: the BN stays where it is, once in the state dict
        self.per_channel, self.signed = per_channel, signed
        widen = torch.ones(1)
        if signed and file_scale is not None and weight is not None:
            with torch.no_grad():
                top = self._folded(weight)[0].float().reshape(len(file_scale), -1).abs().amax(dim=1)
            widen = torch.where(top > 0, torch.as_tensor(file_scale, dtype=torch.float32) * 127 / top.clamp(min=1e-12),
                                torch.ones_like(top)).clamp(min=1)
        self.register_buffer("widen", widen, persistent=False)

    def _folded(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w`` folded with the BN, the per-channel factor ``s`` of that fold)."""
        if self.bn is None:
            s = torch.ones(w.shape[0], device=w.device, dtype=w.dtype)
        else:
            s = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
            s = torch.where(s.abs() < 1e-12, torch.full_like(s, 1e-12), s)
        s = s.view(-1, 1, 1, 1)
        return w * s, s

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        folded, s = self._folded(w)
        flat = folded.detach().float().reshape(w.shape[0] if self.per_channel else 1, -1)
        if self.signed:  # symmetric: scale max|w| / 127 (widened: pair-safe), zero point 0, levels -127..127
            scale = (flat.abs().amax(dim=1) / 127 * self.widen.to(flat.device)).clamp(min=1e-12)
            zp, lo, hi = torch.zeros_like(scale, dtype=torch.int32), -127, 127
        else:  # asymmetric uint8 over [min(w, 0), max(w, 0)]
            wmin, wmax = flat.amin(dim=1).clamp(max=0), flat.amax(dim=1).clamp(min=0)
            scale = ((wmax - wmin) / 255).clamp(min=1e-12)
            zp, lo, hi = torch.round(-wmin / scale).to(torch.int32), 0, 255
        if self.per_channel:
            q = torch.fake_quantize_per_channel_affine(folded.float(), scale, zp, 0, lo, hi)
        else:
            q = torch.fake_quantize_per_tensor_affine(folded.float(), float(scale), int(zp), lo, hi)
        return q.to(w.dtype) / s


class SplitSiLU(nn.Module):
    """``x * sigmoid(x)`` with the sigmoid as a module of its own: ONNX exports SiLU as Sigmoid then Mul, and ONNX
    Runtime quantizes both outputs, so both need a point to fake-quantize at."""

    def __init__(self, group: int = 0):
        super().__init__()
        self.sigmoid = nn.Sigmoid()
        self.group = group  # SiLUs that were one module (ultralytics shares one) become one module again

    def forward(self, x):
        return x * self.sigmoid(x)


def qdq_params(int8_model) -> tuple[dict[str, tuple[float, int]], dict[str, tuple[bool, bool, np.ndarray]]]:
    """What a QDQ file quantizes: activation tensor -> (scale, zero point) of its ``QuantizeLinear``, and the output
    tensor of each convolution with 8-bit weights -> (per channel, signed, weight scales)."""
    from onnx import numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in int8_model.graph.initializer}
    producers = {o: n for n in int8_model.graph.node for o in n.output}
    acts, convs = {}, {}
    for node in int8_model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in consts and node.input[1] in consts:
            scale = consts[node.input[1]]
            zp = consts[node.input[2]] if len(node.input) > 2 and node.input[2] in consts else np.zeros(1)
            if scale.size == 1:
                acts[node.input[0]] = (float(scale), int(zp))
        elif node.op_type == "Conv":
            w = producers.get(node.input[1])
            if w is not None and w.op_type == "DequantizeLinear" and w.input[0] in consts:
                scale = consts[w.input[1]]
                convs[node.output[0]] = (scale.size > 1, consts[w.input[0]].dtype == np.int8, scale.reshape(-1))
    return acts, convs


def _onnx_values(graph, names: list[str], image: np.ndarray) -> dict[str, np.ndarray]:
    """The values of ``names`` in ``graph`` (an FP32 ONNX model) for ``image``."""
    import tempfile
    from pathlib import Path

    import onnx
    from onnx import TensorProto, helper

    from compression.runtime import onnx_session

    g = copy.deepcopy(graph)
    known = {o.name for o in g.graph.output}
    g.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in known)
    with tempfile.TemporaryDirectory(prefix="yc-qat-") as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx.save(g, str(path))
        sess = onnx_session(path)
        return dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: image})))


def _module_outputs(model: nn.Module, image: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(module name, output) of every tensor-valued module call for ``image`` (a module called twice, twice)."""
    records, handles = [], []
    for name, m in model.named_modules():
        if name:
            handles.append(m.register_forward_hook(
                lambda _m, _i, out, name=name: records.append((name, out.detach())) if torch.is_tensor(out) else None))
    try:
        with torch.no_grad():
            model.eval()(image)
    finally:
        for h in handles:
            h.remove()
    return records


def prepare_qat(student: nn.Module, int8_model, fp32_graph, probe: torch.Tensor) -> tuple[nn.Module, dict]:
    """A copy of ``student`` that computes what the QDQ file ``int8_model`` computes, with fake quantization.

    Args:
        student: the FP32 model the file was quantized from.
        int8_model: the PTQ file (an ``onnx.ModelProto``): its scales, zero points and INT8 convolutions.
        fp32_graph: the FP32 graph it was quantized from (:func:`compression.quantize.ptq_graph`), for matching.
        probe: one image ``[1, 3, s, s]`` in [0, 1] for matching ONNX tensors to torch module outputs.

    Returns ``(model, summary)``: the summary counts the quantized tensors matched, the weights fake-quantized and
    lists the tensors no torch output matched (their quantization is then not simulated).
    """
    from ultralytics.nn.modules import Conv

    model = copy.deepcopy(student).cpu().float().eval()
    groups: dict[int, int] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.SiLU:
                setattr(parent, name, SplitSiLU(groups.setdefault(id(child), len(groups))))
    acts, convs = qdq_params(int8_model)
    input_name = fp32_graph.graph.input[0].name
    # activations to fake-quantize, and the outputs of the convolutions whose weights are 8-bit (weight-only ones too)
    names = [t for t in acts if t != input_name] + [t for t in convs if t not in acts]
    want = _onnx_values(fp32_graph, names, probe.numpy())
    records = _module_outputs(model, probe)
    by_shape: dict[tuple, list] = {}
    for name, out in records:
        by_shape.setdefault(tuple(out.shape), []).append((name, out))
    points: dict[str, list[str]] = {}  # module name -> ONNX tensors quantized at its output
    unmatched = []
    for t in names:
        ref = torch.from_numpy(want[t])
        tol = 1e-3 * float(ref.abs().max()) + 1e-5
        found = [(float((out - ref).abs().max()), n) for n, out in by_shape.get(tuple(ref.shape), [])]
        found = [(err, n) for err, n in found if err <= tol]
        if not found:
            unmatched.append(t)
            continue
        # the closest output (a conv's output is near its BN's when the BN is near identity), then the innermost
        # module of those that produce it (a Conv block's output is its activation's)
        module = min(found, key=lambda en: (en[0] > 2 * min(found)[0] + 1e-7, -en[1].count(".")))[1]
        points.setdefault(module, []).append(t)
    # One quantizer for the tensors of a Concat group that the file quantizes alike: trained apart, their ranges
    # would drift apart, and the export (one range a group, their union) would then quantize coarser than trained.
    group_of = {t: g for g, members in enumerate(concat_groups(fp32_graph, set(acts))) for t in members}
    quantizers, shared = nn.ModuleDict(), {}
    modules = dict(model.named_modules())
    for i, (module, tensors) in enumerate(points.items()):
        quantized = [t for t in tensors if t in acts]
        if not quantized:
            continue
        key = (group_of.get(quantized[0], f"alone{i}"), *acts[quantized[0]])
        if key in shared:
            q = shared[key]
            q.tensors += quantized
        else:
            q = shared[key] = quantizers[f"p{i}"] = ActQuant(*acts[quantized[0]], quantized)
        modules[module].register_forward_hook(q.output_hook)
    if input_name in acts:
        q = ActQuant(*acts[input_name], [input_name])
        quantizers["input"] = q
        model.register_forward_pre_hook(q.input_hook)
    weights = 0
    # the convolution a BN folds into: a factorised block's (compression.lowrank) last one
    conv_of_bn = {id(m.bn): m.conv[-1] if isinstance(m.conv, nn.Sequential) else m.conv
                  for m in model.modules() if isinstance(m, Conv) and hasattr(m, "bn")}
    # a ReLU the quantizer folded into its convolution: the file's convolution output is the ReLU's (its own module
    # in each block, compression.relu), so its weights are found through the block's BN
    bn_of_relu = {id(m.act): m.bn for m in model.modules()
                  if isinstance(m, Conv) and hasattr(m, "bn") and isinstance(m.act, nn.ReLU)}
    for module, tensors in points.items():
        kind = next((convs[t] for t in tensors if t in convs), None)
        if kind is None:
            continue
        m = modules[module]
        m = bn_of_relu.get(id(m), m)
        conv, bn = (conv_of_bn[id(m)], m) if id(m) in conv_of_bn else (m, None)
        if isinstance(conv, nn.Conv2d) and not parametrize.is_parametrized(conv, "weight"):
            parametrize.register_parametrization(conv, "weight", FoldedWeightQuant(bn, *kind, weight=conv.weight))
            weights += 1
    model.qat_points = quantizers
    matched = {t for tensors in points.values() for t in tensors} | ({input_name} & set(acts))
    summary = {"tensors": len(acts), "matched": len(matched & set(acts)),
               "weights": weights, "int8_convs": len(convs), "unmatched": unmatched}
    return model, summary


def learned_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    """ONNX tensor name -> the (lo, hi) its fake-quantizer holds now (the PTQ file's before training)."""
    return {t: q.range() for q in model.qat_points.values() for t in q.tensors}


def strip_qat_(model: nn.Module) -> nn.Module:
    """Turn a :func:`prepare_qat` model (or a copy of one) back into the plain student, in place, with its trained
    weights: hooks, weight parametrizations, split SiLUs and quantizers removed. Returns ``model``."""
    for m in model.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for key in [k for k, fn in hooks.items() if isinstance(getattr(fn, "__self__", None), ActQuant)]:
                del hooks[key]
    silus: dict[int, nn.SiLU] = {}
    for m in list(model.modules()):
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            # the weight back in front of the bias: the exporter names constants in parameter order
            params = dict(m._parameters)
            m._parameters.clear()
            m._parameters.update({"weight": params.pop("weight"), **params})
        for name, child in list(m.named_children()):
            if isinstance(child, SplitSiLU):
                setattr(m, name, silus.setdefault(child.group, nn.SiLU()))
    if hasattr(model, "qat_points"):
        del model.qat_points
    return model


class LearnedRounding(nn.Module):
    """Parametrization that replaces a signed :class:`FoldedWeightQuant`: the folded weight's int8 levels are
    ``round(w / scale + offset)`` with a learnt ``offset`` in (-0.5, 0.5) (straight-through), so each weight keeps
    its level or moves to the other one next to its FP32 value, never further. The scale stays the PTQ file's, and so
    do each channel's extreme levels (+-127), which set the scale ONNX Runtime computes again from the exported
    weight: baked (:func:`bake_rounding_`) and exported, the levels learnt are the file's."""

    def __init__(self, fq: FoldedWeightQuant, weight: torch.Tensor):
        super().__init__()
        object.__setattr__(self, "fq", fq)
        with torch.no_grad():
            folded, _ = fq._folded(weight.detach().float())
            flat = folded.reshape(weight.shape[0] if fq.per_channel else 1, -1)
            scale = (flat.abs().amax(dim=1) / 127 * fq.widen.to(flat.device)).clamp(min=1e-12)
            scale = scale.view(-1, 1, 1, 1) if fq.per_channel else scale.view(1, 1, 1, 1)
            x = folded / scale
        self.register_buffer("scale", scale)
        self.register_buffer("x", x)  # the FP32 weight in levels
        self.register_buffer("pinned", x.abs() >= 126.5)
        self.offset = nn.Parameter(torch.zeros_like(x))

    def levels(self) -> torch.Tensor:
        # short of half a level: at exactly 0.5 a weight already on a level would round to the next (ties to even)
        y = self.x + self.offset.clamp(-0.499, 0.499)
        q = y + (torch.round(y) - y).detach()
        return torch.where(self.pinned, torch.round(self.x), q.clamp(-127, 127))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        _, s = self.fq._folded(w)
        return (self.levels() * self.scale).to(w.dtype) / s


def fit_rounding(model: nn.Module, reference: nn.Module, images: torch.Tensor, steps: int, batch: int = 8,
                 lr: float = 2e-3, scale_lr: float = 1e-5, seed: int = 0, progress: bool = True) -> dict:
    """Reconstruction after PTQ, in place: on the calibration ``images`` only (no labels), the int8 weights of a
    :func:`prepare_qat` ``model`` choose their rounding (:class:`LearnedRounding`) and its activation scales adjust,
    for ``steps`` Adam steps, so that the fake-quantized model's head inputs come closest to ``reference``'s (the FP32
    model PTQ quantized; each head input's squared error over the reference's variance there). The FP32 weights
    themselves do not move. Both models on ``model``'s device. Returns the fit's record.

    Example:
        >>> twin, _ = prepare_qat(student, onnx.load("ptq.onnx"), ptq_graph("fp32.onnx")[0], images[:1])
        >>> fit_rounding(twin, student, images, steps=150)
        >>> export_onnx(bake_rounding_(twin), 448, "fitted_fp32.onnx")  # then ptq(..., ranges=learned_ranges(twin))
    """
    from tqdm import tqdm

    from compression.relu import head_inputs, matching_loss

    t0 = time.perf_counter()
    for p in model.parameters():
        p.requires_grad_(False)
    offsets = []
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            fq = m.parametrizations.weight[0]
            # the fallback's weights keep PTQ's rounding: uint8 ones, and pair-safe ones, whose scale ONNX Runtime
            # derives from their pair sums, which other levels would change
            if isinstance(fq, FoldedWeightQuant) and fq.signed and not bool((fq.widen > 1 + 1e-4).any()):
                m.parametrizations.weight[0] = rounding = LearnedRounding(fq, m.parametrizations.weight.original)
                offsets.append(rounding.offset)
    scales = [q.scale for q in model.qat_points.values()]
    for p in offsets + scales:
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": offsets, "lr": lr}, {"params": scales, "lr": scale_lr}])
    device = next(model.parameters()).device
    reference = reference.eval()
    model.eval()  # BatchNorm frozen: it folds into the int8 weights
    targets = head_inputs(reference)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(range(steps), desc="PTQ rounding fit", disable=not progress, leave=False)
    for _ in bar:
        x = images[torch.randint(len(images), (batch,), generator=gen)].to(device)
        loss = matching_loss(model, reference, x, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    with torch.no_grad():
        moved = sum(int((r.levels() != torch.round(r.x)).sum()) for r in _roundings(model))
    tail = max(len(losses) // 10, 1)
    return {"steps": steps, "batch": batch, "images": len(images), "weights": sum(p.numel() for p in offsets),
            "levels_moved": moved, "loss_first": float(np.mean(losses[:tail])) if losses else None,
            "loss_last": float(np.mean(losses[-tail:])) if losses else None, "seconds": time.perf_counter() - t0}


def _roundings(model: nn.Module) -> list[LearnedRounding]:
    return [m.parametrizations.weight[0] for m in model.modules()
            if parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], LearnedRounding)]


def bake_rounding_(model: nn.Module) -> nn.Module:
    """:func:`strip_qat_` that keeps the rounding :func:`fit_rounding` learnt: each such convolution's weight becomes
    its levels times the scale, unfolded from the BN, which ONNX Runtime quantizes back to those very levels. Other
    weights return to their FP32 values. Returns ``model``."""
    with torch.no_grad():
        baked = [(m, m.weight.detach().clone()) for m in model.modules()
                 if parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0],
                                                                            LearnedRounding)]
    strip_qat_(model)
    with torch.no_grad():
        for m, w in baked:
            m.weight.copy_(w)
    return model
