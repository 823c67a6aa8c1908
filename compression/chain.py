"""The whole chain for one configuration: load -> prune (rounds of reconstruction + distillation) -> distill
-> export -> INT8 -> measure.

``trial.py`` runs it standalone and under NNI. Artifacts: ``OUT/model.onnx`` (the shipped model), ``OUT/fp32.onnx``
(its FP32 input) and, last and atomically, ``OUT/report.json``. The pruned+distilled FP32 student is cached by the
settings that shaped it, so trials that differ only in quantization settings skip those stages.

Every choice made by a metric (the best recovery checkpoint, the best QAT epoch, the INT8 fallback round, and the
tuner's score through the report's ``selection`` figures) reads ``holdout_images`` train images that no training step
sees; the val split is evaluated only for the figures the report gives.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import onnx
import torch

from compression.benchmark import benchmark_pair, count_params_and_macs, ratio_interval
from compression.config import TrialConfig
from compression.data import (check_labels, data_key, holdout_split, load_data_config, split_images, train_images,
                              train_shape)
from compression.distill import DistillResult, distill
from compression.evaluate import EvalResult, check_imgsz, evaluate, map_drop_sd
from compression.export import export_onnx
from compression.lowrank import STATS_IMAGES
from compression.measure import Measurement, baseline, baseline_map
from compression.models import load_model
from compression.prune import Structure, apply_structure, prune, reconstruct_
from compression.qat import bake_rounding_, fit_rounding, learned_ranges, prepare_qat, strip_qat_
from compression.quantize import file_output_errors, output_errors, ptq, ptq_graph
from compression.relu import fit_relu, swap_relu_
from compression.runtime import (Size, cache_dir, copy_atomic, file_key, hw, select_device, temp_sibling,
                                 write_atomic)

STUDENT_VERSION = 7  # bump when the ReLU fit, pruning or distillation changes what a cached student holds
NOT_SHAPING = ("device", "workers")  # DistillConfig fields that do not change what is learned
QAT_ERROR_IMAGES = 64  # held-out images on which QAT's checkpoints are compared (its file and PTQ's: all of them)


def student_key(weights: str, data: dict, imgsz: Size, cfg: TrialConfig) -> str:
    """The student cache key: every field of the stage configs that shape the FP32 student (derived, not listed)."""
    if cfg.sparsity:
        distill_cfg = {k: v for k, v in asdict(cfg.distill_config()).items() if k not in NOT_SHAPING}
        shaping = {"prune": asdict(cfg.prune_config()), "distill": distill_cfg, "recon_images": cfg.recon_images,
                   "round_steps": cfg.round_steps, "holdout_images": cfg.holdout_images}
    else:
        shaping = {"sparsity": 0}  # nothing is pruned or trained
    if cfg.relu_blocks:
        shaping["relu"] = {k: v for k, v in asdict(cfg.relu_config()).items() if k != "device"}
    key = [STUDENT_VERSION, file_key(weights), data_key(data), imgsz, shaping]
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _load_student(entry: Path, teacher):
    """The cached student: the teacher cut to the cached structure (no training), then its trained tensors."""
    stages = json.loads((entry / "stages.json").read_text())
    student = apply_structure(teacher, Structure(**stages["prune"]["structure"]))
    swap_relu_(student, stages.get("relu", {}).get("blocks", 0))
    student.load_state_dict(torch.load(entry / "state.pt", map_location="cpu", weights_only=True))  # tensors only
    return student.eval(), stages


def _save_student(entry: Path, student, stages: dict) -> None:
    tmp = temp_sibling(entry)
    tmp.mkdir(parents=True)
    torch.save(student.state_dict(), tmp / "state.pt")
    (tmp / "stages.json").write_text(json.dumps(stages))
    try:
        tmp.rename(entry)  # atomic, on NFS too; a concurrent trial (any machine) that got there first wins
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _atomic_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=2))


def _is_teacher(cfg: TrialConfig) -> bool:
    """Whether the trial's FP32 student is the teacher itself (nothing pruned, no activation swapped)."""
    return cfg.sparsity == 0 and cfg.relu_blocks == 0


