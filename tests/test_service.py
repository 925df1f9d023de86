"""The service in-process, over gpiozero's MockFactory: buttons, PWM, safety, isolation."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from gpiozero import DigitalOutputDevice
from gpiozero.pins.mock import MockFactory, MockPWMPin

from smartbiked import config as configuration
from smartbiked import logs
from smartbiked.hardware import Hardware
from smartbiked.service import Service
from tests.conftest import NotifySocket, bike_config, free_port, wait_until
from tests.test_daemon import send

BUTTONS_AND_FAN = """
[service]
offline_safe_after = 0.5

[button]
driver = "gpio_buttons"
pins = { LEFT = "BOARD11", RIGHT = "BOARD12", BRAKE = "BOARD15" }

[fan]
driver = "gpio_pwm"
pin = "GPIO12"
"""


class RecordingPin(MockPWMPin):
    """A mock PWM pin that keeps every value a driver writes, the same value twice too.

    Closing a pin turns it off without a write, so ``writes`` tells a safe value the
    daemon wrote from the 0 that closing leaves behind.
    """

    def __init__(self, factory: MockFactory, info: Any) -> None:
        super().__init__(factory, info)
        self.writes: list[float] = []

    def _set_state(self, value: float) -> None:
        super()._set_state(value)
        self.writes.append(float(value))


@pytest.fixture
def factory() -> Iterator[MockFactory]:
    f = MockFactory(revision="a02082", pin_class=RecordingPin)
    yield f
    f.reset()


@pytest.fixture
def serve(tmp_path, factory):
    """Run a Service on a thread; stop it with service.shutdown() at teardown."""
    running: list[tuple[Service, threading.Thread]] = []

    def start(text: str) -> Service:
        path = tmp_path / "bike.toml"
        path.write_text(text)
        service = Service(configuration.load(path, environ={}), Hardware(pin_factory=factory))
        result: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: result.setdefault("rc", service.run(False)))
        thread.start()
        wait_until(lambda: service.client.is_connected() or not thread.is_alive(), 10,
                   "the service to connect")
        running.append((service, thread))
        return service

    yield start
    for service, thread in running:
        if thread.is_alive():
            service.shutdown()
        thread.join(10)
        assert not thread.is_alive()


def test_button_presses_and_releases_are_published_as_they_happen(broker, probe, serve,
                                                                   factory):
    serve(bike_config(broker, BUTTONS_AND_FAN))
    left, brake = factory.pin(17), factory.pin(22)  # BOARD11, BOARD15 on the J8 header
    left.drive_low()
    pressed = probe.json("bike/000001/button/report", lambda d: d["state"] == 1)
    assert pressed["button"] == "LEFT" and isinstance(pressed["timestamp"], float)
    left.drive_high()
    brake.drive_low()
    brake.drive_high()
    wait_until(lambda: len([m for m in probe.messages
                            if m.topic == "bike/000001/button/report"]) == 4, 10, "4 events")
    events = [probe.json("bike/000001/button/report", after=i) for i, m in
              enumerate(probe.messages) if m.topic == "bike/000001/button/report"]
    assert [(e["button"], e["state"]) for e in events] == [
        ("LEFT", 1), ("LEFT", 0), ("BRAKE", 1), ("BRAKE", 0)]


def test_fan_pin_follows_commands_and_is_safe_after_stop(broker, probe, serve, factory):
    service = serve(bike_config(broker, BUTTONS_AND_FAN))
    fan = factory.pin(12)
    send(broker, "bike/000001/fan/control", '{"power": 75}')
    probe.json("bike/000001/fan/report", lambda d: d["value"] == 75.0)
    assert fan.state == pytest.approx(0.75)
    written = len(fan.writes)
    service.shutdown()
    # The daemon itself writes the safe value before it lets go of the pin.
    assert fan.writes[written:] == [0.0]
    assert fan.state == 0


@pytest.fixture
def notify(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    """What the in-process service tells systemd (STATUS lines say when it lost the broker)."""
    sock = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", sock.path)
    yield sock
    sock.close()


OUTAGE = """
[service]
offline_safe_after = 1.0

[button]
driver = "gpio_buttons"
pins = { LEFT = "BOARD11", RIGHT = "BOARD12" }

[fan]
driver = "gpio_pwm"
pin = "GPIO12"

