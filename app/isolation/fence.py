"""The fence around one sandboxed process: its sandbox, its ways out, its decoys and what it tried.

`Fence.enclose(run_id, phase, worktree, home)` opens, for the length of one agent phase or one command,
a bridge directory of Unix sockets bound read-only into the sandbox: `egress.sock`, served by the
egress proxy with the phase's allowlist (agent, setup or checks), and for the agent CLI only
`model.sock`, served by the model proxy. Inside, `bridge.py` turns them into 127.0.0.1 ports before the
command starts, and the environment points at them (HTTP(S)_PROXY and, for the agent, ANTHROPIC_BASE_URL;
NO_PROXY covers the loopback). The sandbox has no other network. Each phase's HOME gets the run's decoy
credentials; the egress proxy scans what it can read for them, and the enclosure reports every request
(`network`) and every decoy seen (`tripped`) when it closes.

With `intercept_tls` (EGRESS_TLS_INTERCEPT) each run also gets its own certificate authority: its
certificate goes into every HOME of the run, the CA variables name it, and the egress proxy reads what
goes inside HTTPS to an allowed host (app/isolation/tls.py).

Without a sandbox (SANDBOX=off, or no bubblewrap under SANDBOX=auto) nothing is fenced: the decoys are
still planted and the run's record says `unfenced`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import secrets
import shutil
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from app.isolation import bridge
from app.isolation.canary import Canaries
from app.isolation.egress import Channel, EgressPolicy, EgressProxy
from app.isolation.sandbox import Sandbox
from app.isolation.tls import CA_FILE_VARIABLES, Interception
from app.logger import get_logger

log = get_logger(__name__)

AGENT, SETUP, CHECKS = "agent", "setup", "checks"
PHASES = (AGENT, SETUP, CHECKS)
MODEL_PORT = 8765
PROXY_PORT = 3128
CACHE_VARIABLES = ("PIP_CACHE_DIR", "UV_CACHE_DIR", "npm_config_cache", "YARN_CACHE_FOLDER")
RUNS_KEPT = 256  # runs whose decoys and authority stay in memory (more are made again, the same decoys)
_T = TypeVar("_T")
_UNSAFE = re.compile(r"[^a-z0-9-]+")


class ModelListener(Protocol):
    """The model proxy, as far as the fence needs it: a Unix socket for one phase."""

    def listen(self, path: Path) -> AbstractAsyncContextManager[Path]: ...


@dataclass
class Enclosure:
    """What one enclosed process is started with, and what its ways out saw."""

    prefix: list[str]
    env: dict[str, str]
    fenced: bool
    channel: Channel | None = None

    @property
    def network(self) -> list[dict[str, Any]]:
        """Every request that reached the egress proxy, as plain dicts (empty when unfenced)."""
        return [record.to_dict() for record in self.channel.records] if self.channel else []

    @property
    def tripped(self) -> list[str]:
        """The decoys the egress proxy saw leave."""
        return self.channel.tripped if self.channel else []


@dataclass(frozen=True)
class FenceConfig:
    """Where bridges and the package cache live, each phase's allowlist, and the key decoys derive from."""

    bridge_dir: Path
    cache_dir: Path
    key: bytes
    policies: Mapping[str, EgressPolicy] = field(default_factory=dict)
    intercept_tls: bool = False


def _recall(cache: OrderedDict[str, _T], key: str) -> _T | None:
    found = cache.get(key)
    if found is not None:
        cache.move_to_end(key)
    return found


def _keep(cache: OrderedDict[str, _T], key: str, value: _T) -> _T:
    cache[key] = value
    while len(cache) > RUNS_KEPT:
        cache.popitem(last=False)
    return value


def load_key(path: Path) -> bytes:
    """The service's decoy key: made once (0600, under the service's own dir, hidden from every sandbox)."""
    try:
        key = path.read_bytes()
        if len(key) >= 32:
            return key
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    temp.write_bytes(secrets.token_bytes(32))
    temp.chmod(0o600)
    temp.replace(path)
    return path.read_bytes()


class Fence:
    """Encloses sandboxed processes; one per service, shared by the agent, the checks and the setup."""

    def __init__(
        self,
        sandbox: Sandbox | None,
        config: FenceConfig,
        *,
        egress: EgressProxy | None = None,
        model: ModelListener | None = None,
    ) -> None:
        self.sandbox = sandbox
        self.config = config
        self._egress = egress or EgressProxy()
        self._model = model
        self._canaries: OrderedDict[str, Canaries] = OrderedDict()
        self._authorities: OrderedDict[str, Interception] = OrderedDict()

    @property
    def fenced(self) -> bool:
        return self.sandbox is not None

    def canaries(self, run_id: str) -> Canaries:
        """The run's decoys: the same across phases and restarts, unguessable without the service's key."""
        found = _recall(self._canaries, run_id)
        if found is None:
            seed = hmac.new(self.config.key, run_id.encode(), hashlib.sha256).hexdigest()
            found = _keep(self._canaries, run_id, Canaries.from_seed(seed))
            found.register()
        return found

    def authority(self, run_id: str) -> Interception | None:
        """The run's certificate authority when TLS interception is on (made on first use, kept in memory)."""
        if not self.config.intercept_tls:
            return None
        return _recall(self._authorities, run_id) or _keep(self._authorities, run_id, Interception(run_id))

    def policy(self, phase: str) -> EgressPolicy:
        return self.config.policies.get(phase, EgressPolicy())

    @contextlib.asynccontextmanager
    async def enclose(
        self, run_id: str, phase: str, worktree: Path, home: Path, *, model: bool = False
    ) -> AsyncIterator[Enclosure]:
        """The prefix and environment of one process in `worktree` with `home`, for the block."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        canaries = self.canaries(run_id)
        canaries.plant(home)
        env = canaries.env()
        if phase == SETUP:
            env.update(dict.fromkeys(CACHE_VARIABLES, str(self.config.cache_dir)))
        if self.sandbox is None:
            yield Enclosure(prefix=[], env=env, fenced=False)
            return
        authority = self.authority(run_id)
        if authority is not None:
            env.update(dict.fromkeys(CA_FILE_VARIABLES, str(authority.write(home))))
        name = f"{_UNSAFE.sub('-', run_id.lower())[:40]}-{phase}-{secrets.token_hex(4)}"
        bridges = self.config.bridge_dir / name
        bridges.mkdir(mode=0o700, parents=True)
        try:
            async with contextlib.AsyncExitStack() as stack:
                sockets = {PROXY_PORT: bridges / "egress.sock"}
                channel = await stack.enter_async_context(
                    self._egress.channel(
                        sockets[PROXY_PORT], phase, self.policy(phase), canaries.find, authority
                    )
                )
                if model and self._model is not None:
                    sockets[MODEL_PORT] = await stack.enter_async_context(
                        self._model.listen(bridges / "model.sock")
                    )
                    env["ANTHROPIC_BASE_URL"] = f"http://127.0.0.1:{MODEL_PORT}"
                proxy = f"http://127.0.0.1:{PROXY_PORT}"
                for variable in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
                    env[variable] = proxy
                env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
                prefix = [
                    *self.sandbox.prefix(
                        worktree,
                        home,
                        bridges=bridges,
                        cache=self.config.cache_dir if phase == SETUP else None,
                        cache_writable=phase == SETUP,
                    ),
                    *bridge.argv(sys.executable, sockets, []),
                ]
                yield Enclosure(prefix=prefix, env=env, fenced=True, channel=channel)
        finally:
            shutil.rmtree(bridges, ignore_errors=True)
