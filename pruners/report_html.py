"""The report as pictures: one self-contained HTML page (inline SVG and CSS, no script, no
network) and a matplotlib width chart. Rendered from a :class:`pruners.report.PruneReport`.
"""

from __future__ import annotations

import html
from typing import Any, Optional

__all__ = ["render_html", "width_figure"]

_BEFORE, _AFTER, _ACCENT = "#c8ced6", "#2f6fb3", "#d9822b"
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:1100px;color:#1d2329;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e3e6ea;
padding-bottom:4px}.muted{color:#66707a}.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{border:1px solid #e3e6ea;border-radius:8px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:20px}table{border-collapse:collapse;font-size:13px}
td,th{padding:3px 10px;border-bottom:1px solid #eef0f2;text-align:right}
td:first-child,th:first-child,td.text,th.text{text-align:left}.ok{color:#1f7a3a}.bad{color:#b3261e}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:-1px}
svg text{font:11px system-ui,sans-serif;fill:#1d2329}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _legend() -> str:
    return (f'<div class="legend muted"><span style="background:{_BEFORE}"></span>before'
            f'<span style="background:{_AFTER}"></span>after</div>')


def _bars(rows: list[tuple[str, float, float]], unit: str = "", label_w: int = 260,
          width: int = 1000, bar_h: int = 14, single: bool = False) -> str:
    """Horizontal paired bars (before behind, after in front), one row per item; ``single``
    draws one bar per row (``after``)."""
    if not rows:
        return '<p class="muted">nothing to show</p>'
    top = max(max(b, a) for _, b, a in rows) or 1.0
    plot_w = width - label_w - 150
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
           f'height="{len(rows) * (bar_h + 4) + 6}" role="img">']
    for i, (name, before, after) in enumerate(rows):
        y = 3 + i * (bar_h + 4)
        wb, wa = plot_w * before / top, plot_w * after / top
        short = name if len(name) <= 40 else "…" + name[-39:]
        label = f"{_fmt(after)}{unit}" + ("" if single else f" / {_fmt(before)}{unit}")
        back = "" if single else (f'<rect x="{label_w}" y="{y}" width="{wb:.1f}" '
                                  f'height="{bar_h}" fill="{_BEFORE}"/>')
        inset = 1 if single else 3
        out.append(f'<text x="{label_w - 6}" y="{y + bar_h - 3}" text-anchor="end">'
                   f'<title>{_e(name)}</title>{_e(short)}</text>{back}'
                   f'<rect x="{label_w}" y="{y + inset}" width="{wa:.1f}" '
                   f'height="{bar_h - 2 * inset}" fill="{_AFTER}"/><text '
                   f'x="{label_w + max(wb, wa) + 6:.1f}" y="{y + bar_h - 3}">{label}</text>')
    out.append("</svg>")
    return "".join(out)


def _fmt(v: float) -> str:
    if v >= 1e9:
        return f"{v / 1e9:.2f}G"
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e4:
        return f"{v / 1e3:.1f}k"
    return f"{v:.3g}" if isinstance(v, float) and v != int(v) else f"{v:g}"


def _curves(table: Any, width: int = 1000, height: int = 320) -> str:
    """Sensitivity curves: metric against the fraction of the group's units removed, one
    polyline per group; the ten most sensitive named in the legend."""
    curves = table.curves
    if not curves:
        return '<p class="muted">empty table</p>'
    values = [table.baseline] + [m for c in curves for m in c.metric]
    lo, hi = min(values), max(values)
    pad = 0.05 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.05  # a flat scan sits mid-plot
    lo, hi = lo - pad, hi + pad
    left, right, top, bottom = 60, 260, 12, 34
    pw, ph = width - left - right, height - top - bottom

    def xy(f: float, m: float) -> tuple[float, float]:
        return left + pw * f, top + ph * (hi - m) / (hi - lo)

    worst = sorted(curves, key=lambda c: min(c.metric))[:10]
    palette = ["#2f6fb3", "#d9822b", "#1f7a3a", "#b3261e", "#7b4bb3", "#0f8b8d", "#a0522d",
               "#c2185b", "#5d6d7e", "#8e9c2b"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#e3e6ea"/>']
    for t in range(5):
        m = lo + (hi - lo) * t / 4
        _, y = xy(0, m)
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{m:.3g}</text>'
                   f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#f0f2f4"/>')
    for t in range(6):
        x, _ = xy(t / 5, lo)
        out.append(f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{t / 5:.1f}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 4}" text-anchor="middle">fraction of the '
               'group\'s channels removed</text>')
    for c in curves:
        color = palette[worst.index(c)] if c in worst else "#c8ced6"
        pts = [xy(0, table.baseline)] + [xy(n / c.units, m) for n, m in zip(c.removed, c.metric)]
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.4" points="'
                   + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + f'"><title>{_e(c.layers[0])}'
                   "</title></polyline>")
    for i, c in enumerate(worst):
        y = top + 10 + i * 16
        out.append(f'<rect x="{left + pw + 12}" y="{y - 8}" width="10" height="10" '
                   f'fill="{palette[i]}"/><text x="{left + pw + 28}" y="{y + 1}">'
                   f'{_e(c.layers[0][-34:])}</text>')
    out.append("</svg>")
    return "".join(out)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    """Numbers right-aligned, text left-aligned."""
    def cell(tag: str, v: Any) -> str:
        text = isinstance(v, str) and not v.replace(".", "").replace("%", "").isdigit()
        return f"<{tag}{' class=text' if text else ''}>{_e(v)}</{tag}>"

    first = rows[0] if rows else []
    return ("<table><tr>" + "".join(cell("th", h) if i < len(first) and "class=text" in
                                    cell("td", first[i]) else f"<th>{_e(h)}</th>"
                                    for i, h in enumerate(head)) + "</tr>"
            + "".join("<tr>" + "".join(cell("td", v) for v in r) + "</tr>" for r in rows)
            + "</table>")


def render_html(report: Any, sensitivity: Any = None, title: Optional[str] = None) -> str:
    """The page as a string; every asset inline."""
    r = report
    verdict = ("not compared (inexact units change normalisation statistics)" if r.verify is None
               else f'<span class="{"ok" if r.verify.ok else "bad"}">{_e(r.verify)}</span>')
    changed = [l for l in r.layers if (l.out_before, l.in_before) != (l.out_after, l.in_after)]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_e(title or 'Pruning report')}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title or 'Pruning report')}</h1><p class='muted'>target {_e(r.target)}</p>",
        "<section id='summary'><div class='cards'>",
        f"<div class='card'>FLOPs<b>{100 * r.flops_ratio:.1f}%</b>{_fmt(r.flops_after)} of "
        f"{_fmt(r.flops_before)}</div>",
        f"<div class='card'>parameters<b>{100 * r.params_ratio:.1f}%</b>{_fmt(r.params_after)} "
        f"of {_fmt(r.params_before)}</div>",
        f"<div class='card'>layers changed<b>{len(changed)}</b>of {len(r.layers)}</div>",
        f"<div class='card'>engine time<b>{sum(r.seconds.values()):.2f} s</b>all stages</div>",
        "</div></section>",
        "<section id='widths'><h2>Output width of every conv/linear, in model order</h2>",
        _legend(), _bars([(l.module, l.out_before, l.out_after) for l in r.layers]), "</section>",
        "<section id='blocks'><h2>FLOPs and parameters per block</h2>", _legend(),
        "<h3 class='muted'>FLOPs</h3>",
        _bars([(b.name, b.flops_before, b.flops_after) for b in r.blocks if b.flops_before]),
        "<h3 class='muted'>parameters</h3>",
        _bars([(b.name, b.params_before, b.params_after) for b in r.blocks]), "</section>",
        "<section id='frozen'><h2>Frozen channels and why</h2>",
        _table(["channels", "reason"], [[f.count, f.reason] for f in r.frozen])
        if r.frozen else "<p class='muted'>nothing frozen</p>", "</section>",
        "<section id='check'><h2>Verification and engine time</h2>", f"<p>check: {verdict}</p>",
        _bars([(k, v, v) for k, v in r.seconds.items()], unit=" s", label_w=160, single=True),
        "</section>"]
    if r.recovery is not None:
        parts += ["<section id='recovery'><h2>Recovery without training</h2>",
                  _table(["method", "output error before", "after", "layers changed", "samples",
                          "seconds"],
                         [[s.method, f"{s.error_before:.4g}", f"{s.error_after:.4g}",
                           len(s.changed), s.samples, f"{s.seconds:.2f}"]
                          for s in r.recovery.steps]), "</section>"]
    if sensitivity is not None:
        parts += ["<section id='sensitivity'><h2>Sensitivity: metric when one group is "
                  f"pruned (unpruned {sensitivity.baseline:.4g})</h2>", _curves(sensitivity),
                  "</section>"]
    if r.steps:
        parts += ["<section id='steps'><h2>Iterative steps</h2>",
                  _table(["step", "FLOPs", "params", "metric"],
                         [[s.step, f"{100 * s.flops_ratio:.1f}%", f"{100 * s.params_ratio:.1f}%",
                           s.metric] for s in r.steps]), "</section>"]
    if r.notes:
        parts += ["<section id='notes'><h2>Notes</h2><ul>"]
        parts += [f"<li>{_e(n)}</li>" for n in r.notes] + ["</ul></section>"]
    parts.append("</body></html>")
    return "".join(parts)


def width_figure(report: Any):
    """A matplotlib figure: output widths before and after of every conv/linear."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report.layers
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(layers)), 3.6))
    xs = range(len(layers))
    ax.bar(xs, [l.out_before for l in layers], color=_BEFORE, label="before", width=0.9)
    ax.bar(xs, [l.out_after for l in layers], color=_AFTER, label="after", width=0.6)
    ax.set_xlabel("conv/linear layers in model order")
    ax.set_ylabel("output channels")
    ax.set_title(f"{report.target}: FLOPs {100 * report.flops_ratio:.1f}%, params "
                 f"{100 * report.params_ratio:.1f}%")
    ax.legend()
    ax.margins(x=0.01)
    fig.tight_layout()
    return fig