def make_student(teacher, train: dict, holdout: dict | None, imgsz: int, cfg: TrialConfig,
                 on_eval: Callable[[str, dict], None] | None = None, progress: bool = True,
                 on_stage: Callable[[str], None] | None = None, shape: Size | None = None):
    """With ``cfg.relu_blocks``, first swap SiLU for ReLU in the first blocks and fit them back to the teacher
    (:func:`compression.relu.fit_relu`, train images only); then prune in ``cfg.prune_rounds`` steps, each followed
    by least-squares reconstruction and (but the last) ``cfg.round_steps`` of distillation, then recover with
    ``cfg.kd_steps`` (best checkpoint on ``holdout``).

    Returns ``(student, {"prune": ..., "distill": ...})``, the report's stage fields. ``train`` is the train split
    without the held-out images: reconstruction, sensitivity and distillation read only it. With ``holdout`` each
    round's record gives its mAP50-95 there right after pruning and after reconstruction (figures, not choices).
    ``on_stage("prune")`` is called after the ReLU fit, ``on_stage("distill")`` when the main recovery starts.
    The ReLU fit (whole letterboxed images) runs at ``shape``, the deployment's input size (default ``imgsz``);
    pruning and recovery train square at ``imgsz``.
    """
    relu_stage = None
    if cfg.relu_blocks:  # the activations first: pruning then ranks and cuts the channels of the fitted ReLU model
        # at the deployment's shape, the images it will see. YOLOv5n run at 384x512, coco1k val FP32 mAP50-95, ReLU in
        # model.0-2 (relu_epochs=4): fitted at 512x512 0.2426, at 384x512 0.2433; the unswapped model 0.2511
        base, fitted = fit_relu(teacher, teacher, train, cfg.relu_config(), shape or imgsz, progress=progress)
        relu_stage = {"blocks": cfg.relu_blocks, "imgsz": list(hw(shape or imgsz)), **asdict(fitted)}
        if holdout is not None:  # a figure, not a choice
            relu_stage["mAP50_95"] = evaluate(copy.deepcopy(base), holdout, shape or imgsz, device=cfg.device,
                                              progress=False).mAP50_95
        if on_stage:
            on_stage("prune")
    else:
        base = teacher
    t0 = time.perf_counter()
    pcfg = cfg.prune_config()
    lowrank = pcfg.method == "lowrank"
    # channels/blocks: the ranking of the cuts, not their mAP: small images suffice; lowrank: the activation
    # statistics of the deployment size
    sensitivity_size = imgsz if lowrank else min(imgsz, 256)
    count = STATS_IMAGES if lowrank else pcfg.sensitivity_images
    images = train_images(train, count, sensitivity_size, cfg.seed) if cfg.sparsity else None
    # Least-squares reconstruction refits whole layers to the teacher: it repairs removed channels, but lowers a
    # factorised student (held-out mAP50-95 0.155 -> 0.126 at sparsity 0.2), whose widths all match the teacher's.
    recon = train_images(train, cfg.recon_images, min(imgsz, 320), cfg.seed + 1) \
        if cfg.sparsity and cfg.recon_images and not lowrank else None
    round_cfg = dataclasses.replace(cfg.distill_config(), steps=cfg.round_steps, evals=0)
    # Recovery training only makes sense after pruning: on the untouched model it can only drift from the teacher.
    dcfg = cfg.distill_config() if cfg.sparsity else dataclasses.replace(cfg.distill_config(), steps=0)
    start_measured = holdout is not None and dcfg.steps > 0 and dcfg.evals > 0  # the recovery evaluates its start
    rounds: list[dict] = []

    def holdout_map(student) -> float:  # on a copy: evaluation moves a model to the device and into eval mode
        return evaluate(copy.deepcopy(student), holdout, imgsz, batch=round_cfg.batch, device=round_cfg.device,
                        progress=False).mAP50_95

    def recover(student, structure, step):
        # the frontier's figures: what pruning alone leaves and what reconstruction restores; the last round's last
        # one is the main recovery's start, which is evaluated there (filled in below)
        names = [] if holdout is None else ["mAP50_95_pruned"] + ([] if recon is None else ["mAP50_95_reconstructed"])
        if step == cfg.prune_rounds and start_measured:
            names = names[:-1]
        record = {"mAP50_95_pruned": holdout_map(student)} if "mAP50_95_pruned" in names else {}
        r0 = time.perf_counter()
        if recon is not None:
            reconstruct_(student, teacher, recon, structure.kept, progress=progress)
        r1 = time.perf_counter()
        if "mAP50_95_reconstructed" in names:
            record["mAP50_95_reconstructed"] = holdout_map(student)
        # after the last round the main recovery trains: a short run before it only lowered its start (held-out
        # mAP50-95 0.164 -> 0.147 at sparsity 0.2, lowrank)
        res = DistillResult()
        if step < cfg.prune_rounds:
            student, res = distill(student, teacher, train, round_cfg, imgsz, kept=structure.kept, progress=progress)
        rounds.append({**record, "recon_seconds": r1 - r0, "steps": res.steps, "distill_seconds": res.seconds})
        return student

    student, pruned = prune(base, pcfg, imgsz, images, recover=recover, progress=progress)
    for record, extra in zip(pruned.rounds, rounds):
        record.update(recover=extra)
    prune_stage = {**asdict(pruned), "macs_ratio": pruned.macs_after / pruned.macs_before,
                   "params_ratio": pruned.params_after / pruned.params_before, "seconds": time.perf_counter() - t0}
    if on_stage:
        on_stage("distill")
    student, distilled = distill(student, teacher, train, dcfg, imgsz, kept=pruned.structure.kept, holdout=holdout,
                                 on_eval=(lambda r: on_eval("distill", r)) if on_eval else None, progress=progress)
    if start_measured and prune_stage["rounds"]:
        last = "mAP50_95_reconstructed" if recon is not None else "mAP50_95_pruned"
        prune_stage["rounds"][-1]["recover"][last] = distilled.start_mAP50_95
    distill_stage = {**asdict(distilled), "skipped": "nothing pruned" if not cfg.sparsity else None}
    stages = {"prune": prune_stage, "distill": distill_stage}
    return student, ({"relu": relu_stage, **stages} if relu_stage else stages)


