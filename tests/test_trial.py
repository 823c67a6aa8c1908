import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from compression.chain import make_student
from compression.config import STAGE_KEYS, TrialConfig, _TrialKeys, build_config, parse_sets
from compression.data import holdout_split, load_data_config
from compression.distill import DistillConfig
from compression.errors import UserError
from compression.evaluate import evaluate
from compression.export import export_onnx
from compression.models import load_model
from compression.prune import PruneConfig
from compression.quantize import QuantConfig, int8_weight_count
from compression.runtime import file_key
from conftest import write_yolov5_checkpoint

TRIAL = Path(__file__).resolve().parents[1] / "trial.py"


def run_trial(weights, data, out, *sets, env=None, imgsz=64):
    cmd = [sys.executable, str(TRIAL), "--weights", str(weights), "--data", str(data), "--imgsz", str(imgsz),
           "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "YOLO_COMPRESS_CACHE": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module")
def tiny_pt(tiny_yolov5, tmp_path_factory):
    return write_yolov5_checkpoint(tiny_yolov5, tmp_path_factory.mktemp("w") / "tiny.pt")


def test_chain_writes_model_and_report(tiny_pt, tiny_data, tmp_path, env):
    r = run_trial(tiny_pt, tiny_data, tmp_path, "sparsity=0.25", "prune_rounds=2", "round_steps=1", "kd_steps=2",
                  "batch=4", "device=cpu", "recon_images=4", "crop=32", "quantize=false", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    keys = {"mAP50", "mAP50_95", "latency_ms", "size_mb", "params", "macs"}
    assert set(report["baseline"]) == keys and set(report["result"]) == keys
    assert report["result"]["params"] < report["baseline"]["params"]
    assert report["macs_ratio"] == pytest.approx(0.75, abs=0.02) and len(report["stages"]["prune"]["rounds"]) == 2
    # a short distillation between rounds; after the last one the main recovery trains
    assert [r["recover"]["steps"] for r in report["stages"]["prune"]["rounds"]] == [1, 0]
    # each round's held-out mAP right after pruning; lowrank does not reconstruct, so no figure for that
    assert all(0 <= r["recover"]["mAP50_95_pruned"] <= 1 and "mAP50_95_reconstructed" not in r["recover"]
               for r in report["stages"]["prune"]["rounds"])
    assert [e["step"] for e in report["stages"]["distill"]["evals"]] == [1, 2]
    assert [(e["stage"], e["step"]) for e in report["evals"]] == [("distill", 1), ("distill", 2)]
    # the assessor's figure: that mAP over the unpruned model's on the same images at the same size
    unpruned = report["evals"][0]["mAP50_95"] / report["evals"][0]["relative_mAP50_95"]
    assert unpruned > 0 and all(e["relative_mAP50_95"] == pytest.approx(e["mAP50_95"] / unpruned)
                                for e in report["evals"])
    _, held = holdout_split(load_data_config(tiny_data, ("train", "val")), 256)
    teacher_file = export_onnx(load_model(str(tiny_pt)), 64, tmp_path / "teacher.onnx").onnx_path
    assert unpruned == pytest.approx(evaluate(teacher_file, held, 64, progress=False).mAP50_95)
    final = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"default", "mAP50_95", "mAP50", "latency_ms", "size_mb", "params", "macs", "speedup",
            "compression"} <= set(final) and final == report["final"]
    assert report["stages"]["prune"]["seconds"] > 0 and (tmp_path / "model.onnx").is_file()


