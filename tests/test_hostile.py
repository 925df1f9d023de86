"""Hostile and buggy apps: no message moves the wrong motor or knocks the bike offline.

Each test sends what a careless or malicious app could send, then a good command as a
barrier: the daemon handles messages in order and the broker delivers one publisher's
messages in order, so once the good command's report is in, anything the bad message
caused would already have arrived.
"""

from __future__ import annotations

import json
import re
import threading

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from smartbiked.topics import reply_topic_problem
from tests.conftest import ROOT, Probe, bike_config, retained, wait_until
from tests.test_daemon import FAN, send
from tests.test_service import factory, serve  # noqa: F401  (fixtures)

OWN_REPLIES = ("bike/000001/reply/#",)


def v5(response_topic: str, correlation: bytes | None = None) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = response_topic
    if correlation is not None:
        props.CorrelationData = correlation
    return props


def barrier(broker, probe, value: float) -> int:
    """Send a good fan command and wait for its report; the index just before it."""
    mark = len(probe.messages)
    send(broker, "bike/000001/fan/control", str(value))
    probe.json("bike/000001/fan/report", lambda d: d["value"] == value, after=mark)
    return mark


def fan_values(probe, after: int = 0) -> list[float]:
    return [json.loads(m.payload)["value"] for m in probe.messages[after:]
            if m.topic == "bike/000001/fan/report"]


HOSTILE_REPLY_TOPICS = [
    ("bike/000002/fan/control", "another bike's motor"),
    ("bike/000001/incline/control", "a motor the app may not touch"),
    ("bike/000001/status", "forged availability"),
    ("bike/000001/heartrate/report", "a forged reading"),
    ("bike/000001/health", "forged health"),
    ("bike/000001/reply/fan/control", "a control topic inside the namespace"),
    ("$SYS/broker/x", "a broker topic"),
    ("apps/mine/replies", "outside the reply namespace"),
    ("bike/000001/reply/" + "a/" * 7 + "a", "more than 8 levels"),
    ("bike/000001/reply/" + "x" * 250, "more than 256 bytes"),
    ("smartbike-sim/000001/press", "the virtual world's button"),
]


@pytest.mark.parametrize(("topic", "why"), HOSTILE_REPLY_TOPICS, ids=[w for _, w in
                                                                      HOSTILE_REPLY_TOPICS])
def test_a_hostile_response_topic_refuses_the_command_and_gets_nothing(
        broker, probe, run_daemon, topic, why):
    probe.subscribe("#")  # see every topic, the bike's and everyone else's
    run_daemon(bike_config(broker, FAN))
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
    barrier(broker, probe, 10.0)
    mark = len(probe.messages)
    send(broker, "bike/000001/fan/control", b'{"value": 77}', properties=v5(topic, b"c1"))
    refusal = probe.json("bike/000001/fan/status", after=mark)
    assert refusal["ok"] is False and "ResponseTopic" in refusal["error"], refusal
    barrier(broker, probe, 20.0)
    assert 77.0 not in fan_values(probe, mark), f"{why}: the refused command moved the fan"
    touched = [m.topic for m in probe.messages[mark:] if m.topic == topic]
    assert not touched, f"{why}: the daemon published on {topic}"


def test_answers_go_to_the_reply_namespace_with_their_correlation(broker, probe, run_daemon):
    run_daemon(bike_config(broker, FAN))
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
    send(broker, "bike/000001/fan/control", b"40",
         properties=v5("bike/000001/reply/app-7", b"req-1"))
    answer = probe.wait_for("bike/000001/reply/app-7")
    assert json.loads(answer.payload)["value"] == 40.0
    assert answer.properties.CorrelationData == b"req-1"


def test_an_oversized_correlation_is_refused(broker, probe, run_daemon):
    run_daemon(bike_config(broker, FAN))
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
    mark = len(probe.messages)
    send(broker, "bike/000001/fan/control", b"66",
         properties=v5("bike/000001/reply/app", b"x" * 65))
    refusal = probe.json("bike/000001/fan/status", after=mark)
    assert "CorrelationData" in refusal["error"]
    barrier(broker, probe, 5.0)
    assert 66.0 not in fan_values(probe, mark)
    assert not [m for m in probe.messages[mark:] if m.topic == "bike/000001/reply/app"]


