"""The outbox against a real broker: state never lies, transient messages are bounded.

Pressure is real: the broker is frozen with SIGSTOP, so nothing is acknowledged and
the outbox can hand paho only the broker's Receive Maximum. A fake clock decides ages.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator

import pytest

from smartbiked import outbox as outbox_module
from smartbiked.mqtt_client import MQTTClient
from smartbiked.outbox import Outbox
from tests.conftest import Broker, retained, wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def outbox(broker: Broker, clock: Clock) -> Iterator[Outbox]:
    client = MQTTClient(broker.host, "", "", broker.port, client_id="outbox-test")
    box = Outbox(client, clock=clock, max_waiting=50)
    client.on_publish = lambda mid, rc: box.acknowledged(mid, rc)  # type: ignore[method-assign]
    client.setup_mqtt_client()
    client.loop_start()
    assert client.connected.wait(10)
    box.start()
    yield box
    box.close()
    client.disconnect()
    client.loop_stop()


def values(probe, topic: str) -> list[float]:
    return [json.loads(m.payload)["value"] for m in probe.messages if m.topic == topic]


def frozen(broker: Broker):
    """A context in which the broker acknowledges nothing."""
    class Frozen:
        def __enter__(self) -> None:
            broker.proc.send_signal(signal.SIGSTOP)

        def __exit__(self, *exc: object) -> None:
            broker.proc.send_signal(signal.SIGCONT)
    return Frozen()


def test_state_is_coalesced_and_its_latest_value_always_arrives(broker, probe, outbox):
    with frozen(broker):
        for i in range(500):
            outbox.state("bike/1/fan/report", {"value": float(i)})
    wait_until(lambda: outbox.pending() == 0, 20, "the outbox to drain")
    probe.json("bike/1/fan/report", lambda d: d["value"] == 499.0)
    got = values(probe, "bike/1/fan/report")
    assert got[-1] == 499.0
    assert len(got) < 100, "state was not coalesced"
    assert outbox.counters.shed == {}


def test_under_pressure_the_oldest_transient_messages_are_shed_and_counted(
        broker, probe, outbox):
    with frozen(broker):
        for i in range(300):
            outbox.send("bike/1/power/report", {"value": float(i)}, "reports")
        outbox.state("bike/1/fan/report", {"value": 7.0})
    wait_until(lambda: outbox.pending() == 0, 20, "the outbox to drain")
    wait_until(lambda: values(probe, "bike/1/fan/report") == [7.0], 10, "the state")
    got = values(probe, "bike/1/power/report")
    shed = outbox.counters.shed["reports"]
    assert shed > 0 and len(got) + shed == 300
    assert got == sorted(got) and got[-1] == 299.0, "the newest must survive, in order"
    assert outbox.counters.as_dict()["reports_shed"] == shed


def test_stale_transient_messages_are_shed_not_sent(broker, probe, outbox, clock):
    with frozen(broker):
        for i in range(60):
            outbox.send("bike/1/speed/report", {"value": float(i)}, "reports")
        outbox.state("bike/1/resistance/report", {"value": 3.0})
        clock.now += 5  # the broker was stuck for five seconds
    wait_until(lambda: values(probe, "bike/1/resistance/report") == [3.0], 10, "the state")
    wait_until(lambda: outbox.pending() == 0, 20, "the outbox to drain")
    got = values(probe, "bike/1/speed/report")
    # At most what paho already held (the broker's Receive Maximum) went out late.
    assert len(got) <= 20, f"{len(got)} readings arrived five seconds late"
    assert outbox.counters.shed["reports"] == 60 - len(got)


def test_nothing_is_queued_through_an_outage_but_state(make_broker, clock):
    broker = make_broker()
    client = MQTTClient(broker.host, "", "", broker.port, client_id="outbox-outage",
                        reconnect_max=0.5)
    box = Outbox(client, clock=clock)
    client.on_publish = lambda mid, rc: box.acknowledged(mid, rc)  # type: ignore[method-assign]
    client.setup_mqtt_client()
    box.start()
    box.send("bike/1/button/report", {"button": "BRAKE"}, "events")  # not connected yet
    box.state("bike/1/fan/report", {"value": 1.0})
    client.loop_start()
    try:
        assert client.connected.wait(10)
        box.connected()
        wait_until(lambda: box.pending() == 0, 10, "the state to go out")
        assert box.counters.offline == 1
    finally:
        box.close()
        client.disconnect()
        client.loop_stop()


def test_a_packet_over_the_brokers_maximum_is_refused_and_the_connection_stays(
        make_broker, clock):
    broker = make_broker(extra=["max_packet_size 400"])
    client = MQTTClient(broker.host, "", "", broker.port, client_id="outbox-max")
    box = Outbox(client, clock=clock)
    client.on_publish = lambda mid, rc: box.acknowledged(mid, rc)  # type: ignore[method-assign]
    drops: list[object] = []
    client.on_disconnect = lambda rc: drops.append(rc)  # type: ignore[method-assign]
    client.setup_mqtt_client()
    client.loop_start()
    try:
        assert client.connected.wait(10)
        assert client.broker_max_packet == 400
        box.start()
        box.state("bike/1/health", {"padding": "x" * 600})
        box.state("bike/1/fan/report", {"value": 2.0})
        wait_until(lambda: box.pending() == 0, 10, "the outbox to drain")
        assert box.counters.refused == 1 and not drops
    finally:
        box.close()
        client.disconnect()
        client.loop_stop()


def test_a_flood_of_refusals_sheds_its_own_oldest_not_the_readings(broker, probe, outbox):
    with frozen(broker):
        for i in range(10):
            outbox.send("bike/1/power/report", {"value": float(i)}, "reports")
        for i in range(200):
            outbox.send("bike/1/fan/status", {"ok": False, "n": i}, "refusals")
    wait_until(lambda: outbox.pending() == 0, 20, "the outbox to drain")
    probe.json("bike/1/fan/status", lambda d: d["n"] == 199)  # the broker delivered it all
    assert values(probe, "bike/1/power/report") == [float(i) for i in range(10)]
    refusals = [json.loads(m.payload)["n"] for m in probe.messages
                if m.topic == "bike/1/fan/status"]
    assert refusals[-1] == 199 and len(refusals) <= 20 + 32
    assert outbox.counters.shed["refusals"] == 200 - len(refusals)


def test_state_sent_since_the_connect_is_not_repeated_but_a_reconnect_repeats_it(
        broker, probe, outbox):
    outbox.state("bike/1/fan/report", {"value": 4.0})
    probe.json("bike/1/fan/report", lambda d: d["value"] == 4.0)
    outbox.connected()  # the subscription was granted after the state went out
    outbox.state("bike/1/resistance/report", {"value": 1.0})  # a barrier behind it
    probe.json("bike/1/resistance/report")
    assert values(probe, "bike/1/fan/report") == [4.0]
    outbox.disconnected()
    outbox.connected()
    wait_until(lambda: values(probe, "bike/1/fan/report") == [4.0, 4.0], 10, "a resend")
    outbox.refresh()
    wait_until(lambda: len(values(probe, "bike/1/fan/report")) == 3, 10, "a refresh")


def test_at_the_brokers_receive_maximum_each_acknowledgement_sends_the_next(make_broker):
    # A Receive Maximum of 1: every message waits for the one before to be acknowledged.
    # The outbox is woken by an acknowledgement only at that limit; were it not, each
    # message would wait for the thread's 1 s poll and 60 of them would take a minute.
    # The client runs like the daemon's (loop_forever on its own thread), so the
    # outbox's publishes are written at once from the outbox thread.
    broker = make_broker(extra=["max_inflight_messages 1"])
    client = MQTTClient(broker.host, "", "", broker.port, client_id="outbox-rmax")
    box = Outbox(client)  # the real clock: drain() times out
    client.on_publish = lambda mid, rc: box.acknowledged(mid, rc)  # type: ignore[method-assign]
    client.setup_mqtt_client()
    loop = threading.Thread(target=client.loop_forever, daemon=True)
    loop.start()
    try:
        assert client.connected.wait(10)
        assert client.broker_receive_max == 1
        box.start()
        for i in range(60):
            box.state(f"bike/1/fan{i}/report", {"value": float(i)})
        assert box.drain(timeout=10.0), f"{box.pending()} still waiting after 10 s"
        assert box.counters.shed == {}
    finally:
        box.close()
        client.disconnect()
        loop.join(10)


class WatchedClient(MQTTClient):
    """A real client that notes which thread hands each message to paho, and can hold
    one publish back (at the gate) to open the window a race needs."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.calls: list[tuple[str, bytes]] = []
        self.hold: bytes | None = None  # a payload whose publish waits at the gate
        self.at_gate = threading.Event()
        self.gate = threading.Event()
        self.overtaken = threading.Event()  # another publish while one waits at the gate

    def publish(self, topic_name, payload, qos=1, retain=False, properties=None):  # type: ignore[no-untyped-def]
        self.calls.append((threading.current_thread().name, payload))
        if self.at_gate.is_set() and not self.gate.is_set():
            self.overtaken.set()
        if payload == self.hold:
            self.at_gate.set()
            self.gate.wait(10)
        return super().publish(topic_name, payload, qos, retain, properties)