[cadence]
driver = "gpio_pulse"
pin = 5
interval = 0.1
"""


def bodies(probe, topic: str, after: int = 0) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in probe.messages[after:]
            if m.topic == f"bike/000001/{topic}/report"]


def test_nothing_from_an_outage_is_published_late(broker, relay, probe, serve, factory,
                                                  notify):
    serve(bike_config(broker, OUTAGE, port=relay.port))
    status = "bike/000001/status"
    probe.wait_for(status, lambda m: m.payload == b"online")
    left, right = factory.pin(17), factory.pin(18)  # BOARD11, BOARD12
    probe.publish("bike/000001/fan/control", "90")
    probe.json("bike/000001/fan/report", lambda d: d["value"] == 90.0)
    probe.json("bike/000001/cadence/report")
    connected = notify.wait_for("STATUS=connected to*")

    fan = factory.pin(12)
    written = len(fan.writes)
    cut = time.monotonic()
    relay.down()
    lost = probe.wait_for(status, lambda m: m.payload == b"lost")
    after_lost = probe.messages.index(lost)  # what the old connection sent came before it
    notify.wait_for("STATUS=reconnecting to*", after=connected)
    offline = time.time()  # the daemon knows; every reading from now on is "during"
    left.drive_low()        # a turn signalled while the bike is cut off...
    left.drive_high()
    # The hardware thread has run for offline_safe_after (1 s, ten cadence intervals)
    # since: the fan going safe is the barrier that readings were taken meanwhile.
    wait_until(lambda: fan.state == 0, 10, "the fan to go safe")
    assert time.monotonic() - cut >= 1.0, "safe before offline_safe_after had passed"
    left.drive_low()        # ...and again just before the line is back (still fresh then)
    left.drive_high()
    restored = time.time()
    relay.up()

    back = probe.wait_for(status, lambda m: m.payload == b"online", after=after_lost)
    after_back = probe.messages.index(back)
    right.drive_low()
    right.drive_high()
    probe.json("bike/000001/button/report", lambda d: d == {**d, "button": "RIGHT", "state": 0},
               after=after_back)
    probe.json("bike/000001/cadence/report", lambda d: d["timestamp"] >= restored,
               after=after_back)

    # ...never arrives late: only the press made after the reconnect is published.
    presses = [(e["button"], e["state"]) for e in bodies(probe, "button", after_lost)]
    assert presses == [("RIGHT", 1), ("RIGHT", 0)]
    # No reading taken while cut off is published after it; fresh ones are.
    stale = [r for r in bodies(probe, "cadence", after_lost)
             if offline <= r["timestamp"] < restored]
    assert stale == []
    # The safe value was written once for the whole outage, and the actuator's new
    # state (not a stale reading) is reported when the line is back.
    assert fan.writes[written:] == [0.0]
    assert bodies(probe, "fan", after_lost)[-1]["value"] == 0.0


def test_a_driver_that_fails_to_start_does_not_stop_the_others(broker, probe, serve, factory):
    # The config is valid, but something else holds the fan's pin: the fan cannot open.
    holder = DigitalOutputDevice("GPIO12", pin_factory=factory)
    service = serve(bike_config(broker, BUTTONS_AND_FAN))
    holder.close()
    assert "fan" in service.bike.failed and "button" in service.bike.drivers
    send(broker, "bike/000001/fan/control", "50")
    refusal = probe.json("bike/000001/fan/status")
    assert refusal["ok"] is False and "did not start" in refusal["error"]
    factory.pin(22).drive_low()
    assert probe.json("bike/000001/button/report")["button"] == "BRAKE"


def test_journal_records_carry_bike_topic_and_driver_fields(caplog):
    sent: list[dict[str, Any]] = []
    handler = logs.setup("000042", use_journal=True,
                         journal_sender=lambda *args, **fields: sent.append(
                             {"MESSAGE": args[0], **fields}))
    try:
        logging.getLogger("smartbiked.bike").warning(
            "fan: stalled", extra={"TOPIC": "fan", "DRIVER": "gpio_pwm"})
    finally:
        logging.getLogger().removeHandler(handler)
    record = sent[-1]
    assert record["MESSAGE"] == "fan: stalled"
    assert record["BIKE_ID"] == "000042" and record["TOPIC"] == "fan"
    assert record["DRIVER"] == "gpio_pwm" and record["SYSLOG_IDENTIFIER"] == "smartbiked"


def test_journal_is_chosen_only_when_stderr_is_the_journal(monkeypatch, tmp_path):
    import os
    import sys

    target = tmp_path / "stderr"
    with open(target, "w") as f:
        monkeypatch.setattr(sys, "stderr", f)
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert logs.stderr_is_journal()
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not logs.stderr_is_journal()
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not logs.stderr_is_journal()


BLUETOOTH_BIKE = r"""
[resistance]
driver = "gpio_pwm"
pin = "GPIO13"

[serial.motors]
url = "loop://"

[incline]
driver = "serial_actuator"
port = "motors"
template = "I{{value}}\n"
ack = 'I(?P<value>-?[0-9.]+)'

[ble]
enabled = true
backend = "bumble"
transport = "tcp-client:127.0.0.1:{port}"
"""


def test_bluetooth_commands_take_the_mqtt_path_without_the_incline_and_not_while_stopping(
        broker, probe, serve, factory):
    """The service's own guards, behind the Control Point's: Bluetooth may never tilt
    the frame without [ble] incline, and nothing it sends moves anything once stopping."""
    service = serve(bike_config(broker, BLUETOOTH_BIKE.format(port=free_port())))
    resistance = factory.pin(13)
    why = service.bluetooth_command("incline", b'{"value": 5}')
    assert why is not None and "incline" in why
    assert service.bluetooth_command("resistance", b'{"value": 30}') is None
    probe.json("bike/000001/resistance/report", lambda d: d["value"] == 30.0)
    assert resistance.state == pytest.approx(0.3)
    assert not [m for m in probe.messages if m.topic == "bike/000001/incline/report"]
    # An MQTT app may tilt it (the loop:// board echoes the command as its answer):
    # the limits are Bluetooth's, not the bike's.
    send(broker, "bike/000001/incline/control", b"5")
    probe.json("bike/000001/incline/report", lambda d: d["value"] == 5.0)
    service.shutdown()
    written = len(resistance.writes)
    assert service.bluetooth_command("resistance", b'{"value": 80}') == "the bike is stopping"
    assert resistance.writes[written:] == []
