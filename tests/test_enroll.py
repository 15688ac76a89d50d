"""Zero-touch enrollment with the real parts: mosquitto with the enrollment listener from `sgw broker
config --enroll-port`, `sgw enroll serve` as a process, the real agent and gateway, and factory
identities (IDevIDs) from a test manufacturer CA made with `cryptography` (tests/support/idevid.py).

Refusals are checked at both places that refuse: the broker's TLS (only allow-listed manufacturer CAs,
only valid certificates) and the service, which trusts nothing the broker did; requests that the broker
would never let through are sent by a test client holding a valid IDevID, carrying another chain.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gateway.common import tomledit
from gateway.core import suites
from gateway.core.topics import enroll_req_topic, enroll_resp_topic
from gateway.pki.csr import make_csr
from gateway.pki.enrollment import broker_username, make_request
from gateway.pki.home import Home
from gateway.registry.store import Registry
from tests.sgw_metrics_contract import contract_metrics
from tests.support.agent import dump_toml, read_ledger, scrape, start_agent, wait_for
from tests.support.cli import SGW_ARGV, run_cli
from tests.support.gateway import ROOT, Env
from tests.support.idevid import IDevID, Manufacturer
from tests.support.mosquitto import TLSIdentity, connect, disconnect, free_port, start_broker, try_connect
from tests.support.provision import provision

pytestmark = pytest.mark.slow  # whole-path processes (broker, service, gateway, agents): bounded

FAULTS = [{"at_s": 2.0, "duration_s": 1.0, "fault": "bearing"}]


@dataclass
class EnrollEnv:
    env: Env
    enroll_port: int
    metrics_port: int
    acme: Manufacturer  # allow-listed, any serial
    beta: Manufacturer  # allow-listed, only serial B-OK
    evil: Manufacturer  # never allow-listed
    service: subprocess.Popen[bytes]
    service_log: Path

    @property
    def home(self) -> Path:
        return self.env.prov.home

    def device(self, idevid: IDevID, name: str) -> Path:
        """A device folder as it leaves the factory plus sgw's public CA certificate and an agent.toml
        with only [enroll] and test settings: no sgw key of any kind."""
        folder = idevid.cert_file.parent
        (folder / "sgw-ca.crt").write_bytes((self.home / "ca" / "ca.crt").read_bytes())
        (folder / "agent.toml").write_text(dump_toml({
            "enroll": {"idevid_cert_file": "idevid.crt", "idevid_key_file": "idevid.key",
                       "ca_file": "sgw-ca.crt", "host": "127.0.0.1", "port": self.enroll_port,
                       "timeout_s": 5.0, "retry_s": 0.5},
            "source": {"speed": 0.0, "faults": FAULTS},
            "filter": {"summary_interval_s": 1.0},
            # Resend soon what the gateway refused as unknown_device before it re-read the registry.
            "outbox": {"path": "outbox.db", "receipt_timeout_s": 1.0},
            "log": {"format": "json"},
        }))
        return folder / "agent.toml"

    def listing(self) -> dict[str, dict[str, object]]:
        rc, out, err = run_cli(["enroll", "list", "--dir", str(self.home), "--json"])
        assert rc == 0, err
        return {str(row["serial"]): row for row in json.loads(out)["devices"]}

    def outcomes(self) -> dict[str, float]:
        got = scrape(self.metrics_port)
        return {k.split('"')[1]: v for k, v in got.items() if k.startswith("sgw_enroll_requests_total{")}


@pytest.fixture
def store_kind() -> str:
    """The store the home uses; tests parametrize it to run on PostgreSQL too."""
    return "sqlite"


@pytest.fixture
def enr(tmp_path: Path, store_kind: str, request: pytest.FixtureRequest) -> Iterator[EnrollEnv]:
    port, enroll_port, metrics_port = free_port(), free_port(), free_port()
    prov = provision(tmp_path / "home", [], broker_port=port)
    if store_kind == "postgresql":  # the enrollment tables, the registry and the gateway all on it
        url = str(request.getfixturevalue("pg_url"))
        tomledit.edit_file(prov.gateway_toml, {"store": {"url": url}})
    acme = Manufacturer.create(tmp_path / "acme", "Acme Devices CA")
    beta = Manufacturer.create(tmp_path / "beta", "Beta Devices CA")
    evil = Manufacturer.create(tmp_path / "evil", "Evil Devices CA")
    home = str(prov.home)
    for argv in (["--manufacturer-ca", str(acme.cert_file)],
                 ["--manufacturer-ca", str(beta.cert_file), "--serial", "B-OK"]):
        rc, _, err = run_cli(["enroll", "allow", "--dir", home, *argv])
        assert rc == 0, err
    broker = start_broker(prov.home, tmp_path / "broker", port=port, enroll_port=enroll_port)
    log = tmp_path / "enroll.log"
    with log.open("ab") as fh:
        service = subprocess.Popen([*SGW_ARGV, "enroll", "serve", "--dir", home, "--log-format", "json",
                                    "--metrics-port", str(metrics_port)],
                                   stdout=fh, stderr=fh, stdin=subprocess.DEVNULL, cwd=ROOT)
    env = Env(prov, broker, tmp_path)
    e = EnrollEnv(env, enroll_port, metrics_port, acme, beta, evil, service, log)
    try:
        wait_for(lambda: "enrollment service connected" in log.read_text(), 30, "the enrollment service")
        yield e
    finally:
        for gw in env.gateways:
            gw.stop()
        for c in env.clients:
            disconnect(c.client)
        service.send_signal(signal.SIGTERM)
        try:
            assert service.wait(20) == 0, log.read_text()[-2000:]
        finally:
            if service.poll() is None:
                service.kill()
            broker.stop()


def _identity(idevid: IDevID, home: Path) -> TLSIdentity:
    return TLSIdentity(broker_username(idevid.cert.subject), home / "ca" / "ca.crt", idevid.cert_file,
                       idevid.key_file)


def _request(idevid: IDevID, *, time_ns: int | None = None, nonce: bytes | None = None) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    e2e = X25519PrivateKey.generate().public_key().public_bytes_raw()
    return make_request([idevid.cert], idevid.key, csr=make_csr(idevid.serial, key), e2e_public=e2e,
                        nonce=nonce or os.urandom(16),
                        time_ns=time.time_ns() if time_ns is None else time_ns).encode()


def _ask(enr: EnrollEnv, conn: IDevID, payload: bytes) -> dict[str, object]:
    """Publish one request on `conn`'s own request topic (connected with `conn`) and return the answer."""
    ident = _identity(conn, enr.home)
    client = connect(ident, enr.enroll_port)
    got: list[bytes] = []
    done, subscribed = threading.Event(), threading.Event()

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        got.append(msg.payload)
        done.set()

    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    try:
        client.subscribe(enroll_resp_topic(ident.name), qos=1)
        assert subscribed.wait(10)
        client.publish(enroll_req_topic(ident.name), payload, qos=1).wait_for_publish(10)
        assert done.wait(20), "no enrollment answer"
    finally:
        disconnect(client)
    doc = json.loads(got[0])
    assert isinstance(doc, dict)
    return doc


