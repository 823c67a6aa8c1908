"""The whole chain for one configuration: load -> prune -> reconstruct -> distill -> export -> INT8 -> measure.

``trial.py`` runs it standalone and under NNI. Artifacts: ``OUT/model.onnx`` (the shipped model), ``OUT/fp32.onnx``
(its FP32 input) and, last and atomically, ``OUT/report.json``. The pruned+distilled FP32 student is cached by the
parameters that shaped it, so trials that differ only in quantization settings skip those stages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from compression.config import TrialConfig
from compression.runtime import cache_dir

STUDENT_VERSION = 3  # bump when pruning or distillation changes what a cached student holds
# TrialConfig fields that shape the FP32 student (everything before quantization).
STUDENT_KEYS = ("sparsity", "prune_importance", "recon_images", "kd_epochs", "kd_temperature", "kd_alpha",
                "kd_feature", "kd_images", "train_imgsz", "lr", "optimizer", "freeze_bn", "batch", "mosaic", "seed")


def _file_key(path: str | Path) -> list:
    p = Path(path)
    st = p.stat() if p.is_file() else None
    return [str(p.resolve()), st and st.st_size, st and st.st_mtime_ns]


def student_key(weights: str, data: dict, imgsz: int, cfg: TrialConfig) -> str:
    shaping = {k: getattr(cfg, k) for k in STUDENT_KEYS} if cfg.sparsity else {"sparsity": 0}  # nothing trained
    key = [STUDENT_VERSION, _file_key(weights), data["yaml_file"], imgsz, shaping]
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _load_student(entry: Path, teacher, cfg: TrialConfig, imgsz: int):
    """The cached student: pruned again (deterministic, seconds) for its shapes, then its trained tensors loaded."""
    from compression.prune import prune

    student, _ = prune(teacher, cfg.prune_config(), imgsz)
    state = torch.load(entry / "state.pt", map_location="cpu", weights_only=True)  # tensors only, nothing runs
    student.load_state_dict(state)
    return student.eval(), json.loads((entry / "stages.json").read_text())


def _save_student(entry: Path, student, stages: dict) -> None:
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(student.state_dict(), tmp / "state.pt")
    (tmp / "stages.json").write_text(json.dumps(stages))
    try:
        tmp.rename(entry)  # atomic; a concurrent trial that got there first wins, ours is dropped
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def run_chain(weights: str, data_path: str, imgsz: int, cfg: TrialConfig, out: str | Path,
              on_epoch: Callable[[dict], None] | None = None, progress: bool = True,
              score_fn: Callable[[dict], dict] | None = None, on_stage: Callable[[str], None] | None = None) -> dict:
    """Run the chain for ``cfg`` and return the report (also written to ``out/report.json``, last).

    ``on_stage(name)`` is called as each stage starts: baseline, prune, distill, export, quantize, measure, report.
    """
    from compression.benchmark import benchmark_pair, count_params_and_macs
    from compression.data import load_data_config, train_images
    from compression.distill import distill
    from compression.evaluate import check_imgsz, evaluate
    from compression.export import export_onnx
    from compression.measure import Measurement, baseline
    from compression.models import load_model
    from compression.prune import prune, reconstruct_

    def stage(name: str) -> None:
        if on_stage:
            on_stage(name)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").unlink(missing_ok=True)  # a report only ever describes a finished run
    data = load_data_config(data_path, ("train", "val") if cfg.kd_alpha < 1 else ("val",))
    teacher = load_model(weights)
    imgsz = check_imgsz(imgsz, int(max(teacher.stride)))
    stage("baseline")
    base, base_onnx = baseline(teacher, weights, data, imgsz, progress=progress)
    stages: dict = {}
    epochs: list[dict] = []

    def epoch_hook(stage):
        def hook(record):
            epochs.append({"stage": stage, **record})
            if on_epoch:
                on_epoch({"stage": stage, "step": len(epochs), **record})
        return hook

    # 1-3: the FP32 student, from the cache when another trial already made it.
    key = student_key(weights, data, imgsz, cfg)
    entry = cache_dir() / "students" / key
    if entry.is_dir() and (entry / "stages.json").is_file():
        student, cached = _load_student(entry, teacher, cfg, imgsz)
        stages.update(cached)
        stages["cache"] = {"student": "hit", "key": key}
        for record in cached.get("distill", {}).get("epochs", []):  # replayed: the assessor sees the same curve
            epoch_hook("distill")(record)
    else:
        stage("prune")
        t0 = time.perf_counter()
        student, pruned = prune(teacher, cfg.prune_config(), imgsz)
        recon = cfg.recon_images if cfg.sparsity else 0
        if recon:
            reconstruct_(student, teacher, train_images(data, recon, imgsz, cfg.seed), progress=progress)
        stages["prune"] = {**asdict(pruned), "reconstructed_on": recon, "seconds": time.perf_counter() - t0}
        # Recovery training only makes sense after pruning: on the untouched model it can only drift from the
        # teacher (measured: 0.330 -> 0.258 mAP50-95 after one epoch on COCO128's 128 train images).
        stage("distill")
        dcfg = cfg.distill_config() if cfg.sparsity else dataclasses.replace(cfg.distill_config(), kd_epochs=0)
        student, distilled = distill(student, teacher, data, dcfg, imgsz, on_epoch=epoch_hook("distill"),
                                     progress=progress)
        stages["distill"] = {**asdict(distilled), "skipped": "nothing pruned" if not cfg.sparsity else None}
        _save_student(entry, student, {k: stages[k] for k in ("prune", "distill")})
        stages["cache"] = {"student": "miss", "key": key}

    stage("export")
    t0 = time.perf_counter()
    fp32_path = Path(export_onnx(student, imgsz, out / "fp32.onnx").onnx_path)
    untouched = cfg.sparsity == 0  # neither pruned nor trained: the FP32 export is the baseline's
    fp32_map = base.mAP50_95 if untouched else evaluate(fp32_path, data, imgsz, progress=progress).mAP50_95
    stages["export"] = {"fp32_mAP50_95": fp32_map, "seconds": time.perf_counter() - t0}

    model_path = out / "model.onnx"
    evaluated: dict = {}
    if cfg.quantize:
        stage("quantize")
        stages["quantize"] = quantize_stage(student, teacher, fp32_path, model_path, data, imgsz, cfg, fp32_map,
                                            epoch_hook("qat"), progress, evaluated)
    else:
        tmp = model_path.with_name(f".{model_path.name}.{os.getpid()}.tmp")
        shutil.copyfile(fp32_path, tmp)
        tmp.replace(model_path)

    stage("measure")
    t0 = time.perf_counter()
    shipped = max((r["mAP50_95"] for r in stages.get("quantize", {}).get("rounds", [])), default=None)
    acc = evaluated.get(shipped) or evaluate(model_path, data, imgsz, progress=progress)
    # 150 runs each (~6 s at 640): on 2 shared cores the INT8/FP32 ratio of 50-run medians still varied by +-0.03
    speed, base_speed = benchmark_pair(model_path, base_onnx, imgsz, runs=150, progress=progress)
    params, macs = count_params_and_macs(student, imgsz)
    result = Measurement(acc.mAP50, acc.mAP50_95, speed.latency_ms, speed.size_mb, params, macs)
    stages["measure"] = {"seconds": time.perf_counter() - t0}
    base = Measurement(**{**asdict(base), "latency_ms": base_speed.latency_ms})  # timed in this run, beside ours
    report = {"config": asdict(cfg), "weights": str(weights), "data": data["yaml_file"], "imgsz": imgsz,
              "baseline": asdict(base), "result": asdict(result),
              "speedup": base.latency_ms / result.latency_ms, "compression": base.size_mb / result.size_mb,
              "epochs": epochs, "stages": stages}
    if score_fn:
        report["final"] = score_fn(report)
    stage("report")
    _atomic_json(out / "report.json", report)  # last: a report means the run finished
    return report


def quantize_stage(student, teacher, fp32_path: Path, model_path: Path, data: dict, imgsz: int, cfg: TrialConfig,
                   fp32_map: float, on_epoch, progress: bool, evaluated: dict) -> dict:
    """PTQ of ``fp32_path`` (``qat_epochs == 0``) or QAT of ``student`` then INT8 export, into ``model_path``.

    ``evaluated`` collects every INT8 candidate's val result by its mAP50-95."""
    import tempfile

    import onnx

    from compression.data import train_images
    from compression.distill import distill
    from compression.evaluate import evaluate
    from compression.export import export_onnx
    from compression.qat import learned_ranges, prepare_qat, set_fake_quant
    from compression.quantize import ptq

    qcfg = cfg.quant_config()
    images = train_images(data, qcfg.calib_images, imgsz, cfg.seed)

    def eval_fn(path):
        acc = evaluate(path, data, imgsz, progress=False)
        evaluated[acc.mAP50_95] = acc  # the shipped round's full result, so the chain need not evaluate it again
        return acc.mAP50_95

    if cfg.qat_epochs == 0:
        res = ptq(fp32_path, model_path, images.numpy(), qcfg, eval_fn, fp32_map=fp32_map, progress=progress)
        return asdict(res)
    t0 = time.perf_counter()
    qmodel = prepare_qat(student, qcfg.granularity == "per_channel", images[:32])
    qmodel, trained = distill(qmodel, teacher, data, cfg.qat_distill_config(), imgsz, on_epoch=on_epoch,
                              progress=progress)
    set_fake_quant(qmodel, False)
    with tempfile.TemporaryDirectory(prefix="yc-qat-") as tmp:
        qat_fp32 = Path(tmp) / "qat_fp32.onnx"
        export_onnx(qmodel, imgsz, qat_fp32)
        ranges = learned_ranges(qmodel, onnx.load(str(qat_fp32)))
        res = ptq(qat_fp32, model_path, images.numpy(), qcfg, eval_fn, fp32_map=fp32_map, progress=progress,
                  ranges=ranges)
    res.method = "qat"
    out = asdict(res)
    out.update(qat=asdict(trained), learned_ranges=len(ranges), seconds=time.perf_counter() - t0)
    return out

