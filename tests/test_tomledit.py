"""gateway/common/tomledit.py, the one way sgw edits TOML text, and the provisioning edits built on it:
a change rewrites its own value only; the operator's comments, order and other keys stay."""

from __future__ import annotations

import tomllib

import pytest

from gateway.common import tomledit
from gateway.pki import templates

AGENT = """[device]
id = "dev-1"  # the operator's note

[e2e]
device_key_file = "e2e.key"
device_key_id = 3   # rotated by hand once
gateway_key_id = 1
# the operator's own comment, before the next section

[source]
type = "simulated"
faults = []
"""


def test_set_keys_changes_values_in_place_and_adds_missing_ones_after_the_last_key() -> None:
    out = tomledit.set_keys(AGENT, {"e2e": {"device_key_id": 4, "suite": "x25519"},
                                    "source": {"faults": [{"at_s": 1.0, "fault": "bearing"}]},
                                    "metrics": {"port": 9}})
    assert tomllib.loads(out) == {
        "device": {"id": "dev-1"},
        "e2e": {"device_key_file": "e2e.key", "device_key_id": 4, "gateway_key_id": 1, "suite": "x25519"},
        "source": {"type": "simulated", "faults": [{"at_s": 1.0, "fault": "bearing"}]},
        "metrics": {"port": 9},
    }
    lines = out.splitlines()
    assert 'id = "dev-1"  # the operator\'s note' in lines
    assert "device_key_id = 4   # rotated by hand once" in lines
    assert lines.index('suite = "x25519"') == lines.index("gateway_key_id = 1") + 1
    assert lines.index("# the operator's own comment, before the next section") < lines.index("[source]")
    assert "[[source.faults]]" not in out  # tables inside values stay inline


def test_set_keys_refuses_what_is_not_toml() -> None:
    with pytest.raises(ValueError, match="not TOML"):
        tomledit.set_keys("[e2e\nx = 1", {"e2e": {"x": 2}})
    with pytest.raises(ValueError, match="not a table"):
        tomledit.set_keys("e2e = 1\n", {"e2e": {"x": 2}})


def test_dumps_and_value_write_what_tomllib_reads() -> None:
    doc = {"mqtt": {"host": "h", "port": 1}, "source": {"faults": [{"at_s": 0.0, "fault": "x"}]}}
    assert tomllib.loads(tomledit.dumps(doc)) == doc
    assert tomllib.loads("v = " + tomledit.value(['a"b', 1.5, True])) == {"v": ['a"b', 1.5, True]}


def test_provisioning_edits_keep_the_operators_text() -> None:
    rotated = templates.with_device_key_id(AGENT, 4)
    assert rotated == AGENT.replace("device_key_id = 3", "device_key_id = 4")
    suite = templates.with_suite(AGENT, "x25519-mlkem768", "gateway_e2e_mlkem.pub")
    assert suite is not None
    assert tomllib.loads(suite)["e2e"]["suite"] == "x25519-mlkem768"
    assert "# the operator's own comment, before the next section" in suite
    gateway = '[e2e]\nprivate_key_file = "gateway/e2e.key"  # kept\nkey_id = 1\n'
    added = templates.with_mlkem_key(gateway)
    assert added is not None and 'private_key_file = "gateway/e2e.key"  # kept' in added
    assert tomllib.loads(added)["e2e"]["mlkem_private_key_file"] == "gateway/e2e_mlkem.key"
    assert templates.with_mlkem_key(added) == added  # already there: unchanged
    # What cannot be edited safely is refused, not guessed at.
    assert templates.with_device_key_id("[e2e]\n", 2) is None
    assert templates.with_device_key_id("not toml [", 2) is None
    assert templates.with_suite("[device]\n", "x25519", "") is None
    assert templates.with_mlkem_key("[e2e]\nkey_id = 1\n") is None
