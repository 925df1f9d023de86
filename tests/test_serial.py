"""Serial boards, sensors and actuators against a fake board on a pty, loop:// and socket://.

Time that matters to the code under test (staleness, reconnect interval, warning rate)
runs on a fake clock; waits for bytes block on the port (select) with a deadline.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import serial
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smartbiked.errors import HardwareError
from smartbiked.fakeboard import FakeBoard, wait_until
from smartbiked.hardware.base import REQUIRED, Driver, Hardware
from smartbiked.hardware.serial import (
    SerialActuator,
    SerialBoard,
    SerialSensor,
    _Number,
    parse_line,
)
from smartbiked.topics import TOPICS


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def hardware(clock: Clock) -> Hardware:
    return Hardware(clock=clock)


@pytest.fixture
def boards() -> Iterator[list[Any]]:
    """Boards (real and fake) to close after the test, whatever happens."""
    made: list[Any] = []
    yield made
    for board in reversed(made):
        board.close()


@pytest.fixture
def fake(tmp_path: Path, boards: list[Any]) -> FakeBoard:
    board = FakeBoard(tmp_path)
    boards.append(board)
    return board


def make_board(hardware: Hardware, boards: list[Any], url: str, name: str = "bike",
               **options: Any) -> SerialBoard:
    board = SerialBoard(name, {"url": url, **options}, hardware)
    hardware.ports[name] = board
    boards.append(board)
    return board


def driver_settings(cls: type[Driver], topic: str, **options: Any) -> dict[str, Any]:
    """Settings as the config loader hands them over: every default filled in."""
    filled = {name: opt.default for name, opt in cls.options().items()
              if opt.default is not REQUIRED}
    spec = TOPICS[topic]
    if spec.kind == "actuator":
        filled.update(min=spec.low, max=spec.high, step=spec.step,
                      safe="hold" if spec.safe is None else spec.safe)
    return {"port": "bike", **filled, **options}


def sensor(hardware: Hardware, topic: str, **options: Any) -> SerialSensor:
    return SerialSensor(topic, driver_settings(SerialSensor, topic, **options), hardware)


def actuator(hardware: Hardware, topic: str, **options: Any) -> SerialActuator:
    return SerialActuator(topic, driver_settings(SerialActuator, topic, **options), hardware)


def poll_until(board: SerialBoard, predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    """Poll the board, blocking on its port between polls, until predicate holds."""
    def step(left: float) -> None:
        board.poll()
        if not predicate():
            board.wait_readable(min(left, 0.5))
    wait_until(predicate, step, timeout)


# --------------------------------------------------------------------------- line formats


@pytest.mark.parametrize(("text", "fmt", "columns", "expected"), [
    ("72", "auto", (), {"value": 72.0}),
    ("  -3.5 ", "auto", (), {"value": -3.5}),
    ("1.2e3", "number", (), {"value": 1200.0}),
    ("hr=72,power=180", "auto", (), {"hr": 72.0, "power": 180.0}),
    ("HR: 72; Power:180", "auto", (), {"hr": 72.0, "power": 180.0}),
    ("hr = 72  power = 180", "keyvalue", (), {"hr": 72.0, "power": 180.0}),
    ('{"hr": 72, "power": 180.5, "id": "uno", "ok": true}', "auto", (),
     {"hr": 72.0, "power": 180.5}),
    ('{"HR": 1}', "json", (), {"hr": 1.0}),
    ("72,180", "auto", (), {"0": 72.0, "1": 180.0}),
    ("72, 180;3", "csv", ("hr", "power", "_"), {"hr": 72.0, "power": 180.0}),
    ("72\t180", "csv", ("hr", "power"), {"hr": 72.0, "power": 180.0}),
    ("72", "csv", ("hr",), {"hr": 72.0}),
])
def test_line_formats(text: str, fmt: str, columns: tuple[str, ...],
                      expected: dict[str, float]) -> None:
    assert parse_line(text, fmt, columns) == expected


@pytest.mark.parametrize(("text", "fmt", "columns"), [
    ("", "auto", ()),
    ("hello", "auto", ()),
    ("nan", "auto", ()),
    ("inf", "number", ()),
    ("1e999", "auto", ()),             # finite grammar, infinite value
    ("hr=1e999", "auto", ()),
    ("hr=72 x", "auto", ()),           # trailing junk: half a line is not a reading
    ("hr=72bpm", "auto", ()),
    ("12:30", "auto", ()),             # a key must start with a letter
    ('{"hr": NaN}', "auto", ()),
    ('{"hr": 1e999}', "json", ()),
    ("[1, 2]", "json", ()),
    ('{"id": "uno"}', "json", ()),     # no number at all
    ("hr=72", "number", ()),           # explicit formats do not guess
    ("72", "keyvalue", ()),
    ("72,180", "csv", ("hr",)),        # a column too many would shift every key
    ("72,,180", "csv", ()),
    ("0x10", "auto", ()),
    ("1_000", "auto", ()),
])
def test_unreadable_lines(text: str, fmt: str, columns: tuple[str, ...]) -> None:
    assert parse_line(text, fmt, columns) is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80), st.sampled_from(["auto", "number", "keyvalue", "json", "csv"]))
def test_parse_never_raises_and_yields_finite_numbers(text: str, fmt: str) -> None:
    values = parse_line(text, fmt, ())
    assert values is None or (values and all(math.isfinite(v) for v in values.values()))


def test_each_configured_format_through_a_board(hardware: Hardware, boards: list[Any]) -> None:
    cases = [("number", [], b"72\n", {"value": 72.0}),
             ("keyvalue", [], b"hr=72;power=180\n", {"hr": 72.0, "power": 180.0}),
             ("json", [], b'{"hr": 72}\n', {"hr": 72.0}),
             ("csv", ["HR", "power"], b"72,180\n", {"hr": 72.0, "power": 180.0})]
    for fmt, columns, line, expected in cases:
        # loop:// hands back what is written: the board reads its own line.
        board = make_board(hardware, boards, "loop://", name=fmt, format=fmt, columns=columns)
        board.write(line)
        board.poll()
        assert {k: r.value for k, r in board.latest.items()} == expected, fmt
        assert (board.good_lines, board.bad_lines) == (1, 0)


# --------------------------------------------------------------------------- sensors


def test_one_board_feeds_two_sensors_with_scale_and_offset(
        fake: FakeBoard, hardware: Hardware, boards: list[Any]) -> None:
    board = make_board(hardware, boards, str(fake.path))
    assert board.connected
    heart = sensor(hardware, "heartrate", field="HR")
    power = sensor(hardware, "power", field="power", scale=2, offset=-10)
    assert heart.read() is None and power.read() is None

    fake.send_line("hr=72,power=180", end="\r\n")  # Arduino's println
    poll_until(board, lambda: "power" in board.latest)
    assert heart.read() == 72.0
    assert power.read() == 350.0
    # Reading the shared board again reads nothing twice and loses nothing.
    board.poll()
    board.poll()
    assert (heart.read(), power.read(), board.good_lines, board.bad_lines) == (72, 350, 1, 0)

    fake.send_line('{"hr": 80}')
    poll_until(board, lambda: board.latest["hr"].value == 80)
    assert heart.read() == 80.0 and power.read() == 350.0


def test_partial_lines_are_kept_across_reads(hardware: Hardware, boards: list[Any]) -> None:
    board = make_board(hardware, boards, "loop://")
    for chunk in (b"hr=7", b"2,pow", b"er=18"):
        board.write(chunk)
        board.poll()
        assert board.latest == {} and board.bad_lines == 0
    board.write(b"0\r\n9")
    board.poll()
    assert {k: r.value for k, r in board.latest.items()} == {"hr": 72.0, "power": 180.0}
    board.write(b"1\n")
    board.poll()
    assert board.latest["value"].value == 91.0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(st.integers(0, 250), min_size=1, max_size=8), data=st.data())
def test_any_chunking_gives_the_same_readings(values: list[int], data: st.DataObject) -> None:
    stream = b"".join(f"hr={v}\r\n".encode() for v in values)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    board = SerialBoard("b", {"url": "loop://"}, Hardware(clock=Clock()))
    try:
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            board.write(stream[start:end])
            board.poll()
        assert board.latest["hr"].value == values[-1]
        assert (board.good_lines, board.bad_lines) == (len(values), 0)
    finally:
        board.close()


def test_garbage_is_counted_and_warned_about_at_most_every_10_s(
        hardware: Hardware, clock: Clock, boards: list[Any],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="smartbiked.serial")
    board = make_board(hardware, boards, "loop://")
    # The oversized line would parse (hr=5): too long is too long, whatever it says.
    board.write(b"hello\nhr=nan\nhr=1e999\n{bad json\nhr=" + b"0" * 300 + b"5\nhr=70\n")
    board.poll()  # must not raise
    assert board.bad_lines == 5
    assert board.latest["hr"].value == 70.0
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "dropped 1 unreadable" in warnings[0]

    # An oversized line arriving in pieces counts once; the line after it is intact.
    board.write(b"y" * 300)
    board.poll()
    board.write(b"yyyy\nhr=71\n")
    board.poll()
    assert board.bad_lines == 6 and board.latest["hr"].value == 71.0
    assert len(caplog.records) == 1  # still inside the 10 s window

    clock.advance(10)
    board.poll()
    assert len(caplog.records) == 2
    assert "dropped 5 unreadable" in caplog.records[1].getMessage()
    board.poll()
    assert len(caplog.records) == 2  # nothing new to report


def test_values_go_stale(hardware: Hardware, clock: Clock, boards: list[Any]) -> None:
    board = make_board(hardware, boards, "loop://")
    speed = sensor(hardware, "speed", stale_after=5.0)
    never = sensor(hardware, "cadence", field="rpm")
    board.write(b"4.5\n")
    board.poll()
    assert speed.read() == 4.5
    clock.advance(5.0)
    assert speed.read() == 4.5
    clock.advance(0.01)
    assert speed.read() is None
    assert never.read() is None
    board.write(b"5\n")
    board.poll()
    assert speed.read() == 5.0 and never.read() is None


def test_missing_board_name_is_a_clear_error(hardware: Hardware) -> None:
    with pytest.raises(HardwareError, match=r"\[serial.bike\]"):
        sensor(hardware, "power")


# --------------------------------------------------------------------------- connection


def test_unplug_and_replug_through_the_same_symlink(
        fake: FakeBoard, hardware: Hardware, clock: Clock, boards: list[Any],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="smartbiked.serial")
    board = make_board(hardware, boards, str(fake.path), reconnect_interval=2.0)
    heart = sensor(hardware, "heartrate", field="hr")
    fake.send_line("hr=72")
    poll_until(board, lambda: heart.read() == 72.0)

    fake.unplug()
    assert not fake.path.exists()
    poll_until(board, lambda: not board.connected)  # noticed, not raised
    assert heart.read() is None  # nothing fresh can come from a board that is away
    board.poll()
    assert not board.connected
    lost = [r for r in caplog.records if "lost" in r.getMessage()]
    assert len(lost) == 1

    fake.replug()
    assert fake.path.is_symlink()
    # Reopened the moment it is back: the clock has not moved, so no reconnect_interval
    # has passed; the new device under the path is what counts.
    board.poll()
    assert board.connected and board.reconnects == 1
    assert heart.read() is None  # what it said before the loss is not fresh either
    fake.send_line("hr=75")
    poll_until(board, lambda: heart.read() == 75.0)
    assert len(caplog.records) == 1  # the loss, once; no warning per reconnect attempt


def test_board_absent_at_start_then_plugged_in(
        tmp_path: Path, hardware: Hardware, clock: Clock, boards: list[Any],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="smartbiked.serial")
    path = tmp_path / "usb-Arduino_Uno-if00"
    board = make_board(hardware, boards, str(path), reconnect_interval=2.0)
    power = sensor(hardware, "power")
    assert not board.connected
    for _ in range(3):
        clock.advance(2.0)
        board.poll()
        assert not board.connected and power.read() is None
    assert len(caplog.records) == 1 and "cannot open" in caplog.records[0].getMessage()

    late = FakeBoard(tmp_path, path.name)
    boards.append(late)
    board.poll()
    assert board.connected  # at once: it appeared, no reconnect_interval to wait out
    late.send_line("215")
    poll_until(board, lambda: power.read() == 215.0)


def test_native_ports_are_opened_exclusively(
        fake: FakeBoard, hardware: Hardware, boards: list[Any]) -> None:
    first = make_board(hardware, boards, str(fake.path), name="first")
    second = make_board(hardware, boards, str(fake.path), name="second")
    assert first.connected and not second.connected
    first.close()
    first.close()  # idempotent
    assert not first.connected
    second.hardware.clock.advance(2.0)  # type: ignore[attr-defined]
    second.poll()
    assert second.connected
    first.poll()
    assert not first.connected  # a closed board stays closed


def test_open_arguments_per_port_type(hardware: Hardware, boards: list[Any]) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    def record(url: str, **kwargs: Any) -> serial.SerialBase:
        calls.append((url, kwargs))
        raise serial.SerialException("not here")

    hardware.open_serial = record
    for url in ("/dev/serial/by-id/usb-x", "loop://", "socket://127.0.0.1:9",
                "rfc2217://127.0.0.1:9"):
        make_board(hardware, boards, url, name=url, baudrate=115200)
    kwargs = dict(calls)
    assert kwargs["/dev/serial/by-id/usb-x"] == {
        "baudrate": 115200, "timeout": 0, "exclusive": True, "write_timeout": 1.0}
    assert "exclusive" not in kwargs["loop://"] and "exclusive" not in kwargs[
        "socket://127.0.0.1:9"]
    assert "write_timeout" not in kwargs["rfc2217://127.0.0.1:9"]  # pyserial refuses it
    assert all(k["timeout"] == 0 for k in kwargs.values())


def test_socket_board(hardware: Hardware, boards: list[Any]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(2)
        url = f"socket://127.0.0.1:{server.getsockname()[1]}"
        board = make_board(hardware, boards, url)
        assert board.connected
        conn, _ = server.accept()
        with conn:
            conn.settimeout(2)
            cadence = sensor(hardware, "cadence", field="rpm")
            fan = actuator(hardware, "fan")
            conn.sendall(b"rpm=8")
            conn.sendall(b"5\n")
            poll_until(board, lambda: cadence.read() == 85.0)
            assert fan.apply(60.0) == 60.0
            received = b""
            while not received.endswith(b"\n"):
                received += conn.recv(100)
            assert received == b"fan=60\n"
        poll_until(board, lambda: not board.connected)  # the far end hung up


# --------------------------------------------------------------------------- actuators


def test_command_values_print_without_trailing_zero() -> None:
    assert [str(_Number(v)) for v in (40.0, 5.5, -10.0, -0.0, 0.25, 1 / 3)] == [
        "40", "5.5", "-10", "0", "0.25", "0.333333"]
    assert f"{_Number(40.0):.1f}|{_Number(40.0)}" == "40.0|40"


def test_actuator_without_ack(fake: FakeBoard, hardware: Hardware, boards: list[Any]) -> None:
    make_board(hardware, boards, str(fake.path))
    resistance = actuator(hardware, "resistance")
    incline = actuator(hardware, "incline", template="I{value:.1f}\r\n")
    assert resistance.apply(40.0) == 40.0
    assert fake.next_line() == "resistance=40"
    assert resistance.apply(5.5) == 5.5
    assert fake.next_line() == "resistance=5.5"
    assert incline.apply(-2.5) == -2.5
    assert fake.next_line() == "I-2.5"


def test_actuator_takes_the_value_from_the_ack(
        fake: FakeBoard, hardware: Hardware, boards: list[Any]) -> None:
    board = make_board(hardware, boards, str(fake.path))

    def motor(command: str) -> str:
        asked = float(command.split("=")[1])
        # Chatter before the answer: a reading, which must not be lost.
        return f"hr=99\nok {min(asked, 35):g}"

    fake.responder = motor
    heart = sensor(hardware, "heartrate", field="hr")
    resistance = actuator(hardware, "resistance", ack=r"^ok (?P<value>\S+)")
    assert resistance.apply(40.0) == 35.0
    assert resistance.apply(20.0) == 20.0
    assert heart.read() == 99.0
    assert board.bad_lines == 0
    assert fake.received == ["resistance=40", "resistance=20"]

    plain = actuator(hardware, "fan", ack="^ok")  # no value group: the commanded value
    assert plain.apply(60.0) == 60.0


def test_actuator_retries_a_board_that_answers_late(
        fake: FakeBoard, hardware: Hardware, boards: list[Any]) -> None:
    board = make_board(hardware, boards, str(fake.path))
    asked: list[str] = []

    def slow(command: str) -> str | None:
        asked.append(command)
        # The first answer comes only after the actuator gave up waiting: it arrives
        # together with the answer to the second try.
        return None if len(asked) == 1 else "ok\nok"

    fake.responder = slow
    resistance = actuator(hardware, "resistance", ack="^ok$", ack_timeout=0.2, retries=2)
    assert resistance.apply(40.0) == 40.0
    assert fake.received == ["resistance=40", "resistance=40"]
    board.poll()
    assert board.bad_lines == 0  # a stray late "ok" is expected chatter, not garbage


def test_an_old_answer_waiting_on_the_port_is_not_taken_for_the_new_one(
        fake: FakeBoard, hardware: Hardware, boards: list[Any]) -> None:
    board = make_board(hardware, boards, str(fake.path))
    resistance = actuator(hardware, "resistance", ack=r"^ok (?P<value>\S+)")
    fake.send_line("ok 10")  # the answer to a command long given up on
    assert board.wait_readable(2.0)
    fake.responder = lambda command: "ok " + command.split("=")[1]
    assert resistance.apply(40.0) == 40.0
    assert board.bad_lines == 0


def test_actuator_fails_when_the_board_answers_wrongly(
        fake: FakeBoard, hardware: Hardware, boards: list[Any]) -> None:
    board = make_board(hardware, boards, str(fake.path))
    fake.responder = lambda command: "error 7"
    incline = actuator(hardware, "incline", ack="^ok", ack_timeout=0.1, retries=2)
    with pytest.raises(HardwareError, match="no acknowledgement.*3 attempt"):
        incline.apply(5.0)
    assert fake.wait_received(3) == ["incline=5"] * 3
    poll_until(board, lambda: board.bad_lines == 3)  # every wrong answer counted, none raised

    fake.responder = lambda command: "ok abc"  # matches, but carries no number
    value = actuator(hardware, "fan", ack=r"^ok (?P<value>\S+)", ack_timeout=0.1, retries=0)
    with pytest.raises(HardwareError, match="1 attempt"):
        value.apply(20.0)


def test_actuator_on_an_absent_or_unplugged_board(
        fake: FakeBoard, tmp_path: Path, hardware: Hardware, boards: list[Any]) -> None:
    make_board(hardware, boards, str(tmp_path / "nothing"), name="gone")
    with pytest.raises(HardwareError, match="not connected"):
        actuator(hardware, "fan", port="gone").apply(20.0)

    board = make_board(hardware, boards, str(fake.path))
    fan = actuator(hardware, "fan")
    fake.unplug()
    with pytest.raises(HardwareError):
        fan.apply(20.0)
    assert not board.connected


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(("cls", "key", "value", "problem"), [
    (SerialActuator, "template", "{topic}={value}\n", None),
    (SerialActuator, "template", "S{value:.1f}\r", None),
    (SerialActuator, "template", "{topic}={valu}\n", "usable template"),
    (SerialActuator, "template", "{value", "usable template"),
    (SerialActuator, "template", "{value:d}", "usable template"),
    (SerialActuator, "template", "fan on\n", "must contain {value}"),
    (SerialActuator, "ack", r"^ok (?P<value>\S+)", None),
    (SerialActuator, "ack", "(", "regular expression"),
    (SerialActuator, "retries", -1, "at least"),
    (SerialActuator, "ack_timeout", 0, "greater than"),
    (SerialSensor, "stale_after", 0.0, "greater than"),
    (SerialSensor, "scale", 2, None),
    (SerialBoard, "format", "xml", "one of"),
    (SerialBoard, "url", "sockt://h:1", "unknown URL scheme"),
    (SerialBoard, "url", "/dev/ttyACM0", None),
    (SerialBoard, "url", "rfc2217://h:1", None),
    (SerialBoard, "columns", ["hr", "HR"], "twice"),
    (SerialBoard, "columns", ["hr", 3], "strings"),
    (SerialBoard, "baudrate", True, "integer"),
])
def test_option_checks(cls: Any, key: str, value: Any, problem: str | None) -> None:
    options = cls.options() if hasattr(cls, "options") else {o.name: o for o in cls.OPTIONS}
    found = options[key].validate(value)
    if problem is None:
        assert found is None
    else:
        assert found is not None and re.search(problem, found), found


def test_fake_board_times_out_and_survives_a_broken_responder(fake: FakeBoard) -> None:
    fd = os.open(fake.path, os.O_RDWR | os.O_NOCTTY)
    try:
        with pytest.raises(TimeoutError):
            fake.next_line(timeout=0.05)
        fake.responder = lambda command: str(1 / 0)
        os.write(fd, b"first\nsec")
        os.write(fd, b"ond\n")
        assert fake.wait_received(2) == ["first", "second"]
        assert [fake.next_line(), fake.next_line()] == ["first", "second"]
    finally:
        os.close(fd)
