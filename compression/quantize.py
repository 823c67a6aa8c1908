"""INT8 post-training quantization of an exported FP32 ONNX detector, through ``onnxruntime.quantization``.

The model is quantized in QDQ format (uint8 activations, int8 weights: the fast path of ONNX Runtime's x86 kernels)
with the calibration ranges of real train images. What stays FP32 is found from the graph, not from node names:
every node with no convolution downstream of it, i.e. the head's decode (sigmoid, grid/anchor arithmetic and the
concat of pixel boxes with [0, 1] scores, which one INT8 scale cannot hold); the weights of the FP32 convolutions are
stored in int8 all the same (:func:`compression.onnx_passes.int8_weights_only_`). When the INT8 model loses more
than ``max_int8_drop`` mAP50-95, convolutions are kept apart one at a time, each the one that lowers the INT8
model's output error most, a bounded number of times. ONNX Runtime's u8s8 convolutions on x86 CPUs without VNNI
(AVX2) add each two products of adjacent input channels at the same kernel tap in int16 and saturate; how the
fallback keeps its convolutions apart is ``fallback``: ``pair_safe`` (int8 weights with a scale so wide that no such
pair can saturate: still the fast u8s8 kernels), ``uint8_weights`` (u8u8 kernels, which do not saturate but run
slower) or ``fp32``. The inputs and output of each quantized Concat share one range (their union), so that the
Concat can move 8-bit values as they are; a convolution's output that feeds a SiLU gets no range below where SiLU
is flat (``silu_floor``).

Graph rewrites for ONNX Runtime's CPU kernels, none of which changes what the model computes, are in
:mod:`compression.onnx_passes`: SpaceToDepth stem and NCHW Resizes before quantization, 8-bit Concats, the input
quantized before the SpaceToDepth and int8-stored FP32 weights after it.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from compression.onnx_passes import boundary_convs, conv_nodes, decode_nodes, finish_int8_, prepare_for_int8_
from compression.runtime import Size, as_size, hw, temp_sibling

GRANULARITY = ("per_tensor", "per_channel")
CALIB_METHODS = ("minmax", "percentile", "entropy")
FALLBACKS = ("pair_safe", "uint8_weights", "fp32")
# Ops whose QDQ output ONNX Runtime quantizes with its input's parameters (its registry's 8-bit pass-through ops).
SHARED_PARAM_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Resize", "MaxPool", "AveragePool",
                    "Slice", "Split", "Pad", "TopK")


@dataclass
class QuantConfig:
    granularity: str = "per_channel"  # weights: one scale per output channel | one per tensor
    calib_method: str = "percentile"  # activation ranges: percentile | minmax | entropy
    calib_percentile: float = 99.995  # percentile: the share of each tensor's calibrated values inside its range (%);
    # YOLOv5n, coco1k design images (README, Status): output error 0.00021 at 448 and 0.00012 at 640, against
    # 0.00053 and 0.00060 at 99.999, mAP50-95 0.2113 / 0.2324 against 0.2055 / 0.2263
    calib_images: int = 256  # train images for calibration (a seeded draw); YOLOv5n at 448, ReLU in model.0-2,
    # coco1k, 253 held-out images, output error against the FP32 file: 64 images, three draws, 0.00013-0.00022;
    # 128, five, 0.00014-0.00033; 256, three, 0.00013-0.00015; 512, two, 0.00016; 760 0.00014: from 256 on no
    # draw lands high (mAP50-95 means 0.2498, 0.2487, 0.2502, 0.2481, 0.2478, FP32 0.2502: within the noise).
    # 128 -> 256 costs 30 s at 448 px on 2 cores
    max_int8_drop: float = 0.01  # mAP50-95 the INT8 model may lose against its FP32 input (on the held-out
    # images) before the fallback
    fallback_rounds: int = 3  # at most this many convolutions kept apart, one per re-quantization
    fallback: str = "pair_safe"  # how: pair_safe (int8 weights no u8s8 pair can saturate with) | uint8_weights
    # (asymmetric uint8 weights: slower u8u8 kernels) | fp32
    share_concat_ranges: bool = True  # one range for a Concat's inputs and output (no requantization there)
    silu_floor: bool = True  # pre-SiLU convolution outputs: range floor where SiLU is within half a step of 0
    seed: int = 0

    def __post_init__(self):
        if self.granularity not in GRANULARITY:
            raise ValueError(f"granularity must be one of {GRANULARITY}, got {self.granularity!r}")
        if self.calib_method not in CALIB_METHODS:
            raise ValueError(f"calib_method must be one of {CALIB_METHODS}, got {self.calib_method!r}")
        if not 50 < self.calib_percentile <= 100:
            raise ValueError(f"calib_percentile must be in (50, 100], got {self.calib_percentile}")
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
    fallback_nodes: list[str] = field(default_factory=list)  # convolutions the fallback kept apart
    fallback: str = "pair_safe"  # how they were kept: pair-safe int8 weights, uint8 weights or FP32
    rounds: list[dict] = field(default_factory=list)  # per quantization: fallback layers, mAP50_95
    fp32_mAP50_95: float | None = None
    learned_ranges: int = 0  # tensors whose calibrated range QAT's learned range replaced
    shared_concat_ranges: int = 0  # tensors given the common range of their Concat group
    silu_floors: int = 0  # pre-SiLU tensors whose range floor was raised (silu_floor_ranges)
    space_to_depth: list[str] = field(default_factory=list)  # stride-2 input convolutions run as SpaceToDepth + conv
    pinned_resizes: int = 0  # Resizes kept in NCHW layout by pin_resize_layout_
    folded_concats: int = 0  # Concats that run on 8-bit data without requantizing (fold_concat_qdq_)
    seconds: float = 0.0


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


def concat_groups(model, tensors: set[str], skip: list[str] = ()) -> list[list[str]]:
    """The groups of ``tensors`` that share one range: joined by Concat nodes (inputs and output; nodes in ``skip``
    left out), and tensors in several concats join the groups together, as do the input and outputs of the ops
    whose output ONNX Runtime quantizes with its input's parameters (MaxPool, Resize, ...)."""
    skip, parent = set(skip), {}

    def root(t: str) -> str:
        while parent.setdefault(t, t) != t:
            t = parent[t]
        return t

    for node in model.graph.node:
        if node.name in skip:
            continue
        if node.op_type == "Concat":
            names = [t for t in [*node.input, *node.output] if t in tensors]
        elif node.op_type in SHARED_PARAM_OPS:
            names = [t for t in [node.input[0], *node.output] if t in tensors]
        else:
            continue
        for t in names[1:]:
            parent[root(t)] = root(names[0])
    groups: dict[str, list[str]] = {}
    for t in parent:
        groups.setdefault(root(t), []).append(t)
    return list(groups.values())


