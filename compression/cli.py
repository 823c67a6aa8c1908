"""``python -m compression <verb>``: the stages and tools one by one. Each verb ends stdout with one JSON line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import asdict


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


def _benchmark(args) -> dict:
    from compression.benchmark import benchmark

    model = None
    if args.weights:
        from compression.models import load_model

        model = load_model(args.weights)
    result = asdict(benchmark(args.model, args.imgsz, runs=args.runs, threads=args.threads, model=model))
    if args.baseline:
        base = benchmark(args.baseline, args.imgsz, runs=args.runs, threads=args.threads)
        result.update(baseline_latency_ms=base.latency_ms, baseline_size_mb=base.size_mb,
                      speedup=base.latency_ms / result["latency_ms"], size_ratio=result["size_mb"] / base.size_mb)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m compression", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="show tracebacks and library logs")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("export", help="export a model to ONNX and check it against torch")
    p.add_argument("--weights", required=True, help=".pt checkpoint (ultralytics or original yolov5) or model .yaml")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--out", required=True, help="output .onnx path")
    p.add_argument("--check-image", help="image for the torch/ONNX check (default: ultralytics' bus.jpg)")
    p.set_defaults(func=_export)

    p = sub.add_parser("evaluate", help="mAP50 and mAP50-95 on the dataset's val split")
    p.add_argument("--model", required=True, help=".pt, .yaml or .onnx")
    p.add_argument("--data", required=True, help="ultralytics-style dataset yaml")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (torch models)")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("benchmark", help="ONNX Runtime CPU latency and file size")
    p.add_argument("--model", required=True, help=".onnx file")
    p.add_argument("--imgsz", type=int, default=None)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    p.add_argument("--baseline", help="FP32 .onnx to time in the same run; adds speedup and size_ratio")
    p.add_argument("--weights", help="the torch model, to add params and MACs")
    p.set_defaults(func=_benchmark)
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
