"""``python -m compression <verb>``: the stages and tools one by one. Each verb ends stdout with one JSON line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _export(args) -> dict:
    from compression.evaluate import check_imgsz
    from compression.export import export_onnx
    from compression.models import load_model

    model = load_model(args.weights)
    imgsz = check_imgsz(args.imgsz, int(max(model.stride)))
    return asdict(export_onnx(model, imgsz, args.out, check_image=args.check_image))


def _evaluate(args) -> dict:
    from compression.evaluate import evaluate

    return asdict(evaluate(args.model, args.data, args.imgsz, batch=args.batch, device=args.device))


def input_size(text: str):
    """``--imgsz``: ``640`` (a square) or ``384,512`` / ``384x512`` (height, width)."""
    parts = text.replace("x", ",").split(",")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides) <= 0:
        raise argparse.ArgumentTypeError(f"expected a side (640) or height,width (384,512), got '{text}'")
    return sides[0] if len(sides) == 1 or sides[0] == sides[1] else tuple(sides)


# timings per session pair; the machine state (the report's latency_state)
RUN_DETAILS = ("blocks", "state_sd", "state_runs", "state_dof")


def _benchmark(args) -> dict:
    from compression.benchmark import benchmark, benchmark_pair, count_params_and_macs, ratio_interval

    if args.baseline:  # both in the same run, interleaved: the only fair latency ratio on a noisy machine
        res, base = benchmark_pair(args.model, args.baseline, args.imgsz, runs=args.runs, threads=args.threads)
        lo, hi = ratio_interval(res, base)
        result = {k: v for k, v in asdict(res).items() if k not in RUN_DETAILS}
        result.update(baseline_latency_ms=base.latency_ms, baseline_p90_ms=base.p90_ms, baseline_size_mb=base.size_mb,
                      baseline_imgsz=base.imgsz, latency_ratio=res.latency_ms / base.latency_ms,
                      latency_ratio_interval=[lo, hi], speedup=base.latency_ms / res.latency_ms,
                      size_ratio=res.size_mb / base.size_mb,
                      latency_state={"sd": base.state_sd, "runs": base.state_runs,
                                     "dof": base.state_dof})
    else:
        res = benchmark(args.model, args.imgsz, runs=args.runs, threads=args.threads)
        result = {k: v for k, v in asdict(res).items() if k not in RUN_DETAILS}
    if args.weights:
        from compression.models import load_model

        result["params"], result["macs"] = count_params_and_macs(load_model(args.weights), result.get("imgsz") or
                                                                 args.imgsz or _onnx_imgsz(args.model))
    return result


def _onnx_imgsz(path):
    from compression.runtime import fixed_size, onnx_session

    return fixed_size(onnx_session(path)) or 640


def _trials(args):
    from compression.experiment import trials_from_disk, trials_from_rest
    from compression.runtime import SHARED_ENV

    if args.shared:
        os.environ[SHARED_ENV] = args.shared  # the one place the shared folder is read from

    return trials_from_rest(args.port, args.experiment) if args.port else trials_from_disk(args.experiment, args.root)


def _best(args) -> dict:
    from compression.config import parse_sets
    from compression.experiment import best_trial, export_best
    from compression.score import build_score_config

    score_cfg = build_score_config(parse_sets(args.score))
    return export_best(best_trial(_trials(args), args.metric, score_cfg), args.out)


def _history(args) -> dict:
    from compression.errors import UserError
    from compression.config import parse_sets
    from compression.experiment import tuner_history
    from compression.runtime import write_atomic
    from compression.score import build_score_config

    try:
        space = json.loads(Path(args.space).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the search space '{args.space}': {e}") from None
    records, left_out = tuner_history(_trials(args), space, build_score_config(parse_sets(args.score)))
    if not records:
        raise UserError(f"experiment {args.experiment} has no succeeded trial that fits {args.space}")
    write_atomic(Path(args.out), json.dumps(records, indent=1))
    return {"trials": len(records), "left_out": left_out, "out": args.out,
            "next": f"nnictl experiment import <new experiment id> --filename {args.out}"}


def _report(args) -> dict:
    from compression.reference import reference_for_report
    from compression.report import complete_reports, write_report

    trials = _trials(args)
    reference = None
    if not args.no_reference and complete_reports(trials):
        reports = complete_reports(trials)
        rect = any(r.get("config", {}).get("deploy_rect") for r in reports)  # trials shaped like the train images
        reference = reference_for_report(reports[0], progress=sys.stderr.isatty(), rect=rect)
    return write_report(trials, args.out, f"yolo-compress experiment {args.experiment}", reference)


def _remote(args) -> dict:
    from compression.remote import launch

    return launch(args.shared, args.hosts, args.manager_ip, args.key, args.python, args.port, args.check,
                  base=Path(args.config))


def _infer(args) -> dict:
    from compression.infer import infer

    return infer(args.model, args.source, args.out, imgsz=args.imgsz, conf=args.conf, iou=args.iou, device=args.device)


def _experiment_parser(sub, verb: str, help_: str) -> argparse.ArgumentParser:
    """A verb that reads an NNI experiment: by id from its folder, or through a running one's REST API."""
    p = sub.add_parser(verb, help=help_)
    p.add_argument("--experiment", required=True, help="NNI experiment id")
    p.add_argument("--port", type=int, help="read a running experiment through its REST API on this port")
    p.add_argument("--root", help="NNI experiment folder root (default: ~/nni-experiments)")
    p.add_argument("--shared", help="folder the trials wrote their artifacts to on other machines (default: "
                                    "$YC_SHARED)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m compression", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="show tracebacks and library logs")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("export", help="export a model to ONNX and check it against torch")
    p.add_argument("--weights", required=True, help=".pt checkpoint (ultralytics or original yolov5) or model .yaml")
    p.add_argument("--imgsz", type=input_size, default=640, help="640, or height,width such as 384,512")
    p.add_argument("--out", required=True, help="output .onnx path")
    p.add_argument("--check-image", help="image for the torch/ONNX check (default: ultralytics' bus.jpg)")
    p.set_defaults(func=_export)

    p = sub.add_parser("evaluate", help="mAP50 and mAP50-95 on the dataset's val split")
    p.add_argument("--model", required=True, help=".pt, .yaml or .onnx")
    p.add_argument("--data", required=True, help="ultralytics-style dataset yaml")
    p.add_argument("--imgsz", type=input_size, default=None,
                   help="640, or height,width such as 384,512 (default: the ONNX file's size, else 640)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (torch models)")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("benchmark", help="ONNX Runtime CPU latency and file size")
    p.add_argument("--model", required=True, help=".onnx file")
    p.add_argument("--imgsz", type=input_size, default=None, help="input size of files with a dynamic size")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads: the cores you deploy on (default: all cores)")
    p.add_argument("--baseline", help="FP32 .onnx to time in the same run; adds speedup and size_ratio")
    p.add_argument("--weights", help="the torch model, to add params and MACs")
    p.set_defaults(func=_benchmark)

    p = _experiment_parser(sub, "best", "copy the best complete trial's INT8 ONNX (and its report) out of an experiment")
    p.add_argument("--out", required=True, help="output .onnx path; the report goes beside it as <name>.report.json")
    p.add_argument("--metric", default="default",
                   help="final-metric key to rank by (default: the score, on held-out train images; ranking by "
                        "mAP50_95, the val figure, makes the best trial's val mAP an optimistic estimate)")
    p.add_argument("--score", action="append", default=[], metavar="KEY=VALUE",
                   help="the experiment's ScoreConfig field, if it set one (repeatable, as trial.py's): trials that "
                        "shipped the same file are rescored with their pooled speedup under it")
    p.set_defaults(func=_best)

    p = _experiment_parser(sub, "history", "write an experiment's ended trials as NNI import data, to start a new "
                                           "experiment's tuner from them (same weights, data and budget); a trial "
                                           "that ended without a score counts as 0")
    p.add_argument("--out", required=True, help="output .json, for make experiment PRIOR=... (YC_PRIOR) or nnictl "
                                                "experiment import <id> --filename")
    p.add_argument("--space", default=str(ROOT / "search_space.json"),
                   help="the new experiment's search space: trials that do not fit it are left out")
    p.add_argument("--score", action="append", default=[], metavar="KEY=VALUE",
                   help="the new experiment's ScoreConfig field, if not the default (repeatable, as trial.py's): each "
                        "trial's value is its score under it, whatever score it reported")
    p.set_defaults(func=_history)

    p = sub.add_parser("infer", help="draw detections on an image or a folder of images; JSON of detections")
    p.add_argument("--model", required=True, help=".pt, .yaml or .onnx")
    p.add_argument("--source", required=True, help="image file or folder")
    p.add_argument("--out", required=True, help="output folder (images with boxes, detections.json)")
    p.add_argument("--imgsz", type=input_size, default=None, help="default: the ONNX file's size, else 640")
    p.add_argument("--conf", type=float, default=0.25)
    p.add_argument("--iou", type=float, default=0.45)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_infer)

    p = sub.add_parser("remote", help="start experiment.yml's search on other machines over SSH, after checking "
                                      "each one (NNI remote training service)")
    p.add_argument("--shared", default=os.environ.get("YC_SHARED"),
                   help="folder every machine mounts at the same path (default: $YC_SHARED)")
    p.add_argument("--hosts", help="workers, 'user@host[:port] ...' (default: experiment.remote.yml's machineList)")
    p.add_argument("--manager-ip", help="address of this machine the workers reach (default: the one it uses to "
                                        "reach the first worker)")
    p.add_argument("--key", help="SSH private key for --hosts (default: ~/.ssh/id_ed25519, id_ecdsa or id_rsa)")
    p.add_argument("--python", help="the workers' folder of python for --hosts (default: this python's folder)")
    p.add_argument("--port", type=int, default=8080, help="NNI's port here (dashboard; workers connect to it)")
    p.add_argument("--check", action="store_true", help="write the config and check the workers; start nothing")
    p.add_argument("--config", default=str(ROOT / "experiment.yml"),
                   help="the search to run: an NNI config like experiment.yml (its training service is replaced)")
    p.set_defaults(func=_remote)

    p = _experiment_parser(sub, "report", "HTML page and PNG plot of an experiment's trials with the Pareto front")
    p.add_argument("--out", required=True, help="output folder (report.html, pareto.png)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the unpruned model's curves over input sizes (measured once per weights and data)")
    p.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, *_args, **_kw: f"warning: {message}\n"
    if not args.verbose:
        os.environ.setdefault("YOLO_VERBOSE", "False")  # ultralytics logs only errors
        warnings.filterwarnings("ignore", module="torch")
    from compression.errors import UserError

    try:
        result = args.func(args)
    except UserError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result))
    return 0
