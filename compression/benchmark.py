"""Latency, size and compute of a model: ONNX Runtime CPU timings, file size, torch params and MACs."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from compression.errors import UserError
from compression.runtime import Size, cache_dir, check_fixed_size, file_key, fixed_size, hw, onnx_session


@dataclass
class BenchResult:
    latency_ms: float  # median of the timed runs
    p90_ms: float
    threads: int  # ONNX Runtime intra-op threads
    size_mb: float  # ONNX file size
    runs: int
    params: int | None = None  # from the torch model, when one is given
    macs: int | None = None
    imgsz: Size | None = None  # input size timed (a square side, or (height, width))
    blocks: list[list[float]] = field(default_factory=list, repr=False)  # benchmark_pair: timings per session pair (ms)
    state_sd: float = 0.0  # benchmark_pair's baseline: spread of log(latency) between runs on this machine
    state_runs: int = 0  # how many logged runs that spread is from (this host, these threads); 0 when none
    state_dof: int = 0  # its degrees of freedom: the runs less one per baseline file


def count_params_and_macs(model: nn.Module, imgsz: Size) -> tuple[int, int]:
    """Parameters and multiply-accumulates of one image of size ``imgsz`` (Torch-Pruning's counter)."""
    import torch_pruning as tp

    device = next(model.parameters()).device
    was_training = model.training
    macs, params = tp.utils.count_ops_and_params(model.eval(), torch.zeros(1, 3, *hw(imgsz), device=device))
    model.train(was_training)
    return int(params), int(macs)


def benchmark(onnx_path: str | Path, imgsz: Size | None = None, runs: int = 50, warmup: int = 10,
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
    fixed = fixed_size(session)
    imgsz = imgsz or fixed or 640
    check_fixed_size(fixed, imgsz, f"ONNX model '{onnx_path}'")
    x = np.random.default_rng(0).random((1, 3, *hw(imgsz)), dtype=np.float32)
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
        runs=runs, params=params, macs=macs, imgsz=imgsz,
    )


def benchmark_pair(model: str | Path, baseline: str | Path, imgsz: Size | None = None, runs: int = 50,
                   warmup: int = 10, threads: int | None = None, progress: bool = True,
                   sessions: int = 5) -> tuple[BenchResult, BenchResult]:
    """Time ``model`` and ``baseline`` in the same run, alternating blocks of runs of each, so that the machine's
    load drifts affect both alike; returns ``(model, baseline)`` results (compare only these two with each other).

    The runs are spread over ``sessions`` fresh pairs of ONNX Runtime sessions: on 2 shared cores the ratio moved
    from 0.39 to 0.47 between session pairs created one after the other in one process, as much as between
    processes, so one pair of sessions says little about the next. Each result keeps its timings per session
    (``blocks``), from which :func:`ratio_interval` gives the uncertainty of the ratio. Each file runs at its own
    fixed input size (a model exported at 448 px against the FP32 baseline at 640: the ratio then includes the
    resolution); ``imgsz`` is for files with a dynamic size.
    """
    if runs < 30:
        raise UserError(f"runs must be >= 30 for a stable median and p90, got {runs}")
    if not 1 <= sessions <= runs // 5:
        raise UserError(f"sessions must be in 1..{runs // 5} for {runs} runs, got {sessions}")
    paths, sizes = (model, baseline), []
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"ONNX model '{path}' not found")
        fixed = fixed_size(onnx_session(path, threads))
        check_fixed_size(fixed, imgsz, f"ONNX model '{path}'")
        sizes.append(fixed or imgsz or 640)
    rng = np.random.default_rng(0)
    inputs = [rng.random((1, 3, *hw(n)), dtype=np.float32) for n in sizes]
    # Blocks of runs, alternating: ONNX Runtime's idle threads spin for a moment after a run and slow the other
    # session down if the two alternate run by run (INT8 suffered most: 0.86x FP32 interleaved run by run, 0.78x
    # timed apart); the first runs of each block, where the other pool may still spin, are not counted.
    block, skip = 10, 3
    timings: list[list[list[float]]] = [[], []]  # per file, per session pair
    threads_used = 0
    with tqdm(total=2 * runs, desc="benchmark pair", disable=not progress, leave=False) as bar:
        for i in range(sessions):
            share = runs // sessions + (i < runs % sessions)
            pair = [onnx_session(path, threads) for path in paths]
            threads_used = pair[0].get_session_options().intra_op_num_threads
            feeds = [{sess.get_inputs()[0].name: x} for sess, x in zip(pair, inputs)]
            for k, sess in enumerate(pair):
                for _ in range(warmup):
                    sess.run(None, feeds[k])
            timed: list[list[float]] = [[], []]
            while min(map(len, timed)) < share:
                for k, sess in enumerate(pair):
                    for j in range(block + skip):
                        t0 = time.perf_counter()
                        sess.run(None, feeds[k])
                        if j >= skip and len(timed[k]) < share:
                            timed[k].append((time.perf_counter() - t0) * 1e3)
                            bar.update()
            for k in range(2):
                timings[k].append(timed[k])
    results = []
    for per_session, p, n in zip(timings, paths, sizes):
        t = np.concatenate(per_session)
        results.append(BenchResult(latency_ms=float(np.median(t)), p90_ms=float(np.percentile(t, 90)),
                                   threads=threads_used, size_mb=Path(p).stat().st_size / 1e6, runs=runs, imgsz=n,
                                   blocks=per_session))
    return results[0], with_machine_state(baseline, results[1])


