"""Who the runs API answers: a Bearer API_TOKEN, or without one a direct loopback caller and no other."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.fakes.runner import RecordingRunner

API_TOKEN = "runs-api-token-0123456789"
# What uvicorn puts in the scope for a caller on this machine, and for every caller behind ngrok or
# cloudflared (the service runs uvicorn with proxy_headers off).
LOOPBACK_CLIENT = ("127.0.0.1", 50000)


@pytest.fixture
def loopback_client(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., TestClient]]:
    """Start an app (lifespan included) for the given settings, called from 127.0.0.1."""
    clients: list[TestClient] = []

    def start(**settings: object) -> TestClient:
        app = create_app(make_settings(**settings), RecordingRunner().factory())
        client = TestClient(app, client=LOOPBACK_CLIENT, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)


def test_without_api_token_a_direct_loopback_caller_is_answered(
    loopback_client: Callable[..., TestClient],
) -> None:
    response = loopback_client().get("/runs")
    assert response.status_code == 200, response.text
    assert response.json() == {"runs": []}


@pytest.mark.parametrize(
    "header",
    ["X-Forwarded-For", "Forwarded", "CF-Connecting-IP", "X-Real-IP", "True-Client-IP", "X-Forwarded-Host"],
)
def test_without_api_token_a_loopback_caller_through_a_proxy_or_tunnel_is_refused(
    loopback_client: Callable[..., TestClient], header: str
) -> None:
    client = loopback_client()
    for method, path in (("GET", "/runs"), ("GET", "/runs/run-1"), ("POST", "/runs/run-1/cancel")):
        response = client.request(method, path, headers={header: "203.0.113.7"})
        assert response.status_code == 401, (method, path, response.text)
        assert response.json() == {
            "error": f"this request came through a proxy or tunnel ({header}); "
            "set API_TOKEN to use the runs API remotely"
        }


def test_without_api_token_a_caller_that_is_not_loopback_is_refused(
    client_for: Callable[[Settings], TestClient], make_settings: Callable[..., Settings]
) -> None:
    response = client_for(make_settings()).get("/runs")
    assert response.status_code == 401
    assert response.json() == {"error": "API_TOKEN is not set: the runs API is loopback-only"}


def test_with_api_token_a_caller_through_a_tunnel_with_the_token_is_answered(
    loopback_client: Callable[..., TestClient],
) -> None:
    client = loopback_client(api_token=API_TOKEN)
    tunnelled = {"X-Forwarded-For": "203.0.113.7"}
    answered = client.get("/runs", headers={**tunnelled, "Authorization": f"Bearer {API_TOKEN}"})
    assert answered.status_code == 200, answered.text
    refused = client.get("/runs", headers=tunnelled)
    assert refused.status_code == 401
    assert refused.json() == {"error": "missing or wrong Bearer token"}
