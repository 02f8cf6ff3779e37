"""A self-contained HTML report explaining a linearizability violation.

For each bad key the report draws the operations as bars on a time axis,
one row per process, and marks the longest linearizable prefix the search
found: its operations in green with their order, a path through possible
linearization points, the model state after each, and in red the operation
that could not be linearized before its return.  Everything (SVG, CSS, a
few lines of JS) is inline, so the file opens offline and can be attached to
a bug report as is.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path

from .core import NOT_LINEARIZABLE, UNKNOWN, CheckResult, KeyResult
from .history import Operation

#: Most operations drawn per key; beyond it the window around the failure.
MAX_DRAWN = 400
#: How many of the prefix's last operations the window keeps in view.
CONTEXT_OPS = 60

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; }
.verdict-bad { color: #b00020; } .verdict-unknown { color: #8a6d00; }
.verdict-ok { color: #1b7f3a; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: left;
         font-family: ui-monospace, monospace; font-size: 12px; }
th { background: #f3f3f3; }
tr.fail td { background: #fde7ea; }
tr.hl td { background: #fff3b0; }
.legend span { display: inline-block; margin-right: 1.2em; }
.swatch { display: inline-block; width: 14px; height: 10px; margin-right: 4px;
          vertical-align: middle; border: 1px solid #666; }
svg text { font-family: ui-monospace, monospace; font-size: 10px; }
svg .bar { stroke: #444; stroke-width: 0.6; }
svg .bar.hl { stroke: #000; stroke-width: 2.5; }
.scroll { overflow-x: auto; border: 1px solid #ddd; }
"""

_JS = """
document.querySelectorAll('[data-op]').forEach(function (el) {
  el.addEventListener('mouseenter', function () { hl(el.dataset.op, true); });
  el.addEventListener('mouseleave', function () { hl(el.dataset.op, false); });
});
function hl(id, on) {
  document.querySelectorAll('[data-op="' + id + '"]').forEach(function (el) {
    el.classList.toggle('hl', on);
  });
}
"""

_COLORS = {
    "prefix": "#6cc788",
    "failed": "#e5484d",
    "open": "#d9d9d9",
    "other": "#f0c36d",
}


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def describe_op(op: Operation) -> str:
    """A short human description: ``write 3``, ``cas 1→2``, ``read → nil``."""
    value = op.value
    shown = "nil" if value is None else repr(value)
    if op.f in ("read", "get"):
        return f"{op.f} → {shown}"
    if op.f == "cas" and isinstance(value, tuple) and len(value) == 2:
        a, b = ("nil" if v is None else repr(v) for v in value)
        return f"cas {a}→{b}"
    if op.f == "delete":
        return "delete"
    return f"{op.f} {shown}"


def _key_name(key: str | None) -> str:
    return "(single register)" if key is None else str(key)


def _short(text: str, limit: int = 28) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _window(result: KeyResult) -> list[Operation]:
    """The operations to draw: those up to a little past the failure, and
    of those only the ones near it when there are too many to read."""
    ops = result.ops
    if not ops:
        return []
    focus = [ops[i] for i in result.prefix[-CONTEXT_OPS:]]
    if result.failed_op is not None:
        focus.append(ops[result.failed_op])
    if len(ops) <= MAX_DRAWN or not focus:
        lo = min(op.call_ns for op in ops)
    else:
        lo = min(op.call_ns for op in focus)
    hi = max(op.call_ns for op in ops)
    if result.failed_op is not None:
        failed = ops[result.failed_op]
        end = failed.return_ns if failed.return_ns is not None else failed.call_ns
        hi = end + (end - lo) // 8
    near = [op for op in ops if op.call_ns <= hi and (op.return_ns is None or op.return_ns >= lo)]
    if len(near) > MAX_DRAWN:
        near.sort(key=lambda op: abs(op.call_ns - hi))
        near = near[:MAX_DRAWN]
    keep = {op.id for op in near} | {op.id for op in focus}
    return [op for op in ops if op.id in keep]


def _time_label(delta: float, span: float) -> str:
    if span >= 5e6:
        return f"{delta / 1e6:.1f} ms"
    if span >= 5e3:
        return f"{delta / 1e3:.1f} µs"
    return f"{delta:.0f}"


