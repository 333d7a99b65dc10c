"""How many agents a test's services run at once, counted from /proc by a sampler thread."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType

from app.agent.claude_code import bundled_cli

PROC = Path("/proc")


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ...)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself hold spaces and parentheses.
    return stat.rsplit(")", 1)[-1].split()


def _descends_from(pid: int, roots: set[int]) -> bool:
    seen = set()
    current: int | None = pid
    while current is not None and current > 1 and current not in seen:
        if current in roots:
            return True
        seen.add(current)
        fields = _stat(current)
        current = int(fields[1]) if fields else None
    return False


def agent_groups(roots: Iterable[int], cli: Path | None = None) -> set[int]:
    """The process groups of the agent CLIs that descend from one of `roots`: one group per agent.

    Every agent runs in a process group of its own (its launcher calls setsid), and the CLI starts
    helper processes of the same binary, so agents are counted by group, not by process. Zombies have
    no command line and are not counted.
    """
    binary = str(cli or bundled_cli()).encode()
    ancestors = set(roots)
    groups = set()
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv0 = (entry / "cmdline").read_bytes().split(b"\0", 1)[0]
        except OSError:
            continue
        if argv0 != binary:
            continue
        fields = _stat(int(entry.name))
        if fields and _descends_from(int(entry.name), ancestors):
            groups.add(int(fields[2]))
    return groups


class AgentSampler:
    """Counts `agent_groups` every `interval` seconds in a thread; `peak` is the most seen at once.

    with AgentSampler(lambda: {service.process.pid}) as sampler:
        ...
    assert sampler.peak <= 2
    """

    def __init__(self, roots: Callable[[], Iterable[int]], interval: float = 0.02) -> None:
        cli = bundled_cli()
        if cli is None:
            raise RuntimeError("the bundled Claude Code CLI is missing")
        self.roots = roots
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._cli = cli
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agent-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            count = len(agent_groups(set(self.roots()), self._cli))
            self.samples += 1
            self.peak = max(self.peak, count)
            self._stop.wait(self.interval)

    def __enter__(self) -> AgentSampler:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
