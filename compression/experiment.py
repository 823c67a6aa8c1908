"""Reading an NNI experiment's trials (running or stopped): from its REST API, or from its folder on disk.

NNI 3.0 keeps every experiment under ``~/nni-experiments/<id>`` (``experimentWorkingDirectory``): a SQLite database
of trial events and metrics, and one folder per trial (its ``NNI_OUTPUT_DIR``) where ``trial.py`` writes
``model.onnx`` and, last, ``report.json``. A trial without ``report.json`` did not finish and is never picked.

Trials on other machines (NNI's remote training service) keep that folder on the worker. With ``YC_SHARED`` set
(a folder every machine mounts), ``trial.py`` writes to ``$YC_SHARED/experiments/<experiment>/<trial>`` instead, and
this module looks there first.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from compression.errors import UserError
from compression.runtime import copy_atomic, shared_dir

DEFAULT_ROOT = "~/nni-experiments"
ENDED_WITHOUT_SUCCESS = ("EARLY_STOPPED", "FAILED", "USER_CANCELED", "SYS_CANCELED")  # NNI trial states
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class Trial:
    id: str
    status: str
    folder: Path | None
    metrics: dict = field(default_factory=dict)  # the final result reported to NNI
    parameters: dict = field(default_factory=dict)
    searched: list[Path] = field(default_factory=list)  # where its artifacts were looked for, for error messages

    @property
    def complete(self) -> bool:
        return (self.status == "SUCCEEDED" and self.folder is not None and (self.folder / "report.json").is_file()
                and (self.folder / "model.onnx").is_file())


def _decode(data: str):
    """NNI stores a metric as a JSON string of the JSON the trial reported (sometimes nested once more)."""
    value = json.loads(data)
    while isinstance(value, str):
        value = json.loads(value)
    return value


def experiment_folder(exp_id: str, root: str | Path | None = None) -> Path:
    if not _ID.match(exp_id or ""):
        raise UserError(f"experiment id '{exp_id}' is not an NNI id (letters and digits, e.g. 'a1b2c3d4')")
    base = Path(os.path.expanduser(str(root or DEFAULT_ROOT)))
    folder = base / exp_id
    if not (folder / "db" / "nni.sqlite").is_file():
        known = sorted(p.name for p in base.iterdir() if not p.is_symlink() and (p / "db").is_dir()) \
            if base.is_dir() else []
        hint = f"; experiments there: {', '.join(known[-5:])}" if known else ""
        raise UserError(f"experiment '{exp_id}' not found under {base}{hint}")
    return folder


def shared_trial_folder(shared: Path, exp_id: str, trial_id: str) -> Path:
    """Where a trial's artifacts go when ``YC_SHARED`` names a folder every machine of the experiment mounts."""
    return shared / "experiments" / exp_id / trial_id


def trial_output_dir(out: str | Path | None = None, env=os.environ) -> Path:
    """``out`` if given; under NNI with ``YC_SHARED`` set, the trial's shared folder; else ``NNI_OUTPUT_DIR``."""
    if out:
        return Path(out)
    shared, exp_id, trial_id = shared_dir(), env.get("NNI_EXP_ID"), env.get("NNI_TRIAL_JOB_ID")
    if shared and exp_id and trial_id:
        return shared_trial_folder(shared, exp_id, trial_id)
    return Path(env.get("NNI_OUTPUT_DIR") or "runs/trial")


def _candidates(folder: Path | None, exp_id: str, trial_id: str, shared: Path | None) -> list[Path]:
    """The shared folder first; NNI 3.0 local trials live in ``environments/<env>/trials/<id>``, remote trials' logs
    are copied to ``trials/<id>``."""
    found = [shared_trial_folder(shared, exp_id, trial_id)] if shared else []
    if folder is not None:
        found += [*sorted((folder / "environments").glob(f"*/trials/{trial_id}")), folder / "trials" / trial_id]
    return found


def _pick_folder(candidates: list[Path]) -> Path | None:
    """The first candidate holding a finished trial's ``report.json``, else the first that exists."""
    existing = [c for c in candidates if c.is_dir()]
    return next((c for c in existing if (c / "report.json").is_file()), existing[0] if existing else None)


