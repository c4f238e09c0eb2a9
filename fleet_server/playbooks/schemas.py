"""Typed shapes of playbooks, runs and task events, for the service and the HTTP API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

# file name without .yml; the service also checks the file is in the playbooks directory
PLAYBOOK_NAME_PATTERN = r"^[a-z0-9_]{1,64}$"
RunStatus = Literal["queued", "running", "successful", "failed"]
EventStatus = Literal["ok", "changed", "failed", "skipped"]


class PlaybookInfo(BaseModel):
    name: str  # file name without .yml, e.g. "provision_terminal"
    file: str
    description: str


class RunCreate(BaseModel):
    # Defaults to the terminal_id or office_id among the extra vars.
    target: str | None = Field(
        default=None, min_length=1, max_length=200, description="terminal or office the run is for"
    )
    extravars: dict[str, Any] = Field(default_factory=dict, max_length=200)
    limit: str | None = Field(default=None, max_length=500, description="ansible host pattern")


class TaskEventPublic(BaseModel):
    id: int
    run_id: int
    at: str
    host: str
    task: str
    action: str
    status: EventStatus
    duration_s: float | None
    message: str
    paths: list[str]


class RunPublic(BaseModel):
    id: int
    playbook: str
    target: str
    status: RunStatus
    rc: int | None
    started_by: str
    extravars: dict[str, Any]  # secrets already replaced by "***"
    error: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    # task results over all hosts; failures under ignore_errors are not counted
    ok: int
    changed: int
    failed: int
    skipped: int


class RunDetail(RunPublic):
    events: list[TaskEventPublic]