@pytest.fixture
def watched(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> (
        Iterator[tuple[WatchedClient, Outbox]]):
    # Only wakes move the outbox here: a missed one shows as a message that never leaves.
    monkeypatch.setattr(outbox_module, "LOOK_AGAIN", 3600.0)
    client = WatchedClient(broker.host, "", "", broker.port, client_id="outbox-watched")
    box = Outbox(client)
    client.on_publish = lambda mid, rc: box.acknowledged(mid, rc)  # type: ignore[method-assign]
    client.setup_mqtt_client()
    client.loop_start()
    assert client.connected.wait(10)
    box.start()
    yield client, box
    client.gate.set()
    box.close()
    client.disconnect()
    client.loop_stop()


def idle(box: Outbox) -> None:
    # The sending thread waits with nothing waiting or under way.
    wait_until(lambda: box.pending() == 0 and box._sleeping and not box._in_hand, 10,
               "the outbox to be idle")


def test_an_idle_outbox_hands_a_message_over_on_the_thread_that_queued_it(
        probe, watched) -> None:
    # No wake of the outbox thread per message: the report of a command goes out from
    # the hardware thread, a refusal from paho's.
    client, box = watched
    idle(box)
    box.state("bike/1/fan/report", {"value": 1.0})
    assert client.calls[-1] == ("MainThread", b'{"value": 1.0}')
    idle(box)
    box.send("bike/1/fan/status", {"ok": False}, "refusals")
    assert client.calls[-1] == ("MainThread", b'{"ok": false}')
    probe.json("bike/1/fan/status")
    assert values(probe, "bike/1/fan/report") == [1.0]


def test_a_newer_state_queued_during_a_direct_hand_over_goes_after_it(
        broker, probe, watched) -> None:
    # Thread A hands fan=1 to paho itself; meanwhile thread B sets fan=2. The outbox
    # thread must not send fan=2 before fan=1 reaches paho: the retained value would
    # then be the older one for good.
    client, box = watched
    idle(box)
    client.hold = b'{"value": 1.0}'
    a = threading.Thread(target=box.state, args=("bike/1/fan/report", {"value": 1.0}),
                         name="A")
    a.start()
    assert client.at_gate.wait(10)
    box.state("bike/1/fan/report", {"value": 2.0})  # B: queued for the outbox thread
    # fan=2 must not reach paho while fan=1 is held at the gate (a wait for something
    # that must not happen has no event to end it: half a second is the window).
    assert not client.overtaken.wait(0.5), "fan=2 went to paho while fan=1 was under way"
    client.gate.set()
    a.join(10)
    wait_until(lambda: client.calls[-1][1] == b'{"value": 2.0}', 10, "fan=2 to be handed over")
    assert [p for _, p in client.calls][-2:] == [b'{"value": 1.0}', b'{"value": 2.0}']
    probe.json("bike/1/fan/report", lambda d: d["value"] == 2.0)
    assert json.loads(retained(broker, "bike/1/fan/report").payload)["value"] == 2.0


def test_a_publisher_holding_a_lock_a_callback_needs_survives_a_failed_write(broker) -> None:
    # The outbox hands a message to paho from the thread that queued it, which may hold
    # a lock of its own (the coach's, announcing a mode). If that write fails, paho would
    # run on_disconnect there, under its callback lock: held by the loop thread while an
    # on_message callback waits for the first thread's lock. A deadlock; MQTT dead.
    client = MQTTClient(broker.host, "", "", broker.port, client_id="outbox-lock")
    box = Outbox(client)
    client.on_publish = lambda mid, rc: box.acknowledged(mid, rc)  # type: ignore[method-assign]
    app_lock = threading.Lock()  # stands for the coach's lock
    heard: list[bytes] = []
    in_callback, sending, fail = threading.Event(), threading.Event(), threading.Event()

    def on_message(msg) -> None:  # like handle_control -> coach.command()
        if sending.is_set():
            in_callback.set()
        with app_lock:
            heard.append(msg.payload)

    client.handle_message = on_message  # type: ignore[attr-defined]
    client.on_message = lambda c, u, m: client.handle_message(m)  # type: ignore[method-assign,attr-defined]
    client.setup_mqtt_client()
    paho = client._paho()
    real_send = paho._sock_send

    def sock_send(data):  # type: ignore[no-untyped-def]
        if fail.is_set() and threading.current_thread().name == "announcer":
            fail.clear()
            sending.set()
            assert in_callback.wait(10)  # the loop thread now waits for app_lock
            raise ConnectionResetError(104, "Connection reset by peer")
        return real_send(data)

    paho._sock_send = sock_send
    loop = threading.Thread(target=client.loop_forever, name="loop", daemon=True)
    loop.start()
    app = MQTTClient(broker.host, "", "", broker.port, client_id="outbox-lock-app")
    app.setup_mqtt_client()
    app.loop_start()
    try:
        assert client.connected.wait(10) and app.connected.wait(10)
        client.subscribe("t/cmd")
        wait_until(lambda: app.publish("t/cmd", b"ping") and b"ping" in heard, 10,
                   "the subscription")
        # Every ping handled: the loop thread is in no callback (there paho would leave
        # the announcer's packet to the loop thread, and the scene below never happens).
        app.publish("t/cmd", b"last ping")
        wait_until(lambda: b"last ping" in heard and not paho._in_callback_mutex.locked(),
                   10, "the pings to be handled")
        box.start()
        idle(box)

        def announce() -> None:
            with app_lock:
                fail.set()
                box.state("bike/1/mode/report", {"mode": "resistance"})

        announcer = threading.Thread(target=announce, name="announcer", daemon=True)
        announcer.start()
        assert sending.wait(10)  # inside the write, holding app_lock
        app.publish("t/cmd", b"command")
        announcer.join(10)
        assert not announcer.is_alive(), "deadlock: the publisher never returned"
        wait_until(lambda: b"command" in heard, 10, "the callback to get the lock")
        # The loop thread met the failed connection itself, and reconnected.
        wait_until(lambda: app.publish("t/cmd", b"after") and b"after" in heard, 20,
                   "commands after the reconnect")
    finally:
        box.close()
        app.disconnect()
        app.loop_stop()
        client.disconnect()
        loop.join(10)


def test_an_acknowledgement_from_before_a_reconnect_never_passes_for_a_new_message(
        broker, watched) -> None:
    # connected() forgets what was unacknowledged; an acknowledgement arriving after
    # that (a message handed over just before) must be forgotten too. Kept as "early",
    # it would mark the message that gets the same mid after the counter wraps as
    # acknowledged: drain() would then return before the broker has it.
    client, box = watched
    idle(box)
    acked = threading.Event()
    box.state("bike/1/status", "online")  # handed over at once, on this thread
    box.connected()
    online_mid = client._paho()._last_mid
    forward = box.acknowledged

    def acknowledged(mid: int, reason_code: object = None) -> None:
        forward(mid, reason_code)
        if mid == online_mid:
            acked.set()

    client.on_publish = lambda mid, rc: acknowledged(mid, rc)  # type: ignore[method-assign]
    box.acknowledged = acknowledged  # type: ignore[method-assign]
    assert acked.wait(10) or online_mid not in box._unacked
    idle(box)
    client._paho()._last_mid = online_mid - 1  # the next message gets online's mid
    with frozen(broker):
        box.state("bike/1/fan/report", {"value": 7.0})
        assert box.pending() == 1, "a message the broker has not acknowledged is not pending"