def concat_ranges(model, cache_path, skip: list[str]) -> dict[str, tuple[float, float]]:
    """One range per group of tensors joined by Concat nodes (:func:`concat_groups`): the union of their calibrated
    ranges.

    With equal scales ONNX Runtime's QLinearConcat is a copy. Measured on YOLOv5n at 640, 2 threads: 2-8 % faster
    than with the calibrated per-tensor ranges, and mAP50-95 0.320 vs 0.318 (minmax, 16 images).
    """
    from onnxruntime.quantization.calibrate import load_tensors_data

    data = load_tensors_data(cache_path).data
    # ONNX Runtime drops a Relu by giving its input the Relu output's range, whose 0 must then be its floor: a ReLU
    # output in a group that reaches below 0 keeps its own range (measured: ReLU in model.0-4 of YOLOv5n, model.4's
    # output shared the range of a SiLU output in the head's Concat and kept its negative values, relative error 0.73)
    relu_outputs = {n.output[0] for n in model.graph.node if n.op_type == "Relu"}
    ranges = {}
    for members in concat_groups(model, set(data), skip):
        if min(float(np.min(data[t].range_value[0])) for t in members) < 0:
            members = [t for t in members if t not in relu_outputs]
        if len(members) < 2:
            continue
        lo = min(float(np.min(data[t].range_value[0])) for t in members)
        hi = max(float(np.max(data[t].range_value[1])) for t in members)
        ranges.update({t: (lo, hi) for t in members})
    return ranges