def _svg(result: KeyResult, drawn: Sequence[Operation]) -> str:
    """The timeline: a row per process, a bar per operation."""
    order = {op_id: i for i, op_id in enumerate(result.prefix)}
    processes = sorted({op.process for op in drawn})
    row = {p: i for i, p in enumerate(processes)}
    t0 = min(op.call_ns for op in drawn)
    closed = [op.return_ns for op in drawn if op.return_ns is not None]
    t1 = max([*closed, *(op.call_ns for op in drawn)])
    span = max(t1 - t0, 1)
    t_end = t1 + span * 0.04  # where open-ended operations stop being drawn
    left, plot_w, row_h, top = 84, max(900, min(6000, 14 * len(drawn))), 22, 28
    width = left + plot_w + 20
    height = top + row_h * len(processes) + 30

    def x(t: float) -> float:
        return left + (t - t0) / (t_end - t0) * plot_w

    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">']
    parts.append(
        '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="6" height="6" fill="#eee"/>'
        '<line x1="0" y1="0" x2="0" y2="6" stroke="#aaa" stroke-width="3"/></pattern></defs>'
    )
    for i in range(11):
        t = t0 + (t_end - t0) * i / 10
        xi = x(t)
        parts.append(
            f'<line x1="{xi:.1f}" y1="{top - 6}" x2="{xi:.1f}" y2="{height - 24}" stroke="#eee"/>'
        )
        parts.append(
            f'<text x="{xi:.1f}" y="{height - 10}" text-anchor="middle">'
            f"{_e(_time_label(t - t0, span))}</text>"
        )
    for p, i in row.items():
        y = top + i * row_h
        parts.append(f'<text x="4" y="{y + 14}">process {p}</text>')
    for op in drawn:
        y = top + row[op.process] * row_h + 3
        end = op.return_ns if op.return_ns is not None else t_end
        x0, x1 = x(op.call_ns), max(x(end), x(op.call_ns) + 3)
        if op.id == result.failed_op:
            kind = "failed"
        elif op.id in order:
            kind = "prefix"
        elif op.return_ns is None:
            kind = "open"
        else:
            kind = "other"
        fill = "url(#hatch)" if kind == "open" else _COLORS[kind]
        # open-ended (outcome unknown): dashed outline, whatever its colour
        dash = ' stroke-dasharray="3 2"' if op.return_ns is None else ""
        label = describe_op(op)
        if op.id in order:
            label = f"#{order[op.id] + 1} {label}"
        tip = [
            f"op {op.id}: {describe_op(op)}",
            f"process {op.process}, {op.status}",
            f"invoke {op.call_ns}, "
            + (f"return {op.return_ns}" if op.return_ns is not None else "never returned"),
        ]
        if op.id in order:
            position = order[op.id]
            tip.append(f"linearized #{position + 1}; state after: {result.states[position]}")
        if op.id == result.failed_op:
            tip.append("cannot be linearized before it returns")
        parts.append(
            f'<g data-op="{op.id}"><title>{_e(chr(10).join(tip))}</title>'
            f'<rect class="bar" data-op="{op.id}" x="{x0:.1f}" y="{y}" '
            f'width="{x1 - x0:.1f}" height="{row_h - 6}" fill="{fill}" rx="2"{dash}/>'
        )
        if x1 - x0 > 30:
            chars = max(3, int((x1 - x0 - 4) / 6.2))
            parts.append(
                f'<text x="{x0 + 3:.1f}" y="{y + 12}" pointer-events="none">'
                f"{_e(_short(label, chars))}</text>"
            )
        parts.append("</g>")
    # A path through possible linearization points of the prefix, in order.
    drawn_ids = {op.id for op in drawn}
    points: list[str] = []
    t_prev = float("-inf")
    for op_id in result.prefix:
        op = result.ops[op_id]
        t = max(float(op.call_ns), t_prev)
        if op.return_ns is not None:
            t = min(t, float(op.return_ns))
        t_prev = t
        if op_id in drawn_ids:
            y_mid = top + row[op.process] * row_h + row_h / 2 - 0.5
            points.append(f"{x(t):.1f},{y_mid:.1f}")
    if len(points) > 1:
        parts.append(
            f'<polyline points="{" ".join(points)}" fill="none" stroke="#1f5fbf" '
            'stroke-width="1" stroke-opacity="0.7"/>'
        )
    for pt in points:
        cx, cy = pt.split(",")
        parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.2" fill="#1f5fbf"/>')
    if result.failed_op is not None:
        failed = result.ops[result.failed_op]
        if failed.return_ns is not None:
            xf = x(failed.return_ns)
            parts.append(
                f'<line x1="{xf:.1f}" y1="{top - 8}" x2="{xf:.1f}" y2="{height - 24}" '
                'stroke="#e5484d" stroke-width="1.5" stroke-dasharray="4 3"/>'
            )
            anchor = "end" if xf > left + plot_w * 0.6 else "start"
            xt = xf - 3 if anchor == "end" else xf + 3
            parts.append(
                f'<text x="{xt:.1f}" y="{top - 12}" fill="#b00020" text-anchor="{anchor}">'
                f"op {failed.id} must have taken effect by here</text>"
            )
    parts.append("</svg>")
    return "".join(parts)


