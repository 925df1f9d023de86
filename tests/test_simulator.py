"""smartbiked --simulate end to end (real broker, daemon subprocess), and the virtual
boards against the real serial drivers in-process."""

from __future__ import annotations

import json
import math
import re
import signal
import statistics
from pathlib import Path

import pytest

from smartbiked import config as configuration
from smartbiked.hardware import SerialBoard
from smartbiked.hardware.serial import SerialActuator, SerialSensor
from smartbiked.simulator import VirtualBike, state_topic
from tests.conftest import bike_config, wait_until

SENSORS = ("speed", "cadence", "power", "heartrate")
STATE = state_topic("000001")

# A whole bike: pins named three ways, a json sensor board with scale and offset, an
# acknowledged incline motor. The board urls name hardware this machine does not have.
FULL = r"""
[serial.sensors]
url = "/dev/serial/by-id/usb-Arduino_Uno_sensors-if00"
format = "json"

[serial.motors]
url = "/dev/serial/by-id/usb-Arduino_Nano_motors-if00"

[button]
driver = "gpio_buttons"
pins = { LEFT = "BOARD11", RIGHT = 18, BRAKE = "GPIO22" }

[cadence]
driver = "gpio_pulse"
pin = 5
interval = 0.25

[speed]
driver = "gpio_pulse"
pin = "BOARD31"
pulses_per_revolution = 2
circumference = 2.0
interval = 0.25

[fan]
driver = "gpio_pwm"
pin = "GPIO13"

[resistance]
driver = "gpio_pwm"
pin = 12

[heartrate]
driver = "serial_sensor"
port = "sensors"
field = "hr"
scale = 0.5
offset = 10
interval = 0.25

[power]
driver = "serial_sensor"
port = "sensors"
field = "watts"
interval = 0.25

[incline]
driver = "serial_actuator"
port = "motors"
template = "I{value}\n"
ack = 'OK I(?P<value>-?[0-9.]+)'
ack_timeout = 0.5
"""

# The other GPIO actuator kinds: a relay fan and a servo resistance lever.
RELAY_AND_SERVO = """
[fan]
driver = "gpio_relay"
pin = 13
threshold = 50

[resistance]
driver = "gpio_servo"
pin = "GPIO12"
"""


def reports(probe, topic: str, after: int = 0) -> list[dict]:
    return [json.loads(m.payload) for m in probe.messages[after:]
            if m.topic == f"bike/000001/{topic}/report"]


def worlds(probe, after: int = 0) -> list[tuple[int, dict]]:
    return [(i, json.loads(m.payload)) for i, m in enumerate(probe.messages[after:], after)
            if m.topic == STATE]


def start(run_daemon, broker, probe, body: str):
    daemon = run_daemon(bike_config(broker, body), "--simulate", "--seed", "7")
    daemon.notify.wait_for("READY=1")
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
    probe.subscribe("smartbike-sim/#")
    return daemon


def test_every_sensor_reports_at_its_rate_with_the_models_values(
        broker, probe, run_daemon):
    daemon = start(run_daemon, broker, probe, FULL)
    mark = len(probe.messages)
    wait_until(lambda: all(len(reports(probe, t, mark)) >= 12 for t in SENSORS)
               and len(worlds(probe, mark)) >= 2, 15, "12 reports of each sensor")

    for topic in SENSORS:
        got = reports(probe, topic, mark)
        # The daemon's own timestamps, so delivery delays do not count. The median gap
        # shrugs off a few late or skipped ticks on a busy machine, and still tells the
        # configured 0.25 s from the 1 s default or from twice the rate.
        gaps = [b["timestamp"] - a["timestamp"] for a, b in zip(got, got[1:], strict=False)]
        assert 0.15 < statistics.median(gaps) < 0.45, (topic, gaps)
        assert {r["unitName"] for r in got} == {
            {"speed": "m/s", "cadence": "RPM", "power": "W", "heartrate": "BPM"}[topic]}
    last = {t: [r["value"] for r in reports(probe, t, mark)[-5:]] for t in SENSORS}
    assert all(4 < v < 13 for v in last["speed"]), last
    assert all(65 < v < 105 for v in last["cadence"]), last
    assert all(80 < v < 300 for v in last["power"]), last
    assert all(50 < v < 180 for v in last["heartrate"]), last
    assert len({round(v) for v in last["power"]}) > 1, "power never varies"

    # What the daemon reports is what the model does: pulses carry the speed and cadence,
    # the board's json lines (heart rate scaled back by 0.5 and 10) carry the rest.
    index, world = worlds(probe, mark)[-1]
    wait_until(lambda: all(reports(probe, t, index) for t in SENSORS), 5,
               "a report of each sensor after the model's state")
    after = {t: reports(probe, t, index)[0]["value"] for t in SENSORS}
    assert math.isclose(after["speed"], world["speed"], rel_tol=0.1), (after, world)
    assert abs(after["cadence"] - world["cadence"]) < 8, (after, world)
    assert abs(after["power"] - world["power"]) < 20, (after, world)
    assert abs(after["heartrate"] - world["heartrate"]) < 4, (after, world)

    # A clean stop takes the virtual boards' directory with it.
    boards = re.search(r"is (/\S+)/usb-Virtual_sensors-if00", daemon.output())
    assert boards and Path(boards.group(1)).is_dir()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    assert not Path(boards.group(1)).exists()


