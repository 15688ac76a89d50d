"""Every certificate a provisioned home holds matches certs/profiles.toml, read by openssl (outside eyes:
not sgw's own x509 code): key and curve, signature, subject, basic constraints, key usage, extended key
usage, validity, chain; the CRL's next update. A certificate file the profiles do not describe fails too,
so a new kind of certificate cannot appear without its profile."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.support.provision import add_instance, provision

ROOT = Path(__file__).resolve().parent.parent
PROFILES = tomllib.loads((ROOT / "certs" / "profiles.toml").read_text())
DEVICE, INSTANCE = "dev-1", "gw-2"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def _openssl(*args: str) -> str:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _when(text: str, field: str) -> dt.datetime:
    (value,) = re.findall(rf"{field}=(.+)", text)
    return dt.datetime.strptime(value.strip(), "%b %d %H:%M:%S %Y %Z")


def _path(name: str, profile: dict[str, Any]) -> str:
    gateway = INSTANCE if name == "gateway_instance" else "gw-1"
    return str(profile["file"]).format(id=DEVICE, gateway=gateway)


def _extension(text: str, name: str) -> str | None:
    """The value line(s) openssl prints under an extension's heading ('critical' kept on the heading)."""
    m = re.search(rf"X509v3 {name}:( critical)? *\n\s+(.+)", text)
    return None if m is None else (m.group(2).strip() + (" [critical]" if m.group(1) else ""))


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prov = provision(tmp_path_factory.mktemp("profiles") / "home", [DEVICE], sans=["broker.plant.example"])
    add_instance(prov, INSTANCE)
    return prov.home


@pytest.mark.parametrize("name", [n for n in PROFILES if n not in ("all", "crl")])
def test_each_certificate_matches_its_profile(home: Path, name: str) -> None:
    profile, common = PROFILES[name], PROFILES["all"]
    path = home / _path(name, profile)
    text = _openssl("x509", "-in", str(path), "-noout", "-text", "-startdate", "-enddate")
    assert f"Public Key Algorithm: {common['public_key']}" in text
    assert f"ASN1 OID: {common['curve']}" in text
    assert f"Signature Algorithm: {common['signature']}" in text
    cn = str(profile["cn"]).format(id=DEVICE, gateway=INSTANCE if name == "gateway_instance" else "gw-1")
    assert re.search(rf"Subject: O ?= ?{common['organization']}, CN ?= ?{re.escape(cn)}\n", text), text
    assert _extension(text, "Basic Constraints") == f"{profile['basic_constraints']} [critical]"
    if "key_usage" in profile:
        assert _extension(text, "Key Usage") == f"{profile['key_usage']} [critical]"
    assert _extension(text, "Extended Key Usage") == profile.get("eku")
    assert ("X509v3 Subject Alternative Name" in text) == bool(profile.get("subject_alt_names"))
    days = (_when(text, "notAfter") - _when(text, "notBefore")).total_seconds() / 86400
    assert days <= profile["max_days"] + 1 / 24, days  # issued 5 minutes back-dated
    ca = str(home / PROFILES["ca"]["file"])
    assert _openssl("verify", "-CAfile", ca, str(path)).strip().endswith(": OK")


def test_the_crl_is_signed_and_bounded(home: Path) -> None:
    crl = str(home / PROFILES["crl"]["file"])
    ca = str(home / PROFILES["ca"]["file"])
    text = _openssl("crl", "-in", crl, "-noout", "-lastupdate", "-nextupdate", "-CAfile", ca)
    days = (_when(text, "nextUpdate") - _when(text, "lastUpdate")).total_seconds() / 86400
    assert 0 < days <= PROFILES["crl"]["max_days"] + 1 / 24


def test_no_certificate_without_a_profile(home: Path) -> None:
    described = {_path(n, p) for n, p in PROFILES.items() if n != "all"}
    ca_bytes = (home / PROFILES["ca"]["file"]).read_bytes()
    found = {str(p.relative_to(home)) for p in home.rglob("*.crt")
             if p.read_bytes() != ca_bytes}  # copies of the CA certificate beside each identity
    assert found <= described, sorted(found - described)
