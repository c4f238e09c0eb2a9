"""Citizen traffic at a terminal: which service items, how often, how long, how many give up.

Pure logic with an injected random generator, so the same seed gives the same day.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from importlib import resources
from typing import Any

import yaml

BEIJING = timezone(timedelta(hours=8))

# Share of the daily peak by local hour: a morning rush after opening, a lunch dip, an afternoon hump.
HOURLY_PROFILE = {8: 0.5, 9: 1.0, 10: 0.95, 11: 0.7, 12: 0.35, 13: 0.6, 14: 0.9, 15: 0.85, 16: 0.6}
ABANDON_STEPS = ("face_login", "id_card", "confirm", "print", "sms_code")


@dataclass(frozen=True, slots=True)
class ServiceItem:
    code: str
    name: str
    name_en: str
    category: str
    face_login: bool
    weight: float
    typical_s: float


@dataclass(frozen=True, slots=True)
class Catalogue:
    items: tuple[ServiceItem, ...]

    def by_code(self) -> dict[str, ServiceItem]:
        return {i.code: i for i in self.items}


def load_catalogue() -> Catalogue:
    """The service-item catalogue shipped with the wire package."""
    text = resources.files("fleet_wire").joinpath("catalog/service_items.yaml").read_text("utf-8")
    doc: Any = yaml.safe_load(text)
    return Catalogue(tuple(ServiceItem(**raw) for raw in doc["items"]))


class SimClock:
    """Simulated local time running `speed` times faster than the real clock."""

    def __init__(self, start: datetime, speed: float, real_now: float) -> None:
        self.start = start
        self.speed = speed
        self.real_start = real_now

    def at(self, real_now: float) -> datetime:
        return self.start + timedelta(seconds=(real_now - self.real_start) * self.speed)


@dataclass(frozen=True, slots=True)
class PlannedEvent:
    at: datetime
    type: str
    body: dict[str, Any]


class TrafficModel:
    def __init__(
        self,
        catalogue: Catalogue,
        rng: random.Random,
        *,
        peak_sessions_per_hour: float = 30.0,
        abandon_rate: float = 0.12,
        always_open: bool = False,
    ) -> None:
        self.items = catalogue.items
        self.weights = [i.weight for i in catalogue.items]
        self.rng = rng
        self.peak = peak_sessions_per_hour
        self.abandon_rate = abandon_rate
        self.always_open = always_open
        self._n = 0

    def rate_per_hour(self, local: datetime) -> float:
        """Expected sessions per hour at this local time (0 outside opening hours)."""
        if self.always_open:
            return self.peak * 0.8
        if local.weekday() >= 5:
            return self.peak * 0.3 if local.weekday() == 5 and 9 <= local.hour < 12 else 0.0
        return self.peak * HOURLY_PROFILE.get(local.hour, 0.0)

    def arrivals(self, local: datetime, dt_s: float) -> int:
        """Sessions starting in the next dt_s simulated seconds (Poisson)."""
        lam = self.rate_per_hour(local) * dt_s / 3600.0
        # Knuth's method: fine for the small lambdas of one terminal and one step
        limit, k, p = math.exp(-lam), 0, 1.0
        while True:
            p *= self.rng.random()
            if p <= limit:
                return k
            k += 1

    def session(self, terminal_id: str, start: datetime) -> list[PlannedEvent]:
        """One citizen's session at the terminal, as the events the kiosk app would post."""
        item = self.rng.choices(self.items, self.weights)[0]
        self._n += 1
        session = f"{terminal_id}-{int(start.timestamp())}-{self._n}"
        face = item.face_login
        out = [
            PlannedEvent(start, "service.started", {"session": session, "service_code": item.code, "face_login": face})
        ]
        t = start
        if face:
            t += timedelta(seconds=self.rng.uniform(4, 12))
            ok = self.rng.random() > 0.04
            out.append(
                PlannedEvent(
                    t,
                    "face.decision",
                    {
                        "mode": "verify",
                        "decision": "match" if ok else "no_match",
                        "score": round(self.rng.uniform(0.25, 0.45) if ok else self.rng.uniform(0.62, 0.9), 3),
                        "reason": "ok" if ok else "below_threshold",
                        "latency_ms": round(self.rng.uniform(120, 260), 1),
                        "model_version": "dlib-resnet-v1",
                    },
                )
            )
            if not ok:
                dur = (t - start).total_seconds() + self.rng.uniform(5, 30)
                out.append(
                    PlannedEvent(
                        start + timedelta(seconds=dur),
                        "service.abandoned",
                        {
                            "session": session,
                            "service_code": item.code,
                            "duration_s": round(dur, 1),
                            "step": "face_login",
                            "face_login": face,
                        },
                    )
                )
                return out
        duration = max(10.0, self.rng.lognormvariate(math.log(item.typical_s), 0.35))
        if self.rng.random() < self.abandon_rate:
            duration *= self.rng.uniform(0.2, 0.8)
            out.append(
                PlannedEvent(
                    start + timedelta(seconds=duration),
                    "service.abandoned",
                    {
                        "session": session,
                        "service_code": item.code,
                        "duration_s": round(duration, 1),
                        "step": self.rng.choice(ABANDON_STEPS),
                        "face_login": face,
                    },
                )
            )
        else:
            out.append(
                PlannedEvent(
                    start + timedelta(seconds=duration),
                    "service.completed",
                    {
                        "session": session,
                        "service_code": item.code,
                        "duration_s": round(duration, 1),
                        "face_login": face,
                    },
                )
            )
        return out

    def peripheral_incident(self, start: datetime) -> list[PlannedEvent]:
        """A printer running out of paper, a card reader hiccup… and its recovery."""
        peripheral, code, message = self.rng.choice(
            [
                ("receipt_printer", "paper_out", "receipt paper roll is empty"),
                ("a4_printer", "paper_jam", "paper jam in tray 1"),
                ("id_reader", "read_timeout", "ID card chip did not answer in 3 s"),
                ("qr_scanner", "no_response", "QR scanner did not answer for 150 s"),
            ]
        )
        fixed = start + timedelta(minutes=self.rng.uniform(3, 40))
        return [
            PlannedEvent(start, "peripheral.fault", {"peripheral": peripheral, "code": code, "message": message}),
            PlannedEvent(fixed, "peripheral.recovered", {"peripheral": peripheral}),
        ]


