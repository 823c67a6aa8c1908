"""INT8 post-training quantization of an exported FP32 ONNX detector, through ``onnxruntime.quantization``.

The model is quantized in QDQ format (uint8 activations, int8 weights: the fast path of ONNX Runtime's x86 kernels)
with the calibration ranges of real train images. What stays FP32 is found from the graph, not from node names:
every node with no convolution downstream of it, i.e. the head's decode (sigmoid, grid/anchor arithmetic and the
concat of pixel boxes with [0, 1] scores, which one INT8 scale cannot hold); the weights of the FP32 convolutions are
stored in int8 all the same (:func:`int8_weights_only`). When the INT8 model loses more than ``max_int8_drop``
mAP50-95, the most sensitive convolutions (output error with one of them quantized at a time) get uint8 weights
(``fallback="uint8_weights"``: ONNX Runtime's u8s8 kernels saturate on CPUs without VNNI, u8u8 ones do not) or stay
FP32, and the model is quantized again, a bounded number of times. The inputs and output of each
quantized Concat share one range (their union), so that the Concat can move 8-bit values as they are.

Graph rewrites for ONNX Runtime's CPU kernels, none of which changes what the model computes: the stride-2 stem
convolution as SpaceToDepth + stride-1 convolution (:func:`space_to_depth_stem`), Resize kept in NCHW layout
(:func:`pin_resize_layout`), and, after quantization, 8-bit Concats (:func:`fold_concat_qdq`) and the input's
quantization before the SpaceToDepth (:func:`quantize_before_space_to_depth`).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from compression.runtime import temp_sibling


GRANULARITY = ("per_tensor", "per_channel")
CALIB_METHODS = ("minmax", "percentile", "entropy")
FALLBACKS = ("uint8_weights", "fp32")
COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Ops whose QDQ output ONNX Runtime quantizes with its input's parameters (its registry's 8-bit pass-through ops).
SHARED_PARAM_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Resize", "MaxPool", "AveragePool",
                    "Slice", "Split", "Pad", "TopK")


@dataclass
class QuantConfig:
    granularity: str = "per_channel"  # weights: one scale per output channel | one per tensor
    calib_method: str = "percentile"  # activation ranges: percentile (99.999) | minmax | entropy
    calib_images: int = 128  # train images for calibration
    max_int8_drop: float = 0.01  # mAP50-95 the INT8 model may lose against its FP32 input before the fallback
    fallback_rounds: int = 3  # at most this many re-quantizations with more sensitive convolutions kept apart
    fallback: str = "uint8_weights"  # how: uint8_weights (asymmetric uint8 weights: no u8s8 saturation) | fp32
    share_concat_ranges: bool = True  # one range for a Concat's inputs and output (no requantization there)
    seed: int = 0

    def __post_init__(self):
        if self.granularity not in GRANULARITY:
            raise ValueError(f"quant_granularity must be one of {GRANULARITY}, got {self.granularity!r}")
        if self.calib_method not in CALIB_METHODS:
            raise ValueError(f"calib_method must be one of {CALIB_METHODS}, got {self.calib_method!r}")
        if not 1 <= self.calib_images <= 100000:
            raise ValueError(f"calib_images must be in 1..100000, got {self.calib_images}")
        if not 0 <= self.max_int8_drop <= 1:
            raise ValueError(f"max_int8_drop must be in 0..1, got {self.max_int8_drop}")
        if not 0 <= self.fallback_rounds <= 10:
            raise ValueError(f"fallback_rounds must be in 0..10, got {self.fallback_rounds}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")


@dataclass
class QuantResult:
    method: str  # "ptq" | "qat"
    granularity: str
    calib_method: str
    fp32_nodes: list[str] = field(default_factory=list)  # nodes left in FP32 (decode, boundary, fp32 fallback)
    fallback_nodes: list[str] = field(default_factory=list)  # convolutions the sensitivity fallback kept apart
    fallback: str = "uint8_weights"  # how they were kept: uint8 weights or FP32
    rounds: list[dict] = field(default_factory=list)  # per quantization: fallback layers, mAP50_95
    fp32_mAP50_95: float | None = None
    learned_ranges: int = 0  # tensors whose calibrated range QAT's learned range replaced
    shared_concat_ranges: int = 0  # tensors given the common range of their Concat group
    space_to_depth: list[str] = field(default_factory=list)  # stride-2 input convolutions run as SpaceToDepth + conv
    pinned_resizes: int = 0  # Resizes kept in NCHW layout by pin_resize_layout
    folded_concats: int = 0  # Concats that run on 8-bit data without requantizing (fold_concat_qdq)
    seconds: float = 0.0


def decode_nodes(model) -> list[str]:
    """Names of the nodes with no Conv/MatMul/Gemm downstream: the decode after the head's last convolutions.

    Works on any family (anchor-based or anchor-free head) and on pruned graphs, since it only reads the graph.
    """
    # ONNX keeps nodes in topological order, so one backward pass sees every consumer before its producer.
    feeds_compute: set[str] = set()  # tensors from which some path reaches a compute op
    decode = []
    for node in reversed(model.graph.node):
        if node.op_type in COMPUTE_OPS or any(out in feeds_compute for out in node.output):
            feeds_compute.update(node.input)
        else:
            decode.append(node.name)
    return decode[::-1]


def conv_nodes(model) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in COMPUTE_OPS]


def boundary_convs(model, decode: list[str]) -> list[str]:
    """Convolutions worth keeping FP32 by position: those reading the graph input (3 image channels, where INT8's
    im2col costs more than it saves; :func:`space_to_depth_stem` rewrites the stride-2 ones first) and those whose
    outputs feed only the decode (their INT8 output would be dequantized at once). Measured on YOLOv5n at 640,
    2 threads: INT8 with them quantized ran at 0.95-1.0x the FP32 latency, with them FP32 at 0.86-0.89x."""
    inputs = {i.name for i in model.graph.input}
    decode = set(decode)
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    keep = []
    for node in model.graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        users = [c for out in node.output for c in consumers.get(out, [])]
        if node.input[0] in inputs or (users and all(c.name in decode for c in users)):
            keep.append(node.name)
    return keep


class ImageReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over letterboxed images, a few per batch.

    It supports ONNX Runtime's strided calibration (``len`` and ``set_range``, in batches), which merges the ranges
    batch by batch: the histogram calibrators otherwise keep every activation of every image in memory (128 images
    of YOLOv5n at 640 px ran a 24 GB machine out of memory).
    """

    def __init__(self, images: np.ndarray, input_name: str, batch: int = 8):
        self.images, self.input_name, self.batch = images, input_name, batch
        self.start, self.end, self.pos = 0, len(self), 0

    def __len__(self) -> int:
        return (len(self.images) + self.batch - 1) // self.batch

    def set_range(self, start_index: int, end_index: int):
        self.start, self.end, self.pos = start_index, min(end_index, len(self)), start_index

    def get_next(self):
        if self.pos >= self.end:
            return None
        chunk = self.images[self.pos * self.batch:(self.pos + 1) * self.batch]
        self.pos += 1
        return {self.input_name: chunk}

    def rewind(self):
        self.start, self.end, self.pos = 0, len(self), 0