def test_the_student_before_recovery_is_measured_on_held_out_images(tiny_yolov5, tiny_data):
    data = load_data_config(tiny_data, ("train", "val"))
    train, holdout = holdout_split(data, 2)
    cfg = build_config(parse_sets(["sparsity=0.25", "prune_method=channels", "kd_steps=1", "batch=2", "crop=32",
                                   "recon_images=4", "device=cpu"]))
    _, stages = make_student(tiny_yolov5, train, holdout, 64, cfg, progress=False)
    (record,) = stages["prune"]["rounds"]
    assert 0 <= record["recover"]["mAP50_95_pruned"] <= 1 and 0 <= record["recover"]["mAP50_95_reconstructed"] <= 1
    # without recovery steps the round measures the reconstructed student itself: the model make_student returns
    no_steps = build_config(parse_sets(["sparsity=0.25", "prune_method=channels", "kd_steps=0", "recon_images=4",
                                        "device=cpu"]))
    student, stages = make_student(tiny_yolov5, train, holdout, 64, no_steps, progress=False)
    reconstructed = evaluate(student, holdout, 64, device="cpu", progress=False).mAP50_95
    assert stages["prune"]["rounds"][0]["recover"]["mAP50_95_reconstructed"] == pytest.approx(reconstructed)
    _, stages = make_student(tiny_yolov5, train, None, 64, cfg, progress=False)  # no held-out images, no figures
    assert not {"mAP50_95_pruned", "mAP50_95_reconstructed"} & set(stages["prune"]["rounds"][0]["recover"])


def test_no_pruning_no_training_reproduces_the_baseline(tiny_pt, tiny_data, tmp_path, env):
    r = run_trial(tiny_pt, tiny_data, tmp_path, "sparsity=0", "relu_blocks=0", "quantize=false", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["result"]["mAP50_95"] == report["baseline"]["mAP50_95"]
    assert report["result"]["params"] == report["baseline"]["params"]


def test_a_trial_at_a_smaller_input_is_timed_against_the_baseline_at_the_base_size(tiny_pt, tiny_data, tmp_path,
                                                                                     env):
    r = run_trial(tiny_pt, tiny_data, tmp_path, "deploy_imgsz=64", "calib_images=8", "bench_threads=1", env=env,
                  imgsz=128)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["imgsz"], report["deploy_imgsz"], report["bench_threads"]) == (128, 64, 1)
    assert report["macs_ratio"] == pytest.approx((64 / 128) ** 2, rel=0.01)  # same model, a quarter of the pixels
    from compression.runtime import onnx_session

    assert onnx_session(tmp_path / "model.onnx").get_inputs()[0].shape[2] == 64
    lo, hi = report["latency_ratio_interval"]
    assert lo <= report["latency_ratio"] <= hi
    final = report["final"]
    assert final["imgsz"] == 64 and final["speedup_low"] <= final["speedup"] <= final["speedup_high"]


@pytest.mark.parametrize("bad, expect", [("sparsty=0.2", "did you mean 'sparsity'"),
                                         ("sparsity=0.95", "sparsity must be in"), ("kd_alpha=2", "kd_alpha")])
def test_bad_keys_and_values_are_one_line(tiny_pt, tiny_data, tmp_path, bad, expect, env):
    r = run_trial(tiny_pt, tiny_data, tmp_path, bad, env=env)
    assert r.returncode == 2 and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "report.json").exists()


def test_set_values_are_typed():
    cfg = build_config(parse_sets(["sparsity=0.2", "kd_steps=3", "quantize=false", "prune_method=blocks"]))
    assert (cfg.sparsity, cfg.kd_steps, cfg.quantize, cfg.prune_method) == (0.2, 3, False, "blocks")
    with pytest.raises(UserError, match="kd_steps must be an int"):
        build_config(parse_sets(["kd_steps=1.5"]))
    with pytest.raises(UserError, match="^prune_method must be one of"):  # the stage's check, in the key's name
        build_config(parse_sets(["prune_method=layers"]))
    with pytest.raises(UserError, match="^quant_granularity must be one of"):
        build_config(parse_sets(["quant_granularity=per_layer"]))
    with pytest.raises(UserError, match="key=value"):
        parse_sets(["sparsity"])