STATE_RUNS = 50  # each baseline file's latest runs on this machine from which the state's spread is read


def _state_log(baseline: str | Path, threads: int) -> Path:
    """Where the medians of one baseline file, timed on this host with ``threads`` threads, are kept (JSON lines):
    one folder per host and thread count, one file per baseline file in it."""
    machine = json.dumps([threads, socket.gethostname()])
    key = json.dumps(file_key(baseline))
    return (cache_dir() / "latency" / hashlib.sha1(machine.encode()).hexdigest()[:16]
            / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.jsonl")


def _log_latencies(log: Path) -> np.ndarray:
    """log(latency) of the last :data:`STATE_RUNS` runs in one state log."""
    times = []
    for line in log.read_text().splitlines()[-STATE_RUNS:]:
        try:
            times.append(float(json.loads(line)["latency_ms"]))
        except (ValueError, KeyError, TypeError):  # a line two writers interleaved (a shared disk): not a run
            continue
    return np.log(times)


def with_machine_state(baseline: str | Path, result: BenchResult) -> BenchResult:
    """Log ``result``'s median for ``baseline`` and return it with the spread of log(latency) between the runs of
    each baseline file timed on this host with the same threads (``state_sd``: pooled over those files, each about
    its own mean, from their last :data:`STATE_RUNS` runs; 0 until they give 2 degrees of freedom, e.g. 3 runs of
    one file).

    Why: a shared machine moves between states for minutes at a time (here, 2 cores: the FP32 YOLOv5n file at 640
    timed 12.2-12.8 ms for some minutes and 15.8-17.2 ms later on, and the INT8/FP32 ratio of one pair
    of files 0.47 and then 0.40), which no run sees from within. The baseline is timed in every trial, so its own
    history shows how far the state moves; the state is the machine's, so a baseline file timed here for the first
    time (new weights, another base size) starts from what the others showed. One JSON line per run, appended
    (whole lines on a local disk).
    """
    log = _state_log(baseline, result.threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(json.dumps({"time": time.time(), "latency_ms": result.latency_ms}) + "\n")
    groups = [g for g in map(_log_latencies, sorted(log.parent.glob("*.jsonl"))) if len(g) >= 2]
    dof = sum(len(g) - 1 for g in groups)
    if dof < 2:
        return BenchResult(**{**vars(result), "state_sd": 0.0, "state_runs": 0, "state_dof": 0})
    spread = float(np.sqrt(sum(((g - g.mean()) ** 2).sum() for g in groups) / dof))
    return BenchResult(**{**vars(result), "state_sd": spread, "state_runs": sum(len(g) for g in groups),
                          "state_dof": dof})


def ratio_interval(model: BenchResult, baseline: BenchResult, level: float = 0.95) -> tuple[float, float]:
    """Where a re-run of the same :func:`benchmark_pair` should put ``model.latency_ms / baseline.latency_ms``.

    From the spread of the ratio between the run's session pairs (``blocks``): a prediction interval for the
    difference of two means of as many pairs (ours and the re-run's), on the log scale, with Student's t for the
    few pairs; plus the machine's state (``baseline.state_sd``, :func:`with_machine_state`), which a re-run may find
    elsewhere: twice its variance (two runs, two draws), with Student's t for its degrees of freedom (``state_dof``:
    a new host's first runs give few); the two half-widths add in quadrature (independent errors).
    The baseline's own spread bounds the ratio's as long as the model slows down with the machine by no more than
    twice as much as the baseline does (log scale), so this part errs wide (in the example above the ratio moved
    by 0.16, the baseline by 0.28).
    """
    from scipy import stats

    pairs = [(a, b) for a, b in zip(model.blocks, baseline.blocks) if a and b]
    if len(pairs) < 2:
        raise UserError("ratio_interval needs a benchmark_pair result of at least two session pairs")
    logs = np.log([np.median(a) / np.median(b) for a, b in pairs])
    k = len(logs)
    est = np.log(model.latency_ms / baseline.latency_ms)
    within = stats.t.ppf(0.5 + level / 2, k - 1) * logs.std(ddof=1) * (2 / k) ** 0.5
    state = stats.t.ppf(0.5 + level / 2, max(baseline.state_dof, 1)) * 2 ** 0.5 * baseline.state_sd
    half = (within ** 2 + state ** 2) ** 0.5
    return float(np.exp(est - half)), float(np.exp(est + half))
