"""The Bluetooth smart trainer: the Control Point state machine (pure) and, on bumble's
virtual link, the whole peripheral seen by a central as a training app sees it."""

from __future__ import annotations

import math

import pytest

from smartbiked import ftms
from smartbiked.ble.control import ControlPoint
from smartbiked.topics import Command, Limits, Refusal, parse_command, topic_path

LIMITS = {
    "resistance": Limits(0, 100),
    "incline": Limits(-10, 19, 0.5),
    "targetpower": Limits(0, 2000),
    "grade": Limits(-40, 40),
}


class MqttPath:
    """``submit`` through the real MQTT parser, as the service will wire it."""

    def __init__(self, limits=LIMITS, refuse: str | None = None):
        self.limits = limits
        self.refuse = refuse
        self.commands: list[Command] = []

    def __call__(self, topic: str, payload: bytes) -> str | None:
        result = parse_command(topic_path("b1", topic, "control"), payload, "b1", self.limits)
        if isinstance(result, Refusal):
            return result.reason
        if self.refuse:
            return self.refuse
        self.commands.append(result)
        return None


def answer(cp, peer, hex_bytes):
    return cp.write(peer, bytes.fromhex(hex_bytes))


def result(cp, peer, hex_bytes):
    return ftms.decode_response(answer(cp, peer, hex_bytes).response)[1]


def test_commands_need_control_first():
    path = MqttPath()
    cp = ControlPoint(path, LIMITS)
    for hex_bytes in ("05fa00", "041e", "110000f4012833", "07", "0801", "01", "033200"):
        assert answer(cp, "A", hex_bytes).response == bytes.fromhex("80" + hex_bytes[:2] + "05")
    assert path.commands == []
    assert cp.controller is None


def test_one_controller_at_a_time():
    changes = []
    path = MqttPath()
    cp = ControlPoint(path, LIMITS, on_control=lambda who, why: changes.append((who, why)))
    assert answer(cp, "A", "00") == ftms_answer("800001")
    assert cp.controller == "A"
    assert result(cp, "A", "00") == ftms.SUCCESS  # asking again is fine
    assert result(cp, "B", "00") == ftms.CONTROL_NOT_PERMITTED
    assert result(cp, "B", "05fa00") == ftms.CONTROL_NOT_PERMITTED
    assert path.commands == []
    assert [who for who, _ in changes] == ["A"]
    # A's link drops: Control Permission Lost, and B may take over.
    assert cp.disconnected("B") is None
    assert cp.disconnected("A") == b"\xff"
    assert cp.controller is None
    assert result(cp, "B", "00") == ftms.SUCCESS
    assert [who for who, _ in changes] == ["A", None, "B"]


def ftms_answer(response_hex, status_hex=None):
    from smartbiked.ble.control import Answer
    return Answer(bytes.fromhex(response_hex),
                  bytes.fromhex(status_hex) if status_hex is not None else None)


def test_requests_become_mqtt_commands():
    path = MqttPath()
    cp = ControlPoint(path, LIMITS)
    answer(cp, "A", "00")
    # Target power 250 W: success, Machine Status "target power changed" 250.
    assert answer(cp, "A", "05fa00") == ftms_answer("800501", "08fa00")
    # Resistance 3.0 of 20 levels (1-byte form) and 10.5 (2-byte form): 15 % and 52.5 %.
    assert answer(cp, "A", "041e") == ftms_answer("800401", "071e")
    assert result(cp, "A", "046900") == ftms.SUCCESS
    # Simulation: wind -1.5 m/s, grade 5 %, Crr 0.004, Cw 0.51.
    assert answer(cp, "A", "1124faf4012833") == ftms_answer("801101", "1224faf4012833")
    # Inclination 5 % = 2.86 degrees, on the incline's 0.5 degree grid: 3.0.
    assert result(cp, "A", "033200") == ftms.SUCCESS
    assert path.commands == [
        Command("targetpower", 250.0),
        Command("resistance", 15.0),
        Command("resistance", 52.5),
        Command("grade", 5.0, (("crr", 0.004), ("cw", 0.51), ("wind", -1.5))),
        Command("incline", 3.0),
    ]


