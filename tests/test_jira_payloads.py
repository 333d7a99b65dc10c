"""Every shape of Jira webhook body, ADF conversion, trigger rules and validation of app.integrations.jira."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.errors import InvalidTicket
from app.intake.adf import MAX_ADF_DEPTH, adf_to_text, description_text
from app.intake.jira import (
    MAX_DESCRIPTION_CHARS,
    MAX_SUMMARY_CHARS,
    Accepted,
    Ignored,
    TriggerRules,
    interpret,
)

FIXTURES = Path(__file__).parent / "fixtures" / "jira"
LABEL = TriggerRules(trigger_label="auto-code")
OPEN = TriggerRules()


PARSED = {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in FIXTURES.glob("*.json")}


def load(name: str) -> dict[str, Any]:
    """A fresh copy of a fixture body, safe to modify."""
    body: dict[str, Any] = copy.deepcopy(PARSED[name])
    return body


def accepted(body: object, rules: TriggerRules = OPEN) -> Accepted:
    outcome = interpret(body, rules)
    assert isinstance(outcome, Accepted), outcome
    return outcome


def ignored(body: object, rules: TriggerRules = OPEN) -> Ignored:
    outcome = interpret(body, rules)
    assert isinstance(outcome, Ignored), outcome
    return outcome


def problems_of(body: object, rules: TriggerRules = OPEN) -> list[str]:
    with pytest.raises(InvalidTicket) as caught:
        interpret(body, rules)
    assert caught.value.problems, "InvalidTicket must name at least one problem"
    return caught.value.problems


def custom(**issue: Any) -> dict[str, Any]:
    """A custom Automation body in the Jira-like nested shape."""
    return {"issue": issue}


# --- native webhooks --------------------------------------------------------------------------------


def test_native_issue_created_cloud_becomes_a_full_ticket() -> None:
    outcome = accepted(load("issue_created_cloud"), LABEL)
    ticket = outcome.ticket
    assert outcome.event == "jira:issue_created"
    assert ticket.key == "ACME-1"
    assert ticket.summary == "Login accepts an empty password"
    assert ticket.description.startswith("The login form accepts an empty password.\n\nh3. Steps")
    assert "{code:python}" in ticket.description  # wiki markup passes through unchanged
    assert ticket.url == "https://acme.atlassian.net/browse/ACME-1"
    assert ticket.project == "ACME"
    assert ticket.labels == ("auto-code", "backend")
    assert ticket.issue_type == "Bug"
    assert ticket.reporter == "Mia Krystof"


def test_issue_updated_that_adds_the_trigger_label_starts_a_run() -> None:
    outcome = accepted(load("issue_updated_label_added"), LABEL)
    assert outcome.event == "jira:issue_updated"
    assert outcome.ticket.key == "ACME-7"
    assert outcome.ticket.issue_type == "Story"


def test_issue_updated_label_added_triggers_even_if_fields_labels_lag_behind() -> None:
    body = load("issue_updated_label_added")
    body["issue"]["fields"]["labels"] = ["backend"]  # the changelog is what says the label was added
    assert accepted(body, LABEL).ticket.key == "ACME-7"


def test_issue_updated_changing_another_field_is_ignored() -> None:
    outcome = ignored(load("issue_updated_other_field"), LABEL)
    assert "jira:issue_updated" in outcome.reason
    assert "auto-code" in outcome.reason


def test_issue_updated_removing_the_label_is_ignored() -> None:
    assert "did not add" in ignored(load("issue_updated_label_removed"), LABEL).reason


def test_issue_updated_without_a_configured_trigger_label_is_ignored() -> None:
    reason = ignored(load("issue_updated_label_added"), OPEN).reason
    assert "no trigger label" in reason


def test_issue_updated_matches_the_labels_field_case_insensitively() -> None:
    body = load("issue_updated_label_added")
    body["changelog"]["items"][0]["field"] = "Labels"
    assert accepted(body, LABEL).event == "jira:issue_updated"


def test_issue_updated_label_added_from_nothing() -> None:
    body = load("issue_updated_label_added")
    body["changelog"]["items"][0]["fromString"] = None
    body["changelog"]["items"][0]["toString"] = "auto-code"
    assert accepted(body, LABEL).ticket.key == "ACME-7"


def test_issue_updated_with_a_longer_label_containing_the_trigger_is_ignored() -> None:
    body = load("issue_updated_label_added")
    body["changelog"]["items"][0]["toString"] = "backend auto-code-later"
    ignored(body, LABEL)


def test_issue_updated_when_the_label_was_already_there_is_ignored() -> None:
    body = load("issue_updated_label_added")
    body["changelog"]["items"][0]["fromString"] = "auto-code"
    body["changelog"]["items"][0]["toString"] = "auto-code frontend"
    ignored(body, LABEL)


def test_issue_updated_that_adds_a_different_label_is_ignored() -> None:
    body = load("issue_updated_label_added")
    body["changelog"]["items"][0]["toString"] = "backend frontend"
    ignored(body, LABEL)


@pytest.mark.parametrize(
    "changelog",
    [None, [], "labels", {"items": "labels"}, {"items": [1, None, {"field": 5}, {"field": "labels"}]}],
)
def test_issue_updated_with_malformed_changelog_is_ignored(changelog: object) -> None:
    body = load("issue_updated_label_added")
    body["changelog"] = changelog
    ignored(body, LABEL)


def test_issue_updated_that_adds_the_label_but_has_no_issue_is_invalid() -> None:
    body = load("issue_updated_label_added")
    del body["issue"]
    assert problems_of(body, LABEL) == ["issue is missing"]


@pytest.mark.parametrize("name", ["comment_created_cloud", "comment_created_server"])
def test_comment_created_is_ignored_with_or_without_an_issue(name: str) -> None:
    body = load(name)
    assert ("issue" in body) == (name == "comment_created_cloud")
    assert ignored(body, LABEL).reason == "event comment_created does not start a run"


@pytest.mark.parametrize(
    ("name", "event"), [("issue_deleted", "jira:issue_deleted"), ("worklog_created", "worklog_created")]
)
def test_other_native_events_are_ignored_naming_the_event(name: str, event: str) -> None:
    assert event in ignored(load(name), LABEL).reason


def test_unknown_event_is_ignored_even_with_a_broken_issue() -> None:
    reason = ignored({"webhookEvent": "jira:version_released", "issue": [1, 2]}).reason
    assert "jira:version_released" in reason


def test_event_name_is_shown_safely_in_the_reason() -> None:
    reason = ignored({"webhookEvent": "evil\nX-Injected: 1" + "x" * 500}).reason
    assert "\n" not in reason
    assert len(reason) < 200


def test_webhook_event_that_is_not_a_string_is_invalid() -> None:
    assert problems_of({"webhookEvent": None, "issue": {}}) == ["webhookEvent must be a string"]


def test_issue_created_without_issue_is_invalid() -> None:
    body = load("issue_created_cloud")
    del body["issue"]
    assert problems_of(body) == ["issue is missing"]


def test_issue_created_with_issue_not_an_object_is_invalid() -> None:
    body = load("issue_created_cloud")
    body["issue"] = "ACME-1"
    assert problems_of(body) == ["issue must be an object"]


def test_server_issue_created_uses_name_and_context_path() -> None:
    ticket = accepted(load("issue_created_server"), LABEL).ticket
    assert ticket.key == "OPS_2-417"
    assert ticket.project == "OPS_2"
    assert ticket.reporter == "jdoe"  # Server/DC user without displayName: its name
    assert ticket.url == "https://jira.example.org/jira/browse/OPS_2-417"
    assert "||Host||Path||" in ticket.description


def test_reporter_falls_back_to_email_address() -> None:
    body = load("issue_created_server")
    reporter = body["issue"]["fields"]["reporter"]
    del reporter["name"]
    del reporter["key"]
    assert accepted(body).ticket.reporter == "jdoe@example.org"


def test_reporter_of_a_strange_type_is_left_out() -> None:
    body = load("issue_created_cloud")
    body["issue"]["fields"]["reporter"] = ["Mia"]
    body["issue"]["fields"]["issuetype"] = 7
    ticket = accepted(body).ticket
    assert ticket.reporter is None
    assert ticket.issue_type is None


# --- Automation and custom bodies -------------------------------------------------------------------


def test_automation_jira_format() -> None:
    outcome = accepted(load("automation_jira_format"), LABEL)
    assert outcome.event == "automation"
    assert outcome.ticket.key == "ACME-3"
    assert outcome.ticket.url == "https://acme.atlassian.net/browse/ACME-3"
    assert outcome.ticket.description == "Read it from the {{BUILD_NUMBER}} environment variable at startup."


def test_automation_format_with_numeric_id_at_top_level() -> None:
    body = load("automation_format_numeric_id")
    assert isinstance(body["id"], int)
    outcome = accepted(body, LABEL)
    assert outcome.event == "automation"
    assert outcome.ticket.key == "ACME-4"
    assert outcome.ticket.labels == ("auto-code", "api")
    assert outcome.ticket.url == "https://acme.atlassian.net/browse/ACME-4"
    assert outcome.ticket.reporter == "Mia Krystof"


def test_custom_nested_body_keeps_quotes_and_backslashes() -> None:
    outcome = accepted(load("custom_nested"))
    assert outcome.event == "custom"
    assert outcome.ticket.summary == 'Bump "requests" to 2.32 \\ fix the CVE'
    assert outcome.ticket.project == "ACME"
    assert outcome.ticket.url is None


def test_custom_flat_body() -> None:
    outcome = accepted(load("custom_flat"), LABEL)
    ticket = outcome.ticket
    assert outcome.event == "custom"
    assert (ticket.key, ticket.summary) == ("ACME-13", "Translate the settings page")
    assert ticket.description == "Add German strings for every label on /settings."
    assert ticket.url == "https://acme.atlassian.net/browse/ACME-13"
    assert ticket.reporter == "Mia Krystof"
    assert ticket.labels == ("auto-code", "i18n")


def test_custom_body_with_issue_key_and_browse_url() -> None:
    ticket = accepted(load("custom_issue_key"), LABEL).ticket
    assert ticket.key == "ACME-14"
    assert ticket.url == "https://acme.atlassian.net/browse/ACME-14"
    assert ticket.description == ""


def test_custom_body_with_snake_case_issue_key() -> None:
    ticket = accepted({"issue_key": "web-5", "summary": "Fix it"}).ticket
    assert (ticket.key, ticket.project) == ("WEB-5", "WEB")


def test_custom_body_flat_inside_issue() -> None:
    outcome = accepted(custom(key="WEB-6", summary="Flat summary", description="Body"))
    assert (outcome.ticket.summary, outcome.ticket.description) == ("Flat summary", "Body")


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)",
        "ftp://acme.test/file",
        "https://user:token@acme.atlassian.net/browse/ACME-1",
        "https://acme.atlassian.net/browse/ACME-1\nInjected",
        "not a url",
        42,
    ],
)
def test_unusable_custom_urls_are_dropped(url: object) -> None:
    ticket = accepted({"key": "ACME-1", "summary": "s", "url": url}).ticket
    assert ticket.url is None


def test_self_link_with_credentials_gives_no_url() -> None:
    body = load("automation_jira_format")
    body["issue"]["self"] = "https://bot:secret@acme.atlassian.net/rest/api/2/issue/10003"
    assert accepted(body).ticket.url is None


# --- descriptions -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("  *bold* and {{mono}}\n\n", "*bold* and {{mono}}"),
        ("", ""),
        (None, ""),
        ("   \n  ", ""),
        ({"type": "doc", "version": 1, "content": []}, ""),
        (
            {
                "type": "doc",
                "version": 1,
                "content": [{"type": "paragraph", "content": [{"type": "text", "text": "Hi"}]}],
            },
            "Hi",
        ),
    ],
)
def test_description_shapes(description: object, expected: str) -> None:
    body = load("issue_created_cloud")
    body["issue"]["fields"]["description"] = description
    assert accepted(body).ticket.description == expected
    assert description_text(description) == expected


def test_missing_description_is_empty() -> None:
    body = load("issue_created_cloud")
    del body["issue"]["fields"]["description"]
    assert accepted(body).ticket.description == ""


@pytest.mark.parametrize("description", [42, ["a"], True])
def test_description_of_a_wrong_type_is_a_problem(description: object) -> None:
    body = load("issue_created_cloud")
    body["issue"]["fields"]["description"] = description
    assert problems_of(body) == ["issue.fields.description must be a string or an ADF document"]


def test_huge_description_is_capped() -> None:
    body = load("issue_created_cloud")
    body["issue"]["fields"]["description"] = "x" * (MAX_DESCRIPTION_CHARS * 3)
    description = accepted(body).ticket.description
    assert MAX_DESCRIPTION_CHARS <= len(description) < MAX_DESCRIPTION_CHARS + 100
    assert description.endswith("[description truncated]")


def test_rich_adf_description_keeps_structure() -> None:
    text = accepted(load("issue_created_adf")).ticket.description
    expected_lines = [
        "## Context",
        "### Steps",
        "1. Open the export page",
        "2. Pick a format",
        "   - CSV",
        "   - JSON",
        "```python",
        "def retry_export():",
        "    raise TimeoutError",
        "> It worked last week.",
        "---",
        "Do not touch the billing tables.",
        "| Format | Works |",
        "| CSV | no |",
        "- [x] Reproduce",
        "- [ ] Fix",
        "Stack trace",
        "[attachment: screenshot.png]",
        "https://acme.atlassian.net/browse/ACME-1",
        "https://github.com/acme/web/pull/7",
        "Left column",
    ]
    lines = text.split("\n")
    for line in expected_lines:
        assert line in lines, line
    assert "Reported by @Mia Krystof in the runbook (https://wiki.acme.test/runbook)." in text
    assert "`retry_export()`" in text
    assert "Status: IN REVIEW due 2024-07-01" in text
    assert "\n\n\n" not in text
    assert text == text.strip()


# --- ADF details ------------------------------------------------------------------------------------


def doc(*content: object) -> dict[str, Any]:
    return {"type": "doc", "version": 1, "content": list(content)}


def para(*content: object) -> dict[str, Any]:
    return {"type": "paragraph", "content": list(content)}


def text(value: str, *marks: dict[str, Any]) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "text", "text": value}
    if marks:
        node["marks"] = list(marks)
    return node


def item(*content: object) -> dict[str, Any]:
    return {"type": "listItem", "content": list(content)}


def test_adf_link_equal_to_its_text_is_not_repeated() -> None:
    url = "https://acme.test/x"
    assert adf_to_text(doc(para(text(url, {"type": "link", "attrs": {"href": url}})))) == url


def test_adf_paragraphs_are_separated_by_blank_lines_and_hard_breaks_by_newlines() -> None:
    value = doc(para(text("one"), {"type": "hardBreak"}, text("two")), para(text("three")))
    assert adf_to_text(value) == "one\ntwo\n\nthree"


def test_adf_nested_bullet_and_ordered_lists() -> None:
    value = doc(
        {
            "type": "bulletList",
            "content": [
                item(
                    para(text("top")),
                    {
                        "type": "orderedList",
                        "attrs": {"order": 3},
                        "content": [
                            item(para(text("three"))),
                            item(
                                para(text("four")),
                                {"type": "bulletList", "content": [item(para(text("deep")))]},
                            ),
                        ],
                    },
                ),
                item(para(text("second"))),
            ],
        }
    )
    assert adf_to_text(value) == "- top\n  3. three\n  4. four\n     - deep\n- second"


def test_adf_heading_levels_and_bad_level() -> None:
    value = doc(
        {"type": "heading", "attrs": {"level": 4}, "content": [text("Four")]},
        {"type": "heading", "attrs": {"level": "big"}, "content": [text("Bad")]},
    )
    assert adf_to_text(value) == "#### Four\n\n# Bad"


def test_adf_inline_nodes_without_their_usual_attributes() -> None:
    value = doc(
        para(
            {"type": "mention", "attrs": {"id": "557058:abc"}},
            text(" "),
            {"type": "emoji", "attrs": {"shortName": ":tada:"}},
            text(" "),
            {"type": "inlineCard", "attrs": {"data": {"url": "https://acme.test/card"}}},
            {"type": "status"},
            {"type": "date", "attrs": {"timestamp": "soon"}},
            {"type": "placeholder", "attrs": {"text": "Type here"}},
        ),
        {"type": "media", "attrs": {"id": "abc", "type": "file"}},
    )
    assert adf_to_text(value) == "@557058:abc :tada: https://acme.test/cardsoon\n\n[attachment]"


def test_adf_code_block_without_language_and_blockquote_of_two_paragraphs() -> None:
    value = doc(
        {"type": "codeBlock", "content": [text("x = 1")]},
        {"type": "blockquote", "content": [para(text("a")), para(text("b"))]},
    )
    assert adf_to_text(value) == "```\nx = 1\n```\n\n> a\n>\n> b"


def test_adf_unknown_nodes_render_their_children() -> None:
    value = doc(
        {
            "type": "futureBlock",
            "content": [para(text("inside"), {"type": "sparkle", "content": [text("!")]})],
        }
    )
    assert adf_to_text(value) == "inside!"


@pytest.mark.parametrize(
    "value",
    [
        {},
        {"type": "doc"},
        {"type": "doc", "content": "text"},
        {"type": "doc", "content": [None, 1, "x", [], {"type": None}]},
        {
            "type": 5,
            "content": [{"type": "text", "text": 5}, {"type": "text", "marks": "bold", "text": "ok"}],
        },
        {"type": "doc", "content": [{"type": "heading", "attrs": [], "content": {}}]},
        {"type": "doc", "content": [{"type": "table", "content": [{"type": "tableRow", "content": [1]}, 2]}]},
        {
            "type": "doc",
            "content": [{"type": "text", "text": "t", "marks": [None, {"type": "link", "attrs": 3}]}],
        },
        {"type": "doc", "content": [{"type": "date", "attrs": {"timestamp": 10**40}}]},
        {"type": "doc", "content": [{"type": "orderedList", "attrs": {"order": True}, "content": [{}]}]},
        {
            "type": "doc",
            "content": [{"type": "taskList", "content": [{"type": "taskList", "content": [{}]}]}],
        },
    ],
)
def test_adf_malformed_input_never_raises(value: dict[str, Any]) -> None:
    result = adf_to_text(value)
    assert isinstance(result, str)
    assert result == result.strip()


def test_adf_deep_nesting_stops_descending() -> None:
    node: dict[str, Any] = text("bottom")
    for _ in range(5000):
        node = {"type": "blockquote", "content": [node]}
    result = adf_to_text(doc(node))
    assert "bottom" not in result  # descent stopped long before the bottom, without a RecursionError


def test_adf_shallow_nesting_is_kept() -> None:
    node: dict[str, Any] = para(text("bottom"))
    for _ in range(MAX_ADF_DEPTH // 4):
        node = {"type": "panel", "content": [node]}
    assert adf_to_text(doc(node)) == "bottom"


def test_adf_cycle_terminates() -> None:
    node: dict[str, Any] = {"type": "bulletList", "content": []}
    node["content"].append(item(para(text("loop")), node))
    assert adf_to_text(doc(node)).startswith("- loop")


def test_description_text_of_odd_values() -> None:
    assert description_text(12) == ""
    assert description_text([para(text("list of nodes"))]) == "list of nodes"


# --- trigger rules ----------------------------------------------------------------------------------


def test_created_ticket_without_the_trigger_label_is_ignored() -> None:
    body = load("issue_created_cloud")
    body["issue"]["fields"]["labels"] = ["backend"]
    reason = ignored(body, LABEL).reason
    assert "ACME-1" in reason
    assert "auto-code" in reason


def test_trigger_label_is_compared_case_insensitively() -> None:
    body = load("issue_created_cloud")
    body["issue"]["fields"]["labels"] = ["Auto-Code"]
    accepted(body, LABEL)


@pytest.mark.parametrize("name", ["custom_nested", "automation_jira_format"])
def test_automation_and_custom_bodies_are_filtered_by_label(name: str) -> None:
    body = load(name)
    body["issue"]["fields"]["labels"] = []
    ignored(body, LABEL)


def test_project_filter_ignores_other_projects() -> None:
    rules = TriggerRules(projects=frozenset({"WEB", "OPS_2"}))
    assert "ACME" in ignored(load("issue_created_cloud"), rules).reason
    assert accepted(load("issue_created_server"), rules).ticket.project == "OPS_2"


def test_project_filter_applies_to_issue_updated() -> None:
    rules = TriggerRules(trigger_label="auto-code", projects=frozenset({"WEB"}))
    assert "project ACME" in ignored(load("issue_updated_label_added"), rules).reason


def test_project_comes_from_fields_project_key_else_the_key_prefix() -> None:
    body = load("issue_created_cloud")
    body["issue"]["fields"]["project"]["key"] = "MOVED"
    assert accepted(body).ticket.project == "MOVED"
    del body["issue"]["fields"]["project"]
    assert accepted(body).ticket.project == "ACME"


@pytest.mark.parametrize("project", [{"key": 5}, {"key": "../x"}, 7])
def test_project_key_of_a_wrong_shape_is_a_problem(project: object) -> None:
    body = load("issue_created_cloud")
    body["issue"]["fields"]["project"] = project
    assert problems_of(body)[0].startswith("issue.fields.project")


def test_no_rules_accept_every_created_ticket() -> None:
    body = load("issue_created_cloud")
    body["issue"]["fields"]["labels"] = []
    assert accepted(body, OPEN).ticket.labels == ()


# --- validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [[], ["issue"], "ACME-1", 1, 1.5, None, True])
def test_body_that_is_not_an_object_is_invalid(body: object) -> None:
    assert problems_of(body) == ["body must be a JSON object"]


def test_empty_body_is_invalid() -> None:
    assert problems_of({}) == ["issue is missing (expected issue.key and issue.fields.summary)"]


def test_missing_key_and_summary_are_both_named() -> None:
    assert problems_of({"issue": {"fields": {}}}) == [
        "issue.key is missing",
        "issue.fields.summary is missing",
    ]


def test_missing_summary_in_a_flat_body_names_the_flat_path() -> None:
    assert problems_of({"key": "ACME-1"}) == ["summary is missing"]


def test_lowercase_key_is_normalised() -> None:
    assert accepted(custom(key=" acme-42 ", fields={"summary": "s"})).ticket.key == "ACME-42"


@pytest.mark.parametrize(
    "key",
    ["../etc", "PROJ-0", "-1", "P" * 195 + "-1234", "PROJ-1\nPROJ-2", "PROJ 1", "PROJ-1;rm", "", "1PROJ-1"],
)
def test_bad_keys_are_problems(key: str) -> None:
    problems = problems_of(custom(key=key, fields={"summary": "s"}))
    assert len(problems) == 1
    assert problems[0].startswith("issue key issue.key: not a Jira issue key")


@pytest.mark.parametrize("summary", [42, 1.5, True, ["a"], {"text": "a"}])
def test_summary_that_is_not_a_string_is_a_problem(summary: object) -> None:
    body = load("issue_created_cloud")
    body["issue"]["fields"]["summary"] = summary
    assert problems_of(body) == ["issue.fields.summary must be a string"]


@pytest.mark.parametrize("summary", ["", "   ", "\n\t"])
def test_blank_summary_is_a_problem(summary: str) -> None:
    body = load("issue_created_cloud")
    body["issue"]["fields"]["summary"] = summary
    assert problems_of(body) == ["issue.fields.summary is empty"]


def test_key_must_be_a_string() -> None:
    assert problems_of(custom(key=10001, fields={"summary": "s"})) == ["issue.key must be a string"]


def test_wrong_types_are_all_collected() -> None:
    problems = problems_of({"issue": {"key": "../x", "fields": {"summary": 3, "labels": "auto-code"}}})
    assert len(problems) == 3
    assert problems[0].startswith("issue key issue.key")
    assert problems[1:] == [
        "issue.fields.summary must be a string",
        "issue.fields.labels must be a list of strings",
    ]


def test_fields_that_are_a_list_are_a_problem() -> None:
    problems = problems_of({"issue": {"key": "ACME-1", "fields": ["summary"]}})
    assert "issue.fields must be an object" in problems


@pytest.mark.parametrize("labels", [["ok", 1], "auto-code", {"auto-code": True}])
def test_labels_that_are_not_a_list_of_strings_are_a_problem(labels: object) -> None:
    body = load("issue_created_cloud")
    body["issue"]["fields"]["labels"] = labels
    assert problems_of(body) == ["issue.fields.labels must be a list of strings"]


def test_summary_keeps_unicode_zero_width_and_quotes() -> None:
    summary = "Ünïcødé 日本語 \u200bzero\u200dwidth \"double\" 'single' back\\slash 🚀 <b>&amp;"
    body = load("issue_created_cloud")
    body["issue"]["fields"]["summary"] = f"  {summary}\n"
    assert accepted(body).ticket.summary == summary


def test_summary_is_capped() -> None:
    body = load("issue_created_cloud")
    body["issue"]["fields"]["summary"] = "y" * 5000
    assert len(accepted(body).ticket.summary) == MAX_SUMMARY_CHARS


def test_lone_surrogates_do_not_break_the_ticket() -> None:
    body = json.loads('{"key": "ACME-1", "summary": "bad \\ud800 half", "labels": ["x\\udfff"]}')
    ticket = accepted(body).ticket
    assert ticket.summary == "bad \ufffd half"
    assert ticket.labels == ("x\ufffd",)


# --- properties -------------------------------------------------------------------------------------

ALL_FIXTURES = sorted(PARSED)
RULES = st.sampled_from([OPEN, LABEL, TriggerRules(trigger_label="auto-code", projects=frozenset({"ACME"}))])
KEYISH = st.sampled_from(
    [
        "issue",
        "fields",
        "key",
        "summary",
        "description",
        "labels",
        "webhookEvent",
        "changelog",
        "items",
        "self",
        "url",
        "project",
        "type",
        "content",
        "text",
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(st.characters(exclude_categories=()), max_size=30)
    | st.sampled_from(["ACME-1", "jira:issue_created", "jira:issue_updated", "doc", "auto-code", "labels"])
)
JSON = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(KEYISH | st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)
OUTCOMES = (Accepted, Ignored)


def outcome_of(body: object, rules: TriggerRules) -> object:
    """The outcome, or the InvalidTicket; any other exception fails the test."""
    try:
        outcome = interpret(body, rules)
    except InvalidTicket as error:
        assert error.problems
        assert all(isinstance(problem, str) and problem for problem in error.problems)
        return error
    assert isinstance(outcome, OUTCOMES)
    return outcome


def paths(value: object, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside a JSON document."""
    found = [prefix]
    if isinstance(value, dict):
        for name, child in value.items():
            found += paths(child, (*prefix, name))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += paths(child, (*prefix, index))
    return found


