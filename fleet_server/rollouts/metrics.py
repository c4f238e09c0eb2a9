"""Prometheus metrics of rollouts, on the server's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fleet_server.rollouts.schemas import ROLLOUT_STATES


class RolloutMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.terminals = Gauge(
            "fleet_rollout_terminals",
            "Terminals of each live rollout by wave and update state",
            ["rollout", "wave", "state"],
            registry=registry,
        )
        self.failures = Counter(
            "fleet_rollout_update_failures_total",
            "Update failures reported by terminals (or timed out on the server), by reason",
            ["reason"],
            registry=registry,
        )
        self.halted = Gauge(
            "fleet_rollouts_halted", "Rollouts halted by their own gate, waiting for an admin", registry=registry
        )
        self.rollouts = Gauge("fleet_rollouts", "Live rollouts by state", ["state"], registry=registry)
        self.tick_seconds = Histogram(
            "fleet_rollout_tick_seconds",
            "Time one tick of the rollout engine took",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=registry,
        )
        self._terminal_keys: set[tuple[str, str, str]] = set()
        for state in ROLLOUT_STATES:
            self.rollouts.labels(state=state).set(0)
        self.halted.set(0)

    def set_terminals(self, counts: dict[tuple[str, str, str], int]) -> None:
        """Replace the per-rollout gauge: label sets no longer live are removed."""
        for key in self._terminal_keys - counts.keys():
            try:
                self.terminals.remove(*key)
            except KeyError:
                pass
        for key, n in counts.items():
            self.terminals.labels(*key).set(n)
        self._terminal_keys = set(counts)

    def set_rollouts(self, states: dict[str, int]) -> None:
        for state in ROLLOUT_STATES:
            self.rollouts.labels(state=state).set(states.get(state, 0))
