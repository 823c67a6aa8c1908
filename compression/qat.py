"""Quantization-aware training: fake-quantized convolutions trained by distillation, exported as INT8 QDQ ONNX.

BN is folded into the convolutions first (so the trained weights are the exported ones). Each convolution then sees
its input and its output through uint8 fake-quantization with learnable scale and zero point (LSQ, initialised from
the 0.01%/99.99% quantiles of calibration activations) and its weight through symmetric int8 fake-quantization, per
channel or per tensor, with the scale ONNX Runtime will use (``max|w| / 127``). After training, the FP32 graph of
the trained weights is exported and quantized by ONNX Runtime in QDQ format, with the learned ranges written over
the calibrated ones for every tensor they cover; the decode stays FP32 exactly as in post-training quantization.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

QMAX = 255  # uint8 activations


def fuse_bn(model: nn.Module) -> nn.Module:
    """Fold every ultralytics Conv block's BatchNorm into its convolution (in place), as ultralytics' own fuse."""
    from ultralytics.nn.modules import Conv
    from ultralytics.utils.torch_utils import fuse_conv_and_bn

    for m in model.modules():
        if isinstance(m, Conv) and hasattr(m, "bn"):
            m.conv = fuse_conv_and_bn(m.conv, m.bn)
            delattr(m, "bn")
            m.forward = m.forward_fuse
    return model


class ActQuant(nn.Module):
    """uint8 fake-quantization with learnable scale and zero point (LSQ); ``observe`` mode records the range."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))  # shape [1]: what the learnable fake-quant op expects
        self.zero_point = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.observe, self.enabled = False, True

    def init_from_range(self):
        lo, hi = min(float(self.lo), 0.0), max(float(self.hi), 0.0)
        scale = max(hi - lo, 1e-8) / QMAX
        with torch.no_grad():
            self.scale.fill_(scale)
            self.zero_point.fill_(float(min(QMAX, max(0, round(-lo / scale)))))

    def range(self) -> tuple[float, float]:
        s, z = float(self.scale.detach().abs()), float(self.zero_point.detach())
        return (0 - z) * s, (QMAX - z) * s

    def forward(self, x):
        if self.observe:  # 0.01% / 99.99% quantiles, not min/max: rare outliers would waste the 256 levels
            flat = x.detach().flatten()
            if flat.numel() > 1_000_000:
                flat = flat[torch.randint(flat.numel(), (1_000_000,), device=flat.device)]
            lo, hi = torch.quantile(flat.float(), torch.tensor([1e-4, 1 - 1e-4], device=flat.device))
            self.lo = torch.minimum(self.lo, lo)
            self.hi = torch.maximum(self.hi, hi)
            return x
        if not self.enabled:
            return x
        grad = 1.0 / (x.numel() / x.shape[0] * QMAX) ** 0.5
        # In float32 also under mixed precision (CUDA autocast hands float16 activations to this op).
        return torch._fake_quantize_learnable_per_tensor_affine(
            x.float(), self.scale.abs() + 1e-9, self.zero_point, 0, QMAX, grad).to(x.dtype)


class QuantConv(nn.Module):
    """A (BN-folded) Conv2d with fake-quantized input, weight and output."""

    def __init__(self, conv: nn.Conv2d, per_channel: bool):
        super().__init__()
        self.conv, self.per_channel = conv, per_channel
        self.act_in, self.act_out = ActQuant(), ActQuant()

    def weight_q(self):
        w = self.conv.weight
        if self.per_channel:
            scale = (w.detach().abs().amax(dim=(1, 2, 3)) / 127).clamp(min=1e-12)
            zp = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
            return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -127, 127)
        scale = float((w.detach().abs().max() / 127).clamp(min=1e-12))
        return torch.fake_quantize_per_tensor_affine(w, scale, 0, -127, 127)

    def forward(self, x):
        if not self.act_in.enabled or self.act_in.observe:
            return self.act_out(self.conv(self.act_in(x)))
        y = nn.functional.conv2d(self.act_in(x), self.weight_q(), self.conv.bias, self.conv.stride,
                                 self.conv.padding, self.conv.dilation, self.conv.groups)
        return self.act_out(y)


def prepare_qat(model: nn.Module, per_channel: bool, calib: torch.Tensor, batch: int = 8) -> nn.Module:
    """A BN-folded copy of ``model`` with every Conv2d fake-quantized, its activation scales calibrated on ``calib``."""
    model = fuse_bn(copy.deepcopy(model).cpu().float().eval())
    # ultralytics' DFL conv is a fixed projection (bins 0..15), not a learned layer: leave it FP32 and frozen
    targets = [(parent, name, child) for parent in model.modules() if type(parent).__name__ != "DFL"
               for name, child in parent.named_children() if isinstance(child, nn.Conv2d)]
    for _, _, child in targets:
        child.requires_grad_(True)  # fuse_conv_and_bn hands back frozen convs
    for parent, name, child in targets:
        setattr(parent, name, QuantConv(child, per_channel))
    quants = [m for m in model.modules() if isinstance(m, ActQuant)]
    for q in quants:
        q.observe = True
    with torch.no_grad():
        for i in range(0, len(calib), batch):
            model(calib[i:i + batch])
    for q in quants:
        q.observe = False
        q.init_from_range()
    return model


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    for m in model.modules():
        if isinstance(m, ActQuant):
            m.enabled = enabled
        if isinstance(m, QuantConv):
            m.act_in.enabled = m.act_out.enabled = enabled


def learned_ranges(model: nn.Module, onnx_model) -> dict[str, tuple[float, float]]:
    """ONNX tensor name -> (lo, hi) learned by QAT, for the inputs and outputs of the matched Conv nodes.

    Torch convs are matched to ONNX Conv nodes by their (exported, identical) weights; a tensor read by several
    convs gets the union of their ranges.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in onnx_model.graph.initializer}
    convs = [m for m in model.modules() if isinstance(m, QuantConv)]
    by_shape: dict[tuple, list] = {}
    for m in convs:
        by_shape.setdefault(tuple(m.conv.weight.shape), []).append(m)
    ranges: dict[str, tuple[float, float]] = {}

    def add(name, rng):
        old = ranges.get(name)
        ranges[name] = rng if old is None else (min(old[0], rng[0]), max(old[1], rng[1]))

    for node in onnx_model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        for m in by_shape.get(tuple(w.shape), []):
            if np.allclose(m.conv.weight.detach().numpy(), w, atol=1e-6):
                add(node.input[0], m.act_in.range())
                add(node.output[0], m.act_out.range())
                break
    return ranges
