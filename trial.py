"""One NNI trial: the compression chain for one sampled configuration, reported to the tuner.

    params (NNI or --set) -> TrialConfig -> load -> prune -> reconstruct -> distill -> INT8 (PTQ | QAT)
                          -> export_onnx -> evaluate / benchmark beside the FP32 baseline -> score -> report

Under NNI (``nnictl create --config experiment.yml``) the parameters come from the tuner, each held-out
evaluation of a training run (mAP on train images that training never sees, over the unpruned FP32 model's at the
trial's input size) is reported as an intermediate result,
and the final metric is ``{"default": score, "mAP50_95", ...}``; artifacts go to the trial's ``NNI_OUTPUT_DIR``, or to
``$YC_SHARED/experiments/<experiment>/<trial>`` when ``YC_SHARED`` names a folder all machines share (remote trials).
Standalone:

    python trial.py --weights ../shared/weights/yolov5n.pt --data ../shared/datasets/coco1k/data.yaml \\
        --imgsz 640 --out runs/t1 --set sparsity=0.2 --set quantize=false

``--set deploy_imgsz=448`` runs the trial at 448 px against the FP32 baseline at ``--imgsz``. Writes OUT/model.onnx,
OUT/fp32.onnx and, last, OUT/report.json. This is the only file that imports nni.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

# The trial's fixed budget: what a user edits (or overrides by environment) for their own weights and data.
DEFAULTS = {
    "weights": os.environ.get("YC_WEIGHTS", "../shared/weights/yolov5n.pt"),
    "data": os.environ.get("YC_DATA", "../shared/datasets/coco128/data.yaml"),
    "imgsz": int(os.environ.get("YC_IMGSZ", "640")),
    "set": [s for s in os.environ.get("YC_SET", "").split() if s],  # fixed key=value pairs, e.g. "kd_steps=300"
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=DEFAULTS["weights"], help="FP32 .pt checkpoint or model .yaml")
    parser.add_argument("--data", default=DEFAULTS["data"], help="ultralytics-style dataset yaml")
    parser.add_argument("--imgsz", type=int, default=DEFAULTS["imgsz"])
    parser.add_argument("--out", default=None, help="output folder (default: $YC_SHARED/experiments/<exp>/<trial> "
                        "under NNI when YC_SHARED is set, else NNI_OUTPUT_DIR, else runs/trial)")
    parser.add_argument("--set", action="append", default=list(DEFAULTS["set"]), metavar="KEY=VALUE",
                        help="TrialConfig field (repeatable)")
    parser.add_argument("--score", action="append", default=[], metavar="KEY=VALUE",
                        help="ScoreConfig field (repeatable): w_map, w_latency, w_size, max_map_drop, penalty")
    parser.add_argument("--nni", action="store_true", help="take parameters from NNI and report to it")
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.verbose:
        os.environ.setdefault("YOLO_VERBOSE", "False")
        warnings.filterwarnings("ignore")
    from compression.chain import run_chain
    from compression.config import build_config, parse_sets
    from compression.errors import UserError
    from compression.experiment import trial_output_dir
    from compression.score import build_score_config, score

    out = trial_output_dir(args.out)  # under NNI with YC_SHARED set: the shared folder, found by `best` on any machine
    (out / "report.json").unlink(missing_ok=True)  # first of all: a report only ever describes a finished run
    print(json.dumps({"artifacts": str(out.resolve())}), flush=True)

    nni = None
    if args.nni or os.environ.get("NNI_PLATFORM"):
        import nni
    try:
        overrides = parse_sets(args.set)
        if nni is not None:
            overrides.update(nni.get_next_parameter() or {})  # tuner values over the fixed budget
        cfg = build_config(overrides)
        score_cfg = build_score_config(parse_sets(args.score))

        def on_eval(record):
            print(json.dumps({"eval": record}), flush=True)
            if nni is not None:
                nni.report_intermediate_result(record.get("relative_mAP50_95", record["mAP50_95"]))

        report = run_chain(args.weights, args.data, args.imgsz, cfg, out, on_eval=on_eval,
                           progress=sys.stderr.isatty(), score_fn=lambda r: score(r, score_cfg),
                           on_stage=lambda name: print(json.dumps({"stage": name}), flush=True))
        final = report["final"]
    except UserError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    if nni is not None:
        nni.report_final_result(final)
    print(json.dumps(final))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