def test_out_of_range_is_invalid_parameter_and_nothing_is_sent():
    path = MqttPath()
    cp = ControlPoint(path, LIMITS)
    answer(cp, "A", "00")
    for hex_bytes in (
        "05d107",          # 2001 W: above the target power limit
        "0518fc",          # -1000 W
        "04d300",          # level 21.1 of 20 (2-byte form)
        "04f6ff",          # level -1.0
        "1100009411" "2833",  # grade 45 %: beyond the grade limits
        "110000f401" "28ff",  # Cw 2.55 kg/m: beyond GRADE_PARAMS
        "111879f401" "2833",  # wind 31 m/s
        "03c409",          # inclination 250 %: far beyond the incline
    ):
        assert result(cp, "A", hex_bytes) == ftms.INVALID_PARAMETER, hex_bytes
    assert path.commands == []
    assert result(cp, "A", "1100009808" "2833") == ftms.SUCCESS  # 22 % is a road
    assert path.commands[-1].value == 22.0


def test_refusal_by_the_command_path_is_operation_failed():
    path = MqttPath(refuse="no power reading in the last 5 s: ERG needs the power sensor")
    cp = ControlPoint(path, LIMITS)
    answer(cp, "A", "00")
    assert answer(cp, "A", "05fa00") == ftms_answer("800504")
    assert cp.last_refusal.startswith("no power reading")


def test_unsupported_requests():
    limits = {"resistance": Limits(0, 100)}
    path = MqttPath(limits)
    cp = ControlPoint(path, limits)
    answer(cp, "A", "00")
    for hex_bytes in ("05fa00", "110000f4012833", "033200", "021027", "13"):
        assert result(cp, "A", hex_bytes) == ftms.OP_NOT_SUPPORTED
    # Unsupported wins over "not in control": an app learns what the bike can do.
    assert result(cp, "B", "05fa00") == ftms.OP_NOT_SUPPORTED
    machine, target = cp.features()
    assert target == ftms.TARGET_RESISTANCE
    assert machine & ftms.FEATURE_RESISTANCE_LEVEL
    assert path.commands == []


def test_malformed_parameters():
    path = MqttPath()
    cp = ControlPoint(path, LIMITS)
    answer(cp, "A", "00")
    assert result(cp, "A", "05fa") == ftms.INVALID_PARAMETER
    assert result(cp, "A", "0803") == ftms.INVALID_PARAMETER
    assert cp.write("A", b"").response is None
    assert path.commands == []


def test_reset_start_stop_and_revoke():
    changes = []
    cp = ControlPoint(MqttPath(), LIMITS, on_control=lambda who, why: changes.append(who))
    answer(cp, "A", "00")
    assert answer(cp, "A", "07") == ftms_answer("800701", "04")
    assert answer(cp, "A", "0802") == ftms_answer("800801", "0202")
    assert answer(cp, "A", "01") == ftms_answer("800101", "01")
    assert cp.controller is None  # a reset releases control
    assert result(cp, "A", "05fa00") == ftms.CONTROL_NOT_PERMITTED
    answer(cp, "A", "00")
    # An MQTT app took over: the Bluetooth app loses control, and is told.
    assert cp.revoke("resistance commanded over MQTT") == b"\xff"
    assert cp.revoke("again") is None
    assert changes == ["A", None, "A", None]


def test_ranges_follow_the_limits():
    cp = ControlPoint(MqttPath(), LIMITS)
    assert ftms.decode_range(cp.resistance_range(), 0.1) == (0.0, 20.0, 0.1)
    assert ftms.decode_range(cp.power_range(), 1) == (0, 2000, 1)
    low, high, _ = ftms.decode_range(cp.inclination_range(), 0.1)
    assert low == pytest.approx(math.tan(math.radians(-10)) * 100, abs=0.1)
    assert high == pytest.approx(math.tan(math.radians(19)) * 100, abs=0.1)
    assert cp.level_of(50.0) == 10.0