def override_calibration(cache_path, ranges: dict[str, tuple[float, float]]) -> int:
    """Write ``ranges`` over an ONNX Runtime calibration cache (JSON); returns how many tensors it changed."""
    from onnxruntime.quantization.calibrate import TensorData, load_tensors_data, save_tensors_data

    data = load_tensors_data(cache_path)
    changed = 0
    for name, (lo, hi) in ranges.items():
        if name in data.data:
            data.data[name] = TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
            changed += 1
    save_tensors_data(data, cache_path)
    return changed


def concat_ranges(model, cache_path, skip: list[str]) -> dict[str, tuple[float, float]]:
    """One range per group of tensors joined by Concat nodes (inputs and output; nodes in ``skip`` left out): the
    union of their calibrated ranges. Tensors in several concats join the groups together, and so do the input and
    outputs of the ops whose output ONNX Runtime quantizes with its input's parameters (MaxPool, Resize, ...).

    With equal scales ONNX Runtime's QLinearConcat is a copy. Measured on YOLOv5n at 640, 2 threads: 2-8 % faster
    than with the calibrated per-tensor ranges, and mAP50-95 0.320 vs 0.318 (minmax, 16 images).
    """
    from onnxruntime.quantization.calibrate import load_tensors_data

    data, skip = load_tensors_data(cache_path).data, set(skip)
    parent: dict[str, str] = {}

    def root(t: str) -> str:
        while parent.setdefault(t, t) != t:
            t = parent[t]
        return t

    for node in model.graph.node:
        if node.name in skip:
            continue
        if node.op_type == "Concat":
            names = [t for t in [*node.input, *node.output] if t in data]
        elif node.op_type in SHARED_PARAM_OPS:
            names = [t for t in [node.input[0], *node.output] if t in data]
        else:
            continue
        for t in names[1:]:
            parent[root(t)] = root(names[0])
    groups: dict[str, list[str]] = {}
    for t in parent:
        groups.setdefault(root(t), []).append(t)
    ranges = {}
    for members in groups.values():
        lo = min(float(np.min(data[t].range_value[0])) for t in members)
        hi = max(float(np.max(data[t].range_value[1])) for t in members)
        ranges.update({t: (lo, hi) for t in members})
    return ranges


