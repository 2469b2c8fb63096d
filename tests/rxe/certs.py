"""Self-signed certificates made on the spot for the TLS tests (nothing checked in).

With the ``cryptography`` package when it is installed, else ``openssl req``.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
from pathlib import Path


def self_signed(directory: Path, name: str, dns: list[str], ips: list[str]) -> tuple[Path, Path]:
    """A self-signed EC certificate for ``dns`` and ``ips`` (subjectAltName); returns the
    (certificate, key) PEM paths. It is its own trust anchor: load it as ``cafile``."""
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    try:
        _with_cryptography(cert_path, key_path, name, dns, ips)
    except ImportError:
        _with_openssl(cert_path, key_path, name, dns, ips)
    return cert_path, key_path


def _with_cryptography(cert_path: Path, key_path: Path, name: str, dns: list[str],
                       ips: list[str]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    alt: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    alt += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


def _with_openssl(cert_path: Path, key_path: Path, name: str, dns: list[str],
                  ips: list[str]) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("neither the cryptography package nor openssl is installed")
    san = ",".join([f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips])
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "30",
                    "-subj", f"/CN={name}", "-addext", f"subjectAltName={san}",
                    "-addext", "basicConstraints=critical,CA:TRUE",
                    "-keyout", str(key_path), "-out", str(cert_path)],
                   check=True, capture_output=True, timeout=60)
