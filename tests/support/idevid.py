"""Factory identities for enrollment tests: a manufacturer CA and IEEE 802.1AR-style IDevIDs (serial
number in the subject), made with `cryptography`, independent of sgw's CA code.

    mfr = Manufacturer.create(tmp_path / "acme", "Acme Devices CA")
    dev = mfr.idevid(tmp_path / "device", "SN-0001")          # idevid.crt (+ chain), idevid.key
    mfr.idevid(folder, "SN-0002", days=-1)                     # an expired one
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class IDevID:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_file: Path
    key_file: Path
    serial: str


@dataclass(frozen=True)
class Manufacturer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_file: Path

    @classmethod
    def create(cls, folder: Path, name: str) -> Manufacturer:
        folder.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name.split(maxsplit=1)[0]),
                             x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        path = folder / "ca.crt"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(cert, key, path)

    def idevid(self, folder: Path, serial: str, *, days: int = 7300, product: str = "Sensor-9",
               key: ec.EllipticCurvePrivateKey | None = None) -> IDevID:
        """An IDevID for `serial` (negative `days`: expired that many days ago)."""
        folder.mkdir(parents=True, exist_ok=True)
        key = key or ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        start, end = ((now - dt.timedelta(days=30), now + dt.timedelta(days=days)) if days > 0
                      else (now - dt.timedelta(days=60), now + dt.timedelta(days=days)))
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme"),
                             x509.NameAttribute(NameOID.COMMON_NAME, product),
                             x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))
        cert_file, key_file = folder / "idevid.crt", folder / "idevid.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(_pem_key(key))
        key_file.chmod(0o600)
        return IDevID(cert, key, cert_file, key_file, serial)
