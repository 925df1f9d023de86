"""The systemd watchdog: WATCHDOG=1 only while the MQTT loop and the hardware thread live.

systemd restarts the service when no ping arrives within WATCHDOG_USEC. So the promise
checked here is what systemd sees: while one loop is really stuck a silence much longer
than WATCHDOG_USEC happens, and the pings come back once it is free. The service runs
in-process so the test can hold each loop still for real: a PWM pin whose write blocks
(a driver stuck on the hardware thread), and a message handler that blocks (the paho
loop). Both are released by the test, through events, never by waiting and hoping.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory, MockPWMPin

from smartbiked import config as configuration
from smartbiked.hardware import Hardware
from smartbiked.service import IDLE_SLEEP, Service
from tests.conftest import NotifySocket, Probe, bike_config, wait_until

#: systemd's WatchdogSec, in microseconds: the daemon then pings every 0.1 s.
WATCHDOG_USEC = 200_000
#: A silence this long (7.5 x WatchdogSec) is what systemd would have killed the
#: daemon for; healthy pings every 0.1 s never leave such a gap, even on a busy machine.
SILENCE = 1.5
#: The thresholds the service documents: the hardware thread may be quiet for 3 s (a
#: slow acknowledgement), the MQTT loop for reconnect_max + 15 s (a slow connect).
HARDWARE_GRACE = 3.0
MQTT_GRACE = 1 + 15.0  # bike_config's reconnect_max is 1

FAN = """
[fan]
driver = "gpio_pwm"
pin = 12
"""


@dataclass
class Gate:
    """Holds whoever writes ``value`` to a pin until :meth:`open` (a stuck driver)."""

    value: float | None = None
    entered: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def open(self) -> None:
        self.released.set()


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.open()  # never leave a thread stuck behind the test


@pytest.fixture
def factory(gate: Gate) -> Iterator[MockFactory]:
    class GatedPin(MockPWMPin):
        def _set_state(self, value: float) -> None:
            if gate.value is not None and abs(value - gate.value) < 1e-9:
                gate.entered.set()
                gate.released.wait(60)
            super()._set_state(value)

    f = MockFactory(revision="a02082", pin_class=GatedPin)
    yield f
    f.reset()


@pytest.fixture
def notify(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    """systemd's side, as the service finds it in its environment."""
    sock = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", sock.path)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    yield sock
    sock.close()


@pytest.fixture
def serve(tmp_path, factory, gate, notify) -> Iterator[Callable[[str], Service]]:
    """Run a Service on a thread (the watchdog env set); shut it down at teardown."""
    running: list[tuple[Service, threading.Thread]] = []

    def start(text: str) -> Service:
        path = tmp_path / "bike.toml"
        path.write_text(text)
        service = Service(configuration.load(path, environ={}), Hardware(pin_factory=factory))
        thread = threading.Thread(target=service.run, args=(False,), daemon=True)
        thread.start()
        running.append((service, thread))
        return service

    yield start
    gate.open()  # a failed test may have left the hardware thread stuck
    for service, thread in running:
        if thread.is_alive():
            service.shutdown()
        thread.join(15)
        assert not thread.is_alive()


def pings(notify: NotifySocket) -> int:
    return sum(1 for line in list(notify.lines) if line == "WATCHDOG=1")


def wait_for_silence(notify: NotifySocket, quiet: float, timeout: float) -> None:
    """Return once no WATCHDOG=1 has arrived for ``quiet`` seconds; fail after ``timeout``."""
    last = {"count": pings(notify), "at": time.monotonic()}

    def silent() -> bool:
        count, now = pings(notify), time.monotonic()
        if count != last["count"]:
            last.update(count=count, at=now)
        return now - last["at"] >= quiet

    wait_until(silent, timeout, f"{quiet} s without a watchdog ping (systemd would restart)")


def online(probe: Probe, after: int = 0) -> Any:
    return probe.wait_for("bike/000001/status", lambda m: m.payload == b"online", after=after)


def test_pings_stop_while_the_hardware_thread_is_stuck_and_resume_after(
        broker, probe, serve, gate, notify):
    serve(bike_config(broker, FAN))
    online(probe)
    wait_until(lambda: pings(notify) >= 3, 10, "the first watchdog pings")

    # The fan's driver hangs in its write of 42 %, as a wedged driver would.
    gate.value = 0.42
    mark = len(probe.messages)
    probe.publish("bike/000001/fan/control", "42")
    assert gate.entered.wait(10), "the command never reached the pin"
    wait_for_silence(notify, SILENCE, HARDWARE_GRACE + SILENCE + 10)

    resumed = len(notify.lines)
    gate.open()
    notify.wait_for("WATCHDOG=1", after=resumed)
    assert probe.json("bike/000001/fan/report", after=mark)["value"] == 42.0


def test_pings_stop_while_the_mqtt_loop_is_stalled_and_resume_after(
        broker, probe, serve, notify):
    service = serve(bike_config(broker, FAN))
    online(probe)
    wait_until(lambda: pings(notify) >= 3, 10, "the first watchdog pings")

    # Stall paho's loop inside a message handler (the documented extension point):
    # connected or not, nothing on that thread runs until the test lets go.
    connection = service.client
    handler = connection.on_message
    entered, released = threading.Event(), threading.Event()

    def stalling(client: Any, userdata: Any, msg: Any) -> None:
        if msg.payload == b"stall":
            entered.set()
            released.wait(90)
            return
        handler(client, userdata, msg)

    connection.on_message = stalling
    stalled = len(probe.messages)
    try:
        probe.publish("bike/000001/fan/control", "stall")
        assert entered.wait(10), "the daemon never got the message"
        wait_for_silence(notify, SILENCE, MQTT_GRACE + SILENCE + 15)
    finally:
        resumed = len(notify.lines)
        released.set()
    notify.wait_for("WATCHDOG=1", after=resumed, timeout=20)
    # The loop is really back. Silent for longer than its keep-alive, it was dropped by
    # the broker ("lost"); it reconnects ("online") and obeys commands again.
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"lost", after=stalled)
    mark = len(probe.messages)
    online(probe, after=stalled)
    probe.publish("bike/000001/fan/control", "30")
    probe.json("bike/000001/fan/report", lambda d: d["value"] == 30.0, after=mark, timeout=20)


def test_an_idle_bike_keeps_the_pings_coming_on_its_heartbeat_alone(
        broker, probe, serve, notify):
    # The hardware thread sleeps as long as the watchdog allows (an idle Pi wakes for
    # nothing); past the stale limit with nothing to do, its heartbeat must still come.
    service = serve(bike_config(broker, FAN))
    online(probe)
    assert service.bike.max_sleep <= HARDWARE_GRACE / 2
    start = time.monotonic()
    wait_until(lambda: time.monotonic() - start > HARDWARE_GRACE + 1.0, 10,
               "the stale limit to pass")
    notify.wait_for("WATCHDOG=1", timeout=SILENCE, after=len(notify.lines))


def test_without_a_watchdog_the_hardware_thread_sleeps_until_something_is_due(
        broker, probe, serve, monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC")
    service = serve(bike_config(broker, FAN))
    online(probe)
    wait_until(lambda: service.bike.max_sleep == IDLE_SLEEP, 10, "the long sleep")
    # Asleep, it still answers at once.
    mark = len(probe.messages)
    probe.publish("bike/000001/fan/control", "30")
    assert probe.json("bike/000001/fan/report", after=mark)["value"] == 30.0