def silu(x: np.ndarray | float) -> np.ndarray:
    return x / (1 + np.exp(-np.asarray(x, np.float64)))


def silu_floor(lo: float, step: float) -> float:
    """The floor for the range of a SiLU's input: the point below which SiLU stays within ``step / 2`` of 0 (its
    output's quantization step), or ``lo`` if that is higher. Below -1.28 SiLU rises monotonically towards 0.

    Example:
        >>> round(silu_floor(-25.0, 0.1), 2)  # -4.49: |SiLU(x)| < 0.05 below it
    """
    if lo >= -1.28 or abs(silu(lo)) > step / 2:
        return lo
    a, b = lo, -1.28  # |SiLU(a)| <= step / 2 < |SiLU(b)|
    for _ in range(60):
        mid = (a + b) / 2
        a, b = (mid, b) if abs(silu(mid)) <= step / 2 else (a, mid)
    return float(a)


def silu_floor_ranges(model, cache_path, ranges: dict[str, tuple[float, float]],
                      skip: list[str]) -> dict[str, tuple[float, float]]:
    """New ranges for the outputs of convolutions that feed a SiLU (``Sigmoid`` and ``Mul`` of the same tensor):
    the calibrated floor raised to :func:`silu_floor` of the SiLU output's step. ``ranges`` (e.g. the shared Concat
    ranges) take precedence over the calibration cache.

    Why: the calibrated range of a convolution's output is as wide below zero as above (YOLOv5n at 448, the second
    convolution: -80.9 .. 73.9), but SiLU maps everything below about -5 to within half a step of its own 8-bit
    output, so those levels are lost on values that all come out the same. With the floor there the convolution's
    output gets up to twice the resolution. YOLOv5n, coco1k train images outside the held-out and calibration ones
    (FP32 at 448 0.2164), the same fallback convolutions: mAP50-95 0.2129 -> 0.2156 at 448, 0.2296 -> 0.2301 at 640;
    output error 0.00047 -> 0.00033 at 448. (With the fallback it then chooses: 0.2123, the same mAP within the
    +-0.003 that files of equal error differ by.)
    """
    from onnxruntime.quantization.calibrate import load_tensors_data

    data = load_tensors_data(cache_path).data

    def range_of(t: str) -> tuple[float, float]:
        if t in ranges:
            return ranges[t]
        lo, hi = data[t].range_value
        return float(np.min(lo)), float(np.max(hi))

    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    skip, out = set(skip), {}
    for node in model.graph.node:
        t = node.output[0] if node.output else None
        if node.op_type != "Conv" or node.name in skip or t not in data or t in ranges:
            continue  # a tensor in a shared group keeps the group's range
        sig = [u for u in consumers.get(t, []) if u.op_type == "Sigmoid"]
        mul = [u for u in consumers.get(t, []) if u.op_type == "Mul" and t in u.input
               and any(s.output[0] in u.input for s in sig)]
        if not mul or mul[0].output[0] not in data:
            continue
        lo, hi = range_of(t)
        mlo, mhi = range_of(mul[0].output[0])
        floor = silu_floor(lo, (mhi - min(mlo, 0.0)) / 255)
        if floor > lo:
            out[t] = (floor, hi)
    return out


def pair_safe_range(w: np.ndarray, per_channel: bool) -> np.ndarray:
    """The symmetric int8 range (one per output channel, or one) under which no u8s8 pair of ``w`` saturates.

    ``w`` is a convolution weight ``[M, C, kh, kw]``. ONNX Runtime's u8s8 kernels without VNNI add the products of
    input channels 2i and 2i+1 at the same tap in int16 (a probe, 255 x 127 on two taps: channels 0 and 1 saturate;
    1 and 2, 0 and 2, or two taps of one channel do not). With scale ``range / 127`` every weight is within
    -127..127 and every such pair sums to at most ``|w1 + w2| / scale + 1 <= 128`` levels, so ``255 * 128 < 2**15``
    bounds the pair sum: no input can saturate it. With an odd channel count the pairing is not known, so that weight
    gets twice its plain range (7-bit weights).

    Example:
        >>> pair_safe_range(np.array([[[[1.0]], [[0.8]]]]), True)  # array([1.8]): the pair, not the largest weight
    """
    m, c = w.shape[:2]
    flat = np.abs(w).reshape(m if per_channel else 1, -1).max(1)
    if c % 2:
        return 2 * flat
    pairs = np.abs(w[:, 0::2] + w[:, 1::2]).reshape(m if per_channel else 1, -1).max(1)
    return np.maximum(flat, pairs)


