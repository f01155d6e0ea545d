"""Presentation of `octopus-rt eval` results: the text / Markdown table and the sweep plot (Pillow).

No matplotlib: the plot is drawn with Pillow so the evaluation needs only the `data` extra.
"""

from __future__ import annotations

import math
from pathlib import Path

from octopus_rt.training.eval_metrics import Estimate

__all__ = ["format_estimate", "format_table", "plot_sweep"]


def format_estimate(est: Estimate, metric: str) -> tuple[str, str, str]:
    """(value, n, 95 % CI) as strings; proportions and IoUs in percent, correlations as 3 decimals."""
    if est.n == 0 or not math.isfinite(est.value):
        return "n/a", str(est.n), ""
    if metric in ("SRCC",) or metric.startswith("PLCC"):
        return f"{est.value:.3f}", str(est.n), "-"
    ci = f"[{100 * est.low:.1f}, {100 * est.high:.1f}]" if math.isfinite(est.low) else ""
    return f"{100 * est.value:.1f}", str(est.n), ci


def format_table(report, markdown: bool = False) -> str:
    """One block per task: rows (sub-task, metric, system, value %, n, 95 % CI)."""
    header = ("sub-task", "metric", "system", "value", "n", "95% CI")
    lines: list[str] = []
    tasks: list[str] = []
    for row in report.rows:
        if row.task not in tasks:
            tasks.append(row.task)
    for task in tasks:
        body = [(r.subtask, r.metric, r.system, *format_estimate(r.estimate, r.metric))
                for r in report.rows if r.task == task]
        if markdown:
            lines.append(f"**{task}**\n")
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "|".join("---" for _ in header) + "|")
            lines += ["| " + " | ".join(cells) + " |" for cells in body]
        else:
            widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
            lines.append(f"== {task} ==")
            lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
            lines += ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths)) for cells in body]
        lines.append("")
    for note in report.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines).rstrip() + "\n"


def plot_sweep(sweep: dict, path: str | Path, size: tuple[int, int] = (640, 420)) -> Path:
    """Line plot of mIoU vs tau (log axis), one line per point mapping, as a PNG at `path`."""
    from PIL import Image, ImageDraw

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    left, right, top, bottom = 60, 20, 40, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    taus = [float(t) for t in sweep["taus"]]
    curves = sweep["miou"]
    all_values = [v for values in curves.values() for v in values]
    y_low = max(0.0, min(all_values) - 0.05)
    y_high = min(1.0, max(all_values) + 0.05)
    if y_high - y_low < 0.1:
        y_high = min(1.0, y_low + 0.1)
    x_low, x_high = math.log(min(taus)), math.log(max(taus))

    def xy(tau: float, value: float) -> tuple[float, float]:
        fx = 0.5 if x_high == x_low else (math.log(tau) - x_low) / (x_high - x_low)
        fy = (value - y_low) / (y_high - y_low)
        return left + fx * (width - left - right), height - bottom - fy * (height - top - bottom)

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for tau in taus:
        x, _ = xy(tau, y_low)
        draw.line([x, height - bottom, x, height - bottom + 5], fill="black")
        draw.text((x - 10, height - bottom + 8), f"{tau:g}", fill="black")
    for k in range(6):
        value = y_low + k * (y_high - y_low) / 5
        _, y = xy(taus[0], value)
        draw.line([left - 5, y, left, y], fill="black")
        draw.text((8, y - 6), f"{value:.2f}", fill="black")
    colours = {"paper": (31, 119, 180), "quadrant": (214, 39, 40)}
    for k, (mapping, values) in enumerate(curves.items()):
        colour = colours.get(mapping, (44, 160, 44))
        points = [xy(t, v) for t, v in zip(taus, values)]
        draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.line([left + 10, top + 12 + 16 * k, left + 30, top + 12 + 16 * k], fill=colour, width=2)
        draw.text((left + 35, top + 6 + 16 * k), f"mapping: {mapping}", fill="black")
    best = sweep.get("best", {})
    title = f"grounding mIoU vs tau ({sweep.get('split', 'val')} split, n={sweep.get('n', '?')})"
    if best:
        title += f"; best tau={best['tau']:g}, {best['point_mapping']}"
    draw.text((left, 12), title, fill="black")
    draw.text((width // 2 - 30, height - 20), "tau (log scale)", fill="black")
    image.save(path, format="PNG")
    return path
