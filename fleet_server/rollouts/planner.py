"""Turn a plan into exactly which terminals each wave hits: deterministic (the same release over
the same fleet gives the same waves, so a preview is what a create will do) and refused with a
message naming the wave when the sizes cannot add up."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fleet_server.rollouts.errors import BadPlan
from fleet_server.rollouts.releases import ReleaseLike, fits
from fleet_server.rollouts.schemas import RolloutPlan, Targets, WavePlan


@dataclass(frozen=True, slots=True)
class TerminalInfo:
    id: str
    office: str
    profile: str
    tags: tuple[str, ...] = ()
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class OfficeRef:
    id: str
    name: str
    pilot: bool = False
    timezone: str = "Asia/Shanghai"
    maintenance: str = "01:00-05:00"


@dataclass(frozen=True, slots=True)
class PlannedWaves:
    waves: list[list[TerminalInfo]]
    # targeted terminals left out, with why (e.g. their profile is not in the release)
    excluded: list[tuple[str, str]]


def order_key(release: str, terminal: str) -> bytes:
    """A stable shuffle: waves spread over offices, and do not depend on enrolment order."""
    return hashlib.sha256(f"{release}\0{terminal}".encode()).digest()


def matches(targets: Targets, t: TerminalInfo) -> bool:
    """Whether the plan's targets name this terminal (the union of the lists; none: everyone)."""
    if targets.everything():
        return True
    return (
        t.office in targets.offices
        or t.profile in targets.profiles
        or any(tag in targets.tags for tag in t.tags)
        or t.id in targets.terminals
    )


def _wave_label(i: int, wave: WavePlan) -> str:
    return f"wave {i + 1}" + (f" ({wave.name!r})" if wave.name else "")


def _wave_takes(wave: WavePlan, t: TerminalInfo, offices: dict[str, OfficeRef]) -> bool:
    if wave.offices is not None and t.office not in wave.offices:
        return False
    return not (wave.pilot_only and not (offices.get(t.office) and offices[t.office].pilot))


def check_offices(plan: RolloutPlan, offices: dict[str, OfficeRef]) -> None:
    unknown = sorted(o for o in plan.targets.offices if o not in offices)
    if unknown:
        raise BadPlan(f"targets.offices: no such office: {', '.join(unknown)}")
    for i, wave in enumerate(plan.waves):
        unknown = sorted(o for o in wave.offices or () if o not in offices)
        if unknown:
            raise BadPlan(f"{_wave_label(i, wave)}: offices: no such office: {', '.join(unknown)}")


def plan_waves(
    plan: RolloutPlan,
    release: ReleaseLike,
    terminals: Iterable[TerminalInfo],
    offices: dict[str, OfficeRef],
) -> PlannedWaves:
    """Which terminals each wave takes, in wave order; BadPlan naming the wave when it cannot be done."""
    check_offices(plan, offices)
    known = {t.id: t for t in terminals}
    unknown = sorted(t for t in plan.targets.terminals if t not in known)
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise BadPlan(f"targets.terminals: not enrolled: {shown}")
    excluded: list[tuple[str, str]] = []
    eligible: list[TerminalInfo] = []
    for t in known.values():
        if not matches(plan.targets, t):
            continue
        if not t.enabled:
            excluded.append((t.id, "revoked"))
        elif not fits(release.profiles, t.profile):
            excluded.append((t.id, f"device profile {t.profile!r} is not among the release's profiles"))
        else:
            eligible.append(t)
    if not eligible:
        why = f" ({len(excluded)} targeted but excluded: their profiles are not in the release)" if excluded else ""
        raise BadPlan(f"targets: no enrolled terminal is targeted that can take {release.path}{why}")
    eligible.sort(key=lambda t: order_key(release.path, t.id))
    total = len(eligible)
    percent_sum = sum(w.size.percent or 0 for w in plan.waves)
    if percent_sum > 100 + 1e-9:
        raise BadPlan(f"waves: the percentages add up to {percent_sum:g}%, more than 100%")
    remaining = list(eligible)
    waves: list[list[TerminalInfo]] = []
    for i, wave in enumerate(plan.waves):
        label = _wave_label(i, wave)
        candidates = [t for t in remaining if _wave_takes(wave, t, offices)]
        where = ""
        if wave.offices is not None or wave.pilot_only:
            where = " in its offices" if wave.offices is not None else " in pilot offices"
        if wave.size.count is not None:
            n = wave.size.count
        elif wave.size.percent is not None:
            # a non-empty wave never rounds to zero
            n = max(1, math.floor(total * wave.size.percent / 100))
        else:
            n = len(candidates)
        if n > len(candidates):
            size = f"{wave.size.count}" if wave.size.count is not None else f"{wave.size.percent:g}% = {n}"
            raise BadPlan(
                f"{label}: asks for {size} terminal{'s' if n != 1 else ''} but only {len(candidates)}"
                f" targeted terminal{'s are' if len(candidates) != 1 else ' is'} left for it{where}"
                f" ({total} targeted in all; earlier waves took {total - len(remaining)})"
            )
        taken = candidates[:n]
        taken_ids = {t.id for t in taken}
        remaining = [t for t in remaining if t.id not in taken_ids]
        waves.append(taken)
    if remaining:
        raise BadPlan(
            f"waves: {len(remaining)} targeted terminal{'s are' if len(remaining) != 1 else ' is'} in no wave;"
            " end with a wave without a size to take the rest"
        )
    return PlannedWaves(waves, sorted(excluded))


def wave_sizes(waves: Sequence[Sequence[TerminalInfo]]) -> list[int]:
    return [len(w) for w in waves]