def test_trial_keys_are_the_stage_configs_fields():
    # one declaration of each stage field and default: the trial's defaults are the stage configs' defaults
    cfg = TrialConfig()
    assert (cfg.prune_config(), cfg.distill_config(), cfg.quant_config()) == (PruneConfig(), DistillConfig(),
                                                                              QuantConfig())
    # a stage key reaches its stage under its own name
    cfg = build_config({"prune_rounds": 3, "kd_steps": 7, "quant_granularity": "per_tensor", "seed": 5})
    assert (cfg.prune_config().rounds, cfg.distill_config().steps, cfg.quant_config().granularity) == \
        (3, 7, "per_tensor")
    assert cfg.distill_config().seed == cfg.quant_config().seed == 5
    stage_keys = {key for keys in STAGE_KEYS.values() for key in keys}
    assert stage_keys | {f.name for f in dataclasses.fields(_TrialKeys)} == {f.name for f in dataclasses.fields(cfg)}


def test_a_relu_trial_ships_the_fitted_student_and_caches_it(tiny_pt, tiny_data, tmp_path, env):
    common = ("sparsity=0", "relu_blocks=3", "relu_epochs=1", "device=cpu", "quantize=false")
    r = run_trial(tiny_pt, tiny_data, tmp_path / "a", *common, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    relu = report["stages"]["relu"]
    assert relu["blocks"] == 3 and relu["swapped"] > 3 and [f["blocks"] for f in relu["fits"]] == [4, 24]
    assert 0 <= relu["mAP50_95"] <= 1 and report["stages"]["cache"]["student"] == "miss"
    # the fitted student is what ships, evaluated itself (not the baseline's cached figure)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "a" / "model.onnx")).graph.node]
    assert ops.count("Relu") == relu["swapped"]
    assert report["stages"]["export"]["fp32_mAP50_95"] == report["result"]["mAP50_95"]
    r = run_trial(tiny_pt, tiny_data, tmp_path / "b", *common, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads((tmp_path / "b" / "report.json").read_text())
    assert again["stages"]["cache"]["student"] == "hit" and again["stages"]["relu"] == relu
    assert again["result"]["mAP50_95"] == report["result"]["mAP50_95"]
    assert [n.op_type for n in onnx.load(str(tmp_path / "b" / "model.onnx")).graph.node] == ops
    copied = tmp_path / "elsewhere" / "tiny.pt"  # the same weights under another path and time (a fresh download)
    copied.parent.mkdir()
    shutil.copy(tiny_pt, copied)
    r = run_trial(copied, tiny_data, tmp_path / "c", *common, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "c" / "report.json").read_text())["stages"]["cache"]["student"] == "hit"


def test_caches_are_keyed_on_a_files_contents(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"weights")
    b.write_bytes(b"weights")
    assert file_key(a) == file_key(b)
    key, before = file_key(a), a.stat().st_mtime_ns
    a.write_bytes(b"weighty")  # rewritten in place, same size
    os.utime(a, ns=(before + 10**9, before + 10**9))  # a second later, even where file times are coarse
    assert file_key(a) != key
    assert file_key(tmp_path / "none.pt") == [str(tmp_path / "none.pt"), None]


@pytest.mark.slow
def test_quantized_trials_share_the_distilled_student(tiny_pt, tiny_data, tmp_path, env):
    common = ("sparsity=0.25", "prune_rounds=1", "round_steps=1", "kd_steps=2", "batch=4", "device=cpu",
              "calib_images=8", "recon_images=4", "crop=32")
    r = run_trial(tiny_pt, tiny_data, tmp_path / "ptq", *common, "quant_granularity=per_tensor", "ptq_fit_steps=20",
                  env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    ptq = json.loads((tmp_path / "ptq" / "report.json").read_text())
    fit = ptq["stages"]["quantize"]["rounding_fit"]
    # the fitted file ships only when its output is closer to the FP32 file's than the PTQ file's (held-out images)
    assert fit["steps"] == 20 and fit["matched"]["weights"] > 0
    assert ptq["stages"]["quantize"]["method"] == ("ptq_fit" if fit["fitted_output_error"] < fit["ptq_output_error"]
                                                   else "ptq")
    assert ptq["stages"]["cache"]["student"] == "miss"
    assert any("Sigmoid" in n or "Concat" in n for n in ptq["stages"]["quantize"]["fp32_nodes"])
    r = run_trial(tiny_pt, tiny_data, tmp_path / "qat", *common, "qat_epochs=1", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    qat = json.loads((tmp_path / "qat" / "report.json").read_text())
    assert qat["stages"]["cache"]["student"] == "hit"  # pruning and distillation were not redone
    q = qat["stages"]["quantize"]
    assert q["qat"]["steps"] > 0 and q["matched"]["weights"] > 0 and q["ptq_mAP50_95"] is not None
    # QAT's file ships only when its output is closer to the unpruned model's than the PTQ file's on the held-out
    # images; it is exported only when a trained checkpoint came closer than the PTQ file's fake-quantized twin there
    assert (q["qat_mAP50_95"] is None) == (q["qat"]["best_step"] == 0) == (q["qat_output_error"] is None)
    assert q["method"] == ("qat" if q["qat_output_error"] is not None
                           and q["qat_output_error"] < q["ptq_output_error"] else "ptq")
    assert [e["stage"] for e in qat["evals"]] == ["distill"] * 2 + ["qat"]  # one QAT epoch, one evaluation
    for out in ("ptq", "qat"):
        assert int8_weight_count(tmp_path / out / "model.onnx") > 0
        assert (tmp_path / out / "model.onnx").stat().st_size < 0.5 * (tmp_path / out / "fp32.onnx").stat().st_size


# One kill in the default suite; the other stages in `make test-slow`.
@pytest.mark.parametrize("stage,sig", [("baseline", "SIGKILL")] + [pytest.param(*p, marks=pytest.mark.slow) for p in (
    ("distill", "SIGKILL"), ("export", "SIGKILL"), ("quantize", "SIGTERM"), ("measure", "SIGKILL"))])
def test_a_trial_killed_at_any_stage_leaves_no_report_and_no_half_cache(tiny_pt, tiny_data, tmp_path, env, stage,
                                                                        sig):
    """The trial announces each stage on stdout ({"stage": name}); it is killed as soon as ``stage`` starts."""
    import signal

    env = {**env, "YOLO_COMPRESS_CACHE": str(tmp_path / "cache")}  # this test's own cache: hit or miss is known
    out = tmp_path / "killed"
    out.mkdir()
    (out / "report.json").write_text("{}")  # a report of an earlier run must not survive a new, unfinished one
    cmd = [sys.executable, str(TRIAL), "--weights", str(tiny_pt), "--data", str(tiny_data), "--imgsz", "64", "--out",
           str(out)] + [a for s in ("sparsity=0.25", "prune_rounds=1", "round_steps=1", "kd_steps=2", "batch=4", "crop=32",
                                    "device=cpu", "calib_images=8", "recon_images=4", "seed=7") for a in ("--set", s)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    seen = []
    for line in proc.stdout:
        if line.startswith('{"stage"'):
            seen.append(json.loads(line)["stage"])
            if seen[-1] == stage:
                proc.send_signal(getattr(signal, sig))
                break
    proc.wait(timeout=120)
    assert seen[-1] == stage and proc.returncode != 0, (seen, proc.returncode)
    assert not (out / "report.json").exists()
    cache = Path(env["YOLO_COMPRESS_CACHE"])
    for entry in (cache / "students").glob("[!.]*"):  # published entries are whole; half-written ones stay hidden
        assert (entry / "state.pt").is_file() and (entry / "stages.json").is_file()
    for entry in (cache / "baselines").glob("[!.]*.json"):
        assert json.loads(entry.read_text())["mAP50_95"] >= 0 and entry.with_suffix(".onnx").is_file()

    # The next run of the same trial completes, and takes the student from the cache when it was published.
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["cache"]["student"] == ("miss" if stage in ("baseline", "distill") else "hit")


def test_compare_gives_the_reports_ratios_against_the_baseline_timed_beside_it():
    from compression.chain import compare
    from compression.measure import Measurement

    base = Measurement(0.5, 0.30, 10.0, 8.0, 1000, 4000)
    result = Measurement(0.49, 0.29, 4.0, 2.0, 800, 3000)
    figures = compare(result, base, (0.35, 0.45))
    assert figures["speedup"] == 2.5 and figures["compression"] == 4.0 and figures["latency_ratio"] == 0.4
    assert (figures["macs_ratio"], figures["params_ratio"]) == (0.75, 0.8)
    assert figures["latency_ratio_interval"] == [0.35, 0.45] and figures["result"]["mAP50_95"] == 0.29


def test_the_tuners_score_is_measured_on_held_out_train_images_never_on_val(tiny_pt, tiny_data, tmp_path,
                                                                            monkeypatch):
    import compression.chain as chain
    import compression.measure as measure
    from compression.data import load_data_config
    from compression.evaluate import EvalResult
    from compression.score import ScoreConfig, score

    monkeypatch.setenv("YOLO_COMPRESS_CACHE", str(tmp_path / "cache"))
    val = load_data_config(tiny_data)["val"]
    read = []

    def fake_evaluate(model, data, imgsz, progress=True, keep_images=False, **kw):  # val 0.9, any other split 0.1
        read.append(data["val"])
        one_image = {"tp": [np.ones((1, 10), bool)], "conf": [np.ones(1)], "pred_cls": [np.zeros(1)],
                     "target_cls": [np.zeros(1)], "names": ["a.jpg"]}
        return EvalResult(0.5, 0.9 if data["val"] == val else 0.1, 1, one_image if keep_images else None)

    monkeypatch.setattr(chain, "evaluate", fake_evaluate)
    monkeypatch.setattr(measure, "evaluate", fake_evaluate)
    cfg = build_config(parse_sets(["sparsity=0", "quantize=false", "deploy_imgsz=32"]))
    report = chain.run_chain(str(tiny_pt), str(tiny_data), 64, cfg, tmp_path / "out", progress=False,
                             score_fn=lambda r: score(r, ScoreConfig()))
    sel = report["selection"]
    assert (sel["on"], sel["images"], sel["mAP50_95"], sel["baseline_mAP50_95"]) == ("holdout", 2, 0.1, 0.1)
    assert sel["drop_sd"] == 0.0  # one image, the same matches for both files
    assert report["result"]["mAP50_95"] == 0.9 and report["final"]["score_mAP50_95"] == 0.1
    assert [v for v in read if v != val]  # the held-out images were read, for the shipped file and the baseline


def test_every_value_of_the_search_space_is_a_valid_trial_setting():
    space = json.loads((TRIAL.parent / "search_space.json").read_text())
    for key, spec in space.items():
        values = spec["_value"] if spec["_type"] == "choice" else spec["_value"][:2]  # choices, or the range's ends
        for value in values:
            build_config({key: value})  # a one-line UserError for an unknown key or an out-of-range value
    assert "deploy_imgsz" in space and "sparsity" in space


def test_a_trial_shaped_like_its_train_images_runs_at_their_aspect(tiny_pt, wide_data, tmp_path, env):
    r = run_trial(tiny_pt, wide_data, tmp_path, "deploy_rect=true", "sparsity=0", "relu_blocks=3", "relu_epochs=1",
                  "calib_images=8", "bench_threads=1", env=env, imgsz=128)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["imgsz"], report["deploy_imgsz"], report["deploy_shape"]) == (128, 128, [96, 128])
    assert report["macs_ratio"] == pytest.approx(96 / 128, rel=0.01)  # the baseline stays square at --imgsz
    from compression.runtime import onnx_session

    assert onnx_session(tmp_path / "model.onnx").get_inputs()[0].shape[2:] == [96, 128]
    assert (report["final"]["imgsz"], report["final"]["imgsz_h"], report["final"]["imgsz_w"]) == (128, 96, 128)
    assert report["stages"]["relu"]["imgsz"] == [96, 128]  # fitted on the images as they will be deployed


def test_inert_keys_follow_what_runs():
    from compression.config import inert_keys

    drawn = {"sparsity": 0.0, "qat_epochs": 0, "relu_blocks": 3, "lr": 0.004, "kd_alpha": 0.7, "kd_temperature": 2.0,
             "relu_epochs": 4, "deploy_imgsz": 448, "seed": 1, "device": "cpu", "int8_fallback": "pair_safe"}
    assert inert_keys(drawn) == {"lr", "kd_alpha", "kd_temperature"}
    # QAT distils with the trial's temperature, at its own learning rate and alpha
    assert inert_keys({**drawn, "qat_epochs": 1, "qat_lr": 0.01}) == {"lr", "kd_alpha"}
    # QAT starts from the plain PTQ file: the rounding fit does not run
    assert inert_keys({**drawn, "ptq_fit_steps": 20}) == {"lr", "kd_alpha", "kd_temperature"}
    assert inert_keys({**drawn, "qat_epochs": 1, "ptq_fit_steps": 20}) == {"lr", "kd_alpha", "ptq_fit_steps"}
    assert inert_keys({**drawn, "sparsity": 0.1, "qat_lr": 0.01}) == {"qat_lr"}
    assert inert_keys({**drawn, "relu_blocks": 0, "relu_lr": 0.01}) == {"lr", "kd_alpha", "kd_temperature",
                                                                         "relu_epochs", "relu_lr"}
    # a deciding key the draw does not hold may be set otherwise by the trial's budget: nothing is inert by it
    assert inert_keys({k: v for k, v in drawn.items() if k != "sparsity"}) == set()


def test_qat_reads_every_distillation_key_but_those_it_sets():
    from compression.config import QAT_SETS

    cfg = build_config({"kd_steps": 7, "kd_temperature": 3.0, "kd_alpha": 0.3, "kd_feature": 0.5, "crop": 64,
                        "lr": 0.05, "optimizer": "adamw", "freeze_bn": False, "batch": 4, "mosaic": 0.7,
                        "qat_epochs": 2, "qat_lr": 0.002})
    trained, qat = dataclasses.asdict(cfg.distill_config()), dataclasses.asdict(cfg.qat_distill_config(10))
    assert {name for name in trained if trained[name] != qat[name]} == set(QAT_SETS)
    assert (qat["steps"], qat["lr"], qat["kd_temperature"], qat["batch"]) == (20, 0.002, 3.0, 4)


def test_changing_inert_keys_makes_the_same_model(tiny_pt, tiny_data, tmp_path, env):
    from compression.config import inert_keys

    base = {"sparsity": 0, "qat_epochs": 0, "relu_blocks": 0, "deploy_imgsz": 64, "calib_images": 8,
            "bench_threads": 1, "device": "cpu"}
    other = {"lr": 0.009, "kd_alpha": 0.5, "kd_temperature": 3.0, "kd_steps": 3, "kd_feature": 0.5, "crop": 32,
             "optimizer": "adamw", "freeze_bn": False, "batch": 2, "mosaic": 0.5, "prune_method": "channels",
             "prune_importance": "l1", "prune_rounds": 2, "round_steps": 3, "recon_images": 4, "qat_lr": 0.01,
             "relu_epochs": 1, "relu_lr": 0.01, "relu_match": True}
    assert inert_keys({**base, **other}) == set(other)  # every key the tuner may ignore here is changed below
    files = []
    for i, sets in enumerate((base, {**base, **other})):
        out = tmp_path / str(i)
        r = run_trial(tiny_pt, tiny_data, out, *(f"{k}={v}" for k, v in sets.items()), env=env, imgsz=128)
        assert r.returncode == 0, r.stderr[-2000:]
        files.append((out / "model.onnx").read_bytes())
    assert files[0] == files[1]