# -- tests --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("suite", "store_kind"), [("x25519", "sqlite"), ("x25519-mlkem768", "sqlite"),
                                                   ("x25519", "postgresql")])
def test_a_device_with_only_an_idevid_enrols_and_delivers_telemetry(enr: EnrollEnv, tmp_path: Path,
                                                                    suite: str, store_kind: str) -> None:
    """The device folder holds its factory identity, sgw's public CA certificate and an [enroll]
    section. The agent makes its keys, enrols, installs and runs: its windows get results from a real
    gateway, and no private key ever existed outside the device folder. The CA's entry names the
    suite the device seals with, and the registry holds it to that suite."""
    if suite != "x25519":
        rc, _, err = run_cli(["enroll", "allow", "--dir", str(enr.home), "--manufacturer-ca",
                              str(enr.acme.cert_file), "--suite", suite])
        assert rc == 0, err
    idevid = enr.acme.idevid(tmp_path / "device", "SN-0001")
    config = enr.device(idevid, "device")
    obs = enr.env.observer()
    enr.env.gateway()
    ledger = tmp_path / "ledger.jsonl"
    agent = start_agent(config, tmp_path / "agent.log", "--max-windows", "300", "--ledger", str(ledger),
                        "--flush-timeout-s", "60")
    assert agent.wait(180) == 0, agent.log()[-3000:]
    forwarded = read_ledger(ledger)
    assert forwarded, "the enrolled agent forwarded nothing"
    wanted = {(e["device"], e["epoch"], e["counter"]) for e in forwarded}
    missing = obs.wait_for(wanted, timeout=60)
    assert not missing, (sorted(missing)[:5], sorted(obs.keys())[:5], forwarded[:2])

    cfg = tomllib.loads(config.read_text())
    device_id = cfg["device"]["id"]
    assert device_id == "SN-0001" and {e["device"] for e in forwarded} == {device_id}
    assert cfg["enroll"]["port"] == enr.enroll_port  # the operator's section is kept
    assert cfg["e2e"]["suite"] == suite
    folder = config.parent
    assert not list(folder.glob(".enroll-*")), "pending enrollment files left behind"
    for private in ("device.key", "e2e.key"):
        assert (folder / private).stat().st_mode & 0o777 == 0o600
    # The LDevID certifies the key made on the device; the registry holds the e2e key made there.
    cert = x509.load_pem_x509_certificate((folder / "device.crt").read_bytes())
    tls_key = serialization.load_pem_private_key((folder / "device.key").read_bytes(), None)
    assert isinstance(tls_key, ec.EllipticCurvePrivateKey) and cert.public_key() == tls_key.public_key()
    e2e_public = X25519PrivateKey.from_private_bytes((folder / "e2e.key").read_bytes()).public_key()
    where = Home(enr.home).store_location()
    assert isinstance(where, str) == (store_kind == "postgresql")
    with Registry.open(where) as registry:
        record = registry.get(device_id)
        assert record is not None and record.keys[0].public == e2e_public.public_bytes_raw()
        assert record.min_suite == suites.BY_NAME[suite]
        assert record.cert_serial == format(cert.serial_number, "x")
    # The home keeps only public parts: the private halves were never anywhere but on the device.
    kept = enr.home / "devices" / device_id
    assert sorted(p.name for p in kept.iterdir()) == ["agent.toml", "ca.crt", "device.crt", "e2e.pub",
                                                      "gateway_e2e.pub", "gateway_e2e_mlkem.pub"]
    row = enr.listing()["SN-0001"]
    assert row["state"] == "approved" and row["device_id"] == device_id
    assert enr.outcomes()["approved"] == 1