def _weight_overrides(src: Path, convs: list[str], per_channel: bool, how: str) -> dict:
    """``TensorQuantOverrides`` for the weights of ``convs``, the fallback's convolutions: ``pair_safe`` int8 ranges
    (:func:`pair_safe_range`) or asymmetric ``uint8_weights``.

    Why: ONNX Runtime's u8s8 kernels on x86 without VNNI (AVX2) saturate where a layer's inputs fill the uint8
    range. YOLOv5n at 448, coco1k, every convolution u8s8: val mAP50-95 0.200 (FP32 0.245); the fallback's 3
    convolutions (the stem and the next two, at the highest resolutions) pair-safe: 0.236, uint8 weights: 0.234, at
    1.12x the latency of pair-safe (four paired runs: 1.10-1.13x). Pair-safe everywhere is worse (its wider scales
    cost more than the saturation of the later layers, where large inputs are rare).
    """
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType

    graph = onnx.load(str(src)).graph
    weights = {t.name: t for t in graph.initializer}
    names = set(convs)
    wanted = [n for n in graph.node if n.name in names]
    if how == "uint8_weights":
        spec = {"quant_type": QuantType.QUInt8, "symmetric": False, **({"axis": 0} if per_channel else {})}
        return {n.input[1]: [dict(spec)] for n in wanted}
    overrides = {}
    for n in wanted:
        r = pair_safe_range(numpy_helper.to_array(weights[n.input[1]]), per_channel)
        overrides[n.input[1]] = [{**({"axis": 0} if per_channel else {}), "rmin": -float(x), "rmax": float(x)}
                                 for x in r]
    return overrides


