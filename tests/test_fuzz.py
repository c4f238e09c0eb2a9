"""A small fuzz round against the real stack: every delivered payload is accounted for, and no
honest event is lost while one terminal's credentials publish hostile payloads of every class."""

from __future__ import annotations

from typing import Any

from fleet_dev.devstack import DevStack
from fleet_dev.fuzz import CLASSES, run_round


def test_small_fuzz_round_accounts_for_every_payload_and_loses_no_honest_event(make_stack: Any) -> None:
    st: DevStack = make_stack(3, max_queued_messages=50_000, accounts="dynsec")
    result = run_round(st, "t-000", ["t-001", "t-002"], 500, honest_rate_per_s=20.0)
    assert set(result["classes"]) >= set(CLASSES)  # every class was sent at least once
    assert result["delivered"] == result["published_own"] > 0
    assert result["unaccounted"] == 0
    assert result["wrongly_stored"] == 0
    assert result["rejected_counted"] == result["rejected_by_tally"] > 0
    assert result["honest_sent"] > 0 and result["honest_lost"] == 0
    assert result["server_alive"] == 1 and result["ingest_errors"] == 0
    assert result["takeover_successes"] == 0, result["takeovers"]