@settings(max_examples=150, deadline=None)
@given(body=JSON, rules=RULES)
def test_random_json_gives_only_the_three_outcomes(body: object, rules: TriggerRules) -> None:
    outcome_of(body, rules)


@settings(max_examples=150, deadline=None)
@given(wrapper=st.sampled_from(["issue", "top", "created", "updated"]), issue=JSON, rules=RULES)
def test_random_issue_objects_give_only_the_three_outcomes(
    wrapper: str, issue: object, rules: TriggerRules
) -> None:
    changelog = {"items": [{"field": "labels", "fromString": "", "toString": "auto-code"}]}
    bodies = {
        "issue": {"issue": issue},
        "top": issue,
        "created": {"webhookEvent": "jira:issue_created", "issue": issue},
        "updated": {"webhookEvent": "jira:issue_updated", "changelog": changelog, "issue": issue},
    }
    outcome_of(bodies[wrapper], rules)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(ALL_FIXTURES), data=st.data(), rules=RULES)
def test_mutated_fixtures_give_only_the_three_outcomes(
    name: str, data: st.DataObject, rules: TriggerRules
) -> None:
    body: Any = load(name)
    for _ in range(data.draw(st.integers(1, 5), label="mutations")):
        candidates = [path for path in paths(body) if path]
        if not candidates:
            break
        path = data.draw(st.sampled_from(candidates), label="path")
        parent = body
        for step in path[:-1]:
            parent = parent[step]
        if data.draw(st.booleans(), label="drop"):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(JSON, label="replacement")
    outcome_of(body, rules)