def run_chain(weights: str, data_path: str, imgsz: int, cfg: TrialConfig, out: str | Path,
              on_eval: Callable[[dict], None] | None = None, progress: bool = True,
              score_fn: Callable[[dict], dict] | None = None, on_stage: Callable[[str], None] | None = None) -> dict:
    """Run the chain for ``cfg`` and return the report (also written to ``out/report.json``, last).

    ``on_stage(name)`` is called as each stage starts: baseline, (relu,) prune, distill, export, quantize, measure,
    report.
    ``on_eval(record)`` after each held-out evaluation of a training run (recovery, QAT).
    """
    def stage(name: str) -> None:
        if on_stage:
            on_stage(name)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").unlink(missing_ok=True)  # a report only ever describes a finished run
    trains = cfg.sparsity or cfg.relu_blocks or (cfg.quantize and cfg.qat_epochs)
    data = load_data_config(data_path, ("train", "val") if trains or cfg.quantize or cfg.deploy_rect else ("val",))
    train, holdout = holdout_split(data, cfg.holdout_images, cfg.seed) if data.get("train") else (data, None)
    teacher = load_model(weights)
    stride = int(max(teacher.stride))
    base_imgsz = check_imgsz(imgsz, stride)
    imgsz = check_imgsz(cfg.deploy_imgsz or base_imgsz, stride)  # the trial's size (square): trained at it
    shape = train_shape(train, imgsz, stride) if cfg.deploy_rect else imgsz  # exported, evaluated, timed at it
    stage("baseline")
    base, base_onnx = baseline(teacher, weights, data, base_imgsz, progress=progress)
    evals: list[dict] = []
    held_out: dict[str, EvalResult] = {}  # the quantize stage's evaluations, by file contents (file_key)

    @functools.cache
    def unpruned_map() -> float:  # the unpruned FP32 model's held-out mAP50-95 at this size, once a training run asks
        _, size_onnx = baseline(teacher, weights, data, shape, progress=False)
        return baseline_map(size_onnx, holdout, shape, progress=False).mAP50_95

    def record_eval(name: str, record: dict) -> None:
        if holdout is not None and "mAP50_95" in record:
            # what NNI's assessor compares between trials: how much of the unpruned model's mAP50-95 at the same
            # input size a training run holds, not the mAP itself, which is lower at every smaller size
            reference = unpruned_map()
            record = {**record, "relative_mAP50_95": record["mAP50_95"] / reference if reference > 0 else 0.0}
        evals.append({"stage": name, **record})
        if on_eval:
            on_eval({"stage": name, "index": len(evals), **record})

    student, stages = fp32_student(teacher, weights, data, train, holdout, imgsz, cfg, record_eval, stage, progress,
                                   shape)
    stage("export")
    fp32_path, fp32_acc, stages["export"] = export_student(student, teacher, weights, data, shape, base_imgsz, base,
                                                           cfg, out, progress)
    model_path = out / "model.onnx"
    if cfg.quantize:
        stage("quantize")
        stages["quantize"] = quantize_stage(student, teacher, fp32_path, model_path, train, holdout, shape, cfg,
                                            record_eval, progress, held_out)
    else:
        copy_atomic(fp32_path, model_path)
    stage("measure")
    t0 = time.perf_counter()
    # the shipped model's one val evaluation (without INT8 it is the FP32 file, evaluated above)
    acc = evaluate(model_path, data, shape, progress=progress) if cfg.quantize else fp32_acc
    # 150 runs each (~6 s at 640): on 2 shared cores the INT8/FP32 ratio of 50-run medians still varied by +-0.03.
    # Each file at its own size: the baseline at the base size, so the speedup includes the resolution.
    speed, base_speed = benchmark_pair(model_path, base_onnx, runs=150, threads=cfg.bench_threads or None,
                                       progress=progress)
    params, macs = count_params_and_macs(student, shape)
    result = Measurement(acc.mAP50, acc.mAP50_95, speed.latency_ms, speed.size_mb, params, macs)
    selection = selection_figures(model_path, base_onnx, train, holdout, shape, base_imgsz, progress, held_out)
    stages["measure"] = {"seconds": time.perf_counter() - t0}
    base = Measurement(**{**asdict(base), "latency_ms": base_speed.latency_ms})  # timed in this run, beside ours
    report = {"config": asdict(cfg), "weights": str(Path(weights).resolve() if Path(weights).is_file() else weights),
              "data": data["yaml_file"], "imgsz": base_imgsz, "deploy_imgsz": imgsz,
              "deploy_shape": list(hw(shape)), "bench_threads": speed.threads,
              **compare(result, base, ratio_interval(speed, base_speed)),
              "latency_state": {"sd": base_speed.state_sd, "runs": base_speed.state_runs,
                                "dof": base_speed.state_dof}, "selection": selection,
              "evals": evals, "stages": stages}
    if score_fn:
        report["final"] = score_fn(report)
    stage("report")
    _atomic_json(out / "report.json", report)  # last: a report means the run finished
    return report


