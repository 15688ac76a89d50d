"""Regenerating gateway/pb from proto/ must change nothing: the committed code is what proto/ says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_regenerating_protobuf_changes_nothing(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True, env=env)
    committed = ROOT / "gateway" / "pb"
    generated = sorted(p.name for p in tmp_path.iterdir() if p.suffix in {".py", ".pyi"})
    assert generated, "the generator produced nothing"
    for name in generated:
        assert (committed / name).read_bytes() == (tmp_path / name).read_bytes(), (
            f"gateway/pb/{name} differs from what scripts/gen_proto.sh makes from proto/"
        )


def test_wire_messages_round_trip() -> None:
    from gateway.pb import envelope_pb2, messages_pb2

    header = envelope_pb2.Header(
        version=1, suite=1, device_id="dev-1", epoch=7, counter=3, ephemeral=b"e" * 32
    )
    raw = header.SerializeToString()
    assert envelope_pb2.Header.FromString(raw) == header
    window = messages_pb2.TelemetryWindow(shape=[128, 3], samples=b"\x00" * 768, window_seq=9)
    plain = messages_pb2.Plaintext(sealed_at_ns=1, window=window)
    assert messages_pb2.Plaintext.FromString(plain.SerializeToString()).WhichOneof("body") == "window"
