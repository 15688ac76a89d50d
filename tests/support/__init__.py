"""Shared test support: a real mosquitto (`mosquitto.py`) and provisioned sgw homes (`provision.py`).

Typical use (see tests/conftest.py for ready fixtures):

    from tests.support.provision import provision
    from tests.support.mosquitto import free_port, start_broker

    port = free_port()
    env = provision(tmp_path / "home", ["dev-1", "dev-2"], broker_port=port)
    with start_broker(env.home, tmp_path / "broker", port=port) as broker:
        client = connect(env.identity("dev-1"), broker.port)
"""
