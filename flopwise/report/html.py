"""The report as one self-contained HTML page: table and plots, no script, no external URL.

Everything the page needs is inside the file (CSS inline, PNGs as base64 data URIs), so it can
be mailed, attached to an issue or opened offline, and shows the same everywhere.  Every piece
of text that comes from a run (names, paths, devices) is HTML-escaped.
"""

from __future__ import annotations

import base64
from html import escape

from flopwise import __version__
from flopwise.report.runs import Run
from flopwise.report.series import PLOTS
from flopwise.report.table import final_table

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; margin-bottom: 0.2rem; }
p.note { color: #555; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 1rem 0; }
th, td { padding: 0.3rem 0.6rem; border-bottom: 1px solid #ddd; white-space: nowrap; }
th { background: #f4f4f4; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.unfinished td { color: #8a5a00; }
.scroll { overflow-x: auto; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(30rem, 100%), 1fr)); gap: 1rem; }
figure { margin: 0.5rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9rem; }
ul.runs { font-size: 0.9rem; color: #444; }
code { font-size: 0.85rem; }
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def table_html(runs: list[Run]) -> str:
    """The final-figures table: one ``<tr>`` per run in ``<tbody>``, unfinished runs marked."""
    table = final_table(runs)
    head = "".join(f"<th>{escape(header)}</th>" for header in table.headers)
    body = []
    for run, row in zip(runs, table.rows):
        cells = "".join(f'<td class="num">{escape(cell)}</td>' if numeric else f"<td>{escape(cell)}</td>"
                        for cell, numeric in zip(row, table.numeric))
        body.append(f'<tr class="{"finished" if run.finished else "unfinished"}">{cells}</tr>')
    return (f'<div class="scroll"><table class="runs"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def render_html(runs: list[Run], images: dict[str, bytes]) -> str:
    """The whole page; ``images`` maps each plot name (see ``series.PLOTS``) to its PNG bytes."""
    folders = "".join(f"<li><b>{escape(run.name)}</b>: <code>{escape(str(run.path))}</code>"
                      f"{escape(f' ({run.final.device})' if run.final.device else '')}</li>" for run in runs)
    figures = "".join(
        f'<figure id="{spec.name}"><img src="{data_uri(images[spec.name])}" alt="{escape(spec.title)}">'
        f"<figcaption>{escape(spec.y_label)} against {escape(spec.x_label)}"
        f"{' (log scale)' if spec.log_x else ''}, one line per run.</figcaption></figure>"
        for spec in PLOTS if spec.name in images)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>flopwise report: {escape(", ".join(run.name for run in runs))}</title>
<link rel="icon" href="data:,">
<style>{STYLE}</style>
</head>
<body>
<h1>flopwise report</h1>
<p class="note">{len(runs)} run{"s" if len(runs) != 1 else ""}. Held-out loss is the evaluation at the end of the
budget (p = 1), or the latest one for an unfinished run; tokens/s and MFU are totals over training seconds.</p>
{table_html(runs)}
<ul class="runs">{folders}</ul>
<div class="plots">{figures}</div>
<p class="note">Made by flopwise {escape(__version__)}; the numbers behind each plot are in report.json.</p>
</body>
</html>
"""
