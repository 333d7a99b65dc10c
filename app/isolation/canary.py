"""Decoy credentials for a run: planted where an attacker looks, searched for wherever data leaves.

Each sandboxed phase gets, in its HOME, a cloud credentials file (`.aws/credentials`) and, in its
environment, a token-shaped GITHUB_TOKEN. Nothing real accepts them; a run's honest work never reads
them. Seen in an egress request, a commit or a PR body, they prove that code in the sandbox went looking
for secrets and tried to send them out, and the run is quarantined. `find` sees each value raw, in
base64 (standard and URL-safe, at any byte offset inside a longer encoded blob), in hex and
percent-encoded.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import string
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from app.logger import register_secrets

_UPPER_ALNUM = string.ascii_uppercase + string.digits
_ALNUM = string.ascii_letters + string.digits
_AWS_SECRET = _ALNUM + "/+"


@dataclass(frozen=True)
class Decoy:
    name: str
    value: str


def seed() -> str:
    """A fresh random seed."""
    return secrets.token_hex(16)


def _draw(seed: str, label: str, alphabet: str, length: int) -> str:
    """`length` characters of `alphabet`, derived from the seed and a label (the same every time)."""
    out: list[str] = []
    counter = 0
    while len(out) < length:
        block = hmac.new(seed.encode(), f"{label}:{counter}".encode(), hashlib.sha256).digest()
        out.extend(alphabet[byte % len(alphabet)] for byte in block if byte < 256 - 256 % len(alphabet))
        counter += 1
    return "".join(out[:length])


def _base64_needles(value: bytes) -> set[str]:
    """The parts of the base64 of any text holding `value` that depend on `value` alone."""
    needles = set()
    for offset in range(3):
        start = -(-8 * offset // 6)
        end = 8 * (offset + len(value)) // 6
        padded = b"\0" * offset + value + b"\0\0\0"
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            needles.add(encode(padded).decode()[start:end])
    return needles


def _needles(value: str) -> set[str]:
    raw = value.encode()
    return {
        value,
        raw.hex(),
        raw.hex().upper(),
        urllib.parse.quote(value, safe=""),
        urllib.parse.quote(value, safe="/"),
        *_base64_needles(raw),
    }


@dataclass(frozen=True)
class Canaries:
    """A run's decoys and every form of them that `find` looks for."""

    decoys: tuple[Decoy, ...]
    _needles: tuple[tuple[str, str], ...] = field(repr=False, default=())

    @classmethod
    def from_seed(cls, seed: str) -> Canaries:
        decoys = (
            Decoy("aws access key id", "AKIA" + _draw(seed, "aws-id", _UPPER_ALNUM, 16)),
            Decoy("aws secret access key", _draw(seed, "aws-secret", _AWS_SECRET, 40)),
            Decoy("GITHUB_TOKEN", "ghp_" + _draw(seed, "github", _ALNUM, 36)),
        )
        needles = tuple((decoy.name, needle) for decoy in decoys for needle in sorted(_needles(decoy.value)))
        return cls(decoys=decoys, _needles=needles)

    def value(self, name: str) -> str:
        return next(decoy.value for decoy in self.decoys if decoy.name == name)

    def env(self) -> dict[str, str]:
        """The decoy a sandboxed process finds in its environment."""
        return {"GITHUB_TOKEN": self.value("GITHUB_TOKEN")}

    def plant(self, home: Path) -> None:
        """Write the decoy cloud credentials file into a sandbox HOME (mode 0600)."""
        folder = home / ".aws"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "credentials"
        text = (
            "[default]\n"
            f"aws_access_key_id = {self.value('aws access key id')}\n"
            f"aws_secret_access_key = {self.value('aws secret access key')}\n"
        )
        path.write_text(text)
        path.chmod(0o600)

    def find(self, text: str | bytes) -> list[str]:
        """The names of the decoys in `text`, in any of the encodings or, as such, in any case, each once.

        Case matters to base64, not to a host name: `<token>.evil.test` is found lower-cased too.
        """
        if isinstance(text, bytes):
            text = text.decode("latin-1")
        found = [name for name, needle in self._needles if needle in text]
        folded = text.lower()
        found += [decoy.name for decoy in self.decoys if decoy.value.lower() in folded]
        return list(dict.fromkeys(found))

    def register(self) -> None:
        """Keep the decoys out of the service's logs, like real secrets."""
        register_secrets(decoy.value for decoy in self.decoys)