@pytest.mark.parametrize("store_kind", ["sqlite", "postgresql"])
def test_each_refusal_has_its_reason_where_it_is_refused(enr: EnrollEnv, tmp_path: Path,
                                                         store_kind: str) -> None:
    """Not allow-listed CA and expired IDevID: refused by the broker's TLS, and by the service when a
    connection that passed TLS carries them anyway. Serial not allowed, replay, stale, bad signature,
    topic mismatch: refused by the service. Each answer names its reason; each is counted."""
    good = enr.acme.idevid(tmp_path / "good", "SN-0100")
    # Not allow-listed: the broker refuses the TLS handshake ...
    foreign = enr.evil.idevid(tmp_path / "foreign", "SN-0100")  # same subject as `good`
    assert not try_connect(_identity(foreign, enr.home), enr.enroll_port).ok
    # ... and the service refuses it over a connection that got through (the broker is not trusted).
    answer = _ask(enr, good, _request(foreign))
    assert (answer["status"], answer["reason"]) == ("refused", "untrusted_ca")

    # Expired: the same two places.
    expired = enr.acme.idevid(tmp_path / "expired", "SN-0100", days=-1)
    assert not try_connect(_identity(expired, enr.home), enr.enroll_port).ok
    answer = _ask(enr, good, _request(expired))
    assert (answer["status"], answer["reason"]) == ("refused", "idevid_expired")

    # A serial the CA's entry does not list: through TLS (the CA is allow-listed), refused by the service.
    unlisted = enr.beta.idevid(tmp_path / "unlisted", "B-NO")
    answer = _ask(enr, unlisted, _request(unlisted))
    assert (answer["status"], answer["reason"]) == ("refused", "serial_not_allowed")
    listed = enr.beta.idevid(tmp_path / "listed", "B-OK")
    assert _ask(enr, listed, _request(listed))["status"] == "approved"

    # A replayed request: the first is approved, the same bytes again are refused.
    first = _request(good)
    assert _ask(enr, good, first)["status"] == "approved"
    assert _ask(enr, good, first)["reason"] == "replay"
    # Stale time, a signature by another key, a request for another identity than the connection's.
    assert _ask(enr, good, _request(good, time_ns=time.time_ns() - 3600 * 10**9))["reason"] == "stale"
    forged = json.loads(_request(good))
    forged["e2e_public"] = "00" * 32
    assert _ask(enr, good, json.dumps(forged).encode())["reason"] == "bad_signature"
    assert _ask(enr, good, _request(listed))["reason"] == "topic_mismatch"
    assert _ask(enr, good, b"not json")["reason"] == "malformed"
    # A CSR for another name than the serial; the same serial from another IDevID (a clone's key).
    other = ec.generate_private_key(ec.SECP256R1())
    e2e = X25519PrivateKey.generate().public_key().public_bytes_raw()
    wrong_csr = make_request([good.cert], good.key, csr=make_csr("SN-9999", other), e2e_public=e2e,
                             nonce=os.urandom(16), time_ns=time.time_ns()).encode()
    assert _ask(enr, good, wrong_csr)["reason"] == "bad_csr"
    clone = enr.acme.idevid(tmp_path / "clone", "SN-0100")
    answer = _ask(enr, clone, _request(clone))
    assert (answer["reason"], answer["detail"]) == ("identity_conflict",
                                                    "serial SN-0100 was enrolled by another IDevID")

    rows = enr.listing()
    assert (rows["B-NO"]["state"], rows["B-NO"]["reason"]) == ("refused", "serial_not_allowed")
    assert rows["SN-0100"]["state"] == "approved"  # later refusals do not undo the identity issued
    got = enr.outcomes()
    for reason in ("untrusted_ca", "idevid_expired", "serial_not_allowed", "replay", "stale",
                   "bad_signature", "topic_mismatch", "malformed", "bad_csr", "identity_conflict"):
        assert got[reason] == 1, (reason, got)
    assert got["approved"] == 2
    log = enr.service_log.read_text()
    assert log.count('"msg":"enrollment refused"') == 10, log[-2000:]
    assert "sgw_enroll_requests_total" in contract_metrics()  # documented in ARCHITECTURE.md

    # The operator refuses a serial: from then on it is refused with that reason, even if listed.
    assert run_cli(["enroll", "refuse", "--dir", str(enr.home), "--manufacturer-ca", str(enr.beta.cert_file),
                    "--serial", "B-OK", "--note", "returned unit"])[0] == 0
    answer = _ask(enr, listed, _request(listed))
    assert (answer["reason"], answer["detail"]) == ("refused_by_operator", "returned unit")
    row = enr.listing()["B-OK"]  # the identity issued before stays; new requests are refused
    assert (row["state"], row["reason"], row["device_id"]) == ("approved", "refused_by_operator", "B-OK")