def space_to_depth_stem(model) -> list[str]:
    """Rewrite each stride-2 convolution of the graph input as ``SpaceToDepth(2)`` and a stride-1 convolution over
    the 4x channels (in place); returns the names of the rewritten convolutions.

    The same arithmetic (the kernel is regrouped by input phase, an odd kernel or pad padded with a zero tap), but
    INT8-friendly: ONNX Runtime's QLinearConv over 3 channels with a 6x6 kernel (YOLOv5's stem) ran at 4.7 ms on
    YOLOv5n at 640 against 1.8 ms in FP32, over 12 channels with a 3x3 kernel at 1.5 ms. Convolutions with a dynamic
    or odd input size, dilation or groups are left as they are.
    """
    from onnx import helper, numpy_helper

    inputs = {i.name: [d.dim_value if d.HasField("dim_value") else 0 for d in i.type.tensor_type.shape.dim]
              for i in model.graph.input}
    consts = {t.name: t for t in model.graph.initializer}
    rewritten, nodes = [], []
    for node in model.graph.node:
        shape = inputs.get(node.input[0]) if node.op_type == "Conv" else None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = consts.get(node.input[1]) if shape else None
        if (weight is None or len(shape) != 4 or not all(d > 0 and d % 2 == 0 for d in shape[2:])
                or attrs.get("strides") != [2, 2] or attrs.get("group", 1) != 1
                or any(d != 1 for d in attrs.get("dilations", [1, 1]))
                or attrs.get("auto_pad", b"NOTSET") != b"NOTSET"):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weight)
        o, c, kh, kw = w.shape
        pads = attrs.get("pads", [0, 0, 0, 0])
        new_pads, taps = [0, 0, 0, 0], []
        for axis, (k, size) in enumerate(((kh, shape[2]), (kw, shape[3]))):
            begin = -(-pads[axis] // 2)  # blocks of 2 pixels padded before
            shift = 2 * begin - pads[axis]  # 0 or 1 zero tap in front of the kernel
            taps.append((shift, -(-(k + shift) // 2)))  # (shift, kernel size in blocks)
            out = (size + pads[axis] + pads[axis + 2] - k) // 2 + 1
            new_pads[axis], new_pads[axis + 2] = begin, max(0, out - 1 - begin + taps[-1][1] - size // 2)
        (sy, ky), (sx, kx) = taps
        padded = np.zeros((o, c, 2 * ky, 2 * kx), w.dtype)
        padded[:, :, sy:sy + kh, sx:sx + kw] = w
        # SpaceToDepth puts input phase (ry, rx) of channel ci at channel (2 * ry + rx) * c + ci
        regrouped = padded.reshape(o, c, ky, 2, kx, 2).transpose(0, 3, 5, 1, 2, 4).reshape(o, 4 * c, ky, kx)
        weight.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(regrouped), weight.name))
        s2d = f"{node.input[0]}_space_to_depth"
        nodes.append(helper.make_node("SpaceToDepth", [node.input[0]], [s2d], name=f"{node.name}_space_to_depth",
                                      blocksize=2))
        node.input[0] = s2d
        del node.attribute[:]
        node.attribute.extend([helper.make_attribute("kernel_shape", [ky, kx]),
                               helper.make_attribute("strides", [1, 1]), helper.make_attribute("pads", new_pads)])
        nodes.append(node)
        rewritten.append(node.name)
    if rewritten:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return rewritten


def pin_resize_layout(model) -> int:
    """Put a shape-keeping Reshape (target shape all zeros: copy every dimension) in front of each 4-D Resize (in
    place); returns how many.

    ONNX Runtime's layout optimizer carries its NHWC layout (that of QLinearConv) through the 8-bit Resize, whose
    NHWC nearest-neighbour kernel took 0.4-0.75 ms per upsampling on YOLOv5n at 640 against 0.04 ms in NCHW. It does
    not move layout transposes through a Reshape, so the Resize stays NCHW; the Reshape itself is free.
    """
    from onnx import helper, numpy_helper, shape_inference

    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in shape_inference.infer_shapes(model).graph.value_info
             if v.type.tensor_type.HasField("shape")}
    name = "resize_keep_shape"
    nodes, pinned = [], 0
    for node in model.graph.node:
        if node.op_type == "Resize" and ranks.get(node.input[0]) == 4:
            kept = f"{node.input[0]}_kept"
            nodes.append(helper.make_node("Reshape", [node.input[0], name], [kept], name=f"{node.name}_keep_shape"))
            node.input[0] = kept
            pinned += 1
        nodes.append(node)
    if pinned:
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(4, np.int64), name))
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return pinned


