"""SVG charts for office managers, built as plain strings (no JS, embeddable with <img>)."""

from __future__ import annotations

from html import escape

from fleet_server.usage.schemas import BusyHours, ItemTable, OfficeComparison

FONT = "'Noto Sans CJK SC','Microsoft YaHei','PingFang SC',sans-serif"
COMPLETED_COLOUR = "#2e7d32"
ABANDONED_COLOUR = "#c62828"
BAR_COLOUR = "#1565c0"
GRID_COLOUR = "#e0e0e0"

# metric -> (label, is a share shown as %)
OFFICE_METRICS: dict[str, tuple[str, bool]] = {
    "completion_rate": ("办结率 completion rate", True),
    "abandon_rate": ("放弃率 abandon rate", True),
    "face_login_share": ("刷脸登录占比 face-login share", True),
    "median_duration_s": ("办理时长中位数 median duration (s)", False),
    "p90_duration_s": ("办理时长 P90 duration (s)", False),
    "sessions_per_terminal_day": ("每台每日业务量 sessions per terminal-day", False),
    "started": ("业务量 sessions started", False),
}


def _text(
    x: float,
    y: float,
    text: str,
    *,
    size: int = 12,
    anchor: str = "start",
    colour: str = "#212121",
    weight: str = "normal",
) -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{colour}"'
        f' font-weight="{weight}">{escape(text)}</text>'
    )


def _rect(x: float, y: float, w: float, h: float, colour: str, title: str = "") -> str:
    tip = f"<title>{escape(title)}</title>" if title else ""
    return (
        f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0.0):.1f}" height="{max(h, 0.0):.1f}"'
        f' fill="{colour}">{tip}</rect>'
    )


def _svg(width: int, height: int, title: str, parts: list[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
        f' viewBox="0 0 {width} {height}" font-family="{escape(FONT)}" role="img">'
        f"<title>{escape(title)}</title>"
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>'
        f"{_text(12, 22, title, size=15, weight='bold')}{''.join(parts)}</svg>"
    )


def _fmt(value: float | None, share: bool) -> str:
    if value is None:
        return "–"
    return f"{value * 100:.1f}%" if share else f"{value:,.1f}" if value % 1 else f"{value:,.0f}"


def busy_hours_svg(profile: BusyHours, title: str) -> str:
    """Bars of the share of sessions started in each office-local hour of the day."""
    width, height, left, top, bottom = 760, 300, 48, 40, 40
    plot_w, plot_h = width - left - 16, height - top - bottom
    peak = max((h.share for h in profile.by_hour), default=0.0) or 1.0
    slot = plot_w / 24
    parts = []
    for i in range(5):
        y = top + plot_h * (1 - i / 4)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="{GRID_COLOUR}"/>')
        parts.append(_text(left - 6, y + 4, f"{peak * i / 4 * 100:.0f}%", size=10, anchor="end"))
    for h in profile.by_hour:
        bar_h = plot_h * h.share / peak
        x = left + h.hour * slot
        parts.append(
            _rect(
                x + 2,
                top + plot_h - bar_h,
                slot - 4,
                bar_h,
                BAR_COLOUR,
                f"{h.hour:02d}:00–{h.hour:02d}:59 · {h.started} · {h.share * 100:.1f}%",
            )
        )
        parts.append(_text(x + slot / 2, top + plot_h + 14, f"{h.hour}", size=10, anchor="middle"))
    parts.append(
        _text(
            left + plot_w / 2,
            height - 8,
            f"时段 hour of day · {profile.date_from} – {profile.date_to} · {profile.started} sessions",
            size=11,
            anchor="middle",
        )
    )
    return _svg(width, height, title, parts)


def items_svg(table: ItemTable, title: str, limit: int = 40) -> str:
    """Horizontal stacked bars per service item: completed and abandoned sessions."""
    rows = sorted(table.rows, key=lambda r: (-(r.completed + r.abandoned), r.service_code))[:limit]
    row_h, left, top, right = 22, 230, 56, 120
    width = 860
    height = top + row_h * max(len(rows), 1) + 30
    plot_w = width - left - right
    peak = max((r.completed + r.abandoned for r in rows), default=0) or 1
    parts = [
        _rect(left, 32, 12, 12, COMPLETED_COLOUR),
        _text(left + 16, 43, "办结 completed", size=11),
        _rect(left + 140, 32, 12, 12, ABANDONED_COLOUR),
        _text(left + 156, 43, "放弃 abandoned", size=11),
    ]
    if not rows:
        parts.append(_text(left, top + 14, "no sessions in this range", size=12, colour="#757575"))
    for i, r in enumerate(rows):
        y = top + i * row_h
        done_w = plot_w * r.completed / peak
        gave_up_w = plot_w * r.abandoned / peak
        parts.append(_text(left - 8, y + 15, f"{r.service_code} {r.name}", size=12, anchor="end"))
        parts.append(_rect(left, y + 3, done_w, row_h - 6, COMPLETED_COLOUR, f"{r.name}: {r.completed} completed"))
        parts.append(
            _rect(left + done_w, y + 3, gave_up_w, row_h - 6, ABANDONED_COLOUR, f"{r.name}: {r.abandoned} abandoned")
        )
        rate = _fmt(r.abandon_rate, True)
        parts.append(
            _text(
                left + done_w + gave_up_w + 6,
                y + 15,
                f"{r.completed + r.abandoned} · 放弃 {rate}",
                size=11,
                colour="#616161",
            )
        )
    return _svg(width, height, title, parts)


def offices_svg(comparison: OfficeComparison, metric: str, title: str) -> str:
    """Horizontal bars comparing one figure across offices (pilot offices marked)."""
    label, share = OFFICE_METRICS[metric]
    offices = comparison.offices
    row_h, left, top, right = 24, 170, 50, 80
    width = 760
    height = top + row_h * max(len(offices), 1) + 34
    plot_w = width - left - right
    values = [getattr(o, metric) for o in offices]
    peak = max((v for v in values if v is not None), default=0) or 1
    parts = []
    for i, (o, v) in enumerate(zip(offices, values, strict=True)):
        y = top + i * row_h
        name = f"{o.name}{' ★' if o.pilot else ''}"
        parts.append(_text(left - 8, y + 16, name, size=12, anchor="end"))
        w = plot_w * (v or 0) / peak
        parts.append(_rect(left, y + 4, w, row_h - 8, BAR_COLOUR, f"{o.name}: {_fmt(v, share)}"))
        parts.append(_text(left + w + 6, y + 16, _fmt(v, share), size=11, colour="#616161"))
    parts.append(
        _text(left, height - 10, f"{label} · {comparison.date_from} – {comparison.date_to} · ★ 试点 pilot", size=11)
    )
    return _svg(width, height, title, parts)
