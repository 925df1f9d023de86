"""Review findings: each test fails on the code it was written against, for one reason.

Real parts only: mosquitto, the in-process service over gpiozero's MockFactory, a
fake serial board on a pty, and a TCP relay that can swallow the daemon's bytes.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from smartbiked.fakeboard import FakeBoard
from smartbiked.hardware.serial import parse_line
from smartbiked.logs import FloodGuard
from tests.conftest import bike_config, wait_until
from tests.test_daemon import send
from tests.test_service import factory, serve  # noqa: F401  (fixtures)


def _handed_to_paho(service: Any) -> bool:
    """True once no transient message waits in the outbox: each went to paho."""
    outbox = service.outbox
    with outbox._cond:
        return all(isinstance(item, str) for item in outbox._line)


BUTTON = """
[button]
driver = "gpio_buttons"
pins = { LEFT = "BOARD11", RIGHT = "BOARD12" }
"""


def test_a_press_in_flight_when_the_line_dies_is_not_delivered_after_the_reconnect(
        broker, relay, probe, serve, factory):  # noqa: F811
    """outbox.py promises transient messages are never carried through an outage.

    They are published at QoS 1, so paho keeps the ones in flight when the line dies
    and re-sends them (DUP) on the next CONNACK: a brake press from before a silent
    cut (noticed only after 1.5 x keepalive) steers the game after the reconnect.
    """
    service = serve(bike_config(broker, BUTTON, port=relay.port))
    status = "bike/000001/status"
    probe.wait_for(status, lambda m: m.payload == b"online")
    left, right = factory.pin(17), factory.pin(18)  # BOARD11, BOARD12
    relay.swallow()
    left.drive_low()  # pressed while the line is silently dead
    assert service.bike.sync()  # the press is in the outbox...
    wait_until(lambda: _handed_to_paho(service), 10, "the press to be handed to paho")
    relay.cut()
    lost = probe.wait_for(status, lambda m: m.payload == b"lost")
    back = probe.wait_for(status, lambda m: m.payload == b"online",
                          after=probe.messages.index(lost))
    after_back = probe.messages.index(back)
    right.drive_low()  # a barrier: this press is published after the reconnect
    probe.json("bike/000001/button/report", lambda d: d["button"] == "RIGHT",
               after=after_back)
    late = [json.loads(m.payload) for m in probe.messages
            if m.topic == "bike/000001/button/report"
            and json.loads(m.payload)["button"] == "LEFT"]
    assert late == [], f"a press from before the outage arrived after it: {late}"


MOTOR_AND_FAN = """
[service]
offline_safe_after = 0.5

[serial.motors]
url = "{url}"

[resistance]
driver = "serial_actuator"
port = "motors"
template = "R{{value}}\\n"
ack = 'OK R(?P<value>-?[0-9.]+)'
ack_timeout = 30
retries = 0
min_interval = {min_interval}

[fan]
driver = "gpio_pwm"
pin = "GPIO12"
"""


def test_a_command_held_by_a_reload_does_not_move_a_motor_the_outage_made_safe(
        broker, relay, probe, serve, factory, tmp_path):  # noqa: F811
    """bike.py: offline_safe_after makes actuators safe; nothing may move them before
    the broker is back. A command deferred while a reload waits for a slow board is
    replayed after the outage's safe values, with no broker: the fan spins up again.
    """
    held = threading.Event()
    held.set()
    acks: list[str] = []

    def answer(line: str) -> str | None:
        if held.is_set():
            return f"OK {line}"
        acks.append(line)  # answered later, when the test says so
        return None

    with FakeBoard(tmp_path, "usb-motors", responder=answer) as board:
        text = bike_config(broker, MOTOR_AND_FAN.format(url=board.path, min_interval=0.0),
                           port=relay.port)
        service = serve(text)
        probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
        fan = factory.pin(12)
        send(broker, "bike/000001/fan/control", "50")
        probe.json("bike/000001/fan/report", lambda d: d["value"] == 50.0)

        # The motor board goes slow: a resistance write stays in flight.
        held.clear()
        send(broker, "bike/000001/resistance/control", "40")
        wait_until(lambda: acks == ["R40"], 10, "the resistance command on the board")

        # A reload that retunes resistance waits for that write to finish.
        path = service.config.path
        path.write_text(bike_config(broker, MOTOR_AND_FAN.format(url=board.path,
                                                                   min_interval=0.1),
                                    port=relay.port))
        old = service.config
        reloading = threading.Thread(target=service.reload)
        reloading.start()
        wait_until(lambda: service.config is not old, 10, "the reload to start")
        send(broker, "bike/000001/fan/control", "90")  # arrives during the reload
        wait_until(lambda: service.bike._deferred, 10, "the fan command to be held")

        # The broker goes away for longer than offline_safe_after: the fan goes safe.
        relay.down()
        wait_until(lambda: fan.state == 0, 10, "the fan to be made safe")
        written = len(fan.writes)

        held.set()  # the board answers again (the safe value waiting behind R40 too)
        board.send_line("OK R40")  # the slow write ends; the reload completes
        reloading.join(10)
        assert not reloading.is_alive()
        assert service.bike.sync()
        assert service.bike.offline_since is not None, "the broker came back"
        assert fan.writes[written:] == [], (
            f"the fan moved to {fan.writes[written:]} after being made safe, offline")
        assert fan.state == 0


def test_parse_line_never_raises_on_a_json_integer_beyond_float_range():
    """serial.parse_line's docstring: "Never raises". A JSON integer of 310 digits
    makes float() raise OverflowError (lines over 256 bytes never get here on a board
    thread, so today it is only the public promise that breaks)."""
    line = '{"hr": 1' + "0" * 310 + "}"
    assert parse_line(line) is None


def test_flood_guard_summaries_are_not_themselves_suppressed():
    """logs.FloodGuard: what was held back "is counted and said later ... by flush".

    Summaries go through the same guard under one template per logger and level: past
    ``burst`` kinds flooded at once, the remaining kinds' counts are swallowed.
    """
    now = [0.0]
    guard = FloodGuard(burst=1, window=10.0, clock=lambda: now[0])
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Collect()
    handler.addFilter(guard)
    logger = logging.getLogger("smartbiked.review-floodguard")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        kinds = [f"kind {i}: %d" for i in range(4)]
        for template in kinds:
            for n in range(3):  # one through, two held back
                logger.warning(template, n)
        now[0] = 20.0
        guard.flush()
        summaries = [s for s in seen if "suppressed" in s]
        for template in kinds:
            assert any(repr(template) in s and s.startswith("2 more") for s in summaries), (
                f"no summary for {template!r}: {summaries}")
    finally:
        logger.removeHandler(handler)


def test_a_command_to_a_sensor_cannot_forge_that_sensors_health(broker, probe, run_daemon):
    """README: a sensor's ``status`` topic says when it is lost (``"ok": false``) and
    when it is back. Any app allowed to publish one message makes the daemon say
    ``"ok": false`` there too, for a sensor that is fine: a refusal needs an actuator."""
    from tests.test_daemon import FAN
    from tests.test_hostile import barrier

    run_daemon(bike_config(broker, FAN))
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
    mark = len(probe.messages)
    send(broker, "bike/000001/heartrate/control", b"1")
    send(broker, "bike/000001/anything-at-all/control", b"1")
    barrier(broker, probe, 30.0)
    forged = [(m.topic, json.loads(m.payload)) for m in probe.messages[mark:]
              if m.topic in ("bike/000001/heartrate/status",
                             "bike/000001/anything-at-all/status")]
    assert forged == [], f"an app made the daemon publish {forged}"
