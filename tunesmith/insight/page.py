"""The report's HTML building blocks (tunesmith/insight/report.py and kinds.py): escaping, numbers, tables, notes,
sections, one block per run, and matplotlib figures as embedded PNGs. No script, no external URL."""
from __future__ import annotations

import base64
import html
import io
import math

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf"]                       # matplotlib tab10, one per run (cycled past 10 runs)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:1.5em} h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f3f3f3} td.l,th.l{text-align:left} img{max-width:100%} .note{color:#666;font-style:italic}
.swatch{display:inline-block;width:12px;height:12px;margin-right:6px;vertical-align:middle}
.clean{color:#2a7d2a;font-weight:bold} .warnings{color:#b07000;font-weight:bold} .blocking{color:#c00;font-weight:bold}
.flag{background:#fde2e1;border-left:4px solid #c00;padding:6px 10px} .tok{padding:1px 2px;border-radius:3px}
img.saliency{width:224px;image-rendering:pixelated} .explained{border-bottom:1px solid #eee;padding:4px 0}
pre{white-space:pre-wrap;background:#f7f7f7;padding:6px;margin:0;font-size:.9em}
mark{background:#fd6;padding:0 2px;border-radius:3px} mark sub{color:#555;font-size:.7em;margin-left:2px}
"""


def e(x) -> str:
    return html.escape(str(x))


def fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return e(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}" if abs(v) >= 1e4 or (v and abs(v) < 1e-3) else f"{v:.4f}"
    return e(v)


def scalar(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def table(header: list[str], rows: list[list], left: int = 1) -> str:
    """HTML table; the first `left` columns are left-aligned text (already HTML), the rest formatted numbers."""
    cls = lambda i: ' class="l"' if i < left else ""
    head = "".join(f"<th{cls(i)}>{e(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{c if i < left else fmt(c)}</td>" for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def png(fig) -> str:
    """A matplotlib Figure as an <img> with a base64 PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode("ascii")}">'


def picture(image, alt: str = "image", max_side: int = 480) -> str:
    """A PIL image as an <img> with a base64 PNG data URI, shrunk to at most `max_side` pixels a side."""
    image = image.copy()
    image.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return f'<img alt="{e(alt)}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode("ascii")}">'


def run_label(i: int, run: dict) -> str:
    return f'<span class="swatch" style="background:{COLORS[i % len(COLORS)]}"></span>{e(run["name"])}'


def note(text: str) -> str:
    return f'<p class="note">{e(text)}</p>'


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}">\n<h2>{e(title)}</h2>\n{body}\n</section>\n'


def per_run(runs: list[dict], sid: str, render) -> str:
    """One <div id="{sid}-{i}"> per run, headed by the run name when there are several."""
    parts = []
    for i, run in enumerate(runs):
        head = f"<h3>{run_label(i, run)}</h3>" if len(runs) > 1 else ""
        parts.append(f'<div class="run" id="{sid}-{i}">{head}{render(run)}</div>')
    return "\n".join(parts)