def test_a_refused_agent_keeps_its_enrollment_config_and_enrols_once_allowed(enr: EnrollEnv,
                                                                             tmp_path: Path) -> None:
    """The agent of a serial that is not allowed logs the reason and asks again; once the operator
    allows the serial it enrols without a restart."""
    idevid = enr.beta.idevid(tmp_path / "late", "B-LATE")
    config = enr.device(idevid, "late")
    agent = start_agent(config, tmp_path / "agent.log", "--max-windows", "20")
    try:
        wait_for(lambda: "serial_not_allowed" in agent.log(), 60, "the refusal in the agent's log",
                 agent=agent)
        assert "[device]" not in config.read_text()
        assert run_cli(["enroll", "allow", "--dir", str(enr.home), "--manufacturer-ca",
                        str(enr.beta.cert_file), "--serial", "B-LATE"])[0] == 0
        wait_for(lambda: "[device]" in config.read_text(), 60, "enrollment after allow", agent=agent)
    finally:
        agent.stop()
    assert enr.listing()["B-LATE"]["state"] == "approved"


# Loaded by the agent's interpreter (PYTHONPATH) before sgw starts: SIGKILL at a chosen point.
# "asking": the keys are made, nothing is sent yet. "answered": the service has issued and registered,
# the device has checked the answer and installed nothing. "installing": the commit record is written
# and the keys are in place, the certificate not.
_KILL = """
import os, signal
from gateway.agent import enroll as _enroll

_point = os.environ["SGW_TEST_KILL_AT"]
if _point == "asking":
    def _killing_ask(self, csr, e2e_public):
        os.kill(os.getpid(), signal.SIGKILL)
    _enroll.Enroller._ask = _killing_ask
elif _point == "answered":
    _check = _enroll.Enroller._check
    def _killing_check(self, a, key):
        _check(self, a, key)
        os.kill(os.getpid(), signal.SIGKILL)
    _enroll.Enroller._check = _killing_check
else:
    _write = _enroll.write_atomic
    def _killing_write(path, data, **kw):
        if path.name == _enroll.INSTALLED["tls_cert"]:
            os.kill(os.getpid(), signal.SIGKILL)
        return _write(path, data, **kw)
    _enroll.write_atomic = _killing_write
"""


