"""Latency, size and compute of a model: ONNX Runtime CPU timings, file size, torch params and MACs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from compression.errors import UserError
from compression.runtime import onnx_session


@dataclass
class BenchResult:
    latency_ms: float  # median of the timed runs
    p90_ms: float
    threads: int  # ONNX Runtime intra-op threads
    size_mb: float  # ONNX file size
    runs: int
    params: int | None = None  # from the torch model, when one is given
    macs: int | None = None


def count_params_and_macs(model: nn.Module, imgsz: int) -> tuple[int, int]:
    """Parameters and multiply-accumulates of one ``imgsz`` x ``imgsz`` image (Torch-Pruning's counter)."""
    import torch_pruning as tp

    device = next(model.parameters()).device
    was_training = model.training
    macs, params = tp.utils.count_ops_and_params(model.eval(), torch.zeros(1, 3, imgsz, imgsz, device=device))
    model.train(was_training)
    return int(params), int(macs)


def benchmark(onnx_path: str | Path, imgsz: int | None = None, runs: int = 50, warmup: int = 10,
              threads: int | None = None, model: nn.Module | None = None, progress: bool = True) -> BenchResult:
    """Time batch-1 inference of an ONNX file in ONNX Runtime on the CPU: ``warmup`` runs, then ``runs`` timed.

    Args:
        onnx_path: the model file.
        imgsz: input size (default: the file's fixed input size).
        threads: intra-op threads (default: all cores).
        model: the torch model it came from, to add params and MACs.

    Example:
        >>> benchmark("model.onnx", 640).latency_ms  # median of 50 runs
    """
    if runs < 30:
        raise UserError(f"runs must be >= 30 for a stable median and p90, got {runs}")
    if not Path(onnx_path).is_file():
        raise UserError(f"ONNX model '{onnx_path}' not found")
    session = onnx_session(onnx_path, threads)
    inp = session.get_inputs()[0]
    fixed = inp.shape[2] if isinstance(inp.shape[2], int) else None
    imgsz = imgsz or fixed or 640
    if fixed and fixed != imgsz:
        raise UserError(f"ONNX model '{onnx_path}' has a fixed input of {fixed} px, but imgsz={imgsz} was asked")
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    times = []
    for i in tqdm(range(warmup + runs), desc=f"benchmark {Path(onnx_path).name}", disable=not progress, leave=False):
        t0 = time.perf_counter()
        session.run(None, {inp.name: x})
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    params = macs = None
    if model is not None:
        params, macs = count_params_and_macs(model, imgsz)
    return BenchResult(
        latency_ms=float(np.median(times)), p90_ms=float(np.percentile(times, 90)),
        threads=session.get_session_options().intra_op_num_threads, size_mb=Path(onnx_path).stat().st_size / 1e6,
        runs=runs, params=params, macs=macs,
    )


def benchmark_pair(model: str | Path, baseline: str | Path, imgsz: int | None = None, runs: int = 50,
                   warmup: int = 10, threads: int | None = None, progress: bool = True) -> tuple[BenchResult, BenchResult]:
    """Time ``model`` and ``baseline`` in the same run, alternating one inference of each, so that the machine's
    load drifts affect both alike; returns ``(model, baseline)`` results (compare only these two with each other)."""
    if runs < 30:
        raise UserError(f"runs must be >= 30 for a stable median and p90, got {runs}")
    sessions, times = [], [[], []]
    for path in (model, baseline):
        if not Path(path).is_file():
            raise UserError(f"ONNX model '{path}' not found")
        sessions.append(onnx_session(path, threads))
    shapes = [s.get_inputs()[0].shape[2] for s in sessions]
    fixed = next((s for s in shapes if isinstance(s, int)), None)
    imgsz = imgsz or fixed or 640
    for path, s in zip((model, baseline), shapes):
        if isinstance(s, int) and s != imgsz:
            raise UserError(f"ONNX model '{path}' has a fixed input of {s} px, but imgsz={imgsz} was asked")
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for k, session in enumerate(sessions):
        for _ in range(warmup):
            session.run(None, feeds[k])
    # Blocks of runs, alternating: ONNX Runtime's idle threads spin for a moment after a run and slow the other
    # session down if the two alternate run by run (INT8 suffered most: 0.86x FP32 interleaved run by run, 0.78x
    # timed apart); the first runs of each block, where the other pool may still spin, are not counted.
    block, skip = 10, 3
    with tqdm(total=2 * runs, desc="benchmark pair", disable=not progress, leave=False) as bar:
        while min(len(t) for t in times) < runs:
            for k, session in enumerate(sessions):
                for j in range(block + skip):
                    t0 = time.perf_counter()
                    session.run(None, feeds[k])
                    if j >= skip and len(times[k]) < runs:
                        times[k].append((time.perf_counter() - t0) * 1e3)
                        bar.update()
    return tuple(BenchResult(latency_ms=float(np.median(t)), p90_ms=float(np.percentile(t, 90)),
                             threads=s.get_session_options().intra_op_num_threads,
                             size_mb=Path(p).stat().st_size / 1e6, runs=runs)
                 for t, s, p in zip(times, sessions, (model, baseline)))
