"""A throwaway certificate authority and the TLS files the secured local services use.

``make(folder)`` writes ``ca.pem``, ``server.pem`` + ``server-key.pem`` (valid for ``localhost`` and
``127.0.0.1``) and ``client.pem`` + ``client-key.pem`` (for servers that ask clients for a certificate),
ECDSA P-256, PKCS#8 keys readable by the owner only. Made with ``cryptography`` (already a dependency of
MLflow and Feast) rather than an ``openssl`` script: no tool to install, and the same code on any machine.
A real deployment uses its own CA; these exist so that the tests run every client over verified TLS.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 30


@dataclass(frozen=True)
class TlsFiles:
    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server-key.pem"

    @property
    def client_cert(self) -> Path:
        return self.folder / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.folder / "client-key.pem"


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mlops-stack local"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    tmp.replace(path)


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey,
           issuer: x509.Name, usage: x509.ObjectIdentifier, now: dt.datetime) -> x509.Certificate:
    return (x509.CertificateBuilder()
            .subject_name(_name(subject)).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))


def make(folder: Path) -> TlsFiles:
    """A new CA and server/client certificates in ``folder`` (kept when all are there already)."""
    files = TlsFiles(folder)
    if all(p.exists() for p in (files.ca, files.server_cert, files.server_key, files.client_cert, files.client_key)):
        return files
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("mlops-stack local CA")
    ca = (x509.CertificateBuilder()
          .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = _issue("localhost", server_key, ca_key, ca_name, ExtendedKeyUsageOID.SERVER_AUTH, now)
    client = _issue("mlops-client", client_key, ca_key, ca_name, ExtendedKeyUsageOID.CLIENT_AUTH, now)
    pem = serialization.Encoding.PEM
    _write(files.server_key, _key_pem(server_key), private=True)
    _write(files.client_key, _key_pem(client_key), private=True)
    _write(files.server_cert, server.public_bytes(pem))
    _write(files.client_cert, client.public_bytes(pem))
    _write(files.ca, ca.public_bytes(pem))
    return files
