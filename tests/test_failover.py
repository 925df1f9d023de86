"""Several brokers: the bike moves on when one dies or will not let it listen."""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path

import pytest

from smartbiked.service import failover_order
from tests.conftest import Probe, bike_config, wait_until
from tests.test_daemon import FAN, send


def failover_config(first, others, bike_id: str = "000001") -> str:
    hosts = ", ".join(f'"127.0.0.1:{b.port}"' for b in others)
    return bike_config(first, FAN, bike_id=bike_id).replace(
        "reconnect_max = 1", f"reconnect_max = 1\nfailover_hosts = [{hosts}]")


@pytest.fixture
def probes():
    started: list[Probe] = []

    def watch(broker) -> Probe:
        p = Probe(broker)
        p.setup_mqtt_client()
        p.subscribe("bike/#")
        p.loop_start()
        assert p.connected.wait(10)
        started.append(p)
        return p

    yield watch
    for p in started:
        p.disconnect()
        p.loop_stop()


def bike_id_starting_on(first_port: int, ports: list[int]) -> str:
    """A bike id whose own broker order begins with ``first_port``."""
    for n in range(1, 100):
        bike = f"{n:06d}"
        order = failover_order([("127.0.0.1", p) for p in ports], bike)
        if order[0][1] == first_port:
            return bike
    raise AssertionError("no bike id starts on that broker")


def test_the_bike_order_of_brokers_is_its_own_and_stable():
    brokers = [("b", 1), ("c", 2), ("d", 3)]
    orders = {tuple(failover_order(brokers, f"{n:06d}")) for n in range(30)}
    assert len(orders) > 1, "every bike would pile onto the same broker"
    assert failover_order(brokers, "000007") == failover_order(brokers, "000007")


def test_a_dead_broker_sends_the_bike_to_another_and_commands_work_there(
        make_broker, probes, run_daemon):
    a, b = make_broker(), make_broker()
    watch = {a.port: probes(a), b.port: probes(b)}
    bike = bike_id_starting_on(a.port, [a.port, b.port])
    run_daemon(failover_config(a, [b], bike_id=bike))
    watch[a.port].wait_for(f"bike/{bike}/status", lambda m: m.payload == b"online")
    mark = len(watch[b.port].messages)
    a.stop()
    moved = watch[b.port]
    moved.wait_for(f"bike/{bike}/status", lambda m: m.payload == b"online", after=mark)
    health = moved.json(f"bike/{bike}/health", lambda d: d["broker"] == f"127.0.0.1:{b.port}",
                        after=mark)
    assert health["reconnects"] >= 1
    send(b, f"bike/{bike}/fan/control", "44")
    moved.json(f"bike/{bike}/fan/report", lambda d: d["value"] == 44.0, after=mark)
    send(b, f"bike/{bike}/fan/control", "45")  # a barrier: 44 would be repeated before it
    moved.json(f"bike/{bike}/fan/report", lambda d: d["value"] == 45.0, after=mark)
    reports = [json.loads(m.payload)["value"] for m in moved.messages[mark:]
               if m.topic == f"bike/{bike}/fan/report"]
    assert reports.count(44.0) == 1, f"a command was applied twice: {reports}"


def refusing_broker(make_broker, tmp_path: Path, allow: tuple[str, ...] = ()):
    """A mosquitto that answers SUBSCRIBE with "Not authorized" except for ``allow``.

    mosquitto's acl_file grants every subscription and only filters delivery; its
    dynamic security plugin refuses in the SUBACK, as a cluster node or a strict broker
    does.
    """
    plugins = glob.glob("/usr/lib/*/mosquitto_dynamic_security.so")
    assert plugins, "mosquitto's dynamic security plugin is missing (package mosquitto)"
    acls = [{"acltype": "subscribePattern", "topic": t, "priority": 0, "allow": True}
            for t in allow]
    path = tmp_path / f"dynsec-{len(list(tmp_path.glob('dynsec-*')))}.json"
    path.write_text(json.dumps({
        "defaultACLAccess": {"publishClientSend": True, "publishClientReceive": True,
                             "subscribe": False, "unsubscribe": True},
        "clients": [], "roles": [{"rolename": "apps", "acls": acls}],
        "groups": [{"groupname": "anonymous", "roles": [{"rolename": "apps"}]}],
        "anonymousGroup": "anonymous"}))
    return make_broker(extra=[f"plugin {plugins[0]}", f"plugin_opt_config_file {path}"])


def test_a_broker_that_refuses_the_subscription_is_left_for_another(
        make_broker, probes, run_daemon, tmp_path):
    a = refusing_broker(make_broker, tmp_path)
    b = make_broker()
    bike = bike_id_starting_on(a.port, [a.port, b.port])
    watch_b = probes(b)
    daemon = run_daemon(failover_config(a, [b], bike_id=bike))
    watch_b.wait_for(f"bike/{bike}/status", lambda m: m.payload == b"online", timeout=20)
    log = daemon.output()
    assert re.search(rf"127.0.0.1:{a.port} refused the subscription to bike/{bike}/\+/control",
                     log), log
    send(b, f"bike/{bike}/fan/control", "12")
    watch_b.json(f"bike/{bike}/fan/report", lambda d: d["value"] == 12.0)


def test_a_bike_that_cannot_subscribe_never_says_online(make_broker, run_daemon, tmp_path):
    broker = refusing_broker(make_broker, tmp_path, allow=("bike/+/status", "bike/+/+/report"))
    app = Probe(broker)
    app.setup_mqtt_client()
    app.subscribe("bike/+/status")
    app.subscribe("bike/+/+/report")
    app.loop_start()
    try:
        assert app.connected.wait(10)
        daemon = run_daemon(bike_config(broker, FAN))
        # Two full rounds of refusals: it keeps trying, and never claims to listen.
        wait_until(lambda: daemon.output().count("refused the subscription") >= 4, 20,
                   "repeated refusals")
        app.wait_for("bike/000001/fan/report")  # it did connect and publish its state
        online = [m for m in app.messages if m.topic == "bike/000001/status"
                  and m.payload == b"online"]
        assert online == []
        assert not [ln for ln in daemon.notify.lines if ln.startswith("STATUS=connected")]
    finally:
        app.disconnect()
        app.loop_stop()