def missing_artifacts_hint(trials: list[Trial]) -> str:
    """One clause for trials that SUCCEEDED but whose artifacts are not on this machine (remote trials), else ''."""
    lost = [t for t in trials if t.status == "SUCCEEDED" and not t.complete]
    if not lost:
        return ""
    where = ", ".join(str(p) for p in lost[0].searched) or "no folder"
    shared = f"YC_SHARED={shared_dir()}" if shared_dir() else "YC_SHARED is not set"
    return (f"; {len(lost)} SUCCEEDED trial(s) have no model.onnx and report.json here (looked in {where}; "
            f"{shared}): trials on other machines keep them there unless YC_SHARED names a folder every machine "
            f"mounts (set it for the trials and for this command)")


def trials_from_disk(exp_id: str, root: str | Path | None = None) -> list[Trial]:
    folder, shared = experiment_folder(exp_id, root), shared_dir()
    con = sqlite3.connect(f"file:{folder / 'db' / 'nni.sqlite'}?mode=ro", uri=True, timeout=10)
    try:
        events = con.execute("select trialJobId, event, data from TrialJobEvent order by timestamp").fetchall()
        finals = con.execute("select trialJobId, data from MetricData where type = 'FINAL'").fetchall()
    finally:
        con.close()
    status, params = {}, {}
    for trial_id, event, data in events:
        status[trial_id] = event
        if data and trial_id not in params:  # the first event with data carries the parameters
            try:
                params[trial_id] = _decode(data).get("parameters", {})
            except (ValueError, AttributeError):
                pass
    trials = []
    for trial_id, state in status.items():
        metric = next((_decode(d) for t, d in finals if t == trial_id), {})
        searched = _candidates(folder, exp_id, trial_id, shared)
        trials.append(Trial(trial_id, state, _pick_folder(searched),
                            metric if isinstance(metric, dict) else {"default": metric}, params.get(trial_id, {}),
                            searched))
    return trials


def trials_from_rest(port: int, exp_id: str | None = None) -> list[Trial]:
    import urllib.error
    import urllib.request

    if not 1 <= port <= 65535:
        raise UserError(f"port must be in 1..65535, got {port}")
    base = f"http://localhost:{port}/api/v1/nni"
    try:
        with urllib.request.urlopen(f"{base}/experiment", timeout=10) as r:
            profile = json.load(r)
        with urllib.request.urlopen(f"{base}/trial-jobs", timeout=10) as r:
            jobs = json.load(r)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise UserError(f"no NNI experiment answers on port {port} ({e})") from None
    if exp_id and profile.get("id") != exp_id:
        raise UserError(f"the experiment on port {port} is '{profile.get('id')}', not '{exp_id}'")
    trials, shared = [], shared_dir()
    for job in jobs:
        finals = job.get("finalMetricData") or []
        metric = _decode(finals[-1]["data"]) if finals else {}
        log = job.get("logPath") or ""  # file://localhost:/path for local trials
        searched = _candidates(None, profile["id"], job["trialJobId"], shared)
        if log.startswith("file://") or log.startswith("/"):
            searched.append(Path(log.split(":", 2)[-1] if log.startswith("file://") else log))
        params = {}
        try:
            params = _decode(job.get("hyperParameters", ["{}"])[-1]).get("parameters", {})
        except (ValueError, AttributeError, IndexError):
            pass
        trials.append(Trial(job["trialJobId"], job.get("status", "UNKNOWN"), _pick_folder(searched),
                            metric if isinstance(metric, dict) else {"default": metric}, params, searched))
    return trials


def best_trial(trials: list[Trial], metric: str = "default", score_cfg=None) -> Trial:
    """The complete trial with the best ``metric``. For the score (``default``), trials that shipped the same file
    (byte for byte: a tuner often redraws settings that only differ in keys the file does not depend on) are ranked
    by :func:`pooled_scores`, so that one lucky latency run does not pick a file over a faster one."""
    complete = [t for t in trials if t.complete and isinstance(t.metrics.get(metric), (int, float))]
    if not complete:
        states = ", ".join(f"{t.id} {t.status}" for t in trials) or "none"
        raise UserError(f"no complete trial reports '{metric}' (trials: {states}){missing_artifacts_hint(trials)}")
    if metric == "default":
        pooled = pooled_scores(complete, score_cfg)
        return max(complete, key=lambda t: pooled.get(t.id, t.metrics[metric]))
    lower_is_better = metric in ("latency_ms", "size_mb", "params", "macs")
    return (min if lower_is_better else max)(complete, key=lambda t: t.metrics[metric])


