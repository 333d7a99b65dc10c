"""bridge.py: ports on 127.0.0.1 relayed to Unix sockets, then the command; the relay ends with it."""

from __future__ import annotations

import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.isolation import bridge
from tests.fencing import need_bwrap


class _Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(b"echo:" + self.rfile.readline())


@pytest.fixture
def echo_socket() -> Iterator[Path]:
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="ac-bridge-"))
    path = folder / "echo.sock"
    server = socketserver.ThreadingUnixStreamServer(str(path), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield path
    server.shutdown()
    server.server_close()
    path.unlink(missing_ok=True)
    folder.rmdir()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def client(port: int, code: int = 0) -> list[str]:
    script = (
        "import socket, sys\n"
        f"s = socket.create_connection(('127.0.0.1', {port}))\n"
        "s.sendall(b'hello\\n')\n"
        "print(s.makefile().readline().strip())\n"
        f"sys.exit({code})\n"
    )
    return [sys.executable, "-c", script]


def test_the_command_reaches_the_socket_through_the_port_and_its_exit_code_stays(echo_socket: Path) -> None:
    port = free_port()
    done = subprocess.run(
        bridge.argv(sys.executable, {port: echo_socket}, client(port, 3)), capture_output=True, text=True
    )
    assert (done.returncode, done.stdout.strip()) == (3, "echo:hello"), done.stderr


def test_the_relay_goes_away_with_the_command(echo_socket: Path) -> None:
    port = free_port()
    subprocess.run(bridge.argv(sys.executable, {port: echo_socket}, ["true"]), check=True)
    deadline = time.monotonic() + 3
    while True:
        try:
            with socket.socket() as again:
                again.bind(("127.0.0.1", port))
            break
        except OSError:
            assert time.monotonic() < deadline, "the relay still holds the port after the command ended"
            time.sleep(0.1)


@pytest.mark.parametrize(
    "args", [["notaport=/x", "--", "true"], ["8080=/x"], ["8080=relative", "--", "true"]]
)
def test_bad_arguments_exit_2_with_a_message(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(bridge.PATH), *args], capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stderr.startswith("bridge: ")


def test_inside_a_sandbox_without_a_network_the_bridge_is_the_way_out(echo_socket: Path) -> None:
    need_bwrap()
    port = free_port()
    folder = str(echo_socket.parent)
    sandbox = [
        "bwrap", "--die-with-parent", "--unshare-net", "--unshare-pid", "--ro-bind", "/", "/",
        "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--ro-bind", folder, folder,
        "--ro-bind", sys.prefix, sys.prefix, "--",  # the interpreter, where a checkout under /tmp keeps it
    ]  # fmt: skip
    through = subprocess.run(
        [*sandbox, *bridge.argv(sys.executable, {port: echo_socket}, client(port))],
        capture_output=True,
        text=True,
    )
    assert (through.returncode, through.stdout.strip()) == (0, "echo:hello"), through.stderr
    without = subprocess.run([*sandbox, *client(port)], capture_output=True, text=True)
    assert without.returncode != 0 and "Connection refused" in without.stderr