def test_the_reply_namespace_is_configurable(broker, probe, run_daemon):
    text = bike_config(broker, FAN).replace(
        "reconnect_max = 1", 'reconnect_max = 1\nreply_topics = ["apps/{id}/+/answers"]')
    run_daemon(text)
    probe.subscribe("apps/#")
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
    send(broker, "bike/000001/fan/control", b"30",
         properties=v5("apps/000001/vr/answers", b"1"))
    assert json.loads(probe.wait_for("apps/000001/vr/answers").payload)["ok"] is True
    mark = len(probe.messages)
    send(broker, "bike/000001/fan/control", b"31",
         properties=v5("bike/000001/reply/x", b"2"))  # the default is no longer allowed
    assert "apps/000001/+/answers" in probe.json("bike/000001/fan/status", after=mark)["error"]


def test_a_reply_topic_the_broker_would_reject_costs_one_refusal_not_the_connection(
        broker, probe, run_daemon):
    """300 levels: mosquitto would call the reply a protocol error and paho resend it forever."""
    run_daemon(bike_config(broker, FAN))
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
    mark = len(probe.messages)
    send(broker, "bike/000001/fan/control", b"50",
         properties=v5("bike/000001/reply/" + "/".join(["l"] * 300)))
    assert "ResponseTopic" in probe.json("bike/000001/fan/status", after=mark)["error"]
    for value in (11.0, 12.0, 13.0):
        barrier(broker, probe, value)
    flaps = [m.payload for m in probe.messages[mark:] if m.topic == "bike/000001/status"]
    assert flaps == [], f"the connection dropped: {flaps}"


def test_the_bike_advertises_a_maximum_packet_size(broker, probe, run_daemon):
    """A 64 KB payload never reaches the daemon: the broker drops it (MQTT v5)."""
    run_daemon(bike_config(broker, FAN))
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
    mark = len(probe.messages)
    send(broker, "bike/000001/fan/control", b" " * 65536 + b"90")
    send(broker, "bike/000001/fan/control", b" " * 600 + b"91")  # under the limit: refused
    refusal = probe.json("bike/000001/fan/status", after=mark)
    barrier(broker, probe, 7.0)
    assert "payload too large" in refusal["error"]
    refusals = [m for m in probe.messages[mark:] if m.topic == "bike/000001/fan/status"]
    assert len(refusals) == 1, "the 64 KB message reached the daemon"
    assert not [m for m in probe.messages[mark:] if m.topic == "bike/000001/status"]


def test_a_number_beyond_float_range_is_refused(broker, probe, run_daemon):
    run_daemon(bike_config(broker, FAN))
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
    for payload in (b"1" + b"0" * 400, b'{"value": -' + b"9" * 350 + b"}"):
        mark = len(probe.messages)
        send(broker, "bike/000001/fan/control", payload)
        assert probe.json("bike/000001/fan/status", after=mark)["ok"] is False


def test_refusals_do_not_flood_the_log(broker, probe, run_daemon):
    daemon = run_daemon(bike_config(broker, FAN))
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
    app = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    app.connect(broker.host, broker.port)
    app.loop_start()
    try:
        for i in range(300):
            app.publish("bike/000001/fan/control", f"{500 + i}", qos=1)
        app.publish("bike/000001/fan/control", "3", qos=1).wait_for_publish(10)
    finally:
        app.disconnect()
        app.loop_stop()
    probe.json("bike/000001/fan/report", lambda d: d["value"] == 3.0, timeout=20)
    lines = [ln for ln in daemon.output().splitlines() if "command refused" in ln]
    assert 1 <= len(lines) <= 10, f"{len(lines)} refusal lines for 300 refusals"


def test_a_long_topic_level_is_logged_only_as_a_prefix(broker, probe, run_daemon):
    daemon = run_daemon(bike_config(broker, FAN))
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
    level = "z" * 2000
    send(broker, f"bike/000001/{level}/control", b"1")
    barrier(broker, probe, 8.0)
    assert "z" * 41 not in daemon.output()


def test_a_second_daemon_for_the_same_bike_refuses_to_start(broker, probe, run_daemon):
    first = run_daemon(bike_config(broker, FAN))
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
    second = run_daemon(bike_config(broker, FAN))
    assert second.wait(20) != 0
    assert re.search(r"another smartbiked \(pid \d+\) already runs this bike",
                     second.output()), second.output()
    assert first.proc.poll() is None
    barrier(broker, probe, 9.0)  # the first one still serves


def test_a_stolen_session_is_named_and_backed_off(broker, probe, run_daemon):
    """Another client with the bike's client id: an ERROR naming the cause, then a back-off.

    mosquitto 2.0.11 closes the taken session's socket without MQTT v5's reason 0x8E,
    so the daemon recognises the takeover by connections the broker keeps closing.
    """
    daemon = run_daemon(bike_config(broker, FAN))
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
    intruder = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="smartbiked-000001",
                           protocol=mqtt.MQTTv5)
    intruder.connect(broker.host, broker.port)
    intruder.loop_start()
    try:
        pattern = r"ERROR .*session taken over.*same bike id.*reconnecting in (\d+) s"
        line = wait_until(lambda: re.search(pattern, daemon.output()), 20,
                          "the takeover to be logged")
        assert int(line.group(1)) >= 5
    finally:
        intruder.disconnect()
        intruder.loop_stop()