def test_incline_up_at_constant_power_makes_speed_fall(broker, probe, run_daemon):
    start(run_daemon, broker, probe, FULL)
    mark = len(probe.messages)
    wait_until(lambda: len(reports(probe, "speed", mark)) >= 8
               and len(reports(probe, "power", mark)) >= 8, 10, "flat-road reports")
    flat_speed = statistics.fmean(r["value"] for r in reports(probe, "speed", mark)[-4:])
    flat_power = statistics.fmean(r["value"] for r in reports(probe, "power", mark)[-4:])

    climb = len(probe.messages)
    probe.publish("bike/000001/incline/control", {"value": 8})
    assert probe.json("bike/000001/incline/report", after=climb)["value"] == 8.0
    wait_until(lambda: reports(probe, "speed", climb)
               and reports(probe, "speed", climb)[-1]["value"] < 0.6 * flat_speed,
               20, f"speed to fall below 60 % of {flat_speed:.2f} m/s")
    # Not because the rider eased off: they push at least as hard uphill.
    climb_power = statistics.fmean(r["value"] for r in reports(probe, "power", climb)[-4:])
    assert climb_power > 0.9 * flat_power
    probe.wait_for(STATE, lambda m: json.loads(m.payload)["incline"] == 8.0, after=climb)


@pytest.mark.parametrize("body, fan_reported, fan_state, fan_world", [
    (FULL, 60.0, 0.6, 60.0),             # PWM: the duty is the value's share of 0..100
    (RELAY_AND_SERVO, 100.0, 1.0, 100.0),  # relay: 60 >= threshold switches it fully on
], ids=["pwm", "relay-servo"])
def test_gpio_actuators_move_their_pins_and_the_model(
        broker, probe, run_daemon, body, fan_reported, fan_state, fan_world):
    start(run_daemon, broker, probe, body)
    mark = len(probe.messages)
    probe.publish("bike/000001/fan/control", {"value": 60})
    probe.publish("bike/000001/resistance/control", {"value": 40})
    # (The start-up reports of the safe values may still arrive first.)
    probe.json("bike/000001/fan/report", lambda d: d["value"] == fan_reported, after=mark)
    probe.json("bike/000001/resistance/report", lambda d: d["value"] == 40.0, after=mark)

    def moved(msg) -> bool:
        world = json.loads(msg.payload)
        return (math.isclose(world["outputs"]["fan"]["state"], fan_state)
                and world["fan"] == fan_world
                and math.isclose(world["resistance"], 40.0, abs_tol=0.01))
    world = json.loads(probe.wait_for(STATE, moved, after=mark).payload)
    assert world["outputs"]["fan"]["function"] == "output"


# --------------------------------------------------------------------------- in-process


def load(tmp_path: Path, broker, body: str) -> configuration.Config:
    path = tmp_path / "bike.toml"
    path.write_text(bike_config(broker, body))
    return configuration.load(path, environ={})


def drivers(cfg: configuration.Config, vb: VirtualBike) -> dict:
    boards = {n: SerialBoard(n, s, vb.hardware) for n, s in cfg.serial.items()}
    vb.hardware.ports.update(boards)
    kinds = {"serial_sensor": SerialSensor, "serial_actuator": SerialActuator}
    return {d.topic: kinds[d.kind](d.topic, d.options, vb.hardware) for d in cfg.drivers}


