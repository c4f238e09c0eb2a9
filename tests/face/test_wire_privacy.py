"""Against a real Mosquitto and the real fleet server: what the agent publishes during enrol,
verify, identify and erase carries no image bytes, no template vector and no citizen id."""

from __future__ import annotations

import base64
import json
import queue
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion

from tests.face.conftest import Frames
from tests.face.test_templates import all_bytes_under, vector_traces

pytestmark = [pytest.mark.face, pytest.mark.slow]
CITIZEN = "110101199001011234"
TERMINAL = "t-face-1"


class Capture:
    """A paho subscriber on fleet/v1/# with the server's account: sees everything terminals send."""

    def __init__(self, port: int, username: str, password: str) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        subscribed = threading.Event()
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"face-capture-{uuid.uuid4().hex[:8]}",
        )
        client.username_pw_set(username, password)
        client.on_connect = lambda c, *_: c.subscribe("fleet/v1/#", qos=1)
        client.on_subscribe = lambda *_: subscribed.set()
        client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))
        client.connect("127.0.0.1", port)
        client.loop_start()
        self.client = client
        if not subscribed.wait(10):
            raise TimeoutError("capture client did not subscribe")

    def all(self) -> list[tuple[str, bytes]]:
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def image_traces(image: bytes) -> list[bytes]:
    """Byte windows and base64 pieces that would show an image (or part of it) was sent."""
    traces = [image[i : i + 24] for i in range(200, len(image) - 24, max(1, len(image) // 16))]
    traces.append(b64(image)[300:340].encode())
    return traces


def test_broker_sees_no_image_template_or_citizen_id(tmp_path: Path, engine: Any, frames: Frames) -> None:
    from edge_agent.api.app import create_api
    from edge_agent.api.face_routes import build_face_router
    from edge_agent.face import FaceSettings, build_face_service
    from fleet_dev.devstack import DevStack
    from fleet_dev.proc import wait_for

    st = DevStack(tmp_path / "stack")
    capture = agent = None
    try:
        st.enrol(TERMINAL, "haidian")
        st.start_broker()
        st.start_server()
        capture = Capture(st.port, st.settings.broker_username, st.server_password)
        agent = st.agent(TERMINAL)
        agent.start()
        svc = build_face_service(agent, FaceSettings(), engine=engine)
        images = [frames.obama_enrol, frames.obama_live, frames.obama_live2, frames.biden]
        app = create_api(agent, extra_routers=[build_face_router(svc)])
        with TestClient(app, base_url="http://127.0.0.1") as client:  # the API answers loopback Hosts only
            calls = [
                ("/v1/face/enrol", {"citizen_id": CITIZEN, "image": b64(frames.obama_enrol)}),
                ("/v1/face/enrol", {"citizen_id": "other-2", "image": b64(frames.biden)}),
                ("/v1/face/verify", {"citizen_id": CITIZEN, "image": b64(frames.obama_live)}),
                ("/v1/face/verify", {"citizen_id": CITIZEN, "image": b64(frames.biden)}),
                ("/v1/face/identify", {"image": b64(frames.obama_live2)}),
                ("/v1/face/erase", {"citizen_id": CITIZEN}),
            ]
            for path, body in calls:
                assert client.post(path, json=body).status_code == 200, path
            tid = svc.store.template_id(CITIZEN)
        vectors = [engine.analyse(svc_rgb, svc._live, 320).vector for svc_rgb in [_decode(i) for i in images]]
        wait_for(
            lambda: st.stored(TERMINAL) >= len(calls),
            timeout_s=30,
            what="face events at the server",
        )
        wait_for(lambda: agent.outbox.stats().depth == 0, timeout_s=30, what="outbox drained by receipts")
        seen = capture.all()
    finally:
        if agent is not None:
            agent.stop(graceful=True)
        if capture is not None:
            capture.close()
        st.close()

    event_msgs = [(t, p) for t, p in seen if t.endswith("/events")]
    decisions = [
        env["body"] for _, p in event_msgs for env in json.loads(p)["events"] if env["type"] == "face.decision"
    ]
    # The capture saw every decision (so the checks below are not vacuous).
    assert [d["mode"] for d in decisions] == [
        "enrol",
        "enrol",
        "verify",
        "verify",
        "identify",
        "erase",
    ]
    assert [d["decision"] for d in decisions] == [
        "enrolled",
        "enrolled",
        "match",
        "no_match",
        "match",
        "erased",
    ]
    for body in decisions:
        assert set(body) == {"mode", "decision", "score", "reason", "latency_ms", "model_version"}
    forbidden = [CITIZEN.encode(), b"other-2", tid.encode(), b"\xff\xd8\xff", b"\x89PNG", b"/9j/"]
    for img in images:
        forbidden += image_traces(img)
    for vec in vectors:
        assert vec is not None
        forbidden += vector_traces(vec)
    for topic, payload in seen:
        assert len(payload) < 16_384, (topic, len(payload))
        for trace in forbidden:
            assert trace not in payload, (topic, trace[:16])
    # Nothing of the erased citizen is left in the agent's files (outbox and WAL included).
    leftovers = all_bytes_under(st.root / "agents" / TERMINAL)
    for trace in [CITIZEN.encode(), tid.encode(), *vector_traces(vectors[0])]:
        assert trace not in leftovers


def _decode(image: bytes) -> np.ndarray:
    from edge_agent.face.decode import ImageLimits, decode_image

    return decode_image(image, ImageLimits(10**7, 10**8, 10**4))