def selection_figures(model_path: Path, base_onnx: Path, train: dict, holdout: dict | None, imgsz: Size,
                      base_imgsz: int, progress: bool, evaluated: dict[str, EvalResult] | None = None) -> dict:
    """What the tuner's score (and ``best``) may read: mAP50-95 of the shipped file and of the FP32 baseline (each at
    its own size) on the held-out train images, and ``drop_sd``, how much their difference moves with the images it
    is read on (:func:`compression.evaluate.map_drop_sd`); without held-out images, on the train split (the images
    :func:`quantize_stage` chooses on); never on val, whose figure the report gives. ``evaluated``: evaluations
    already made there, by :func:`compression.runtime.file_key` (the quantize stage's), not made again.
    A dataset with no train images leaves only val: ``{"on": "val"}`` says so."""
    if holdout is None and not (train.get("train") and split_images(train, "train")):
        return {"on": "val"}
    on = holdout or {**train, "val": train["train"]}
    images = split_images(on, "val")
    check_labels(images, on["nc"])  # a trial that neither trains nor calibrates has not checked them yet
    shipped = (evaluated or {}).get(file_key(model_path)[0]) or evaluate(model_path, on, imgsz, progress=progress,
                                                                          keep_images=True)
    base = baseline_map(base_onnx, on, base_imgsz, progress=progress)
    return {"on": "holdout" if holdout else "train", "images": len(images), "mAP50_95": shipped.mAP50_95,
            "baseline_mAP50_95": base.mAP50_95, "drop_sd": map_drop_sd(base.per_image, shipped.per_image)}


