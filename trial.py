"""One run of the compression chain: load -> prune -> distill -> export -> evaluate/benchmark -> report.

Standalone:
    python trial.py --weights ../shared/weights/yolov5n.pt --data ../shared/datasets/coco128/data.yaml \
        --imgsz 640 --out runs/t1 --set sparsity=0.2 --set kd_epochs=10 --set quantize=false

Writes DIR/model.onnx and, last, DIR/report.json. This is the only file that will import nni (the experiment).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path


def run(args) -> dict:
    from compression.config import build_config, parse_sets
    from compression.data import load_data_config
    from compression.distill import distill
    from compression.evaluate import check_imgsz
    from compression.measure import baseline, measure
    from compression.models import load_model
    from compression.prune import prune

    cfg = build_config(parse_sets(args.set))
    data = load_data_config(args.data, ("train", "val") if cfg.kd_alpha < 1 else ("val",))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_model(args.weights)
    imgsz = check_imgsz(args.imgsz, int(max(teacher.stride)))
    base = baseline(teacher, args.weights, data, imgsz)
    stages = {}

    t0 = time.perf_counter()
    student, pruned = prune(teacher, cfg.prune_config(), imgsz)
    stages["prune"] = {**asdict(pruned), "seconds": time.perf_counter() - t0}

    student, distilled = distill(student, teacher, data, cfg.distill_config(), imgsz,
                                 on_epoch=lambda e: print(json.dumps({"epoch": e}), flush=True))
    stages["distill"] = asdict(distilled)

    t0 = time.perf_counter()
    result = measure(student, data, imgsz, out / "model.onnx")
    stages["measure"] = {"seconds": time.perf_counter() - t0}

    report = {"config": asdict(cfg), "weights": str(args.weights), "data": data["yaml_file"], "imgsz": imgsz,
              "baseline": asdict(base), "result": asdict(result), "stages": stages}
    tmp = out / f".report.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out / "report.json")  # last, and atomic: a report means the run finished
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="TrialConfig field")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not args.verbose:
        os.environ.setdefault("YOLO_VERBOSE", "False")
        warnings.filterwarnings("ignore")
    from compression.errors import UserError

    try:
        report = run(args)
    except UserError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"baseline": report["baseline"], "result": report["result"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
