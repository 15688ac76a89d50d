"""`sgw enroll serve`: the enrollment service (docs/PROTOCOL.md, "Enrollment").

Connects to the broker's main listener as sgw-enroll (an sgw identity issued from the home's CA), reads
`sgw/v1/enroll/+/req` and answers each request on the matching `/resp` topic. Every outcome has a log
line and a count in `sgw_enroll_requests_total{outcome}`; a refusal's outcome is its reason.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import paho.mqtt.client as paho
from prometheus_client import CollectorRegistry, Counter, start_http_server

from gateway.common.mqtt import TlsFiles, check, connect_properties, make_client, set_nodelay
from gateway.core.topics import ENROLL_PREFIX, ENROLL_REQ_SUFFIX, enroll_resp_topic, enroll_username_of
from gateway.errors import ProvisioningError
from gateway.pki.ca import cert_pem, ec_key_pem
from gateway.pki.enroll_ca import enroll
from gateway.pki.enrollment import Refusal, Refused, encode_approved, encode_refused, parse_request
from gateway.pki.files import PRIVATE, PRIVATE_DIR, PUBLIC, write_atomic
from gateway.pki.home import Home
from gateway.registry.enrollment import EnrollmentStore
from gateway.registry.ids import ENROLL_CN

log = logging.getLogger("sgw.enroll")
SUBSCRIPTION = f"{ENROLL_PREFIX}+{ENROLL_REQ_SUFFIX}"


def identity(home: Home) -> TlsFiles:
    """The service's broker identity (HOME/enroll/client.crt, CN sgw-enroll), issued on first use."""
    folder = home.root / "enroll"
    files = TlsFiles(home.ca_cert, folder / "client.crt", folder / "client.key")
    if not files.cert_file.exists() or not files.key_file.exists():
        issued = home.require_ca().issue(ENROLL_CN)
        folder.mkdir(mode=PRIVATE_DIR, exist_ok=True)
        write_atomic(files.key_file, ec_key_pem(issued.key), mode=PRIVATE)
        write_atomic(files.cert_file, cert_pem(issued.cert), mode=PUBLIC)
    return files


@dataclass
class EnrollService:
    home: Home
    host: str
    port: int
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        self._registry = self.home.open_registry()
        self._store = EnrollmentStore(self._registry)
        if not self._store.cas():
            log.warning("no manufacturer CA is allow-listed: every request is refused (untrusted_ca)")
        self._metrics = CollectorRegistry()
        self._outcomes = Counter("sgw_enroll_requests", "Enrollment requests by outcome (approved, "
                                 "repeat, error on our side, or the refusal reason)", ["outcome"],
                                 registry=self._metrics)
        for outcome in ("approved", "repeat", "error", *(r.value for r in Refusal)):
            self._outcomes.labels(outcome)
        self._stop = threading.Event()
        self._client = make_client(ENROLL_CN, identity(self.home))

    def handle(self, topic: str, payload: bytes, now_ns: int) -> tuple[str, bytes] | None:
        """(answer topic, answer) for one request message; None for a topic that is not a request."""
        username = enroll_username_of(topic)
        if username is None or not username:
            return None
        nonce = b""
        try:
            req = parse_request(payload)
            nonce = req.nonce
            decision = enroll(self.home, self._store, req, username=username, now_ns=now_ns)
        except Refused as refused:
            self._outcomes.labels(refused.reason.value).inc()
            log.warning("enrollment refused", extra={"fields": {
                "reason": refused.reason.value, "detail": refused.detail, "identity": username}})
            return enroll_resp_topic(username), encode_refused(nonce, refused.reason, refused.detail)
        outcome = "repeat" if decision.repeat else "approved"
        self._outcomes.labels(outcome).inc()
        log.info("enrollment approved", extra={"fields": {
            "device": decision.approved.device_id, "serial": decision.serial, "repeat": decision.repeat}})
        return enroll_resp_topic(username), encode_approved(req.nonce, decision.approved)

    def _on_connect(self, client: paho.Client, _u: object, _f: object, rc: object, _p: object = None) -> None:
        if getattr(rc, "is_failure", False):
            log.error("broker refused the connection", extra={"fields": {"reason": str(rc)}})
            return
        set_nodelay(client)
        client.subscribe(SUBSCRIPTION, qos=1)

    def _on_subscribe(self, _c: paho.Client, _u: object, _mid: int, _rc: object, _p: object = None) -> None:
        # Only now are requests delivered to us (the session is not persistent: a request sent while we
        # were away got "no subscribers" and the device asks again after its timeout).
        log.info("enrollment service connected", extra={"fields": {"host": self.host, "port": self.port}})

    def _on_message(self, client: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        try:
            answer = self.handle(msg.topic, bytes(msg.payload), time.time_ns())
        except (ProvisioningError, OSError) as exc:  # our side: the request may succeed on a retry
            self._outcomes.labels("error").inc()
            log.error("enrollment failed on our side",  # noqa: TRY400 - one line, no trace
                      extra={"fields": {"error": str(exc)}})
            return
        except Exception:  # a bug must not stop the service for every other device
            self._outcomes.labels("error").inc()
            log.exception("enrollment failed on our side")
            return
        if answer is not None:
            client.publish(answer[0], answer[1], qos=1)

    def run(self) -> int:
        if self.metrics_port:
            start_http_server(self.metrics_port, addr=self.metrics_host, registry=self._metrics)
        client = self._client
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.reconnect_delay_set(1, 5)

        def stop(_sig: int, _frame: FrameType | None) -> None:
            self._stop.set()
            client.disconnect()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        check(client.connect(self.host, self.port, keepalive=30, properties=connect_properties()), "connect")
        try:
            client.loop_forever(retry_first_connection=True)
        finally:
            self._registry.close()
        return 0


def serve(home: Path, *, host: str, port: int, metrics_port: int = 0) -> int:
    return EnrollService(Home(home), host, port, metrics_port).run()