def _key_section(result: KeyResult) -> str:
    drawn = _window(result)
    n_ok = sum(1 for op in result.ops if op.return_ns is not None)
    lines = [f"<h2>Key {_e(_key_name(result.key))}: "]
    css = "verdict-bad" if result.verdict == NOT_LINEARIZABLE else "verdict-unknown"
    lines.append(f'<span class="{css}">{_e(result.verdict)}</span></h2>')
    lines.append(
        f"<p>{len(result.ops)} operations ({n_ok} completed ok). The longest linearizable "
        f"prefix found has {len(result.prefix)} operations"
    )
    if result.failed_op is not None:
        failed = result.ops[result.failed_op]
        state = result.states[-1] if result.states else result.initial_state
        lines.append(
            f"; it breaks at <b>op {failed.id}</b> (<code>{_e(describe_op(failed))}</code>, "
            f"process {failed.process}): it returned at {failed.return_ns} but cannot be "
            f"linearized after the prefix (state <code>{_e(_short(state, 200))}</code>) "
            "or in any other order tried."
        )
    if result.verdict == UNKNOWN:
        lines.append(f"; the search gave up ({_e(result.note or 'time budget spent')}).")
    lines.append("</p>")
    if len(drawn) < len(result.ops):
        lines.append(
            f"<p>Showing the {len(drawn)} of {len(result.ops)} operations around the "
            "failure; later operations do not matter to it.</p>"
        )
    lines.append(
        '<p class="legend">'
        f'<span><i class="swatch" style="background:{_COLORS["prefix"]}"></i>'
        "in the linearizable prefix (#order)</span>"
        f'<span><i class="swatch" style="background:{_COLORS["failed"]}"></i>'
        "where it breaks</span>"
        f'<span><i class="swatch" style="background:{_COLORS["other"]}"></i>'
        "not linearized</span>"
        '<span><i class="swatch" style="background:#ddd"></i>outcome unknown (open-ended)</span>'
        "<span>• — one possible linearization point</span></p>"
    )
    lines.append(f'<div class="scroll">{_svg(result, drawn)}</div>')
    lines.append(
        "<h3>Linearizable prefix and model state</h3><table>"
        "<tr><th>#</th><th>op</th><th>process</th><th>invoke</th><th>return</th>"
        "<th>state after</th></tr>"
    )
    lines.append(
        f'<tr><td>0</td><td colspan="4">initial state</td><td>{_e(result.initial_state)}</td></tr>'
    )
    for i, (op_id, state) in enumerate(zip(result.prefix, result.states, strict=True)):
        op = result.ops[op_id]
        ret = "—" if op.return_ns is None else op.return_ns
        lines.append(
            f'<tr data-op="{op.id}"><td>{i + 1}</td><td>{_e(describe_op(op))} '
            f"<small>(op {op.id})</small></td><td>{op.process}</td><td>{op.call_ns}</td>"
            f"<td>{ret}</td><td>{_e(_short(state, 200))}</td></tr>"
        )
    if result.failed_op is not None:
        op = result.ops[result.failed_op]
        lines.append(
            f'<tr class="fail" data-op="{op.id}"><td>✗</td><td>{_e(describe_op(op))} '
            f"<small>(op {op.id})</small></td><td>{op.process}</td><td>{op.call_ns}</td>"
            f"<td>{op.return_ns}</td><td>cannot be linearized</td></tr>"
        )
    lines.append("</table>")
    return "\n".join(lines)


def render_html_report(result: CheckResult, title: str = "Linearizability report") -> str:
    """The report as a string (see :func:`write_html_report`)."""
    bad = [r for r in result.keys.values() if r.verdict == NOT_LINEARIZABLE]
    unknown = [r for r in result.keys.values() if r.verdict == UNKNOWN]
    css = {
        NOT_LINEARIZABLE: "verdict-bad",
        UNKNOWN: "verdict-unknown",
    }.get(result.verdict, "verdict-ok")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f'<h1>{_e(title)}: <span class="{css}">{_e(result.verdict)}</span></h1>',
        f"<p>Model: <code>{_e(result.model)}</code>. {len(result.keys)} key(s) checked in "
        f"{result.elapsed_s:.2f} s.",
    ]
    if bad:
        names = ", ".join(_e(_key_name(r.key)) for r in bad)
        out.append(f" Not linearizable: {len(bad)} key(s): {names}.")
    if unknown:
        names = ", ".join(_e(_key_name(r.key)) for r in unknown)
        out.append(f" Undecided (time budget): {names}.")
    out.append("</p>")
    for r in bad or unknown:
        out.append(_key_section(r))
    if not bad and not unknown:
        out.append("<p>Every key is linearizable; nothing to explain.</p>")
    out.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(out)


def write_html_report(
    result: CheckResult,
    path: str | os.PathLike[str],
    title: str = "Linearizability report",
) -> Path:
    """Write the report for ``result`` to ``path`` and return the path.

    Keys that are not linearizable get a timeline and a table each (keys left
    undecided are drawn instead when no key is bad).
    """
    target = Path(path)
    target.write_text(render_html_report(result, title), encoding="utf-8")
    return target
