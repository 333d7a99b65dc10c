"""Inside a sandbox with no network: listen on 127.0.0.1 ports, relay each to a Unix socket, run a command.

    python -I -S bridge.py 8765=/bridges/x/model.sock 3128=/bridges/x/egress.sock -- cmd arg...

Runs with the service's interpreter in isolated mode and imports the standard library only. It binds
every port first (so the command can connect at once), forks a relay child whose output goes nowhere,
and then becomes the command. The relay ends with the command: the sandbox's pid namespace ends every
process when its first one exits, and the child also leaves as soon as its parent is gone.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

PATH = Path(__file__).resolve()
HOST = "127.0.0.1"
CHUNK = 64 * 1024
PARENT_POLL_SECONDS = 0.5


def argv(python: str, bridges: Mapping[int, Path], command: Sequence[str]) -> list[str]:
    """The argv that runs `command` behind these bridges (port -> Unix socket)."""
    pairs = [f"{port}={path}" for port, path in sorted(bridges.items())]
    return [python, "-I", "-S", str(PATH), *pairs, "--", *command]


def _parse(args: Sequence[str]) -> tuple[dict[int, str], list[str]]:
    if "--" not in args:
        raise ValueError("expected PORT=SOCKET ... -- COMMAND")
    split = list(args).index("--")
    pairs, command = args[:split], list(args[split + 1 :])
    if not command:
        raise ValueError("no command after --")
    bridges: dict[int, str] = {}
    for pair in pairs:
        port, _, path = pair.partition("=")
        if not port.isdigit() or not 1 <= int(port) <= 65535 or not path.startswith("/"):
            raise ValueError(f"not PORT=/absolute/socket/path: {pair!r}")
        bridges[int(port)] = path
    return bridges, command


def _pump(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(CHUNK):
            target.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)


def _relay(client: socket.socket, path: str) -> None:
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        upstream.connect(path)
    except OSError:
        client.close()
        upstream.close()
        return
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def _serve(listener: socket.socket, path: str) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_relay, args=(client, path), daemon=True).start()


def _watch_parent(parent: int) -> None:
    import time

    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(0)


def _child(listeners: Mapping[socket.socket, str], parent: int) -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    for listener, path in listeners.items():
        threading.Thread(target=_serve, args=(listener, path), daemon=True).start()
    _watch_parent(parent)


def main(args: Sequence[str]) -> int:
    try:
        bridges, command = _parse(args)
    except ValueError as exc:
        print(f"bridge: {exc}", file=sys.stderr)
        return 2
    listeners: dict[socket.socket, str] = {}
    for port, path in bridges.items():
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((HOST, port))
        except OSError as exc:
            print(f"bridge: cannot listen on {HOST}:{port}: {exc}", file=sys.stderr)
            return 2
        listener.listen(64)
        listeners[listener] = path
    parent = os.getpid()
    if os.fork() == 0:
        try:
            _child(listeners, parent)
        finally:
            os._exit(0)
    for listener in listeners:
        listener.close()
    try:
        os.execvp(command[0], command)  # noqa: S606 - the sandboxed command, as given
    except OSError as exc:
        print(f"bridge: cannot run {command[0]}: {exc}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
