"""The trade-off of an experiment at a glance: mAP50-95 against relative latency for every complete trial, the Pareto
front, and the line to beat: the unpruned model at smaller inputs in FP32 and INT8 (:mod:`compression.reference`).

Writes ``OUT/pareto.png`` (matplotlib) and ``OUT/report.html``, a self-contained page with the plot inlined and a
table of every complete trial, its input size, parameters and figures, Pareto-optimal trials first.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
from pathlib import Path

from compression.errors import UserError
from compression.experiment import Trial, missing_artifacts_hint
from compression.runtime import hw, size_text, temp_sibling, write_atomic


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both: lower latency (x) and higher mAP (y)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


LABEL_LINE = 9  # typographic points between stacked trial labels (fontsize 7)


def label_levels(points: list[tuple[float, float]], width: float = 48, height: float = LABEL_LINE) -> list[int]:
    """How many lines up each point's label goes: one more than any earlier point's within ``width`` x ``height`` of
    it (in typographic points, as the labels' offsets: a trial's label at fontsize 7 is about 45 x 8), so that the
    same configuration drawn twice by the tuner, or two trials a few pixels apart, keep readable labels."""
    levels: list[int] = []
    for i, (x, y) in enumerate(points):
        close = [levels[j] for j in range(i) if abs(x - points[j][0]) < width and abs(y - points[j][1]) < height]
        levels.append(max(close) + 1 if close else 0)
    return levels


def complete_reports(trials: list[Trial]) -> list[dict]:
    """The ``report.json`` of every complete trial, in trial order."""
    return [json.loads((t.folder / "report.json").read_text()) for t in trials if t.complete]


def _rows(trials: list[Trial]) -> list[dict]:
    rows = []
    for t, rep in zip([t for t in trials if t.complete], complete_reports(trials)):
        rows.append({"trial": t.id, "params": t.parameters or {}, "mAP50_95": rep["result"]["mAP50_95"],
                     "imgsz": size_text(rep.get("deploy_shape") or rep.get("deploy_imgsz", rep["imgsz"])),
                     "interval": rep.get("latency_ratio_interval"),
                     "latency_ms": rep["result"]["latency_ms"], "size_mb": rep["result"]["size_mb"],
                     "score": t.metrics.get("default"), "baseline": rep["baseline"],
                     "speedup": rep["baseline"]["latency_ms"] / rep["result"]["latency_ms"],
                     "rel_latency": rep["result"]["latency_ms"] / rep["baseline"]["latency_ms"]})
    return rows


def _pixels(size) -> int:
    h, w = hw(size)
    return h * w


def plot(rows: list[dict], front: list[int], path: Path, reference: list | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    sizes = [40 + 60 * r["size_mb"] for r in rows]
    ax.scatter([r["rel_latency"] for r in rows], [r["mAP50_95"] for r in rows], s=sizes, alpha=0.6,
               c=["tab:orange" if i in front else "tab:blue" for i in range(len(rows))], edgecolors="k",
               label="trials (marker area ~ file size)")
    for r in rows:
        if r["interval"]:  # where a re-run's latency ratio should land
            ax.plot(r["interval"], [r["mAP50_95"]] * 2, color="tab:gray", lw=0.8, alpha=0.6)
    for (precision, style), (rect, color, shaped) in itertools.product(
            (("fp32", "-"), ("int8", "--")), ((False, "tab:green", ""), (True, "tab:purple", ", train images' shape"))):
        curve = sorted((p for p in reference or [] if p.precision == precision and p.rect == rect),
                       key=lambda p: _pixels(p.imgsz))
        if curve:
            ax.plot([p.latency_ratio for p in curve], [p.mAP50_95 for p in curve], style, marker=".", color=color,
                    alpha=0.8, label=f"unpruned {precision.upper()} at smaller inputs{shaped} (no training)")
            for p in curve:
                ax.annotate(size_text(p.imgsz), (p.latency_ratio, p.mAP50_95), fontsize=6, color=color,
                            xytext=(-4, -9), textcoords="offset points")
    fx = [rows[i]["rel_latency"] for i in front]
    fy = [rows[i]["mAP50_95"] for i in front]
    ax.step(fx, fy, where="post", color="tab:orange", lw=1.5, label="Pareto front")
    bm = rows[0]["baseline"]["mAP50_95"]
    ax.scatter([1.0], [bm], marker="*", s=300, c="tab:red", edgecolors="k",
               label=f"FP32 baseline ({rows[0]['baseline']['size_mb']:.1f} MB)")
    # Latency relative to the FP32 model timed beside it in the same trial: absolute milliseconds of trials run
    # minutes apart on a shared machine are not comparable (the FP32 model itself measured 23 to 29 ms).
    ax.set_xlabel("latency / FP32 latency timed in the same trial (ONNX Runtime, CPU, batch 1)")
    ax.set_ylabel("mAP50-95 (val)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    xy = [(r["rel_latency"], r["mAP50_95"]) for r in rows]
    at = [(px * 72 / fig.dpi, py * 72 / fig.dpi) for px, py in ax.transData.transform(xy)]  # pixels -> points
    for (x, y), level, r in zip(xy, label_levels(at), rows):
        ax.annotate(f"{r['trial']} {r['imgsz']}px", (x, y), fontsize=7, xytext=(4, 4 + LABEL_LINE * level),
                    textcoords="offset points")
    fig.savefig(path)
    plt.close(fig)


def write_report(trials: list[Trial], out: str | Path, title: str, reference: list | None = None) -> dict:
    """``report.html`` and ``pareto.png`` of the complete ``trials`` in ``out``, with the ``reference`` curves
    (:func:`compression.reference.reference_curves`) when given."""
    rows = _rows(trials)
    if not rows:
        raise UserError(f"no complete trial to report ({len(trials)} trials, none with report.json and model.onnx)"
                        f"{missing_artifacts_hint(trials)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    front = pareto_front([(r["rel_latency"], r["mAP50_95"]) for r in rows])
    png = out / "pareto.png"
    tmp_png = temp_sibling(png)
    plot(rows, front, tmp_png, reference)
    tmp_png.replace(png)
    order = front + [i for i in sorted(range(len(rows)), key=lambda i: -(rows[i]["score"] or 0)) if i not in front]
    keys = sorted({k for r in rows for k in r["params"]})
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["trial", "Pareto", "imgsz", *keys, "mAP50-95",
                                                            "latency ms", "speedup", "size MB", "score"])
    body = []
    for i in order:
        r = rows[i]
        speedup = f"{r['speedup']:.2f}x" + (f" ({1 / r['interval'][1]:.2f}-{1 / r['interval'][0]:.2f})"
                                             if r["interval"] else "")
        cells = [r["trial"], "yes" if i in front else "", r["imgsz"]] + [
            _fmt(r["params"].get(k, "")) for k in keys] + [
            f"{r['mAP50_95']:.4f}", f"{r['latency_ms']:.2f}", speedup, f"{r['size_mb']:.2f}", _fmt(r["score"])]
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    image = base64.b64encode(png.read_bytes()).decode()
    base = rows[0]["baseline"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px 8px;text-align:right}}tr:nth-child(-n+{len(front)}) td{{background:#fff3e0}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(rows)} complete trials; FP32 baseline mAP50-95 {base['mAP50_95']:.4f}, {base['size_mb']:.2f} MB.
Pareto-optimal trials (no other trial is both faster and more accurate) are highlighted and listed first.</p>
<img src="data:image/png;base64,{image}" alt="mAP50-95 against latency">
{_reference_table(reference)}
<table><tr>{head}</tr>{''.join(body)}</table></body></html>"""
    write_atomic(out / "report.html", page)
    return {"trials": len(rows), "pareto": [rows[i]["trial"] for i in front], "html": str(out / "report.html"),
            "png": str(png), "reference_points": len(reference or [])}


def _reference_table(reference: list | None) -> str:
    if not reference:
        return "<p>No reference curves (the unpruned model at smaller inputs) in this report.</p>"
    rows = "".join(f"<tr><td>{size_text(p.imgsz)}</td><td>{p.precision.upper()}</td><td>{p.mAP50_95:.4f}</td>"
                   f"<td>{1 / p.latency_ratio:.2f}x</td><td>{p.size_mb:.2f}</td></tr>"
                   for p in sorted(reference, key=lambda p: (p.rect, p.precision, -_pixels(p.imgsz))))
    return ("<h2>The line to beat: the unpruned model at smaller inputs</h2><p>No training; speedup against the FP32 "
            "model at the base size, timed in the same run. A trial is worth shipping when it lies above these "
            "curves.</p><table><tr><th>imgsz</th><th>precision</th><th>mAP50-95</th><th>speedup</th><th>size MB</th>"
            f"</tr>{rows}</table><h2>Trials</h2>")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
