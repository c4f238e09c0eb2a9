"""The agent's Prometheus metrics, read from live counters at scrape time."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from edge_agent.agent import Agent


class AgentCollector(Collector):
    def __init__(self, agent: "Agent") -> None:
        self._agent = agent

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        a = self._agent
        st = a.outbox.stats()
        c = a.outbox.counters
        w = a.window.counters
        yield GaugeMetricFamily("edge_outbox_pending", "Rows in the outbox awaiting a receipt", st.depth)
        yield GaugeMetricFamily("edge_outbox_bytes", "Bytes held by the outbox", st.bytes)
        yield GaugeMetricFamily("edge_outbox_oldest_age_seconds", "Age of the oldest unreceipted row", st.oldest_age_s)
        yield GaugeMetricFamily("edge_outbox_in_flight_batches", "Messages awaiting a receipt", a.window.in_flight)
        yield CounterMetricFamily("edge_outbox_enqueued", "Events stored in the outbox", c.enqueued)
        yield CounterMetricFamily("edge_outbox_sent", "Events published for the first time", w.sent_events)
        yield CounterMetricFamily(
            "edge_outbox_resent", "Events published again (no receipt in time, reconnect, restart)", w.resent_events
        )
        yield CounterMetricFamily("edge_outbox_confirmed", "Rows deleted after the server's receipt", c.confirmed)
        dropped = CounterMetricFamily(
            "edge_outbox_dropped", "Events replaced by tombstones by policy", labels=["reason"]
        )
        dropped.add_metric(["evicted"], c.evicted)
        dropped.add_metric(["expired"], c.expired)
        yield dropped
        yield CounterMetricFamily("edge_outbox_refused", "Events refused because the outbox was full", c.refused)
        yield CounterMetricFamily("edge_outbox_receipt_timeouts", "Receipt time-outs", w.receipt_timeouts)
        yield GaugeMetricFamily("edge_link_connected", "1 when connected to the broker", 1 if a.link.connected else 0)
        yield CounterMetricFamily("edge_link_connects", "Successful broker connections", a.link.reconnects)


def build_registry(agent: "Agent") -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(AgentCollector(agent))
    return registry
