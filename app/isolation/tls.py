"""TLS interception for the egress proxy, off unless the operator turns it on (EGRESS_TLS_INTERCEPT).

A tunnel through CONNECT carries TLS the proxy cannot read, so a decoy sent inside HTTPS to an allowed
host goes unseen. With interception, each run gets its own certificate authority: its certificate is
written into every sandbox HOME of the run and named by SSL_CERT_FILE, REQUESTS_CA_BUNDLE,
NODE_EXTRA_CA_CERTS and PIP_CERT; its key never leaves the service's memory. The proxy answers a CONNECT
to an allowed host with a certificate for that host signed by the run's authority, opens its own TLS to
the host (verified against the service's trust store), and relays plaintext it scans for decoys.

The cost: a client that pins certificates or ignores those variables fails the handshake (the record
says so), and the service sees the plaintext of every allowed request.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from collections import OrderedDict
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_FILE_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "PIP_CERT")
VALID_FOR = datetime.timedelta(days=2)
HOSTS_KEPT = 64


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "auto-code egress proxy"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class Interception:
    """One run's certificate authority, the server contexts it signs per host, and the upstream context."""

    def __init__(self, label: str, upstream: ssl.SSLContext | None = None) -> None:
        now = datetime.datetime.now(datetime.UTC)
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = _name(f"auto-code run {label}")
        usage = x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False,
        )  # fmt: skip
        self._ca = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALID_FOR)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.pem = self._ca.public_bytes(serialization.Encoding.PEM)
        self.upstream = upstream or ssl.create_default_context()
        self._servers: OrderedDict[str, ssl.SSLContext] = OrderedDict()

    def write(self, home: Path) -> Path:
        """Put the authority's certificate (never its key) into a sandbox HOME; its path for the env."""
        path = home / ".auto-code" / "egress-ca.pem"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.pem)
        return path

    def server_context(self, host: str) -> ssl.SSLContext:
        """A TLS server context presenting a certificate for `host` (a name or an IP literal)."""
        context = self._servers.get(host)
        if context is not None:
            self._servers.move_to_end(host)
            return context
        context = self._issue(host)
        self._servers[host] = context
        while len(self._servers) > HOSTS_KEPT:
            self._servers.popitem(last=False)
        return context

    def _issue(self, host: str) -> ssl.SSLContext:
        now = datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            alternative: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            alternative = x509.DNSName(host)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(_name(host))
            .issuer_name(self._ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALID_FOR)
            .add_extension(x509.SubjectAlternativeName([alternative]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # ssl loads a key only from a file: a private temp dir (sandboxes get their own /tmp), gone at once.
        with tempfile.TemporaryDirectory(prefix="auto-code-tls-") as folder:
            chain = Path(folder) / "leaf.pem"
            descriptor = os.open(chain, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(_pem_key(key) + leaf.public_bytes(serialization.Encoding.PEM))
            context.load_cert_chain(chain)
        return context
