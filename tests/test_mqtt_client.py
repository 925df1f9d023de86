"""MQTTClient runs the examples of MQTT-Client.md against a real broker."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from smartbiked import mqtt_client
from smartbiked.mqtt_client import MQTTClient
from tests.conftest import Broker, wait_until

USER, PASSWORD = "ExampleUsername", "Ex@mpLeP@Ssw0rd"


@pytest.fixture
def auth_broker(make_broker) -> Broker:
    return make_broker(users={USER: PASSWORD})


def test_documented_example_connects_subscribes_publishes_and_receives(auth_broker):
    # --- MQTT-Client.md, "MQTT Client" and "on_message" examples; import line adapted ---
    class Device:
        def __init__(self):
            self.device_topic = "example/1"
            self.received = []
            self.got = threading.Event()

        def on_message(self, msg):
            if self.device_topic != msg.topic:
                return
            decoded_payload = str(msg.payload, "utf-8")
            dict_payload = json.loads(decoded_payload)
            self.received.append(dict_payload)
            self.got.set()

    class MyChildClient(MQTTClient):
        def __init__(self, broker_address, username, password, device):
            super().__init__(broker_address, username, password)
            self.device = device

        def on_message(self, client, userdata, msg):
            super().on_message(client, userdata, msg)
            self.device.on_message(msg)

    broker_address = auth_broker.host
    username = USER
    password = PASSWORD
    device = Device()
    client = MyChildClient(broker_address, username, password, device)
    # The document's subclass drops the port argument (default 1883); tests never use
    # that port, so point it at the test broker. This is the only other adaptation.
    client.port = auth_broker.port
    client.setup_mqtt_client()
    client.subscribe("example/1")

    def my_event():
        payload = json.dumps({"incline": 19, "ts": 1722834170.603658})
        client.publish("example/1", payload)

    client.start_loop()  # the spelling the document's prose uses
    try:
        assert client.connected.wait(10)
        my_event()
        assert device.got.wait(10), "subclassed on_message never saw the message"
        assert device.received == [{"incline": 19, "ts": 1722834170.603658}]
    finally:
        client.disconnect()
        client.loop_stop()


def test_publish_accepts_any_payload_as_documented(broker, probe):
    client = MQTTClient(broker.host, "", "", broker.port)
    client.setup_mqtt_client()
    client.loop_start()
    try:
        assert client.connected.wait(10)
        for payload in ["Hello World!", [True, False], -10, {"incline": 19}]:
            client.publish("bike/example/2", payload).wait_for_publish(5)
        wait_until(lambda: len([m for m in probe.messages if m.topic == "bike/example/2"]) == 4,
                   10, "four messages")
        seen = [m.payload for m in probe.messages if m.topic == "bike/example/2"]
        assert seen == [b"Hello World!", b"[true, false]", b"-10", b'{"incline": 19}']
    finally:
        client.disconnect()
        client.loop_stop()


def test_wrong_password_is_refused_and_never_logged(auth_broker, caplog):
    client = MQTTClient(auth_broker.host, USER, "wrong-secret-123", auth_broker.port)
    client.setup_mqtt_client()
    client.loop_start()
    try:
        wait_until(lambda: "refused the connection" in caplog.text, 10, "a refusal log")
        assert not client.is_connected()
    finally:
        client.disconnect()
        client.loop_stop()
    assert "wrong-secret-123" not in caplog.text
    assert "wrong-secret-123" not in repr(client)


def test_resubscribes_and_receives_after_the_broker_restarts(make_broker):
    broker = make_broker()
    got = threading.Event()

    class Client(MQTTClient):
        def on_message(self, client, userdata, msg):
            super().on_message(client, userdata, msg)
            got.set()

    client = Client(broker.host, "", "", broker.port, reconnect_max=1)
    client.setup_mqtt_client()
    client.subscribe("bike/000001/fan/control")
    client.loop_start()
    sender = MQTTClient(broker.host, "", "", broker.port, reconnect_max=1)
    sender.setup_mqtt_client()
    sender.loop_start()
    try:
        assert client.connected.wait(10)
        broker.stop()
        wait_until(lambda: not client.is_connected() and not sender.is_connected(), 10,
                   "the disconnect")
        broker.start()  # same port, fresh broker: no session survives
        assert client.connected.wait(15) and sender.connected.wait(15)
        # The SUBACK may trail the CONNACK: keep publishing until one gets through.
        wait_until(lambda: sender.publish("bike/000001/fan/control", "50") and got.wait(0.2),
                   10, "a message after the reconnect")
    finally:
        for c in (client, sender):
            c.disconnect()
            c.loop_stop()


def test_exception_in_on_message_does_not_stop_message_handling(broker):
    got = []

    class Fragile(MQTTClient):
        def on_message(self, client, userdata, msg):
            if msg.payload == b"boom":
                raise RuntimeError("handler bug")
            got.append(msg.payload)

    client = Fragile(broker.host, "", "", broker.port)
    client.setup_mqtt_client()
    client.subscribe("t")
    client.loop_start()
    try:
        assert client.connected.wait(10)
        wait_until(lambda: client.publish("t", "boom") and client.publish("t", "ok")
                   and got, 10, "a message after the failing one")
        assert got[0] == b"ok"
        assert client.client.is_connected()
    finally:
        client.disconnect()
        client.loop_stop()


# Both ways: the client's own shortcuts (paho 2.2) and paho's methods (any other paho).
BOTH_PATHS = pytest.mark.parametrize("fast", [True, False], ids=["shortcuts", "paho"])


@BOTH_PATHS
def test_each_acknowledgement_says_what_the_broker_did_with_the_message(make_broker, fast,
                                                                         monkeypatch):
    monkeypatch.setattr(mqtt_client, "FAST_PATHS", fast)
    # Three PUBACKs: plain success (two bytes), "no matching subscribers" (a reason
    # code, yet a success) and "not authorized" (the ACL refuses the topic). Each
    # reaches on_publish with what the broker said. Run as the daemon runs it:
    # loop_forever on its own thread, publishing from another.
    broker = make_broker(users={USER: PASSWORD, "app": "app"},
                         acl=f"user {USER}\ntopic write ok/#\nuser app\ntopic read ok/#\n")
    app = MQTTClient(broker.host, "app", "app", broker.port, client_id="acks-app")
    heard: list[str] = []
    app.on_message = lambda c, u, m: heard.append(m.topic)  # type: ignore[method-assign]
    ready = threading.Event()
    app.on_ready = ready.set  # type: ignore[method-assign]
    app.setup_mqtt_client()
    app.subscribe("ok/heard/#")
    app.loop_start()
    client = MQTTClient(broker.host, USER, PASSWORD, broker.port, client_id="acks")
    said: dict[int, Any] = {}
    client.on_publish = lambda mid, rc: said.__setitem__(mid, rc)  # type: ignore[method-assign]
    client.setup_mqtt_client()
    loop = threading.Thread(target=client.loop_forever, daemon=True)
    loop.start()
    try:
        assert ready.wait(10) and client.connected.wait(10)
        sent = {name: client.publish(topic, "1").mid for name, topic in (
            ("success", "ok/heard/1"), ("no subscribers", "ok/unheard/1"),
            ("refused", "no/1"))}
        wait_until(lambda: all(mid in said for mid in sent.values()), 10, "each PUBACK")
        assert said[sent["success"]] == 0 and not said[sent["success"]].is_failure
        assert said[sent["no subscribers"]] == 0x10
        assert not said[sent["no subscribers"]].is_failure
        assert said[sent["refused"]] == 0x87 and said[sent["refused"]].is_failure
        wait_until(lambda: heard == ["ok/heard/1"], 10, "the app to hear its message")
    finally:
        client.disconnect()
        loop.join(10)
        app.disconnect()
        app.loop_stop()


@BOTH_PATHS
def test_received_messages_carry_topic_payload_qos_retain_and_properties(broker, probe, fast,
                                                                          monkeypatch):
    monkeypatch.setattr(mqtt_client, "FAST_PATHS", fast)
    # Messages without properties are decoded by the client itself, those with them by
    # paho: both must arrive the same, whatever their QoS, retain flag and payload.
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    got: list[Any] = []
    ready = threading.Event()
    client = MQTTClient(broker.host, "", "", broker.port, client_id="receiver")
    client.on_message = lambda c, u, m: got.append(  # type: ignore[method-assign]
        (m.topic, m.payload, m.qos, m.retain, getattr(m.properties, "ResponseTopic", None)))
    client.on_ready = ready.set  # type: ignore[method-assign]
    client.setup_mqtt_client()
    client.subscribe("rx/#", qos=1)
    loop = threading.Thread(target=client.loop_forever, daemon=True)
    loop.start()
    try:
        assert ready.wait(10)
        reply = Properties(PacketTypes.PUBLISH)
        reply.ResponseTopic = "rx-answers/1"
        sent = [("rx/a", b'{"value": 1}', 1, False, None), ("rx/b", b"", 0, False, None),
                ("rx/c/é", b"\x00\xff" * 300, 1, False, None),
                ("rx/d", b"2", 1, False, "rx-answers/1")]
        for topic, payload, qos, _, response in sent:
            probe.client.publish(topic, payload, qos,
                                 properties=reply if response else None).wait_for_publish(5)
        wait_until(lambda: len(got) == len(sent), 10, "every message")
        assert got == [(t, p, q, r, rt)
                       for t, p, q, r, rt in sent]
        probe.client.publish("rx/kept", b"3", 1, retain=True).wait_for_publish(5)
        wait_until(lambda: len(got) == len(sent) + 1, 10, "the retained message")
        client.subscribe("rx/kept")  # a new subscription: the broker sends it retained
        wait_until(lambda: len(got) == len(sent) + 2, 10, "the retained message again")
        assert got[-2:] == [("rx/kept", b"3", 1, False, None), ("rx/kept", b"3", 1, True, None)]
    finally:
        client.disconnect()
        loop.join(10)


@pytest.mark.parametrize(("keepalive", "timeout"), [(5, 1.25), (30, 5.0), (60, 5.0), (2, 1.0)])
def test_the_loop_waits_a_quarter_keepalive_at_most_5_s(keepalive: int, timeout: float) -> None:
    # An idle bike's network loop wakes every few seconds, not every second, yet pings
    # stay well inside the broker's 1.5 keep-alives.
    assert mqtt_client.loop_timeout(keepalive) == timeout
