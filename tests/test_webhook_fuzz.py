"""Property: no JSON body, random or mutated from a real shape, ever makes the webhook answer 5xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.config import Settings
from app.main import create_app
from app.models import Submission, Ticket
from tests.conftest import WEBHOOK_SECRET
from tests.fakes.runner import RecordingRunner

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=30,
)
interesting_keys = st.sampled_from(
    [
        "issue",
        "key",
        "fields",
        "summary",
        "description",
        "webhookEvent",
        "changelog",
        "items",
        "labels",
        "project",
        "id",
        "self",
        "issuetype",
        "reporter",
        "type",
        "content",
        "text",
        "attrs",
    ]
)
BASE = {
    "webhookEvent": "jira:issue_created",
    "issue": {
        "id": "1",
        "key": "PROJ-1",
        "self": "https://x.atlassian.net/rest/api/2/issue/1",
        "fields": {
            "summary": "s",
            "labels": ["a"],
            "project": {"key": "PROJ"},
            "description": {"type": "doc", "content": [{"type": "paragraph", "content": []}]},
        },
    },
    "changelog": {"items": [{"field": "labels", "fromString": "", "toString": "a"}]},
}


def mutate(value: Any, data: st.DataObject, depth: int = 0) -> Any:
    if isinstance(value, dict) and value and depth < 6:
        key = data.draw(st.sampled_from(sorted(value)))
        choice = data.draw(st.integers(0, 3))
        copy = dict(value)
        if choice == 0:
            del copy[key]
        elif choice == 1:
            copy[key] = data.draw(json_values)
        elif choice == 2:
            copy[data.draw(interesting_keys)] = data.draw(json_values)
        else:
            copy[key] = mutate(value[key], data, depth + 1)
        return copy
    if isinstance(value, list) and value and depth < 6:
        return [mutate(item, data, depth + 1) for item in value]
    return data.draw(json_values)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(
        _env_file=None,
        workspace_dir=tmp_path_factory.mktemp("fuzz"),
        webhook_secret=WEBHOOK_SECRET,
        rate_limit="100000/minute",
    )
    with TestClient(
        create_app(settings, AlwaysNewRunner().factory()), raise_server_exceptions=False
    ) as client:
        yield client


class AlwaysNewRunner(RecordingRunner):
    """Answers every ticket as a new run, so the fuzzer exercises the accepted path every time."""

    async def submit(self, ticket: Ticket, delivery_id: str | None) -> Submission:
        return Submission(run_id="fuzz")


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(body=json_values)
def test_random_json_never_gets_a_5xx(client: TestClient, body: Any) -> None:
    response = client.post(
        "/webhook/jira", content=json.dumps(body), headers={"X-Webhook-Token": WEBHOOK_SECRET}
    )
    assert response.status_code in (200, 202, 400, 422), response.text


@FUZZ
@given(data=st.data())
def test_mutated_jira_bodies_never_get_a_5xx(client: TestClient, data: st.DataObject) -> None:
    body = mutate(BASE, data)
    response = client.post(
        "/webhook/jira", content=json.dumps(body), headers={"X-Webhook-Token": WEBHOOK_SECRET}
    )
    assert response.status_code in (200, 202, 400, 422), response.text
    if response.status_code == 422:
        assert response.json()["problems"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300))
def test_random_bytes_never_get_a_5xx(client: TestClient, raw: bytes) -> None:
    response = client.post("/webhook/jira", content=raw, headers={"X-Webhook-Token": WEBHOOK_SECRET})
    assert response.status_code in (200, 202, 400, 422)