@pytest.mark.parametrize("point", ["asking", "answered", "installing"])
def test_enrollment_is_idempotent_across_an_agent_sigkill(enr: EnrollEnv, tmp_path: Path, point: str) -> None:
    """SIGKILL before asking, after the service answered but before anything was installed, or
    half-way through the install: the restarted agent asks (again) with the keys it made first (after
    an answer, the same identity comes back: one registry entry, one certificate) or finishes the
    install from its commit record; then it runs."""
    failpoint = tmp_path / "failpoint"
    failpoint.mkdir()
    (failpoint / "sitecustomize.py").write_text(_KILL)
    idevid = enr.acme.idevid(tmp_path / "device", "SN-0777")
    config = enr.device(idevid, "device")
    folder = config.parent
    killed = start_agent(config, tmp_path / "killed.log", "--max-windows", "20",
                         env={"PYTHONPATH": str(failpoint), "SGW_TEST_KILL_AT": point})
    assert killed.wait(60) == -signal.SIGKILL, killed.log()[-3000:]
    assert "[device]" not in config.read_text()  # never a half-installed config
    made_key = (folder / ".enroll-tls.key").read_bytes()
    assert (folder / ".enroll-commit.json").exists() == (point == "installing")
    with Registry.open(enr.home / "registry.db") as registry:
        issued = registry.get("SN-0777")
        assert (issued is not None) == (point != "asking")  # the service did its part before the kill

    enr.env.gateway()
    obs = enr.env.observer()
    ledger = tmp_path / "ledger.jsonl"
    agent = start_agent(config, tmp_path / "agent.log", "--max-windows", "300", "--ledger", str(ledger),
                        "--flush-timeout-s", "60")
    assert agent.wait(180) == 0, agent.log()[-3000:]
    forwarded = read_ledger(ledger)
    wanted = {(e["device"], e["epoch"], e["counter"]) for e in forwarded}
    assert wanted and not obs.wait_for(wanted, timeout=60)

    with Registry.open(enr.home / "registry.db") as registry:
        assert [d.device_id for d in registry.list()] == ["SN-0777"]
        after = registry.get("SN-0777")
        assert after is not None and len(after.keys) == 1
        assert issued is None or after.cert_serial == issued.cert_serial
    cert = x509.load_pem_x509_certificate((folder / "device.crt").read_bytes())
    assert format(cert.serial_number, "x") == after.cert_serial
    assert (folder / "device.key").read_bytes() == made_key  # the key made before the kill
    assert not list(folder.glob(".enroll-*"))
    outcomes = enr.outcomes()
    assert outcomes["approved"] == 1
    assert outcomes["repeat"] == (1 if point == "answered" else 0)
    assert ("finished an enrollment that a restart interrupted" in agent.log()) == (point == "installing")


