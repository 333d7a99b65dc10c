"""The `auto-code` command: serve (the default), demo, and runs list|show|cancel|retry."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import uvicorn

from app.config import Settings, load_settings
from app.errors import ConfigError
from app.logger import configure_logging, get_logger
from app.models import network_line

log = get_logger(__name__)


def _settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        print(f"auto-code: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def serve(settings: Settings) -> None:
    """Run the HTTP service until SIGTERM or Ctrl-C."""
    from app.main import create_app

    configure_logging(settings.log_level, settings.secret_values())
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.bind_host,
        port=settings.claude_code_api_port,
        log_config=None,
        proxy_headers=False,
        timeout_graceful_shutdown=5,
    )
    DrainingServer(config, app.state, settings.shutdown_drain.total_seconds()).run()


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM drains first: new tickets get 503 for `drain_seconds`, then
    the server shuts down and runs in flight are interrupted (they resume on the next start)."""

    def __init__(self, config: uvicorn.Config, state: Any, drain_seconds: float) -> None:
        super().__init__(config)
        self._state = state
        self._drain_seconds = drain_seconds
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._drain_seconds <= 0:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        self._state.draining = True
        log.info("draining: new tickets get 503 until shutdown", seconds=self._drain_seconds)
        timer = threading.Timer(self._drain_seconds, super().handle_exit, (sig, frame))
        timer.daemon = True
        timer.start()


def _when(epoch: float | None) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S") if epoch else "-"


def format_run_list(runs: list[dict[str, Any]]) -> str:
    """A table of runs, one a line."""
    if not runs:
        return "no runs"
    lines = [f"{'RUN':<36} {'TICKET':<12} {'STATE':<11} {'CREATED (UTC)':<19}  PR / REASON"]
    for run in runs:
        detail = run.get("pr_url") or run.get("reason") or ""
        lines.append(
            f"{run['run_id']:<36} {run['ticket']:<12} {run['state']:<11} {_when(run.get('created_at')):<19}  "
            f"{detail[:80]}"
        )
    return "\n".join(lines)


def format_run(run: dict[str, Any]) -> str:
    """One run with its steps."""
    lines = [
        f"run      {run['run_id']}",
        f"ticket   {run['ticket']}",
        f"state    {run['state']}" + (f" ({run['reason']})" if run.get("reason") else ""),
        f"created  {_when(run.get('created_at'))} UTC on {run.get('replica') or '-'}",
        f"cost     ${run.get('cost_usd', 0):.4f} in {run.get('turns', 0)} turns",
    ]
    if run.get("pr_url"):
        lines.append(f"pr       {run['pr_url']}")
    if run.get("retry_of"):
        lines.append(f"retry of {run['retry_of']}")
    result = run.get("result") or {}
    network = network_line(result.get("network") or [], result.get("fenced"))
    if network:
        lines.append(f"network  {network.removeprefix('Network: ')}")
    for record in result.get("network") or []:
        verdict = "allowed" if record.get("allowed") else "DENIED "
        lines.append(
            f"  {verdict} {record.get('phase', ''):<7} {record.get('method', ''):<7} "
            f"{record.get('host')}:{record.get('port')}  {record.get('rule', '')}  "
            f"up {record.get('bytes_up', 0)} B, down {record.get('bytes_down', 0)} B"
        )
    for line in result.get("evidence") or []:
        lines.append(f"evidence {line}")
    lines.append("steps:")
    for step in run.get("steps", []):
        seconds = f"{step['seconds']:.1f}s" if step.get("seconds") is not None else "..."
        lines.append(f"  {step['name']:<18} {step['status']:<7} {seconds:>8}  {step.get('summary', '')[:90]}")
    return "\n".join(lines)


def runs_command(args: argparse.Namespace, settings: Settings) -> int:
    """Talk to the running service's runs API."""
    import httpx

    base = args.url or f"http://127.0.0.1:{settings.claude_code_api_port}"
    headers = (
        {"Authorization": f"Bearer {settings.api_token.get_secret_value()}"} if settings.api_token else {}
    )
    paths = {
        "list": ("GET", "/runs"),
        "show": ("GET", f"/runs/{getattr(args, 'run_id', '')}"),
        "cancel": ("POST", f"/runs/{getattr(args, 'run_id', '')}/cancel"),
        "retry": ("POST", f"/runs/{getattr(args, 'run_id', '')}/retry"),
    }
    method, path = paths[args.action]
    params = {
        k: v
        for k, v in {"ticket": getattr(args, "ticket", None), "state": getattr(args, "state", None)}.items()
        if v
    }
    try:
        response = httpx.request(method, base + path, headers=headers, params=params, timeout=30)
    except httpx.HTTPError as exc:
        print(f"auto-code: cannot reach the service at {base}: {exc}", file=sys.stderr)
        return 2
    body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    if response.status_code >= 400:
        print(f"auto-code: {response.status_code}: {body.get('error', response.text)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body, indent=2))
    elif args.action == "list":
        print(format_run_list(body["runs"]))
    elif args.action == "retry":
        print(f"{body['status']}: run {body['run_id']} (retry of {body['retry_of']})")
    else:
        print(format_run(body))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line grammar."""
    parser = argparse.ArgumentParser(prog="auto-code", description="Turn Jira tickets into pull requests.")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the webhook service (the default)")
    demo = commands.add_parser("demo", help="process a sample ticket end to end, offline, with no keys")
    demo.add_argument("--keep", action="store_true", help="keep the demo's temporary directory")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", help="the service's base URL (default http://127.0.0.1:CLAUDE_CODE_API_PORT)"
    )
    common.add_argument("--json", action="store_true", help="print the API's JSON")
    runs = commands.add_parser("runs", help="see, cancel and retry runs of the running service")
    actions = runs.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="list runs, newest first", parents=[common])
    listing.add_argument("--ticket", help="only runs of this ticket, e.g. PROJ-1")
    listing.add_argument("--state", help="only runs in this state, e.g. running, failed")
    for action, text in (
        ("show", "one run with its steps"),
        ("cancel", "cancel a run"),
        ("retry", "retry a run"),
    ):
        actions.add_parser(action, help=text, parents=[common]).add_argument("run_id")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    if args.command in (None, "serve"):
        serve(_settings_or_exit())
    elif args.command == "runs":
        raise SystemExit(runs_command(args, _settings_or_exit()))
    elif args.command == "demo":
        from app.demo.run import run_demo

        raise SystemExit(run_demo(keep=args.keep))
