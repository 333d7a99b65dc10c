"""Decoy credentials: derived from a seed, planted, and found again in any of the usual encodings."""

from __future__ import annotations

import base64
import configparser
import secrets
import urllib.parse
from pathlib import Path

import pytest

from app.demo.sample import DEMO_TICKET
from app.isolation.canary import Canaries, seed
from app.models import PipelineOptions, RunResult, RunState
from app.pipeline.ports import Collaborators
from app.pipeline.steps import Pipeline, RunInput

CANARIES = Canaries.from_seed("a fixed seed")
SECRET = CANARIES.value("aws secret access key")


def test_the_same_seed_gives_the_same_decoys_and_another_seed_others() -> None:
    assert Canaries.from_seed("a fixed seed").decoys == CANARIES.decoys
    other = Canaries.from_seed(seed())
    assert {d.value for d in other.decoys}.isdisjoint({d.value for d in CANARIES.decoys})
    key_id = CANARIES.value("aws access key id")
    assert key_id.startswith("AKIA") and len(key_id) == 20 and key_id.isupper()
    assert len(SECRET) == 40
    token = CANARIES.env()["GITHUB_TOKEN"]
    assert token.startswith("ghp_") and len(token) == 40


def test_planted_credentials_read_as_an_aws_file(tmp_path: Path) -> None:
    CANARIES.plant(tmp_path / "home")
    path = tmp_path / "home" / ".aws" / "credentials"
    parsed = configparser.ConfigParser()
    parsed.read(path)
    assert parsed["default"]["aws_secret_access_key"] == SECRET
    assert path.stat().st_mode & 0o777 == 0o600
    assert CANARIES.find(path.read_bytes()) == ["aws access key id", "aws secret access key"]


@pytest.mark.parametrize("offset", range(6))
@pytest.mark.parametrize("encode", [base64.b64encode, base64.urlsafe_b64encode])
def test_a_decoy_inside_a_base64_blob_is_found_at_any_offset(offset: int, encode: object) -> None:
    blob = secrets.token_bytes(offset) + f"secret={SECRET}&more".encode() + secrets.token_bytes(7)
    text = "payload=" + encode(blob).decode()  # type: ignore[operator]
    assert CANARIES.find(text) == ["aws secret access key"]


@pytest.mark.parametrize(
    "form",
    [
        SECRET,
        SECRET.encode().hex(),
        SECRET.encode().hex().upper(),
        urllib.parse.quote(SECRET, safe=""),
        urllib.parse.quote(SECRET),
    ],
)
def test_raw_hex_and_percent_forms_are_found(form: str) -> None:
    assert "aws secret access key" in CANARIES.find(f"GET /upload?data={form} HTTP/1.1")


def test_a_near_miss_is_not_found_and_bytes_work() -> None:
    changed = SECRET[:-1] + ("A" if SECRET[-1] != "A" else "B")
    assert CANARIES.find(f"x {changed} y") == []
    assert CANARIES.find(b"\xff\x00" + CANARIES.env()["GITHUB_TOKEN"].encode()) == ["GITHUB_TOKEN"]


def test_a_large_diff_is_scanned_quickly() -> None:
    import time

    text = "x" * 5_000_000 + SECRET
    started = time.monotonic()
    assert CANARIES.find(text) == ["aws secret access key"]
    assert time.monotonic() - started < 2


def test_what_the_ticket_is_told_is_withheld_where_it_holds_a_decoy() -> None:
    canaries = Canaries.from_seed("run-seed")
    token = canaries.value("GITHUB_TOKEN")
    parts = Collaborators(
        workspace=None, agent=None, checks=None, pull_requests=None, reporter=None,  # type: ignore[arg-type]
        pr_body=lambda result, ticket: "", find_canaries=lambda run_id, text: canaries.find(text),
    )  # fmt: skip
    run = RunInput(run_id="r", ticket=DEMO_TICKET, options=PipelineOptions(), deadline=0)
    host = {"phase": "agent", "method": "CONNECT", "port": 443, "allowed": False, "rule": "canary"}
    plain = {**host, "host": "pypi.org"}
    result = RunResult(
        run_id="r", ticket="SHOP-1", state=RunState.FAILED, summary=f"I found {token}",
        reason=f"test failed: token: {token}", review_findings=["fine", f"leaks {token}"],
        network=[{**host, "host": f"{token.lower()}.evil.test"}, plain],
    )  # fmt: skip

    found = Pipeline(parts).withhold(run, result)

    assert found == [
        "a host the sandbox asked for: GITHUB_TOKEN", "the agent's summary: GITHUB_TOKEN",
        "the run's reason: GITHUB_TOKEN", "a review finding: a decoy credential",
    ]  # fmt: skip
    assert token not in result.model_dump_json() and token.lower() not in result.model_dump_json()
    assert [record["host"] for record in result.network] == ["(a decoy credential)", "pypi.org"]
    assert result.review_findings == ["fine"]
    clean = RunResult(run_id="r", ticket="SHOP-1", state=RunState.FAILED, summary="done", reason="lint")
    assert Pipeline(parts).withhold(run, clean) == [] and (clean.summary, clean.reason) == ("done", "lint")