def pooled_scores(trials: list[Trial], score_cfg=None) -> dict[str, float]:
    """The score of each trial whose ``model.onnx`` another trial shipped too, recomputed
    (:func:`compression.score.rescore`, ``score_cfg`` or the default) with the geometric mean of the speedups all
    those trials timed: the same file timed k times, each against the FP32 baseline in the same run. On 2 shared
    cores one file's speedup read 2.63x to 3.73x over five trials of experiment lva0kc3r (README, *Status*)."""
    import hashlib
    import math

    from compression.score import ScoreConfig, rescore

    groups: dict[str, list[Trial]] = {}
    for t in trials:
        model = t.folder / "model.onnx" if t.folder is not None else None
        if model is not None and model.is_file():  # without its file a trial is ranked by its own score
            groups.setdefault(hashlib.sha1(model.read_bytes()).hexdigest(), []).append(t)
    pooled = {}
    for group in groups.values():
        speeds = [t.metrics.get("speedup") for t in group]
        if len(group) < 2 or not all(isinstance(v, (int, float)) and v > 0 for v in speeds):
            continue
        mean = math.exp(sum(math.log(v) for v in speeds) / len(speeds))
        for t in group:
            try:
                pooled[t.id] = rescore({**t.metrics, "speedup": mean}, score_cfg or ScoreConfig())
            except UserError:  # a metric without the figures to rescore: ranked by its own score
                pass
    return pooled


def export_best(trial: Trial, out: str | Path) -> dict:
    """Copy the trial's ``model.onnx`` to ``out`` and its ``report.json`` beside it, each atomically."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise UserError(f"--out must name an .onnx file, got '{out}'")
    out.parent.mkdir(parents=True, exist_ok=True)
    report_out = out.with_name(f"{out.stem}.report.json")
    for src, dst in ((trial.folder / "model.onnx", out), (trial.folder / "report.json", report_out)):
        copy_atomic(src, dst)
    return {"trial": trial.id, "onnx": str(out), "report": str(report_out), "parameters": trial.parameters,
            **trial.metrics}


def _in_space(value, spec: dict) -> bool:
    kind, allowed = spec.get("_type"), spec.get("_value", [])
    if kind == "choice":
        return value in allowed
    if kind in ("uniform", "loguniform", "quniform", "qloguniform") and isinstance(value, (int, float)):
        return allowed[0] <= value <= allowed[1]
    return False  # a type this check does not know: leave the trial out rather than hand TPE a value it rejects


def tuner_history(trials: list[Trial], space: dict, score_cfg=None,
                  stopped_value: float = 0.0) -> tuple[list[dict], list[str]]:
    """The ended trials as NNI's import data (``nnictl experiment import <id> -f FILE``, or ``YC_PRIOR``): one
    ``{"parameter": ..., "value": score}`` per trial with a numeric score, so a new experiment's tuner starts from
    what an earlier one learned. With ``score_cfg`` (a :class:`compression.score.ScoreConfig`) each value is the
    trial's score under it (:func:`compression.score.rescore`), so that trials scored with other weights reach the
    tuner on the new experiment's scale. A trial that ended without a score (stopped by the assessor, failed,
    killed) gets ``stopped_value``, as :class:`compression.tuner.StopAwareTpe` records it during a run; running
    and waiting trials are skipped. Trials whose parameters do not fit ``space`` (its keys and values: a search
    space changed since), or whose metric cannot be rescored, are left out; returns ``(records, ids left out)``."""
    from compression.score import rescore

    records, left_out = [], []
    for t in trials:
        value = t.metrics.get("default")
        scored = isinstance(value, (int, float))
        if not scored and t.status not in ENDED_WITHOUT_SUCCESS:
            continue
        if not scored:
            value = stopped_value
        fits = set(t.parameters) == set(space) and all(_in_space(t.parameters[k], space[k]) for k in space)
        if fits and scored and score_cfg is not None:
            try:
                value = rescore(t.metrics, score_cfg)
            except UserError:
                fits = False
        if fits:
            records.append({"parameter": t.parameters, "value": value})
        else:
            left_out.append(t.id)
    return records, left_out
