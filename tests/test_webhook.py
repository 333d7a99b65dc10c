"""POST /webhook/jira over the app with its lifespan: auth, limits, shapes, trigger rules, answers."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.conftest import WEBHOOK_SECRET
from tests.fakes.runner import RecordingRunner
from tests.servers import serve

AUTH = {"X-Webhook-Token": WEBHOOK_SECRET}


def jira_format(key: str = "PROJ-1", **fields: Any) -> dict[str, Any]:
    return {
        "issue": {
            "id": "10001",
            "key": key,
            "self": "https://acme.atlassian.net/rest/api/2/issue/10001",
            "fields": {"summary": "Add a /version endpoint", "description": "Return the version.", **fields},
        }
    }


def sign(body: bytes, secret: str = WEBHOOK_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post(client: TestClient, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(
        "/webhook/jira",
        content=raw,
        headers={"Content-Type": "application/json", **(AUTH if headers is None else headers)},
    )


def test_health(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}


def test_accepts_a_jira_format_body_and_hands_it_to_the_runner(
    client: TestClient, runner: RecordingRunner
) -> None:
    response = post(client, jira_format("proj-7"), {**AUTH, "X-Atlassian-Webhook-Identifier": "delivery-42"})
    assert response.status_code == 202
    assert response.json() == {"status": "accepted", "ticket": "PROJ-7", "run_id": "run-1"}
    ticket, delivery = runner.submitted[0]
    assert ticket.key == "PROJ-7"
    assert ticket.url == "https://acme.atlassian.net/browse/PROJ-7"
    assert delivery == "delivery-42"


def test_a_second_delivery_of_a_running_ticket_is_a_duplicate(
    client: TestClient, runner: RecordingRunner
) -> None:
    first = post(client, jira_format())
    second = post(client, jira_format())
    assert second.status_code == 202
    assert second.json() == {"status": "duplicate", "ticket": "PROJ-1", "run_id": first.json()["run_id"]}
    assert len(runner.submitted) == 1


def test_a_delivery_id_of_unexpected_form_is_dropped_not_used(
    client: TestClient, runner: RecordingRunner
) -> None:
    assert (
        post(client, jira_format(), {**AUTH, "X-Atlassian-Webhook-Identifier": "../../x y"}).status_code
        == 202
    )
    assert runner.submitted[0][1] is None


# --- authentication ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, 401),
        ({"X-Webhook-Token": "wrong-token"}, 401),
        ({"X-Webhook-Token": WEBHOOK_SECRET + "x"}, 401),
        ({"X-Webhook-Token": ""}, 401),
        (AUTH, 202),
    ],
    ids=["no-token", "wrong-token", "longer-token", "empty-token", "right-token"],
)
def test_token_matrix(
    client: TestClient, runner: RecordingRunner, headers: dict[str, str], expected: int
) -> None:
    response = post(client, jira_format(), headers)
    assert response.status_code == expected
    if expected == 401:
        assert "error" in response.json()
        assert runner.submitted == []


def test_hmac_signature_over_the_raw_body_is_accepted(client: TestClient, runner: RecordingRunner) -> None:
    body = json.dumps({"webhookEvent": "jira:issue_created", **jira_format()}).encode()
    assert post(client, body, {"X-Hub-Signature": sign(body)}).status_code == 202
    assert len(runner.submitted) == 1


def test_hmac_over_a_modified_body_is_refused(client: TestClient, runner: RecordingRunner) -> None:
    body = json.dumps({"webhookEvent": "jira:issue_created", **jira_format()}).encode()
    tampered = body.replace(b"PROJ-1", b"PROJ-2")
    response = post(client, tampered, {"X-Hub-Signature": sign(body)})
    assert response.status_code == 401
    assert runner.submitted == []


@pytest.mark.parametrize(
    "signature",
    ["", "sha256=", "sha1=abc", "sha256=zz", "md5=" + "0" * 64],
)
def test_malformed_signatures_are_refused(client: TestClient, signature: str) -> None:
    assert post(client, jira_format(), {"X-Hub-Signature": signature}).status_code == 401


def test_hmac_with_another_secret_is_refused(client: TestClient) -> None:
    body = json.dumps(jira_format()).encode()
    assert post(client, body, {"X-Hub-Signature": sign(body, "another-secret-of-sorts")}).status_code == 401


def test_without_a_secret_development_accepts_unauthenticated_posts(
    client_for: Callable[[Settings], TestClient], make_settings: Callable[..., Settings]
) -> None:
    client = client_for(make_settings(webhook_secret=None))
    assert post(client, jira_format(), {}).status_code == 202


# --- body limits and parsing -----------------------------------------------------------------------


def test_a_body_over_the_limit_is_413(
    client_for: Callable[[Settings], TestClient],
    make_settings: Callable[..., Settings],
    runner: RecordingRunner,
) -> None:
    client = client_for(make_settings(max_body_bytes=2048))
    body = jira_format(description="x" * 4096)
    response = post(client, body)
    assert response.status_code == 413
    assert "2048" in response.json()["error"]
    assert runner.submitted == []


def _raw_http(base_url: str, request: bytes) -> bytes:
    """Send bytes as they are and read the answer: for requests an HTTP client would refuse to make."""
    parts = urlsplit(base_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def test_a_lying_content_length_and_a_chunked_body_are_stopped(
    make_settings: Callable[..., Settings], runner: RecordingRunner
) -> None:
    app = create_app(make_settings(max_body_bytes=2048), runner.factory())
    big = json.dumps(jira_format(description="y" * 8000)).encode()
    with serve(app) as base_url:
        # Content-Length says 100 bytes but the client sends 8 KB: uvicorn reads only what was declared,
        # so the body is cut and is not valid JSON; what matters is that no 8 KB is buffered or accepted.
        lying = (
            b"POST /webhook/jira HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"X-Webhook-Token: {WEBHOOK_SECRET}\r\nContent-Length: 100\r\n\r\n".encode()
            + big
        )
        assert _raw_http(base_url, lying).split(b" ")[1] in (b"400", b"413")

        def chunks() -> Any:
            for start in range(0, len(big), 1000):
                yield big[start : start + 1000]

        chunked = httpx.post(f"{base_url}/webhook/jira", content=chunks(), headers=AUTH, timeout=10)
        assert chunked.status_code == 413
        declared = (
            b"POST /webhook/jira HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"X-Webhook-Token: {WEBHOOK_SECRET}\r\nContent-Length: 99999999\r\n\r\n{{}}".encode()
        )
        assert _raw_http(base_url, declared).split(b" ")[1] == b"413"
    assert runner.submitted == []


def test_content_length_that_is_not_a_number_is_refused(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(), RecordingRunner().factory())
    with serve(app) as base_url:
        request = b"POST /webhook/jira HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}"
        status = _raw_http(base_url, request).split(b" ")[1]
    assert status == b"400"


@pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe", b"[" * 100000 + b"]" * 100000])
def test_invalid_json_is_400(client: TestClient, body: bytes) -> None:
    response = post(client, body)
    assert response.status_code == 400
    assert response.json() == {"error": "body is not valid JSON"}


@pytest.mark.parametrize(
    ("body", "missing"),
    [
        ({"issue": {"fields": {"summary": "x"}}}, "key"),
        ({"issue": {"key": "PROJ-1", "fields": {}}}, "summary"),
        ({"issue": {"key": "../../etc", "fields": {"summary": "x"}}}, "key"),
        ([1, 2, 3], "JSON object"),
        ({"hello": "world"}, "key"),
    ],
)
def test_json_without_a_usable_ticket_is_422_naming_what_is_missing(
    client: TestClient, runner: RecordingRunner, body: Any, missing: str
) -> None:
    response = post(client, body)
    assert response.status_code == 422
    assert any(missing in problem for problem in response.json()["problems"])
    assert runner.submitted == []


def test_unknown_extra_fields_are_fine(client: TestClient) -> None:
    body = jira_format(customfield_10010={"whatever": [1, 2]})
    body["somethingNew"] = {"x": 1}
    assert post(client, body).status_code == 202


# --- shapes and trigger rules ---------------------------------------------------------------------


def test_automation_format_with_a_numeric_id(client: TestClient, runner: RecordingRunner) -> None:
    body = {"id": 10001, "key": "PROJ-3", "fields": {"summary": "Top-level issue", "description": None}}
    assert post(client, body).status_code == 202
    assert runner.submitted[0][0].key == "PROJ-3"


def test_custom_body_with_key_and_summary(client: TestClient, runner: RecordingRunner) -> None:
    assert post(client, {"key": "proj-4", "summary": "Custom"}).status_code == 202
    assert runner.submitted[0][0].summary == "Custom"


def test_adf_description_arrives_as_text(client: TestClient, runner: RecordingRunner) -> None:
    adf = {
        "type": "doc",
        "version": 1,
        "content": [
            {"type": "heading", "attrs": {"level": 2}, "content": [{"type": "text", "text": "Goal"}]},
            {"type": "paragraph", "content": [{"type": "text", "text": "Ship the endpoint."}]},
        ],
    }
    assert post(client, jira_format(description=adf)).status_code == 202
    description = runner.submitted[0][0].description
    assert "Goal" in description and "Ship the endpoint." in description
    assert "content" not in description


def test_issue_created_triggers(client: TestClient, runner: RecordingRunner) -> None:
    body = {"webhookEvent": "jira:issue_created", **jira_format()}
    assert post(client, body).status_code == 202


def test_a_comment_event_without_an_issue_is_ignored_not_rejected(
    client: TestClient, runner: RecordingRunner
) -> None:
    body = {"webhookEvent": "comment_created", "comment": {"body": "hello"}}
    response = post(client, body)
    assert response.status_code == 200
    assert response.json()["status"] == "ignored"
    assert "comment_created" in response.json()["reason"]
    assert runner.submitted == []


def test_issue_updated_without_the_label_being_added_is_ignored(
    client_for: Callable[[Settings], TestClient],
    make_settings: Callable[..., Settings],
    runner: RecordingRunner,
) -> None:
    client = client_for(make_settings(trigger_label="auto-code"))
    body = {
        "webhookEvent": "jira:issue_updated",
        **jira_format(labels=["auto-code"]),
        "changelog": {"items": [{"field": "summary", "fromString": "a", "toString": "b"}]},
    }
    assert post(client, body).json()["status"] == "ignored"
    assert runner.submitted == []


def test_issue_updated_adding_the_trigger_label_triggers(
    client_for: Callable[[Settings], TestClient],
    make_settings: Callable[..., Settings],
    runner: RecordingRunner,
) -> None:
    client = client_for(make_settings(trigger_label="auto-code"))
    body = {
        "webhookEvent": "jira:issue_updated",
        **jira_format(labels=["backend", "auto-code"]),
        "changelog": {
            "items": [{"field": "labels", "fromString": "backend", "toString": "backend auto-code"}]
        },
    }
    assert post(client, body).status_code == 202
    assert len(runner.submitted) == 1


def test_trigger_label_filters_automation_bodies(
    client_for: Callable[[Settings], TestClient],
    make_settings: Callable[..., Settings],
    runner: RecordingRunner,
) -> None:
    client = client_for(make_settings(trigger_label="auto-code"))
    assert post(client, jira_format(labels=["other"])).json()["status"] == "ignored"
    assert post(client, jira_format("PROJ-2", labels=["auto-code"])).status_code == 202
    assert [t.key for t, _ in runner.submitted] == ["PROJ-2"]


def test_jira_projects_filter(
    client_for: Callable[[Settings], TestClient],
    make_settings: Callable[..., Settings],
    runner: RecordingRunner,
) -> None:
    client = client_for(make_settings(jira_projects="PROJ, ops"))
    assert post(client, jira_format("OTHER-1")).json()["status"] == "ignored"
    assert post(client, jira_format("OPS-1")).status_code == 202
    # A key from another project cannot borrow an allowed project's name.
    assert post(client, jira_format("OTHER-2", project={"key": "PROJ"})).json()["status"] == "ignored"
    assert [t.key for t, _ in runner.submitted] == ["OPS-1"]


# --- rate limit and availability ------------------------------------------------------------------


def test_rate_limit_answers_429(
    client_for: Callable[[Settings], TestClient], make_settings: Callable[..., Settings]
) -> None:
    client = client_for(make_settings(rate_limit="3/minute"))
    codes = [post(client, jira_format(f"PROJ-{n}")).status_code for n in range(1, 6)]
    assert codes == [202, 202, 202, 429, 429]


def test_rate_limit_keys_on_proxy_headers_only_when_trusted(
    client_for: Callable[[Settings], TestClient], make_settings: Callable[..., Settings]
) -> None:
    trusted = client_for(make_settings(rate_limit="1/minute", trust_proxy_headers=True))
    first = post(trusted, jira_format("PROJ-1"), {**AUTH, "CF-Connecting-IP": "203.0.113.1"})
    second = post(trusted, jira_format("PROJ-2"), {**AUTH, "CF-Connecting-IP": "203.0.113.2"})
    assert (first.status_code, second.status_code) == (202, 202)

    untrusted = client_for(make_settings(rate_limit="1/minute"))
    first = post(untrusted, jira_format("PROJ-3"), {**AUTH, "CF-Connecting-IP": "203.0.113.3"})
    second = post(untrusted, jira_format("PROJ-4"), {**AUTH, "CF-Connecting-IP": "203.0.113.4"})
    assert (first.status_code, second.status_code) == (202, 429)


def test_without_a_runner_the_webhook_answers_503(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(), runner_factory=None)) as client:
        response = post(client, jira_format())
    assert response.status_code == 503
    assert "error" in response.json()


def test_docs_show_an_example_for_each_accepted_shape(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    examples = spec["paths"]["/webhook/jira"]["post"]["requestBody"]["content"]["application/json"][
        "examples"
    ]
    assert {"automation_jira_format", "automation_format", "native_issue_created", "custom"} <= set(examples)
    assert client.get("/docs").status_code == 200