@pytest.mark.parametrize("board, fields", [
    ('format = "number"', {"heartrate": 'field = "value"'}),
    ('format = "keyvalue"', {"heartrate": 'field = "HR"', "power": 'field = "pwr"'}),
    ('format = "json"', {"heartrate": 'field = "hr"', "cadence": 'field = "rpm"'}),
    ('format = "csv"\ncolumns = ["_", "hr", "watts"]',
     {"heartrate": 'field = "hr"', "power": 'field = "watts"'}),
    ('format = "csv"', {"heartrate": 'field = "1"', "power": 'field = "0"'}),
    ('format = "auto"', {"heartrate": 'field = "hr"', "speed": 'field = "kmh"\nscale = 0.27778'}),
], ids=["number", "keyvalue", "json", "csv-columns", "csv-indexed", "auto"])
def test_sensor_boards_print_what_the_drivers_read_back(tmp_path, broker, board, fields):
    body = f'[serial.arduino]\nurl = "/dev/ttyACM7"\n{board}\n'
    for topic, options in fields.items():
        # scale and offset everywhere, so the simulator must reverse them.
        extra = "" if "scale" in options else "scale = 2.0\noffset = -3.0\n"
        body += (f'\n[{topic}]\ndriver = "serial_sensor"\nport = "arduino"\ninterval = 0.2\n'
                 f'{options}\n{extra}')
    cfg = load(tmp_path, broker, body)
    with VirtualBike(cfg, seed=1) as vb:
        sensors = drivers(cfg, vb)
        board_ = vb.hardware.ports["arduino"]

        def all_read() -> bool:
            board_.poll()
            return all(s.read() is not None for s in sensors.values())
        wait_until(all_read, 5, "every field read from the virtual board")
        assert board_.bad_lines == 0
        world = vb.world()
        for topic, sensor in sensors.items():
            tolerance = {"heartrate": 3, "power": 20, "cadence": 6, "speed": 0.3}[topic]
            assert abs(sensor.read() - world[topic]) < tolerance, (topic, sensor.read(), world)


@pytest.mark.parametrize("template, ack", [
    (r"I{value}\n", "OK I(?P<value>-?[0-9.]+)"),
    (r"{topic}={value}\n", r"^ok (?P<value>\S+)$"),
    (r"SET {topic} {value:.1f}\r\n", "^ACK$"),
    (r"<{value}>\n", ""),                       # a board that never answers
    (r"{topic}:{value}\n", "^done$"),
], ids=["letter", "keyvalue", "spaced", "no-ack", "done"])
def test_actuator_boards_answer_as_the_ack_expects_and_move_the_model(
        tmp_path, broker, template, ack):
    body = (f'[serial.motors]\nurl = "socket://192.0.2.1:7000"\n\n[incline]\n'
            f'driver = "serial_actuator"\nport = "motors"\ntemplate = "{template}"\n'
            f"ack = '{ack}'\nack_timeout = 1.0\nretries = 0\n")
    cfg = load(tmp_path, broker, body)
    with VirtualBike(cfg, seed=1) as vb:
        incline = drivers(cfg, vb)["incline"]
        assert incline.apply(-4.5) == -4.5  # raises HardwareError without a matching ack
        wait_until(lambda: vb.rider.incline_target == -4.5, 5, "the model to get the command")
        assert incline.apply(12.0) == 12.0
        wait_until(lambda: vb.rider.incline_target == 12.0, 5, "the second command")


def test_an_unknown_button_is_refused_and_a_known_one_pressed(tmp_path, broker):
    cfg = load(tmp_path, broker, '[button]\ndriver = "gpio_buttons"\npull_up = false\n')
    with VirtualBike(cfg, seed=1) as vb:
        with pytest.raises(KeyError, match="buttons: LEFT, RIGHT, BRAKE"):
            vb.press("UP")
        pin = vb.factory.pin("BOARD12")
        vb.press("right", hold=0.05)
        # Without a pull-up a pressed button drives its pin high, then lets it fall.
        wait_until(lambda: [s.state for s in pin.states][-2:] == [True, False], 5,
                   "a press and a release on BOARD12")
        assert pin.states.maxlen == 64  # the history a long demo keeps stays bounded