def fp32_student(teacher, weights: str, data: dict, train: dict, holdout: dict | None, imgsz: int, cfg: TrialConfig,
                 record_eval: Callable[[str, dict], None], stage: Callable[[str], None], progress: bool,
                 shape: Size | None = None):
    """Steps 1-3, the FP32 student: from the cache when another trial already made it (its evaluations replayed to
    ``record_eval``, so the assessor sees the same curve), else made by :func:`make_student` and cached.
    Returns ``(student, {"prune", "distill", "cache"})``. ``shape``: the deployment's input size (the ReLU fit's)."""
    key = student_key(weights, data, shape or imgsz, cfg)
    entry = cache_dir() / "students" / key
    if entry.is_dir() and (entry / "stages.json").is_file():
        student, stages = _load_student(entry, teacher)
        for record in stages["distill"]["evals"]:
            record_eval("distill", record)
        return student, {**stages, "cache": {"student": "hit", "key": key}}
    stage("relu" if cfg.relu_blocks else "prune")  # make_student announces "prune" after the ReLU fit
    student, stages = make_student(teacher, train, holdout, imgsz, cfg, record_eval, progress, stage, shape)
    _save_student(entry, student, stages)
    return student, {**stages, "cache": {"student": "miss", "key": key}}


def export_student(student, teacher, weights: str, data: dict, imgsz: Size, base_imgsz: int, base, cfg: TrialConfig,
                   out: Path, progress: bool):
    """Export the student to ``out/fp32.onnx`` and evaluate it on val. Returns ``(path, EvalResult, stage dict)``."""
    t0 = time.perf_counter()
    fp32_path = Path(export_onnx(student, imgsz, out / "fp32.onnx").onnx_path)
    if _is_teacher(cfg):  # neither pruned nor trained: the FP32 export is the baseline's at this size (cached)
        fp32_base = base if hw(imgsz) == hw(base_imgsz) else \
            baseline(teacher, weights, data, imgsz, progress=progress)[0]
        fp32_acc = EvalResult(fp32_base.mAP50, fp32_base.mAP50_95, 0)
    else:
        fp32_acc = evaluate(fp32_path, data, imgsz, progress=progress)
    return fp32_path, fp32_acc, {"fp32_mAP50_95": fp32_acc.mAP50_95, "seconds": time.perf_counter() - t0}


def compare(result, base, interval: tuple[float, float]) -> dict:
    """The report's figures of the shipped model against the FP32 baseline timed in the same run."""
    return {"baseline": asdict(base), "result": asdict(result), "speedup": base.latency_ms / result.latency_ms,
            "compression": base.size_mb / result.size_mb, "latency_ratio": result.latency_ms / base.latency_ms,
            "latency_ratio_interval": list(interval), "macs_ratio": result.macs / base.macs,
            "params_ratio": result.params / base.params}


