"""The console's own SVG charts (the usage service's bar charts live in fleet_server.usage.charts).

Plain strings, every text through `html.escape`: safe to place inline in a page.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

from fleet_server.usage.charts import BAR_COLOUR, COMPLETED_COLOUR, FONT, GRID_COLOUR
from fleet_server.usage.schemas import BusyHours

WEEKDAYS_ZH = ("周一", "周二", "周三", "周四", "周五", "周六", "周日")
WEEKDAYS_EN = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def _text(x: float, y: float, text: str, size: int = 11, anchor: str = "start", colour: str = "#212121") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{colour}">{escape(text)}</text>'
    )


def _frame(width: int, height: int, title: str, parts: list[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%"'
        f' font-family="{escape(FONT)}" role="img" aria-label="{escape(title)}">'
        f"<title>{escape(title)}</title>"
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>{"".join(parts)}</svg>'
    )


def heatmap_svg(busy: BusyHours, title: str, lang: str = "zh") -> str:
    """Weekday x hour grid, darker for a larger share of the range's sessions; numbers in tooltips."""
    days = WEEKDAYS_ZH if lang == "zh" else WEEKDAYS_EN
    left, top, cell_w, cell_h = 44, 24, 30, 26
    width, height = left + 24 * cell_w + 10, top + 7 * cell_h + 26
    counts = {(c.weekday, c.hour): (c.started, c.share) for c in busy.cells}
    peak = max((n for n, _ in counts.values()), default=0) or 1
    parts = [_text(left + h * cell_w + cell_w / 2, top - 8, f"{h}", 10, "middle") for h in range(24)]
    for d in range(7):
        y = top + d * cell_h
        parts.append(_text(left - 6, y + cell_h / 2 + 4, days[d], 11, "end"))
        for h in range(24):
            n, share = counts.get((d, h), (0, 0.0))
            # lightness 97% (none) .. 30% (the busiest hour): readable in print and for colour-blind eyes
            light = 97 - 67 * (n / peak)
            tip = f"{days[d]} {h:02d}:00–{h:02d}:59 · {n} · {share * 100:.1f}%"
            parts.append(
                f'<rect x="{left + h * cell_w + 1}" y="{y + 1}" width="{cell_w - 2}" height="{cell_h - 2}"'
                f' fill="hsl(212,70%,{light:.0f}%)"><title>{escape(tip)}</title></rect>'
            )
    parts.append(_text(left, height - 6, f"{busy.date_from} – {busy.date_to} · {busy.started}", 11))
    return _frame(width, height, title, parts)


@dataclass(frozen=True, slots=True)
class WeekPoint:
    label: str  # first day of the week, e.g. 11-23
    started: int
    completion_rate: float | None


def trend_svg(points: list[WeekPoint], title: str, started_label: str, rate_label: str) -> str:
    """Sessions per week as bars, the completion rate as a line over them."""
    width, height, left, top, bottom, right = 760, 240, 56, 20, 44, 56
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max((p.started for p in points), default=0) or 1
    slot = plot_w / max(len(points), 1)
    parts = []
    for i in range(5):
        y = top + plot_h * (1 - i / 4)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="{GRID_COLOUR}"/>')
        parts.append(_text(left - 6, y + 4, f"{peak * i / 4:,.0f}", 10, "end"))
        parts.append(_text(left + plot_w + 6, y + 4, f"{i * 25}%", 10, "start", COMPLETED_COLOUR))
    line: list[str] = []
    for i, p in enumerate(points):
        x = left + i * slot
        h = plot_h * p.started / peak
        rate = "–" if p.completion_rate is None else f"{p.completion_rate * 100:.1f}%"
        parts.append(
            f'<rect x="{x + slot * 0.15:.1f}" y="{top + plot_h - h:.1f}" width="{slot * 0.7:.1f}" height="{h:.1f}"'
            f' fill="{BAR_COLOUR}"><title>{escape(f"{p.label} · {p.started} · {rate}")}</title></rect>'
        )
        parts.append(_text(x + slot / 2, top + plot_h + 14, p.label, 10, "middle"))
        if p.completion_rate is not None:
            line.append(f"{x + slot / 2:.1f},{top + plot_h * (1 - p.completion_rate):.1f}")
    if len(line) > 1:
        parts.append(f'<polyline points="{" ".join(line)}" fill="none" stroke="{COMPLETED_COLOUR}" stroke-width="2"/>')
    for pt in line:
        cx, cy = pt.split(",")
        parts.append(f'<circle cx="{cx}" cy="{cy}" r="3" fill="{COMPLETED_COLOUR}"/>')
    parts.append(_text(left, height - 8, f"■ {started_label}", 11, "start", BAR_COLOUR))
    parts.append(_text(left + 260, height - 8, f"● {rate_label}", 11, "start", COMPLETED_COLOUR))
    return _frame(width, height, title, parts)
