"""A real NNI experiment (nnictl create, TPE, local training service) of two tiny trials, then `best`."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from compression.experiment import Trial, best_trial, pooled_scores, trials_from_disk, tuner_history
from compression.runtime import onnx_session
from compression.score import ScoreConfig, rescore
from conftest import write_yolov5_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NNICTL = Path(sys.executable).parent / "nnictl"
FINAL_KEYS = {"default", "mAP50_95", "mAP50", "latency_ms", "size_mb", "params", "macs", "speedup", "compression"}

pytestmark = pytest.mark.skipif(not NNICTL.is_file(), reason="nnictl is not installed beside this python")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/nni/{path}", timeout=10) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def experiment(tiny_yolov5, tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nni")
    weights = write_yolov5_checkpoint(tiny_yolov5, tmp / "tiny.pt")
    budget = ("--set prune_rounds=1 --set round_steps=1 --set kd_steps=2 --set batch=4 --set crop=32 "
              "--set calib_images=8 --set recon_images=4 --set device=cpu")
    config = {
        "experimentName": "smoke", "trialCodeDirectory": str(ROOT), "experimentWorkingDirectory": str(tmp / "exp"),
        "searchSpace": {"sparsity": {"_type": "choice", "_value": [0.0, 0.25]},
                        "quant_granularity": {"_type": "choice", "_value": ["per_tensor", "per_channel"]}},
        "trialCommand": f"python trial.py --nni --weights {weights} --data {tiny_data} --imgsz 64 {budget}",
        "trialConcurrency": 2, "maxTrialNumber": 2, "maxExperimentDuration": "5m",  # one per core
        "tuner": yaml.safe_load((ROOT / "experiment.yml").read_text())["tuner"],  # the product's tuner settings
        "trainingService": {"platform": "local"},
    }
    (tmp / "smoke.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    env = {**os.environ, "PATH": f"{NNICTL.parent}{os.pathsep}{os.environ['PATH']}",
           "YOLO_COMPRESS_CACHE": str(tmp / "cache")}
    r = subprocess.run([str(NNICTL), "create", "--config", str(tmp / "smoke.yml"), "--port", str(port)],
                       capture_output=True, text=True, timeout=120, env=env)
    found = re.search(r"nnictl stop (\w+)", r.stdout + r.stderr)
    assert r.returncode == 0 and found, r.stdout + r.stderr
    exp_id = found.group(1)
    try:
        deadline, jobs = time.time() + 280, []
        while time.time() < deadline:
            jobs = get(port, "trial-jobs")
            if len(jobs) == 2 and all(j["status"] not in ("WAITING", "RUNNING") for j in jobs):
                break
            time.sleep(3)
        yield {"id": exp_id, "port": port, "jobs": jobs, "root": tmp / "exp", "env": env, "tmp": tmp}
    finally:
        subprocess.run([str(NNICTL), "stop", exp_id], capture_output=True, timeout=60, env=env)
    with socket.socket() as s:  # the port is free again: nothing of NNI is left listening
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_both_trials_succeed_with_every_final_metric_key(experiment):
    jobs = experiment["jobs"]
    assert [j["status"] for j in jobs] == ["SUCCEEDED", "SUCCEEDED"], jobs
    for job in jobs:
        final = json.loads(json.loads(job["finalMetricData"][-1]["data"]))
        assert FINAL_KEYS <= set(final), final
        assert final["latency_ms"] > 0 and final["size_mb"] > 0


def run_verb(experiment, verb: str, out) -> dict:
    r = subprocess.run([sys.executable, "-m", "compression", verb, "--experiment", experiment["id"], "--root",
                        str(experiment["root"]), "--out", str(out)], capture_output=True, text=True, timeout=300,
                       env=experiment["env"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_best_exports_a_model_that_onnx_runtime_loads(experiment):
    out = experiment["tmp"] / "best.onnx"
    picked = run_verb(experiment, "best", out)
    trials = trials_from_disk(experiment["id"], experiment["root"])
    assert picked["trial"] == best_trial(trials).id
    assert picked["default"] == max(t.metrics["default"] for t in trials)
    assert onnx_session(out).get_inputs()[0].shape[1] == 3
    assert json.loads(out.with_name("best.report.json").read_text())["result"]["size_mb"] > 0


def test_best_skips_a_trial_without_report(experiment):
    trials = trials_from_disk(experiment["id"], experiment["root"])
    top = best_trial(trials)
    (top.folder / "report.json").rename(top.folder / "report.json.bak")  # as a trial killed before its report
    try:
        again = best_trial(trials_from_disk(experiment["id"], experiment["root"]))
        assert again.id != top.id
    finally:
        (top.folder / "report.json.bak").rename(top.folder / "report.json")


def test_report_writes_html_and_png_with_the_pareto_front(experiment):
    out = experiment["tmp"] / "report"
    res = run_verb(experiment, "report", out)
    page = (out / "report.html").read_text()
    assert res["trials"] == 2 and 1 <= len(res["pareto"]) <= 2
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "data:image/png;base64," in page
    assert all(t in page for t in res["pareto"])
    # the line to beat: the unpruned model's FP32 and INT8 points at the base size (64 px: no smaller reference size)
    assert res["reference_points"] == 2 and "The line to beat" in page and "<th>imgsz</th>" in page


def test_history_hands_the_finished_trials_to_a_new_tuner(experiment):
    space = experiment["tmp"] / "space.json"
    space.write_text(json.dumps(yaml.safe_load((experiment["tmp"] / "smoke.yml").read_text())["searchSpace"]))
    out = experiment["tmp"] / "prior.json"
    r = subprocess.run([sys.executable, "-m", "compression", "history", "--experiment", experiment["id"], "--root",
                        str(experiment["root"]), "--out", str(out), "--space", str(space)], capture_output=True,
                       text=True, timeout=120, env=experiment["env"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    records = json.loads(out.read_text())
    done = [t for t in trials_from_disk(experiment["id"], experiment["root"]) if t.status == "SUCCEEDED"]
    assert len(records) == len(done) == 2
    assert sorted(map(json.dumps, records)) == sorted(json.dumps({"parameter": t.parameters,
                                                                  "value": t.metrics["default"]}) for t in done)
    # NNI's own import hands them to the (still running) experiment's TPE, which replays them
    subprocess.run([str(NNICTL), "experiment", "import", experiment["id"], "--filename", str(out)],
                   capture_output=True, text=True, timeout=60, env=experiment["env"])
    log = experiment["root"] / experiment["id"] / "log" / "dispatcher.log"
    deadline = time.time() + 30
    while "Replayed 2 FINISHED trials" not in log.read_text() and time.time() < deadline:
        time.sleep(1)
    assert "Replayed 2 FINISHED trials" in log.read_text()


def test_history_leaves_out_what_the_new_space_cannot_take():
    space = {"imgsz": {"_type": "choice", "_value": [320, 448]}, "lr": {"_type": "loguniform", "_value": [0.001, 0.01]}}
    trials = [Trial("fits", "SUCCEEDED", None, {"default": 2.0}, {"imgsz": 448, "lr": 0.005}),
              Trial("old_size", "SUCCEEDED", None, {"default": 3.0}, {"imgsz": 640, "lr": 0.005}),
              Trial("lr_out", "SUCCEEDED", None, {"default": 3.0}, {"imgsz": 320, "lr": 0.05}),
              Trial("new_key", "SUCCEEDED", None, {"default": 3.0}, {"imgsz": 320}),
              Trial("stopped", "EARLY_STOPPED", None, {}, {"imgsz": 320, "lr": 0.005}),
              Trial("running", "RUNNING", None, {}, {"imgsz": 448, "lr": 0.002}),
              Trial("stopped_old_size", "USER_CANCELED", None, {}, {"imgsz": 640, "lr": 0.005}),
              Trial("failed_after_score", "FAILED", None, {"default": 1.0}, {"imgsz": 320, "lr": 0.002})]
    records, left_out = tuner_history(trials, space, stopped_value=-1.0)
    # a trial that ended without a score counts as stopped_value (as StopAwareTpe records it in a run); a running one
    # is not over yet; a score reported before a failure is what the tuner got
    assert records == [{"parameter": {"imgsz": 448, "lr": 0.005}, "value": 2.0},
                       {"parameter": {"imgsz": 320, "lr": 0.005}, "value": -1.0},
                       {"parameter": {"imgsz": 320, "lr": 0.002}, "value": 1.0}]
    assert left_out == ["old_size", "lr_out", "new_key", "stopped_old_size"]


def test_pareto_front_keeps_only_undominated_points():
    from compression.report import pareto_front

    points = [(10, 0.30), (8, 0.31), (12, 0.33), (9, 0.29), (8, 0.20)]  # (latency, mAP)
    assert pareto_front(points) == [1, 2]


def test_labels_of_trials_on_one_spot_are_stacked_and_others_stay_put():
    from compression.report import label_levels

    # (x, y) in points: two draws of one configuration (QoG61 and wA458 of experiment dqpmah08, 10 pt apart), a third
    # beside them, one under the first label's line, two far away
    points = [(200, 150), (300, 250), (210, 151), (205, 149), (200, 139), (400, 150)]
    assert label_levels(points) == [0, 0, 1, 2, 0, 0]
    assert label_levels([(1.0, 0.3)]) == [0] and label_levels([]) == []


def nnictl(experiment, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(NNICTL), *args], capture_output=True, text=True, timeout=timeout, env=experiment["env"])


def wait_for_jobs(port: int, count: int, seconds: float = 280) -> list[dict]:
    deadline, jobs = time.time() + seconds, []
    while time.time() < deadline:
        jobs = get(port, "trial-jobs")
        if len(jobs) >= count and all(j["status"] not in ("WAITING", "RUNNING") for j in jobs):
            break
        time.sleep(3)
    return jobs


@pytest.mark.slow
def test_stop_then_resume_continues_the_experiment_and_reuses_the_caches(experiment):
    """Runs after the tests above (file order): stop, resume on the same port, one more trial, caches reused."""
    exp_id, port, cache = experiment["id"], experiment["port"], experiment["tmp"] / "cache"
    baselines = {p: p.stat().st_mtime_ns for p in (cache / "baselines").iterdir()}
    students = set((cache / "students").iterdir())
    r = nnictl(experiment, "stop", exp_id)
    assert r.returncode == 0, r.stdout + r.stderr
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # really stopped

    r = nnictl(experiment, "resume", exp_id, "--port", str(port))
    assert r.returncode == 0, r.stdout + r.stderr
    before = {j["trialJobId"]: j["status"] for j in get(port, "trial-jobs")}
    assert list(before.values()) == ["SUCCEEDED", "SUCCEEDED"]  # the finished trials came back as they were
    r = nnictl(experiment, "update", "trialnum", exp_id, "--value", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = wait_for_jobs(port, 3)
    new = [j for j in jobs if j["trialJobId"] not in before]
    assert len(new) == 1 and new[0]["status"] == "SUCCEEDED", jobs

    # The FP32 baseline was not measured again, and the new trial's student came from the cache whenever an
    # earlier trial had made one with the same pruning (two sparsity choices for three trials).
    assert {p: p.stat().st_mtime_ns for p in (cache / "baselines").iterdir()} == baselines
    trials = {t.id: t for t in trials_from_disk(exp_id, experiment["root"])}
    report = json.loads((trials[new[0]["trialJobId"]].folder / "report.json").read_text())
    seen = {json.loads((trials[t].folder / "report.json").read_text())["config"]["sparsity"] for t in before}
    expected = "hit" if report["config"]["sparsity"] in seen else "miss"
    assert report["stages"]["cache"]["student"] == expected
    assert set((cache / "students").iterdir()) >= students


CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome") if
                 Path(p).is_file()), None)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (Debian: apt-get install chromium)")
def test_dashboard_shows_the_trials_and_their_metrics_in_a_real_browser(experiment):
    """Headless Chromium opens the NNI web UI, adds our final-metric keys as table columns and reads the rows."""
    sync_api = pytest.importorskip("playwright.sync_api")
    finals = {j["trialJobId"]: json.loads(json.loads(j["finalMetricData"][-1]["data"])) for j in experiment["jobs"]}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
            "--disable-component-update"])  # this machine has no internet: Chromium must not try to phone home
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1200})
            page.goto(f"http://127.0.0.1:{experiment['port']}/oview")
            body = page.locator("body")
            sync_api.expect(body).to_contain_text(experiment["id"], timeout=30_000)
            sync_api.expect(body).to_contain_text("DONE")
            for trial in finals:  # the top-trials table
                sync_api.expect(body).to_contain_text(trial)

            page.goto(f"http://127.0.0.1:{experiment['port']}/detail")
            page.get_by_text("Add/Remove columns").click(timeout=30_000)
            dialog = page.inner_text("body")
            for key in FINAL_KEYS - {"default"}:  # every key of our final dict is offered as a column
                assert f"{key} (metric)" in dialog, key
            for key in ("mAP50_95", "latency_ms", "size_mb"):
                page.get_by_text(f"{key} (metric)", exact=True).click()
            page.get_by_text("Save", exact=True).click()
            sync_api.expect(page.locator("[role=columnheader]", has_text="size_mb (metric)")).to_be_visible()
            page.screenshot(path=str(experiment["tmp"] / "dashboard.png"), full_page=True)
            for trial, final in finals.items():
                row = page.locator("[role=row]", has_text=trial)
                sync_api.expect(row).to_contain_text("SUCCEEDED")
                shown = [float(x) for x in re.findall(r"\d+\.\d+(?:e-?\d+)?", row.inner_text())]
                for key in ("default", "mAP50_95", "latency_ms", "size_mb"):
                    assert any(x == pytest.approx(final[key], rel=1e-5, abs=1e-6) for x in shown), (key, shown)
        finally:
            browser.close()


def test_history_hands_the_tuner_each_trial_scored_as_the_new_experiment_scores():
    from compression.score import ScoreConfig, rescore

    space = {"imgsz": {"_type": "choice", "_value": [320, 448]}}
    held = {"score_mAP50_95": 0.24, "score_baseline_mAP50_95": 0.26, "score_drop_sd": 0.009, "speedup": 3.0,
            "compression": 3.5}
    trials = [Trial("scored", "SUCCEEDED", None, {"default": 9.0, **held}, {"imgsz": 448}),
              Trial("no_figures", "SUCCEEDED", None, {"default": 2.0}, {"imgsz": 320})]
    records, left_out = tuner_history(trials, space, ScoreConfig(penalty=0.2))
    assert records == [{"parameter": {"imgsz": 448}, "value": rescore(held, ScoreConfig(penalty=0.2))}]
    assert records[0]["value"] != 9.0 and left_out == ["no_figures"]


def test_trials_that_shipped_one_file_are_ranked_by_their_pooled_speedup(tmp_path):
    def trial(tid, content, speedup, acc=0.25):
        folder = tmp_path / tid
        folder.mkdir()
        (folder / "model.onnx").write_bytes(content)
        (folder / "report.json").write_text("{}")
        metrics = {"score_mAP50_95": acc, "score_baseline_mAP50_95": 0.26, "score_drop_sd": 0.0,
                   "speedup": speedup, "compression": 3.4}
        return Trial(tid, "SUCCEEDED", folder, {**metrics, "default": rescore(metrics, ScoreConfig())}, {})

    # file a: one lucky run among slow ones; file b: slightly less accurate on held-out, timed alike twice
    trials = [trial("a1", b"a", 3.7), trial("a2", b"a", 2.6), trial("a3", b"a", 2.7),
              trial("b1", b"b", 3.3, acc=0.249), trial("b2", b"b", 3.3, acc=0.249), trial("c", b"c", 2.0)]
    assert max(trials, key=lambda t: t.metrics["default"]).id == "a1"  # by each trial's own run
    pooled = pooled_scores(trials)
    assert "c" not in pooled and pooled["a1"] == pytest.approx(pooled["a3"])
    mean_a = (3.7 * 2.6 * 2.7) ** (1 / 3)
    assert pooled["a2"] == pytest.approx(trials[1].metrics["default"] * mean_a / 2.6)  # w_latency 1
    assert best_trial(trials).id in ("b1", "b2")
    assert best_trial(trials, "speedup").id == "a1"  # other metrics are ranked as reported