def quantize_before_space_to_depth(model) -> int:
    """Move each ``QuantizeLinear`` that reads a SpaceToDepth's output (read by nothing else) in front of it, so
    that the rearrangement moves 8-bit values (bit-identical: it only permutes them); returns how many moved."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    moved = 0
    nodes = list(model.graph.node)
    for s2d in [n for n in nodes if n.op_type == "SpaceToDepth"]:
        users = consumers.get(s2d.output[0], [])
        if len(users) != 1 or users[0].op_type != "QuantizeLinear":
            continue
        q = users[0]
        q.input[0], s2d.input[0] = s2d.input[0], f"{q.output[0]}_before_space_to_depth"
        q.output[0], s2d.output[0] = s2d.input[0], q.output[0]
        nodes.remove(q)
        nodes.insert(nodes.index(s2d), q)
        moved += 1
    if moved:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return moved


def fold_concat_qdq(model) -> int:
    """Rewrite each ``DequantizeLinear -> Concat -> QuantizeLinear`` whose inputs and output all have the same scale
    and zero point as a plain Concat of the 8-bit tensors; returns how many were rewritten.

    The result is bit-identical (dequantize then quantize with one scale is the identity), but ONNX Runtime runs a
    plain Concat on 8-bit data on all threads, where its QLinearConcat runs on one and converts every element.
    Measured on YOLOv5n at 640, 2 threads: the INT8 model 0.5 ms (about 3 %) faster.
    """
    from onnx import numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}

    def params(node):  # (scale, zero point) of a per-tensor Q/DQ node; None when not constant or per-axis
        names = list(node.input[1:3])
        if not all(n in consts and consts[n].size == 1 for n in names):
            return None
        return tuple((consts[n].dtype.str, consts[n].item()) for n in names)

    dropped, folded = set(), 0
    for node in model.graph.node:
        if node.op_type != "Concat" or node.output[0] in graph_outputs:
            continue
        sources = [producers.get(i) for i in node.input]
        users = consumers.get(node.output[0], [])
        if not all(p is not None and p.op_type == "DequantizeLinear" for p in sources) or len(users) != 1 \
                or users[0].op_type != "QuantizeLinear":
            continue
        keys = {params(p) for p in [*sources, users[0]]}
        if len(keys) != 1 or None in keys:
            continue
        node.input[:] = [p.input[0] for p in sources]
        node.output[0] = users[0].output[0]
        dropped.add(id(users[0]))
        folded += 1
    if folded:
        kept = [n for n in model.graph.node if id(n) not in dropped]
        used = {name for n in kept for name in n.input} | graph_outputs
        kept = [n for n in kept if n.op_type != "DequantizeLinear" or n.output[0] in used]  # DQs left unread
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return folded


def int8_weights_only(model, convs: list[str]) -> int:
    """Store the weights of the FP32 convolutions ``convs`` as per-channel symmetric int8 and a DequantizeLinear
    (in place); returns how many. The convolution still runs in FP32 on FP32 activations (the head's output
    convolutions stay FP32 for speed: their outputs go straight to the decode); only the file shrinks (YOLOv5n: the
    three output convolutions hold 115 k weights, 0.46 MB of a 2.5 MB INT8 file)."""
    from onnx import TensorProto, helper, numpy_helper

    consts = {t.name: t for t in model.graph.initializer}
    wanted, nodes, done = set(convs), [], 0
    for node in model.graph.node:
        weight = consts.get(node.input[1]) if node.op_type == "Conv" and node.name in wanted else None
        if weight is None or weight.data_type != TensorProto.FLOAT or len(weight.dims) != 4:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weight)
        scale = np.maximum(np.abs(w).reshape(len(w), -1).max(axis=1) / 127, 1e-12).astype(np.float32)
        q = np.clip(np.round(w / scale[:, None, None, None]), -127, 127).astype(np.int8)
        name = weight.name
        model.graph.initializer.remove(weight)
        model.graph.initializer.extend([numpy_helper.from_array(q, f"{name}_int8"),
                                        numpy_helper.from_array(scale, f"{name}_scale"),
                                        numpy_helper.from_array(np.zeros(len(w), np.int8), f"{name}_zero_point")])
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero_point"],
                                      [f"{name}_dequantized"], name=f"{node.name}_weight_dequantize", axis=0))
        node.input[1] = f"{name}_dequantized"
        nodes.append(node)
        done += 1
    if done:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return done


def _named_nodes(model) -> None:
    """Give every node a unique name (ORT's node lists refer to names)."""
    seen = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _weight_overrides(src: Path, convs: list[str], per_channel: bool) -> dict:
    """``TensorQuantOverrides`` giving the weights of ``convs`` asymmetric uint8 quantization.

    ONNX Runtime's u8s8 kernels on x86 without VNNI (AVX2) add pairs of uint8 x int8 products in int16 and saturate
    where a layer's inputs fill the uint8 range (YOLOv5n at 448: val mAP50-95 0.200 with every convolution u8s8,
    0.238 with every convolution u8u8, FP32 0.245). u8u8 convolutions do not saturate, but run slower, so only the
    convolutions the fallback finds most sensitive get them.
    """
    import onnx
    from onnxruntime.quantization import QuantType

    graph = onnx.load(str(src), load_external_data=False).graph
    wanted = set(convs)
    spec = {"quant_type": QuantType.QUInt8, "symmetric": False, **({"axis": 0} if per_channel else {})}
    return {n.input[1]: [dict(spec)] for n in graph.node if n.name in wanted}


def _quantize(src: Path, dst: Path, cache: Path, reader, cfg: QuantConfig, exclude: list[str],
              fallback: list[str] | None = None, only: list[str] | None = None, rewrite: bool = True) -> int:
    """``quantize_static`` to QDQ, then (with ``rewrite``) :func:`fold_concat_qdq` and
    :func:`quantize_before_space_to_depth`; returns how many Concats were folded. Both rewrites are bit-exact, so
    files only read for the calibration cache or for an output error skip them (``rewrite=False``). The ``fallback``
    convolutions are kept FP32 or get uint8 weights, as ``cfg.fallback`` says."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    fallback = fallback or []
    overrides = _weight_overrides(src, fallback, cfg.granularity == "per_channel") \
        if fallback and cfg.fallback == "uint8_weights" else {}
    if cfg.fallback == "fp32":
        exclude = exclude + fallback

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[cfg.calib_method]
    if reader is not None:
        reader.rewind()
    quantize_static(
        str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=cfg.granularity == "per_channel",
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
        nodes_to_quantize=only, calibrate_method=method, calibration_cache_path=str(cache),
        extra_options={"CalibMovingAverage": False, "CalibPercentile": 99.999, "CalibTensorRangeSymmetric": False,
                       "TensorQuantOverrides": overrides,
                       "CalibStridedMinMax": 1},  # one batch at a time (see ImageReader)
    )
    if not rewrite:
        return 0
    model = onnx.load(str(dst))
    folded = fold_concat_qdq(model)
    moved = quantize_before_space_to_depth(model)
    if int8_weights_only(model, exclude) or moved or folded:
        onnx.save(model, str(dst))
    return folded


def output_error(reference: Path | str, candidate: Path | str, images: np.ndarray, imgsz: int) -> float:
    """Relative squared error of ``candidate``'s decoded output against ``reference``'s (boxes scaled by 1/imgsz)."""
    from compression.runtime import onnx_session

    outs = []
    for path in (reference, candidate):
        sess = onnx_session(path)
        outs.append(np.concatenate([sess.run(None, {sess.get_inputs()[0].name: images[i:i + 4]})[0]
                                    for i in range(0, len(images), 4)]))
    ref, cand = outs
    scale = np.ones((1, ref.shape[1], 1), np.float32)
    scale[:, :4] = 1 / imgsz
    return float((((ref - cand) * scale) ** 2).mean() / ((ref * scale) ** 2).mean())


def ptq_graph(fp32_onnx: str | Path):
    """The FP32 graph that :func:`ptq` quantizes: ``fp32_onnx`` with unique node names, the stem as SpaceToDepth +
    convolution and the Resizes pinned to NCHW (none of which changes a value). Returns ``(model, space_to_depth
    convolutions, pinned Resizes)``."""
    import onnx

    model = onnx.load(str(fp32_onnx))
    _named_nodes(model)
    rewritten = space_to_depth_stem(model)
    return model, rewritten, pin_resize_layout(model)


def ptq(fp32_onnx: str | Path, out: str | Path, images: np.ndarray, cfg: QuantConfig,
        evaluate_fn: Callable[[Path], float], fp32_map: float | None = None,
        progress: bool = True, ranges: dict[str, tuple[float, float]] | None = None,
        fallback: list[str] | None = None) -> QuantResult:
    """Quantize ``fp32_onnx`` to INT8 QDQ at ``out`` (atomically), with the sensitivity fallback.

    Args:
        fp32_onnx: an FP32 model from :func:`compression.export.export_onnx`.
        images: calibration images, ``[n, 3, s, s]`` float32 in [0, 1] (the model's input).
        evaluate_fn: ONNX path -> mAP50-95 on the held-out images (for the drop check).
        fp32_map: mAP50-95 of ``fp32_onnx`` if already known.
        ranges: tensor name -> (lo, hi) written over the calibrated ranges (the ranges QAT learned).
        fallback: the fallback's convolutions, given instead of searched (QAT keeps those its PTQ file kept).

    Example:
        >>> res = ptq("fp32.onnx", "int8.onnx", train_images(data, 128, 640).numpy(), QuantConfig(), eval_fn)
    """
    import onnx
    from tqdm import tqdm

    t0 = time.perf_counter()
    out = Path(out)
    result = QuantResult("ptq", cfg.granularity, cfg.calib_method)
    model, result.space_to_depth, result.pinned_resizes = ptq_graph(fp32_onnx)
    imgsz = int(images.shape[-1])
    decode = decode_nodes(model)
    boundary = boundary_convs(model, decode)
    convs = [c for c in conv_nodes(model) if c not in boundary]
    with tempfile.TemporaryDirectory(prefix="yc-quant-") as tmp:
        tmp = Path(tmp)
        src, cache = tmp / "fp32.onnx", tmp / "calibration.json"
        onnx.save(model, str(src))
        reader = ImageReader(images.astype(np.float32), model.graph.input[0].name)
        if fp32_map is None:
            fp32_map = evaluate_fn(src)
        if ranges or cfg.share_concat_ranges:  # calibrate every tensor first, then adjust the cached ranges
            _quantize(src, tmp / "calibrated.onnx", cache, reader, cfg, decode + boundary, rewrite=False)
            if ranges:  # the ranges QAT learned, over the calibrated ones (SpaceToDepth only moves values)
                ranges = {**ranges, **{n.output[0]: ranges[n.input[0]] for n in model.graph.node
                                       if n.op_type == "SpaceToDepth" and n.input[0] in ranges}}
                result.learned_ranges = override_calibration(cache, ranges)
            if cfg.share_concat_ranges:
                result.shared_concat_ranges = override_calibration(cache, concat_ranges(model, cache, decode))
        result.fp32_mAP50_95 = fp32_map
        sensitivity = None
        best = None  # (mAP, path, fallback)
        given, fallback = fallback is not None, list(fallback or [])
        for round_ in range(1 if given else cfg.fallback_rounds + 1):
            cand = tmp / f"int8_{round_}.onnx"
            folded = _quantize(src, cand, cache, reader if round_ == 0 else None, cfg, decode + boundary, fallback)
            score = evaluate_fn(cand)
            result.rounds.append({"fallback": list(fallback), "mAP50_95": score})
            if best is None or score > best[0]:
                best = (score, cand, list(fallback))
                result.folded_concats = folded
            if fp32_map - score <= cfg.max_int8_drop or round_ == cfg.fallback_rounds or given:
                break
            if sensitivity is None:  # one conv quantized at a time, on a few calibration images
                probe = images[:8].astype(np.float32)
                sensitivity = {}
                for name in tqdm(convs, desc="sensitivity", disable=not progress, leave=False):
                    single = tmp / "single.onnx"
                    _quantize(src, single, cache, None, cfg, decode + boundary, only=[name], rewrite=False)
                    sensitivity[name] = output_error(src, single, probe, imgsz)
            ranked = sorted(sensitivity, key=sensitivity.get, reverse=True)
            fallback = ranked[:3 * 2 ** round_]
        score, path, fallback = best
        result.fallback_nodes, result.fallback = fallback, cfg.fallback
        result.fp32_nodes = decode + boundary + (fallback if cfg.fallback == "fp32" else [])
        tmp_out = temp_sibling(out)
        quantized = onnx.load(str(path))
        del quantized.metadata_props[:]
        quantized.metadata_props.extend(model.metadata_props)  # names, stride, imgsz for the predictor
        onnx.save(quantized, str(tmp_out))
        tmp_out.replace(out)
    result.seconds = time.perf_counter() - t0
    return result


def int8_weight_count(path: str | Path) -> int:
    """How many INT8/UINT8 weight initializers the file holds (0 means nothing was really quantized)."""
    import onnx

    model = onnx.load(str(path))
    return sum(1 for t in model.graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
               and int(np.prod(t.dims)) > 1)