def quantize_stage(student, teacher, fp32_path: Path, model_path: Path, train: dict, holdout: dict | None,
                   imgsz: Size, cfg: TrialConfig, on_eval: Callable[[str, dict], None], progress: bool,
                   evaluated: dict[str, EvalResult] | None = None) -> dict:
    """PTQ of ``fp32_path`` into ``model_path``; with ``qat_epochs``, then QAT of ``student`` from that PTQ file.

    QAT trains the fake-quantized twin of the PTQ file (:func:`compression.qat.prepare_qat`), keeps the checkpoint
    (or the untrained twin) whose output is closest to the unpruned FP32 model's (what QAT distils towards) on
    ``QAT_ERROR_IMAGES`` held-out train images, and ships its INT8 export only if that file's output is closer than
    the PTQ file's to the FP32 model's on all the held-out images (``holdout``; the train split itself when none are
    held out), never on val. mAP50-95 there is recorded for the checkpoints and both files, but does not choose:
    on a few hundred images files of equal merit differ by up to 0.01 (YOLOv5n at 448, coco1k: QAT files 4-11x
    closer to FP32 than their PTQ files scored -0.0014..+0.011 against them on 253 held-out images, +0.003..+0.010
    on val). The fallback's drop check and its choice of round read the same images; ``evaluated`` (when given)
    keeps each of those evaluations by :func:`compression.runtime.file_key`."""
    qcfg = cfg.quant_config()
    images = train_images(train, qcfg.calib_images, imgsz, cfg.seed)
    chosen_on = "holdout" if holdout else "train"
    choose_on = holdout or {**train, "val": train["train"]}  # no held-out images: the train split, never val

    def eval_fn(path):
        res = evaluate(path, choose_on, imgsz, progress=False, keep_images=evaluated is not None)
        if evaluated is not None:
            evaluated[file_key(path)[0]] = res
        return res.mAP50_95

    if cfg.qat_epochs == 0 and cfg.ptq_fit_steps == 0:
        return {**asdict(ptq(fp32_path, model_path, images.numpy(), qcfg, eval_fn, progress=progress)),
                "chosen_on": chosen_on}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="yc-qat-") as tmp:
        ptq_path, qat_fp32, qat_path = (Path(tmp) / n for n in ("ptq.onnx", "qat_fp32.onnx", "qat.onnx"))
        shipped = ptq(fp32_path, ptq_path, images.numpy(), qcfg, eval_fn, progress=progress)
        if cfg.qat_epochs == 0:
            fit, shipped, best_path = rounding_fit(student, fp32_path, ptq_path, shipped, images, choose_on, imgsz,
                                                   cfg, eval_fn, Path(tmp), progress)
            copy_atomic(best_path, model_path)
            return {**asdict(shipped), "rounding_fit": fit, "method": fit["method"],
                    "seconds": time.perf_counter() - t0, "chosen_on": chosen_on}
        ptq_map = shipped.rounds[-1]["mAP50_95"]  # the round ptq shipped
        qmodel, matched = prepare_qat(student, onnx.load(str(ptq_path)), ptq_graph(fp32_path)[0], images[:1])
        steps_per_epoch = math.ceil(len(split_images(train, "train")) / cfg.batch)
        twin_error = output_error_of(teacher, split_images(choose_on, "val")[:QAT_ERROR_IMAGES], imgsz)
        # trained square at the long side, as the student was; exported, calibrated and compared at ``imgsz``
        qmodel, trained = distill(qmodel, teacher, train, cfg.qat_distill_config(steps_per_epoch), max(hw(imgsz)),
                                  holdout=holdout, on_eval=lambda r: on_eval("qat", r), progress=progress,
                                  output_error=twin_error)
        qat = {"qat": asdict(trained), "matched": matched, "ptq_mAP50_95": ptq_map, "qat_mAP50_95": None,
               "ptq_output_error": None, "qat_output_error": None}
        method, best_path = "ptq", ptq_path
        if trained.best_step > 0:  # a trained checkpoint came closer than the PTQ file's twin: compare the files
            ranges = learned_ranges(qmodel)
            export_onnx(strip_qat_(qmodel), imgsz, qat_fp32)
            res = ptq(qat_fp32, qat_path, images.numpy(), qcfg, eval_fn, fp32_map=shipped.fp32_mAP50_95,
                      progress=progress, ranges=ranges, fallback=shipped.fallback_nodes)
            qat["qat_mAP50_95"] = res.rounds[-1]["mAP50_95"]
            # what QAT trains towards: the unpruned model's outputs at this size (the student's own export when the
            # student is that model)
            reference = fp32_path if _is_teacher(cfg) else export_onnx(teacher, imgsz,
                                                                        Path(tmp) / "teacher.onnx").onnx_path
            qat["ptq_output_error"], qat["qat_output_error"] = file_output_errors(
                reference, [ptq_path, qat_path], split_images(choose_on, "val"), imgsz)
            if qat["qat_output_error"] < qat["ptq_output_error"]:
                method, best_path, shipped = "qat", qat_path, res
        copy_atomic(best_path, model_path)
    return {**asdict(shipped), **qat, "method": method, "seconds": time.perf_counter() - t0, "chosen_on": chosen_on}