ADF_TYPES = st.sampled_from(
    [
        "doc",
        "paragraph",
        "text",
        "hardBreak",
        "heading",
        "bulletList",
        "orderedList",
        "listItem",
        "codeBlock",
        "blockquote",
        "rule",
        "mention",
        "emoji",
        "inlineCard",
        "blockCard",
        "panel",
        "table",
        "tableRow",
        "tableCell",
        "tableHeader",
        "mediaSingle",
        "media",
        "status",
        "date",
        "taskList",
        "taskItem",
        "expand",
        "decisionList",
        "decisionItem",
        "mystery",
    ]
)
ADF_ATTRS = st.dictionaries(
    st.sampled_from(
        [
            "level",
            "order",
            "language",
            "text",
            "id",
            "shortName",
            "url",
            "href",
            "timestamp",
            "state",
            "title",
            "alt",
            "data",
        ]
    ),
    SCALARS,
    max_size=3,
)
ADF = st.recursive(
    st.fixed_dictionaries({"type": ADF_TYPES}, optional={"text": SCALARS, "attrs": ADF_ATTRS | SCALARS}),
    lambda children: st.fixed_dictionaries(
        {"type": ADF_TYPES, "content": st.lists(children, max_size=4) | children},
        optional={
            "attrs": ADF_ATTRS,
            "marks": st.lists(
                st.fixed_dictionaries(
                    {"type": st.sampled_from(["link", "code", "strong"]), "attrs": ADF_ATTRS}
                ),
                max_size=2,
            ),
        },
    ),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None)
@given(node=ADF)
def test_random_adf_always_converts_to_stripped_text(node: dict[str, Any]) -> None:
    result = adf_to_text(node)
    assert isinstance(result, str)
    assert result == result.strip()
    body = {"key": "ACME-1", "summary": "s", "description": copy.deepcopy(node)}
    outcome_of(body, OPEN)