def test_after_a_flood_the_retained_state_is_the_pin(make_broker, serve, factory):  # noqa: F811
    """2,000 fan commands, a third of them invalid: the retained report ends equal to the pin."""
    # The broker must not drop commands for the bike itself (its queue is 1,000 by default).
    broker = make_broker(extra=["max_queued_messages 10000"])
    serve(bike_config(broker, FAN))
    pin = factory.pin(12)
    app = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    app.connect(broker.host, broker.port)
    app.loop_start()
    try:
        last = None
        for i in range(2000):
            payload = "bad" if i % 3 == 0 else str((i * 7) % 101)
            info = app.publish("bike/000001/fan/control", payload, qos=1)
        last = app.publish("bike/000001/fan/control", "90", qos=1)
        info.wait_for_publish(30)
        last.wait_for_publish(30)
    finally:
        app.disconnect()
        app.loop_stop()
    wait_until(lambda: pin.state == pytest.approx(0.9), 30, "the pin to reach 90 %")

    wait_until(lambda: json.loads(retained(broker, "bike/000001/fan/report").payload)["value"]
               == 90.0, 30, "the retained fan report to say 90")
    assert pin.state == pytest.approx(0.9)


def test_reply_topic_checks_refuse_nul_control_characters_and_wildcards():
    for topic in ("bike/000001/reply/a\0b", "bike/000001/reply/\x1b[2J", "bike/000001/reply/+",
                  "bike/000001/reply/#", ""):
        assert reply_topic_problem(topic, OWN_REPLIES), repr(topic)
    assert reply_topic_problem("bike/000001/reply/app-1", OWN_REPLIES) is None


def _readme_acl() -> tuple[list[str], str]:
    """The broker settings and ACL file the README recommends, as written there."""
    text = (ROOT / "README.md").read_text()
    section = text.split("<!-- acl-example:start -->")[1].split("<!-- acl-example:end -->")[0]
    conf, acl = re.findall(r"```\n(.*?)```", section, re.S)
    settings = [ln for ln in conf.splitlines() if ln and not ln.startswith("#")
                and not ln.startswith(("password_file", "acl_file", "allow_anonymous"))]
    return settings, acl


def test_the_readme_acl_lets_the_bike_and_its_app_work_and_protects_the_session(
        make_broker, run_daemon):
    settings, acl = _readme_acl()
    broker = make_broker(users={"smartbiked-000001": "bike-pw", "vr-game": "app-pw",
                                "other": "other-pw"}, acl=acl, extra=settings)
    text = bike_config(broker, FAN).replace(
        "reconnect_max = 1", 'reconnect_max = 1\nusername = "smartbiked-000001"')
    run_daemon(text, MQTT_PASSWORD="bike-pw")
    app = Probe(broker)
    app.username, app._password = "vr-game", "app-pw"
    app.setup_mqtt_client()
    app.subscribe("bike/000001/#")
    app.loop_start()
    try:
        assert app.connected.wait(10)
        app.wait_for("bike/000001/status", lambda m: m.payload == b"online")
        # One connection per account: with use_username_as_clientid a second "vr-game"
        # connection would take this one's session.
        app.publish("bike/000001/fan/control", b"35",
                    properties=v5("bike/000001/reply/vr", b"1")).wait_for_publish(5)
        assert json.loads(app.wait_for("bike/000001/reply/vr").payload)["value"] == 35.0
        # Another account using the bike's client id gets its own user name as client id.
        intruder = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                               client_id="smartbiked-000001", protocol=mqtt.MQTTv5)
        intruder.username_pw_set("other", "other-pw")
        mark = len(app.messages)
        intruder_in = threading.Event()
        intruder.on_connect = lambda *args: intruder_in.set()
        intruder.connect(broker.host, broker.port)
        intruder.loop_start()
        assert intruder_in.wait(10)  # a takeover, if any, has happened at the broker now
        app.publish("bike/000001/fan/control", b"36").wait_for_publish(5)
        app.json("bike/000001/fan/report", lambda d: d["value"] == 36.0, after=mark)
        intruder.disconnect()
        intruder.loop_stop()
        flaps = [m.payload for m in app.messages[mark:] if m.topic == "bike/000001/status"]
        assert flaps == [], flaps
    finally:
        app.disconnect()
        app.loop_stop()