def _quantize(src: Path, dst: Path, cache: Path, reader, cfg: QuantConfig, exclude: list[str],
              fallback: list[str] | None = None, only: list[str] | None = None, rewrite: bool = True) -> int:
    """``quantize_static`` to QDQ, then (with ``rewrite``) the bit-exact passes of
    :func:`compression.onnx_passes.finish_int8_`; returns how many Concats were folded. The rewrites change no value, so
    files only read for the calibration cache or for an output error skip them (``rewrite=False``). The ``fallback``
    convolutions get pair-safe int8 weights, uint8 weights or stay FP32, as ``cfg.fallback`` says."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    fallback = fallback or []
    overrides = _weight_overrides(src, fallback, cfg.granularity == "per_channel", cfg.fallback) \
        if fallback and cfg.fallback != "fp32" else {}
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
        extra_options={"CalibMovingAverage": False, "CalibPercentile": cfg.calib_percentile,
                       "CalibTensorRangeSymmetric": False, "TensorQuantOverrides": overrides,
                       "CalibStridedMinMax": 1},  # one batch at a time (see ImageReader)
    )
    if not rewrite:
        return 0
    model = onnx.load(str(dst))
    changed = finish_int8_(model, exclude)
    if any(changed.values()):
        onnx.save(model, str(dst))
    return changed["folded_concats"]


def _outputs(path: Path | str, images: np.ndarray) -> np.ndarray:
    from compression.runtime import onnx_session

    sess = onnx_session(path)
    return np.concatenate([sess.run(None, {sess.get_inputs()[0].name: images[i:i + 4]})[0]
                           for i in range(0, len(images), 4)])


def _box_scale(ref: np.ndarray, imgsz: Size) -> np.ndarray:
    """Per-channel weights of a decoded output: pixel boxes by 1 / the input's long side (to the [0, 1] of the
    scores)."""
    scale = np.ones((1, ref.shape[1], 1), np.float32)
    scale[:, :4] = 1 / max(hw(imgsz))
    return scale


def _relative_error(ref: np.ndarray, cand: np.ndarray, imgsz: Size) -> float:
    scale = _box_scale(ref, imgsz)
    return float((((ref - cand) * scale) ** 2).mean() / ((ref * scale) ** 2).mean())


def output_error(reference: Path | str | np.ndarray, candidate: Path | str, images: np.ndarray, imgsz: Size) -> float:
    """Relative squared error of ``candidate``'s decoded output against ``reference``'s (boxes scaled by 1/imgsz);
    ``reference`` may be its outputs on ``images`` already."""
    ref = reference if isinstance(reference, np.ndarray) else _outputs(reference, images)
    return _relative_error(ref, _outputs(candidate, images), imgsz)


def file_output_errors(reference: Path | str, candidates: list[Path | str], files: list[Path], imgsz: Size,
                       batch: int = 8) -> list[float]:
    """:func:`output_error` of each candidate file against ``reference`` on image ``files`` (see :func:`output_errors`).

    Example:
        >>> file_output_errors("fp32.onnx", ["ptq.onnx", "qat.onnx"], split_images(held, "val"), 448)
    """
    from compression.runtime import onnx_session

    sessions = [onnx_session(p) for p in (reference, *candidates)]
    return output_errors([lambda x, s=s: s.run(None, {s.get_inputs()[0].name: x})[0] for s in sessions], files, imgsz,
                         batch)


def output_errors(models: list[Callable[[np.ndarray], np.ndarray]], files: list[Path], imgsz: Size,
                  batch: int = 8) -> list[float]:
    """:func:`output_error` of ``models[1:]`` against ``models[0]`` on image ``files`` letterboxed at ``imgsz``;
    each model maps a batch of images to its decoded output. Images are read a batch at a time: a few hundred
    images at 640 px would take gigabytes at once."""
    import torch

    from compression.data import letterbox, read_image

    errors, total = np.zeros(len(models) - 1), 0.0
    for i in range(0, len(files), batch):
        x = torch.cat([letterbox(read_image(f), imgsz) for f in files[i:i + batch]]).numpy()
        ref, *outs = [model(x) for model in models]
        scale = _box_scale(ref, imgsz)
        total += float(((ref * scale) ** 2).sum())
        errors += [float((((ref - out) * scale) ** 2).sum()) for out in outs]
    return [float(e / total) if total else 0.0 for e in errors]


FALLBACK_CANDIDATES = 8  # the most sensitive convolutions (alone) the greedy fallback chooses from
FALLBACK_GAIN = 0.97  # a fallback round is taken only if it lowers the output error at least this much (3 %)


def _greedy_fallback(src: Path, start: Path, cache: Path, cfg: QuantConfig, exclude: list[str], convs: list[str],
                     images: np.ndarray, evaluate_fn: Callable[[Path], float], rounds: list[dict],
                     progress: bool) -> tuple[Path, list[str], int] | None:
    """Keep convolutions apart one at a time, each the one whose fallback lowers the whole INT8 model's output error
    most; returns ``(file, fallback, folded concats)`` of the last round taken (None if none was), appending each
    round to ``rounds``. Candidates are the :data:`FALLBACK_CANDIDATES` convolutions with the largest output error
    when quantized alone (8 calibration images); a round is taken when it lowers the error (16 calibration images)
    by 3 % or more, at most ``fallback_rounds`` times. Each round's held-out mAP50-95 is recorded, not used.

    Why greedy on the whole model: ONNX Runtime picks the convolution kernels' memory layout from the graph around
    them, so a convolution quantized alone need not saturate where it does in the INT8 model (YOLOv5n at 448: the
    second convolution, fused alone exactly as unfused, but kept apart it halves the INT8 model's error).
    The held-out mAP of 64 images does not choose: it moves by more than the rounds differ (YOLOv5n at 448, the
    stem kept apart: held-out 0.2728, 821 other train images 0.2119; stem and the next two: 0.2699, 0.2156).
    """
    from tqdm import tqdm

    probe, imgsz = images[:16], as_size(*images.shape[-2:])
    ref = _outputs(src, probe)  # FP32 outputs: the first 8 for the sensitivity, all 16 for the rounds
    sensitivity = {}
    for name in tqdm(convs, desc="sensitivity", disable=not progress, leave=False):
        single = src.with_name("single.onnx")
        _quantize(src, single, cache, None, cfg, exclude, only=[name], rewrite=False)
        sensitivity[name] = output_error(ref[:8], single, probe[:8], imgsz)
    candidates = sorted(sensitivity, key=sensitivity.get, reverse=True)[:FALLBACK_CANDIDATES]
    error = output_error(ref, start, probe, imgsz)
    rounds[-1]["output_error"] = error
    taken, chosen = None, []
    for round_ in tqdm(range(1, cfg.fallback_rounds + 1), desc="fallback", disable=not progress, leave=False):
        tried = {}
        for i, name in enumerate(c for c in candidates if c not in chosen):
            cand = src.with_name(f"int8_{round_}_{i}.onnx")
            folded = _quantize(src, cand, cache, None, cfg, exclude, fallback=chosen + [name])
            tried[name] = (output_error(ref, cand, probe, imgsz), cand, folded)
        best = min(tried, key=lambda n: tried[n][0], default=None)
        for name, (_, cand, _) in tried.items():
            if name != best:
                cand.unlink()
        if best is None or tried[best][0] > FALLBACK_GAIN * error:
            break
        chosen.append(best)
        error, path, folded = tried[best]
        taken = (path, list(chosen), folded)
        rounds.append({"fallback": list(chosen), "mAP50_95": evaluate_fn(path), "output_error": error})
    return taken


def ptq_graph(fp32_onnx: str | Path):
    """The FP32 graph that :func:`ptq` quantizes: ``fp32_onnx`` with unique node names, the stem as SpaceToDepth +
    convolution and the Resizes pinned to NCHW (none of which changes a value). Returns ``(model, space_to_depth
    convolutions, pinned Resizes)``."""
    import onnx

    model = onnx.load(str(fp32_onnx))
    return (model, *prepare_for_int8_(model))


def ptq(fp32_onnx: str | Path, out: str | Path, images: np.ndarray, cfg: QuantConfig,
        evaluate_fn: Callable[[Path], float], fp32_map: float | None = None,
        progress: bool = True, ranges: dict[str, tuple[float, float]] | None = None,
        fallback: list[str] | None = None) -> QuantResult:
    """Quantize ``fp32_onnx`` to INT8 QDQ at ``out`` (atomically), with the greedy fallback.

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

    t0 = time.perf_counter()
    out = Path(out)
    result = QuantResult("ptq", cfg.granularity, cfg.calib_method)
    model, result.space_to_depth, result.pinned_resizes = ptq_graph(fp32_onnx)
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
        if ranges or cfg.share_concat_ranges or cfg.silu_floor:  # calibrate every tensor, then adjust the ranges
            _quantize(src, tmp / "calibrated.onnx", cache, reader, cfg, decode + boundary, rewrite=False)
            if ranges:  # the ranges QAT learned, over the calibrated ones (SpaceToDepth only moves values)
                ranges = {**ranges, **{n.output[0]: ranges[n.input[0]] for n in model.graph.node
                                       if n.op_type == "SpaceToDepth" and n.input[0] in ranges}}
                result.learned_ranges = override_calibration(cache, ranges)
            shared = concat_ranges(model, cache, decode) if cfg.share_concat_ranges else {}
            result.shared_concat_ranges = override_calibration(cache, shared)
            if cfg.silu_floor:
                result.silu_floors = override_calibration(cache, silu_floor_ranges(model, cache, {**(ranges or {}),
                                                                                               **shared}, decode))
        result.fp32_mAP50_95 = fp32_map
        given, fallback = fallback is not None, list(fallback or [])
        path = tmp / "int8.onnx"
        result.folded_concats = _quantize(src, path, cache, reader, cfg, decode + boundary, fallback=fallback)
        result.rounds.append({"fallback": list(fallback), "mAP50_95": evaluate_fn(path)})
        if not given and cfg.fallback_rounds and fp32_map - result.rounds[0]["mAP50_95"] > cfg.max_int8_drop:
            path, fallback, result.folded_concats = _greedy_fallback(
                src, path, cache, cfg, decode + boundary, convs, images.astype(np.float32), evaluate_fn, result.rounds,
                progress) or (path, fallback, result.folded_concats)
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