# What a healthy peripheral's vendor SDK tells the kiosk app, by kind (camera: the agent probes it).
def healthy_readings(kind: str, rng: random.Random) -> dict[str, float]:
    """Plausible readings of a working peripheral of this kind (empty for kinds the kiosk app does not report)."""
    if kind == "id_card_reader":
        return {"read_ms": round(rng.uniform(800, 1300)), "sam_errors_per_hour": 0}
    if kind == "receipt_printer":
        return {"head_temp_c": round(rng.uniform(32, 48), 1), "cutter_errors_per_day": 0}
    if kind == "document_printer":
        return {
            "toner_pct": round(rng.uniform(40, 90)),
            "tray_sheets_left": round(rng.uniform(80, 250)),
            "jams_per_day": 0,
        }
    if kind == "qr_scanner":
        return {"decode_ms": round(rng.uniform(60, 200)), "no_response_s": 0}
    if kind == "assistance_caller":
        return {
            "registration_age_s": round(rng.uniform(5, 280)),
            "call_setup_ms": round(rng.uniform(900, 2000)),
            "packet_loss_pct": round(rng.uniform(0, 1), 2),
        }
    if kind == "touch_screen":
        return {"idle_open_hours_h": round(rng.uniform(0, 1), 2), "usb_resets_per_day": 0}
    return {}


# An incident as the peripheral's readings show it (the fault's message travels with them).
INCIDENT_READINGS: dict[str, dict[str, float]] = {
    "paper_out": {"paper_left_pct": 0},
    "paper_jam": {"jams_per_day": 6},
    "read_timeout": {"read_ms": 6000},
    "no_response": {"no_response_s": 150},
}