def rounding_fit(student, fp32_path: Path, ptq_path: Path, shipped, images: torch.Tensor, choose_on: dict,
                 imgsz: Size, cfg: TrialConfig, eval_fn: Callable[[Path], float], tmp: Path, progress: bool):
    """The PTQ file's twin (:func:`compression.qat.prepare_qat`) learns its int8 weights' rounding and its activation
    ranges on the calibration ``images`` (:func:`compression.qat.fit_rounding`, ``cfg.ptq_fit_steps``), is exported
    and quantized with those ranges and the PTQ file's fallback convolutions; that file ships only if its output is
    closer than the PTQ file's to the FP32 file's (what both quantize) on the held-out images (``choose_on``).
    Returns ``(record, QuantResult of the file chosen, its path)``."""
    device = select_device(cfg.device)
    twin, matched = prepare_qat(student, onnx.load(str(ptq_path)), ptq_graph(fp32_path)[0], images[:1])
    twin.to(device)
    fit = fit_rounding(twin, copy.deepcopy(student).to(device), images, cfg.ptq_fit_steps, seed=cfg.seed,
                       progress=progress)
    ranges = learned_ranges(twin)
    fitted_fp32, fitted = tmp / "fitted_fp32.onnx", tmp / "fitted.onnx"
    export_onnx(bake_rounding_(twin).cpu(), imgsz, fitted_fp32)
    res = ptq(fitted_fp32, fitted, images.numpy(), cfg.quant_config(), eval_fn, fp32_map=shipped.fp32_mAP50_95,
              progress=progress, ranges=ranges, fallback=shipped.fallback_nodes)
    errors = file_output_errors(fp32_path, [ptq_path, fitted], split_images(choose_on, "val"), imgsz)
    better = errors[1] < errors[0]
    record = {**fit, "matched": {k: v for k, v in matched.items() if k != "unmatched"},
              "ptq_output_error": errors[0], "fitted_output_error": errors[1],
              "ptq_mAP50_95": shipped.rounds[-1]["mAP50_95"], "fitted_mAP50_95": res.rounds[-1]["mAP50_95"],
              "method": "ptq_fit" if better else "ptq"}
    return (record, res, fitted) if better else (record, shipped, ptq_path)


def output_error_of(reference: torch.nn.Module, files: list[Path], imgsz: Size) -> Callable[[torch.nn.Module], float]:
    """A function of a model: the :func:`compression.quantize.output_errors` of its decoded output against
    ``reference``'s on image ``files`` at ``imgsz``, both run on the model's device."""
    reference = copy.deepcopy(reference).eval()

    def error(model: torch.nn.Module) -> float:
        device = next(model.parameters()).device
        runs = [lambda x, m=m: m(torch.from_numpy(x).to(device)).float().cpu().numpy()
                for m in (reference.to(device), model.eval())]
        with torch.inference_mode():
            return output_errors(runs, files, imgsz)[0]

    return error
