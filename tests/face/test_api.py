"""The local face API: clear 4xx for bad input, never a crash; happy paths end to end over HTTP."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edge_agent.face.service import FaceService
from tests.face.conftest import Frames
from tests.face.test_imageheader import png_bomb

pytestmark = pytest.mark.face
CITIZEN = "110101199001011234"
TOKEN = "face-api-test-token-" + "5eed" * 10


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture
def api(tmp_path: Path, engine: Any) -> Iterator[tuple[TestClient, FaceService, Any]]:
    """The agent's real local API with the face router, for an agent that is not connected."""
    from edge_agent.agent import Agent
    from edge_agent.api.app import create_api
    from edge_agent.api.face_routes import build_face_router
    from edge_agent.config import AgentSettings
    from edge_agent.face import FaceSettings, build_face_service

    token_file = tmp_path / "api.token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o640)
    agent = Agent(
        AgentSettings(
            environment="test", terminal_id="t-face-api", data_dir=tmp_path / "agent", api_token_file=token_file
        )
    )
    svc = build_face_service(agent, FaceSettings(max_image_bytes=40_000), engine=engine)
    app = create_api(agent, extra_routers=[build_face_router(svc)])
    with TestClient(app, base_url="http://127.0.0.1:8700", headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client, svc, agent
    agent.outbox.close()


def test_enrol_verify_compare_identify_list_erase_over_http(
    api: tuple[TestClient, FaceService, Any], frames: Frames
) -> None:
    client, svc, agent = api
    r = client.post("/v1/face/enrol", json={"citizen_id": CITIZEN, "image": b64(frames.obama_enrol)})
    assert r.status_code == 200 and r.json()["decision"] == "enrolled", r.text
    r = client.post("/v1/face/verify", json={"citizen_id": CITIZEN, "image": b64(frames.obama_live)})
    body = r.json()
    assert (r.status_code, body["decision"], body["reason"]) == (200, "match", "ok")
    assert body["score"] <= body["threshold"] and body["model_version"] == svc.settings.model_version
    r = client.post("/v1/face/verify", json={"citizen_id": CITIZEN, "image": b64(frames.biden)})
    assert r.json()["decision"] == "no_match" and r.json()["message"]["zh"]
    r = client.post(
        "/v1/face/compare-id",
        json={"image": b64(frames.obama_live), "id_photo": b64(frames.obama_id_photo)},
    )
    assert r.json()["decision"] == "match", r.text
    r = client.post("/v1/face/identify", json={"image": b64(frames.obama_live2), "top_k": 3})
    assert r.json()["decision"] == "match" and r.json()["candidates"][0]["citizen_id"] == CITIZEN
    r = client.get("/v1/face/templates")
    assert r.json()["count"] == 1 and CITIZEN not in r.text
    r = client.post("/v1/face/erase", json={"citizen_id": CITIZEN})
    assert r.json()["decision"] == "erased"
    assert client.get("/v1/face/templates").json()["count"] == 0
    metrics = client.get("/metrics").text
    assert 'edge_face_decisions_total{decision="match",mode="verify",reason="ok"} 1.0' in metrics
    assert "edge_face_gallery_templates 0.0" in metrics
    # Every decision above is durably in the outbox as a face.decision event.
    assert agent.outbox.stats().depth >= 6


def test_unknown_citizen_is_404_not_a_crash(api: tuple[TestClient, FaceService, Any], frames: Frames) -> None:
    client, _, _ = api
    r = client.post("/v1/face/verify", json={"citizen_id": "nobody", "image": b64(frames.obama_live)})
    assert (r.status_code, r.json()["error"]) == (404, "unknown_citizen")
    r = client.post("/v1/face/erase", json={"citizen_id": "nobody"})
    assert (r.status_code, r.json()["error"]) == (404, "unknown_citizen")


BAD: list[tuple[str, Any, int, str]] = [
    ("text_file", lambda f: b64(b"citizen,amount\n110101,1200\n"), 415, "not_an_image"),
    (
        "truncated_jpeg",
        lambda f: b64(f.obama_live[: len(f.obama_live) // 2]),
        400,
        "image_truncated",
    ),
    ("png_bomb", lambda f: b64(png_bomb(6000)), 413, "image_too_large"),
    ("over_byte_limit", lambda f: b64(b"\xff\xd8" + b"\x00" * 40_001), 413, "image_too_large"),
    ("empty_image", lambda f: "", 400, "empty_image"),
    ("not_base64", lambda f: "this is *not* base64!", 400, "bad_base64"),
]


@pytest.mark.parametrize(("label", "make", "status", "code"), BAD, ids=[b[0] for b in BAD])
def test_bad_image_gets_4xx_with_reason(
    api: tuple[TestClient, FaceService, Any],
    frames: Frames,
    label: str,
    make: Any,
    status: int,
    code: str,
) -> None:
    client, svc, _ = api
    svc.enrol(CITIZEN, frames.obama_enrol)
    for path, extra in [
        ("/v1/face/enrol", {"citizen_id": "c-2"}),
        ("/v1/face/verify", {"citizen_id": CITIZEN}),
        ("/v1/face/identify", {}),
    ]:
        r = client.post(path, json={"image": make(frames), **extra})
        assert (r.status_code, r.json()["error"]) == (status, code), (path, r.text)
        assert r.json()["detail"] and r.json()["where"] == "image"
    # The ID photo is checked first; a small live image keeps the body under the API's request cap.
    r = client.post("/v1/face/compare-id", json={"image": b64(frames.obama_id_photo), "id_photo": make(frames)})
    assert (r.status_code, r.json()["error"], r.json()["where"]) == (
        status,
        "id_photo_" + code,
        "id_photo",
    )
    assert len(svc.gallery) == 1


@pytest.mark.parametrize("body", [None, b"", b"{}", b"not json", b'{"citizen_id": "x"}'])
def test_empty_or_malformed_body_gets_422(api: tuple[TestClient, FaceService, Any], body: bytes | None) -> None:
    client, _, _ = api
    r = client.post("/v1/face/verify", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"


def test_bad_citizen_id_gets_422(api: tuple[TestClient, FaceService, Any], frames: Frames) -> None:
    client, _, _ = api
    r = client.post("/v1/face/enrol", json={"citizen_id": "../../etc/passwd", "image": b64(frames.obama_live)})
    assert r.status_code == 422 and r.json()["where"].endswith("citizen_id")


def test_camera_route_without_camera_is_503(api: tuple[TestClient, FaceService, Any], frames: Frames) -> None:
    client, svc, _ = api
    svc.enrol(CITIZEN, frames.obama_enrol)
    r = client.post("/v1/face/verify/camera", json={"citizen_id": CITIZEN})
    assert (r.status_code, r.json()["error"]) == (503, "face_unavailable")


def test_face_routes_need_the_token_and_a_loopback_host(
    api: tuple[TestClient, FaceService, Any], frames: Frames
) -> None:
    """Another process on the terminal, or a rebinding web page, can neither identify, replace nor erase."""
    client, svc, _ = api
    svc.enrol(CITIZEN, frames.obama_enrol)
    before = [t.template_id for t in svc.list_templates()]
    attempts = [
        ("/v1/face/identify", {"image": b64(frames.obama_live2)}),
        ("/v1/face/enrol", {"citizen_id": CITIZEN, "image": b64(frames.biden)}),
        ("/v1/face/erase", {"citizen_id": CITIZEN}),
    ]
    for headers, status in [
        ({"Authorization": ""}, 401),
        ({"Authorization": "Bearer not-the-token-" + "0" * 20}, 401),
        ({"Host": "evil.example:8700"}, 421),
    ]:
        for path, body in attempts:
            r = client.post(path, json=body, headers=headers)
            assert r.status_code == status, (path, headers, r.text)
            assert CITIZEN not in r.text
    assert [t.template_id for t in svc.list_templates()] == before
    r = client.post("/v1/face/verify", json={"citizen_id": CITIZEN, "image": b64(frames.obama_live)})
    assert r.json()["decision"] == "match"  # still the citizen's own template
