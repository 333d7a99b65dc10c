"""The `auto-code` command: serve (the default)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from app.config import Settings, load_settings
from app.errors import ConfigError
from app.logger import configure_logging


def _settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        print(f"auto-code: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def serve(settings: Settings) -> None:
    """Run the HTTP service until SIGTERM or Ctrl-C."""
    import uvicorn

    from app.main import create_app

    configure_logging(settings.log_level, settings.secret_values())
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.claude_code_api_port,
        log_config=None,
        proxy_headers=False,
        timeout_graceful_shutdown=10,
    )


def build_parser() -> argparse.ArgumentParser:
    """The command-line grammar."""
    parser = argparse.ArgumentParser(prog="auto-code", description="Turn Jira tickets into pull requests.")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the webhook service (the default)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    if args.command in (None, "serve"):
        serve(_settings_or_exit())
