"""The sample project and the scripted agent that `auto-code demo` and the end-to-end tests play.

The sample is a tiny Python package with ruff and pytest configured. The scripted implementation of
the sample ticket first leaves an unused import (lint fails) and a wrong separator (a test fails); the
fix rounds, on the resumed session, repair each.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from app.demo.model_server import Script, ToolCall, Turn
from app.models import Ticket

DEMO_TICKET = Ticket(
    key="SHOP-1",
    summary="Add a slugify helper for product names",
    description=(
        "Product pages need URL slugs.\n\n"
        "Add `shop.slug.slugify(name)` that lower-cases the name and joins its words with '-', "
        "e.g. 'Blue Suede Shoes' -> 'blue-suede-shoes'. Cover it with a test."
    ),
    url="https://example.atlassian.net/browse/SHOP-1",
    project="SHOP",
    labels=("auto-code",),
    issue_type="Story",
)

SAMPLE_FILES = {
    "pyproject.toml": (
        '[project]\nname = "sample-shop"\nversion = "0.1.0"\nrequires-python = ">=3.11"\n\n'
        '[tool.ruff]\nline-length = 100\n\n[tool.ruff.lint]\nselect = ["E", "F", "I"]\n\n'
        '[tool.pytest.ini_options]\ntestpaths = ["tests"]\npythonpath = ["."]\n'
        'addopts = "-p no:cacheprovider"\n'
    ),
    "README.md": "# sample-shop\n\nA tiny shop used by the auto-code demo.\n",
    ".gitignore": "__pycache__/\n*.pyc\n.ruff_cache/\n",
    "shop/__init__.py": '"""A tiny shop."""\n',
    "shop/prices.py": (
        '"""Prices."""\n\n\ndef total(prices: list[float], discount: float = 0.0) -> float:\n'
        '    """Sum of the prices, less a fractional discount."""\n'
        "    return round(sum(prices) * (1 - discount), 2)\n"
    ),
    "tests/test_prices.py": (
        "from shop.prices import total\n\n\ndef test_total() -> None:\n"
        "    assert total([10.0, 5.5]) == 15.5\n\n\ndef test_discount() -> None:\n"
        "    assert total([100.0], discount=0.25) == 75.0\n"
    ),
}

SLUG_WITH_PROBLEMS = (
    '"""URL slugs for product names."""\n\nimport os\n\n\ndef slugify(name: str) -> str:\n'
    '    """Lower-case `name` and join its words with a separator."""\n'
    '    return "_".join(name.lower().split())\n'
)
SLUG_TEST = (
    "from shop.slug import slugify\n\n\ndef test_slugify() -> None:\n"
    '    assert slugify("Blue Suede Shoes") == "blue-suede-shoes"\n\n\n'
    "def test_slugify_collapses_spaces() -> None:\n"
    '    assert slugify("  Red   Hat ") == "red-hat"\n'
)

IMPLEMENT_TRIGGER = "Implement this Jira ticket"
CONTINUE_TRIGGER = "The service was interrupted"
REVIEW_TRIGGER = "Review this uncommitted change"
LINT_FIX_TRIGGER = "`ruff check .` failed"
TEST_FIX_TRIGGER = "`python -m pytest -q` failed"


def demo_scripts() -> list[Script]:
    """The scripted agent: implement with two mistakes, pass review, fix lint, then fix the test."""
    return [
        Script(
            IMPLEMENT_TRIGGER,
            [
                Turn(
                    text="I'll add the slug module and a test.",
                    tool_calls=[ToolCall.write("shop/slug.py", SLUG_WITH_PROBLEMS)],
                ),
                Turn(tool_calls=[ToolCall.write("tests/test_slug.py", SLUG_TEST)]),
            ],
            final_text="Added shop/slug.py with slugify() and tests/test_slug.py covering it.",
        ),
        # After a crash or a deploy the resumed session is asked to finish: it (re)writes both files.
        Script(
            CONTINUE_TRIGGER,
            [
                Turn(
                    text="Picking up where I was interrupted.",
                    tool_calls=[
                        ToolCall.write("shop/slug.py", SLUG_WITH_PROBLEMS),
                        ToolCall.write("tests/test_slug.py", SLUG_TEST),
                    ],
                )
            ],
            final_text="Finished the slug module and its test after the interruption.",
        ),
        Script(
            REVIEW_TRIGGER,
            [],
            final_text="The change is small and matches the ticket.\n\nHAS_ISSUES: false\nFINDINGS:\n- none",
        ),
        Script(
            LINT_FIX_TRIGGER,
            [Turn(tool_calls=[ToolCall.edit("shop/slug.py", "import os\n\n\n", "")])],
            final_text="Removed the unused import that ruff reported.",
        ),
        Script(
            TEST_FIX_TRIGGER,
            [Turn(tool_calls=[ToolCall.edit("shop/slug.py", 'return "_".join', 'return "-".join')])],
            final_text="Slugs now join words with '-', as the ticket asks; both tests pass.",
        ),
    ]


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def create_origin(root: Path, files: dict[str, str] | None = None) -> Path:
    """A bare 'origin' repository at root/origin.git holding the sample project on `main`."""
    seed = root / "seed"
    for relative, content in (files or SAMPLE_FILES).items():
        path = seed / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    _git(seed, "init", "-q", "-b", "main")
    _git(seed, "add", "-A")
    _git(
        seed,
        "-c", "user.name=Sample", "-c", "user.email=sample@example.com", "-c", "commit.gpgsign=false",
        "commit", "-q", "-m", "Sample shop",
    )  # fmt: skip
    origin = root / "origin.git"
    _git(root, "clone", "-q", "--bare", str(seed), str(origin))
    return origin
