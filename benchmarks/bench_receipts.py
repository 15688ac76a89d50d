#!/usr/bin/env python3
"""What end-to-end receipts cost per window (issue 15), next to sealing/opening the window itself.

Gateway: ReceiptBook bookkeeping + DownlinkSealer.seal for one receipt covering `k` windows of one
device. Agent: DownlinkOpener.open + applying the receipt to a real SQLite outbox (look up and delete
the k rows). Bytes: the sealed receipt on the wire for k windows, against k sealed windows.
k = 1 is what a device at 12.5 windows/s gets (the gateway sends a receipt about 20 ms after each
batch); k = 16 is a device catching up a backlog.

Usage: python benchmarks/bench_receipts.py [--quick]   (run alone on the machine)
Prints one JSON object; times are microseconds, the best of several runs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from gateway.agent.outbox import Outbox
from gateway.core import keys
from gateway.core.downlink import DownlinkOpener, DownlinkSealer, make_receipt, receipt_ranges
from gateway.core.receipts import ReceiptBook
from gateway.core.session import Sealer
from gateway.core.topics import cmd_topic_for

DEVICE = "bench-0001"
NOW = 1_800_000_000_000_000_000


def best_us(run: Callable[[], None], n: int, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            run()
        out.append((time.perf_counter() - t0) / n * 1e6)
    return min(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n, repeats = (200, 3) if args.quick else (2000, 5)
    gw, dev = keys.generate(), keys.generate()
    dev_pub = keys.public_bytes(dev)
    window_sealer = Sealer(device_id=DEVICE, device_key=dev, device_key_id=1,
                           gateway_public=keys.public_bytes(gw), gateway_key_id=1, epoch=7)
    window_bytes = len(window_sealer.seal(b"\x00" * 830))  # a 128x3 int16 window's plaintext size
    topic = cmd_topic_for(DEVICE)
    result: dict[str, object] = {"window_envelope_bytes": window_bytes, "by_k": {}}
    for k in (1, 16):
        sealer = DownlinkSealer(sender="gw-1", gateway_key=gw, gateway_key_id=1, epoch=1)
        opener = DownlinkOpener(device_id=DEVICE, device_keys={1: dev},
                                trusted_gateways={1: keys.public_bytes(gw)}, window_bits=1 << 16)
        book = ReceiptBook(max_delay_ns=0, min_interval_ns=0)
        counter = [0]

        def gateway_side(k: int = k, book: ReceiptBook = book, sealer: DownlinkSealer = sealer,
                         counter: list[int] = counter) -> None:
            for _ in range(k):
                book.queued(DEVICE)
                book.accepted(DEVICE, 7, counter[0], 1, NOW)
                book.done(DEVICE)
                counter[0] += 1
            for due in book.due(NOW + counter[0]):
                sealer.seal(make_receipt(due.accepted, []), device_id=DEVICE, device_public=dev_pub,
                            device_key_id=1)

        gw_us = best_us(gateway_side, n, repeats)
        # Receipts to open: made up front so the agent side is measured alone.
        msgs = [sealer.seal(make_receipt([(7, i * k, i * k + k - 1)]), device_id=DEVICE,
                            device_public=dev_pub, device_key_id=1) for i in range(n * repeats)]
        with tempfile.TemporaryDirectory() as tmp:
            outbox = Outbox(Path(tmp) / "o.db", max_bytes=1 << 30, max_age_s=3600, policy="drop_oldest")
            payload = b"x" * window_bytes
            for c in range(n * repeats * k):
                outbox.put(payload, created_ns=c, epoch=7, counter=c)
            pending = iter(msgs)

            def agent_side(outbox: Outbox = outbox, opener: DownlinkOpener = opener,
                           it: Iterator[bytes] = pending) -> None:
                opened = opener.open(next(it), topic=topic, now_ns=NOW)
                for mid in outbox.ids_in(receipt_ranges(opened.message.receipt)):
                    outbox.ack(mid)
                outbox.commit_acks()

            agent_us = best_us(agent_side, n, repeats)
            outbox.close()
        receipt_bytes = len(msgs[0])
        result["by_k"][str(k)] = {  # type: ignore[index]
            "gateway_us_per_receipt": round(gw_us, 1), "gateway_us_per_window": round(gw_us / k, 2),
            "agent_us_per_receipt": round(agent_us, 1), "agent_us_per_window": round(agent_us / k, 2),
            "receipt_bytes": receipt_bytes, "receipt_bytes_per_window": round(receipt_bytes / k, 1),
            "downlink_bytes_vs_uplink": round(receipt_bytes / (k * window_bytes), 3),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