def test_enroll_cli_refuses_bad_input_and_changes_nothing(enr: EnrollEnv, tmp_path: Path) -> None:
    for action in ([], ["allow"], ["list"], ["serve"], ["refuse"], ["remove"]):
        argv = ["enroll", *action, "--help"]
        rc, out, _ = run_cli(argv)
        assert rc == 0 and "usage: sgw enroll" in out, argv
    leaf = enr.acme.idevid(tmp_path / "x", "SN-9")
    before = enr.listing()
    for argv in (["allow", "--manufacturer-ca", str(leaf.cert_file)],  # not a CA
                 ["allow", "--manufacturer-ca", str(tmp_path / "missing.crt")],
                 ["allow", "--manufacturer-ca", str(enr.acme.cert_file), "--serial", "bad/serial"],
                 ["refuse", "--manufacturer-ca", str(enr.evil.cert_file), "--serial", "S1"],
                 ["remove", "--manufacturer-ca", str(enr.evil.cert_file)]):
        rc, out, err = run_cli(["enroll", *argv, "--dir", str(enr.home)])
        assert rc != 0 and out == "" and err.startswith("sgw: error: ") and err.count("\n") == 1, (argv, err)
    assert enr.listing() == before
    rc, out, _ = run_cli(["enroll", "list", "--dir", str(enr.home), "--json"])
    cas = json.loads(out)["cas"]
    assert {c["subject"] for c in cas} == {enr.acme.cert.subject.rfc4514_string(),
                                           enr.beta.cert.subject.rfc4514_string()}
    # The listener needs an allow-listed CA and a port of its own.
    bare = provision(tmp_path / "bare", [])
    for home, port in ((bare.home, "18884"), (enr.home, "18883")):
        rc, _, err = run_cli(["broker", "config", "--dir", str(home), "--out", str(tmp_path / "b"),
                              "--run-as-root", "--port", "18883", "--enroll-port", port])
        assert rc != 0 and err.startswith("sgw: error: "), err
        assert not (tmp_path / "b").exists()
    # allow / remove rewrite the listener's CA file in every broker folder that has one.
    bundle = enr.env.broker.conf.parent / "manufacturers.crt"
    evil_pem = enr.evil.cert.public_bytes(serialization.Encoding.PEM)
    evil = ["--dir", str(enr.home), "--manufacturer-ca", str(enr.evil.cert_file)]
    rc, _, err = run_cli(["enroll", "allow", *evil])
    assert rc == 0 and "restart mosquitto" in err and evil_pem in bundle.read_bytes()
    rc, _, err = run_cli(["enroll", "remove", *evil])
    assert rc == 0 and evil_pem not in bundle.read_bytes()
    assert enr.acme.cert.public_bytes(serialization.Encoding.PEM) in bundle.read_bytes()


def test_enroll_only_enrols_and_exits_without_running(enr: EnrollEnv, tmp_path: Path) -> None:
    """`sgw agent --enroll-only` (first start outside a read-only systemd unit): enrols, writes a
    complete config, exits 0 and sends no telemetry; a second call finds it enrolled and exits 0 too."""
    idevid = enr.acme.idevid(tmp_path / "device", "SN-0500")
    config = enr.device(idevid, "device")
    for log in ("first.log", "second.log"):
        agent = start_agent(config, tmp_path / log, "--enroll-only")
        assert agent.wait(120) == 0, agent.log()[-3000:]
    assert tomllib.loads(config.read_text())["device"]["id"] == "SN-0500"
    assert not (config.parent / "outbox.db").exists()
    assert enr.outcomes()["approved"] == 1 and enr.outcomes()["repeat"] == 0
