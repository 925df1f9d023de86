"""A serial board's own I/O thread: lines as they arrive, waits that hold up only itself.

The hardware clock is frozen in these tests, so nothing that depends on time passing
(reconnect_interval, stale readings) can happen by accident; waits block on queues and
conditions with a deadline.
"""

from __future__ import annotations

import logging
import os
import queue
import select as real_select
import termios
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smartbiked import config as configuration
from smartbiked.errors import ConfigError
from smartbiked.fakeboard import FakeBoard
from smartbiked.hardware import base
from smartbiked.hardware import serial as serial_module
from smartbiked.hardware.base import Hardware
from smartbiked.hardware.gpio import GpioPulseSensor
from smartbiked.hardware.serial import SerialActuator, SerialBoard, SerialSensor
from tests.test_serial import Clock, driver_settings


@pytest.fixture
def hardware() -> Hardware:
    return Hardware(clock=Clock())


@pytest.fixture
def closing() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for thing in reversed(made):
        thing.close()


@pytest.fixture
def fake(tmp_path: Path, closing: list[Any]) -> FakeBoard:
    board = FakeBoard(tmp_path)
    closing.append(board)
    return board


class Listener:
    """Subscribes to a board; what the board's thread delivers lands in queues."""

    def __init__(self, board: SerialBoard) -> None:
        self.values: queue.SimpleQueue[tuple[str, dict[str, float]]] = queue.SimpleQueue()
        self.connection: queue.SimpleQueue[tuple[bool, str | None]] = queue.SimpleQueue()
        board.subscribe(
            on_values=lambda v: self.values.put((threading.current_thread().name, v)),
            on_connection=lambda up, why: self.connection.put((up, why)))


def started(hardware: Hardware, closing: list[Any], url: str, **options: Any) -> (
        tuple[SerialBoard, Listener]):
    board = SerialBoard("b", {"url": url, **options}, hardware, open_now=False)
    hardware.ports["b"] = board
    closing.append(board)
    listener = Listener(board)
    board.start()
    return board, listener


def test_every_line_reaches_subscribers_in_order_on_the_boards_thread(
        fake: FakeBoard, hardware: Hardware, closing: list[Any]) -> None:
    board, listener = started(hardware, closing, str(fake.path))
    assert listener.connection.get(timeout=5) == (True, None)  # its first word
    for i in range(200):
        fake.send_line(f"hr={i}")
    for i in range(200):
        thread, values = listener.values.get(timeout=5)
        assert (thread, values) == ("board-b", {"hr": float(i)})
    assert board.good_lines == 200


def test_an_idle_board_sleeps_on_its_port_with_no_timer(
        fake: FakeBoard, hardware: Hardware, closing: list[Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    waits: queue.SimpleQueue[float | None] = queue.SimpleQueue()

    class Select:
        """select.select, telling the test which timeout each wait had."""

        @staticmethod
        def select(r: list[int], w: list[int], x: list[int], timeout: float | None = None
                   ) -> Any:
            if threading.current_thread().name == "board-b" and len(r) == 2:
                waits.put(timeout)  # a wait on the open port (and the wake pipe)
            return real_select.select(r, w, x, timeout)

    monkeypatch.setattr(base, "select", Select)
    _board, listener = started(hardware, closing, str(fake.path))
    assert listener.connection.get(timeout=5)[0]
    fake.send_line("hr=70")
    listener.values.get(timeout=5)
    # Every wait on the port, before and after the line, has no timeout: the thread
    # wakes when bytes come (or a job, or close), never to look whether they came.
    seen = [waits.get(timeout=5), waits.get(timeout=5)]
    assert seen == [None, None]


def test_a_board_plugged_back_in_is_reopened_at_once_not_at_the_next_slot(
        fake: FakeBoard, hardware: Hardware, closing: list[Any]) -> None:
    # reconnect_interval is a minute and the clock is frozen: only watching the device
    # path can bring it back.
    board, listener = started(hardware, closing, str(fake.path), reconnect_interval=60.0)
    assert listener.connection.get(timeout=5) == (True, None)
    fake.unplug()
    up, why = listener.connection.get(timeout=5)
    assert not up and "lost" in (why or "")
    fake.replug()
    assert listener.connection.get(timeout=5) == (True, None)
    assert listener.connection.empty()  # one word per change
    fake.send_line("hr=80")
    assert listener.values.get(timeout=5)[1] == {"hr": 80.0}
    assert board.reconnects == 1


def test_a_board_that_is_there_but_cannot_be_opened_waits_for_its_interval(
        fake: FakeBoard, hardware: Hardware, closing: list[Any]) -> None:
    holder = SerialBoard("holder", {"url": str(fake.path)}, hardware)  # holds the lock
    closing.append(holder)
    board, listener = started(hardware, closing, str(fake.path), reconnect_interval=2.0)
    up, why = listener.connection.get(timeout=5)
    assert not up and "cannot open" in (why or "")
    holder.close()
    # The device did not change, and the (frozen) clock says the interval has not
    # passed: no new attempt. Moving the clock on lets the next watch tick try again.
    hardware.clock.advance(2.0)  # type: ignore[attr-defined]
    assert listener.connection.get(timeout=5) == (True, None)
    assert board.connected


def test_a_command_waits_for_its_ack_on_the_boards_thread_and_readings_still_flow(
        fake: FakeBoard, hardware: Hardware, closing: list[Any]) -> None:
    gate = threading.Event()

    def motor(command: str) -> str | None:
        gate.wait(10)  # a slow motor: answers when the test says so
        return "ok " + command.split("=")[1]

    fake.responder = motor
    board, listener = started(hardware, closing, str(fake.path))
    listener.connection.get(timeout=5)
    fan = SerialActuator("fan", driver_settings(SerialActuator, "fan", port="b",
                                                ack=r"^ok (?P<value>\S+)", ack_timeout=30),
                         hardware)
    outcomes: queue.SimpleQueue[tuple[float | None, str | None]] = queue.SimpleQueue()
    fan.apply_async(60.0, lambda value, error: outcomes.put((value, error)))  # returns at once
    assert fake.next_line() == "fan=60"
    # While the board waits for the answer, what it prints is still read and delivered.
    fake.send_line("hr=71")
    assert listener.values.get(timeout=5) == ("board-b", {"hr": 71.0})
    assert outcomes.empty()
    gate.set()
    assert outcomes.get(timeout=5) == (60.0, None)
    assert board.bad_lines == 0


def test_closing_a_board_ends_a_wait_for_an_ack_at_once(
        fake: FakeBoard, hardware: Hardware, closing: list[Any]) -> None:
    fake.responder = lambda command: None  # never answers
    board, listener = started(hardware, closing, str(fake.path))
    listener.connection.get(timeout=5)
    incline = SerialActuator("incline", driver_settings(
        SerialActuator, "incline", port="b", ack="^ok", ack_timeout=3600, retries=0), hardware)
    outcomes: list[tuple[float | None, str | None]] = []
    incline.apply_async(5.0, lambda value, error: outcomes.append((value, error)))
    assert fake.next_line() == "incline=5"
    board.close()  # must not sit out the hour: whoever waits hears back now
    assert len(outcomes) == 1
    assert outcomes[0][0] is None and "closed" in (outcomes[0][1] or "")
    # A job handed to a closed board fails at once too, on the caller's thread.
    incline.apply_async(6.0, lambda value, error: outcomes.append((value, error)))
    assert outcomes[1][0] is None and "closed" in (outcomes[1][1] or "")


def test_a_sensor_whose_field_the_board_never_sends_is_named_once(
        fake: FakeBoard, hardware: Hardware, closing: list[Any],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="smartbiked.serial")
    board = SerialBoard("b", {"url": str(fake.path)}, hardware, open_now=False)
    hardware.ports["b"] = board
    closing.append(board)
    heart = SerialSensor("heartrate", driver_settings(SerialSensor, "heartrate", port="b",
                                                      field="HR"), hardware)
    power = SerialSensor("power", driver_settings(SerialSensor, "power", port="b",
                                                  field="power"), hardware)
    readings: queue.SimpleQueue[float] = queue.SimpleQueue()
    heart.start(readings.put)
    power.start(lambda value: None)
    listener = Listener(board)  # after the sensors: it hears each line after them
    board.start()
    assert listener.connection.get(timeout=5)[0]  # opening flushes what came before

    def missing() -> list[str]:
        return [r.getMessage() for r in caplog.records if "sends no field" in r.getMessage()]

    for i in range(1, 11):
        fake.send_line(f"power={i},cadence=80")
        if i == 2:
            fake.send_line("garbage")  # unreadable lines do not count
        listener.values.get(timeout=5)
        assert len(missing()) == (0 if i < 5 else 1), i
    (message,) = missing()
    assert "heartrate" in message and "'hr'" in message and "cadence, power" in message
    assert "hr" in heart.stale_reason() and readings.empty()
    assert not [r for r in caplog.records if "power" in r.getMessage().split(":")[0]]


def test_interval_zero_is_for_sensors_that_push_their_readings(tmp_path: Path) -> None:
    interval = SerialSensor.options()["interval"]
    assert interval.validate(0) is None and interval.validate(0.05) is None
    assert "0 (every reading" in (interval.validate(0.01) or "")
    assert SerialSensor.check_settings({"interval": 0}) == []
    problems = GpioPulseSensor.check_settings({"interval": 0})
    assert problems and problems[0][0] == "interval"
    path = tmp_path / "bike.toml"
    path.write_text('[bike]\nid = "000001"\n[cadence]\ndriver = "gpio_pulse"\npin = 17\n'
                    "interval = 0\n")
    with pytest.raises(ConfigError, match="interval.*serial_sensor"):
        configuration.load(path, environ={})
    path.write_text('[bike]\nid = "000001"\n[serial.a]\nurl = "loop://"\n[power]\n'
                    'driver = "serial_sensor"\nport = "a"\ninterval = 0\n')
    assert configuration.load(path, environ={}).drivers[0].options["interval"] == 0.0


def test_device_identity_follows_the_symlink(fake: FakeBoard) -> None:
    first = base.device_identity(str(fake.path))
    assert first is not None and first == base.device_identity(str(fake.path))
    fake.unplug()
    assert base.device_identity(str(fake.path)) is None
    fake.replug()
    # A pty may come back as the same node: the board tries at once after a loss anyway.
    assert base.device_identity(str(fake.path)) is not None
    assert base.device_identity("socket://host:1") == "socket://host:1"


def test_a_thread_holding_its_wakes_starts_board_jobs_when_it_releases_them(
        fake: FakeBoard, hardware: Hardware, closing: list[Any]) -> None:
    board, listener = started(hardware, closing, str(fake.path))
    assert listener.connection.get(timeout=5) == (True, None)
    ran: queue.SimpleQueue[str] = queue.SimpleQueue()
    outcome: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def holder() -> None:
        # As the bike's hardware thread does: jobs handed over, then one wake per board.
        base.hold_wakes()
        board.run(lambda: ran.put("first"))
        board.run(lambda: ran.put("second"))
        outcome.put(ran.empty())  # the board's thread was not woken for them
        base.release_wakes()
        # A wait for a job's result is never held back.
        outcome.put(board.call(lambda: threading.current_thread().name))

    threading.Thread(target=holder, daemon=True).start()
    assert outcome.get(timeout=5) is True
    assert [ran.get(timeout=5), ran.get(timeout=5)] == ["first", "second"]
    assert outcome.get(timeout=5) == "board-b"


def test_an_idle_board_takes_an_ackless_command_at_once_on_the_callers_thread(
        fake: FakeBoard, hardware: Hardware, closing: list[Any]) -> None:
    # No thread is woken for it: the bike's hardware thread writes the line itself and
    # hears back before apply_async returns (a hand-off each way saved per command).
    board, listener = started(hardware, closing, str(fake.path))
    assert listener.connection.get(timeout=5) == (True, None)
    fan = SerialActuator("fan", driver_settings(SerialActuator, "fan", port="b"), hardware)
    outcomes: list[tuple[str, float | None, str | None]] = []
    fan.apply_async(60.0, lambda value, error: outcomes.append(
        (threading.current_thread().name, value, error)))
    assert outcomes == [("MainThread", 60.0, None)]
    assert fake.next_line() == "fan=60"


def test_a_command_for_a_busy_board_waits_for_the_job_before_it(
        fake: FakeBoard, hardware: Hardware, closing: list[Any]) -> None:
    board, listener = started(hardware, closing, str(fake.path))
    assert listener.connection.get(timeout=5) == (True, None)
    gate, running = threading.Event(), threading.Event()

    def slow_job() -> None:
        running.set()
        gate.wait(10)
        board.write(b"first\n")

    board.run(slow_job)
    assert running.wait(5)  # the board's thread is inside a job: not idle
    fan = SerialActuator("fan", driver_settings(SerialActuator, "fan", port="b"), hardware)
    outcomes: queue.SimpleQueue[tuple[str, float | None, str | None]] = queue.SimpleQueue()
    fan.apply_async(40.0, lambda value, error: outcomes.put(
        (threading.current_thread().name, value, error)))
    assert outcomes.empty()  # not written past the job under way
    gate.set()
    assert outcomes.get(timeout=5) == ("board-b", 40.0, None)
    assert fake.wait_received(2) == ["first", "fan=40"]


def test_what_the_port_does_not_take_at_once_is_written_by_the_boards_thread(
        hardware: Hardware, closing: list[Any]) -> None:
    # A pty nobody reads fills up: the caller writes what fits, never waits, and the
    # board's thread writes the rest, in order, once the other end reads again.
    master, slave = os.openpty()
    closing.append(type("Fd", (), {"close": lambda self: os.close(master)})())
    board, listener = started(hardware, closing, os.ttyname(slave))
    os.close(slave)
    assert listener.connection.get(timeout=5) == (True, None)
    data = bytes(range(256)) * 1024  # 256 KiB: far more than a pty holds
    done: queue.SimpleQueue[tuple[str, str | None]] = queue.SimpleQueue()
    board.send(data, lambda error: done.put((threading.current_thread().name, error)))
    assert done.empty()
    got = bytearray()
    while len(got) < len(data):
        ready, _, _ = real_select.select([master], [], [], 5)
        assert ready, f"only {len(got)} of {len(data)} bytes arrived"
        got += os.read(master, 65536)
    assert bytes(got) == data
    assert done.get(timeout=5) == ("board-b", None)


def test_a_write_that_fails_unexpectedly_still_answers_the_command(
        fake: FakeBoard, hardware: Hardware, closing: list[Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # termios.error (not an OSError) can escape pyserial when a board is pulled during
    # a reopen: the command must still be answered, or its actuator waits forever.
    board, listener = started(hardware, closing, str(fake.path))
    assert listener.connection.get(timeout=5) == (True, None)
    gate, running = threading.Event(), threading.Event()
    board.run(lambda: (running.set(), gate.wait(10)))
    assert running.wait(5)  # busy: the command becomes a job

    def broken(self: SerialBoard, data: bytes) -> None:
        raise termios.error(5, "Input/output error")

    monkeypatch.setattr(SerialBoard, "write", broken)
    fan = SerialActuator("fan", driver_settings(SerialActuator, "fan", port="b"), hardware)
    outcomes: queue.SimpleQueue[tuple[float | None, str | None]] = queue.SimpleQueue()
    fan.apply_async(40.0, lambda value, error: outcomes.put((value, error)))
    gate.set()
    value, error = outcomes.get(timeout=5)
    assert value is None and error is not None and "Input/output error" in error


def test_a_port_is_not_closed_under_a_write_on_the_callers_thread(
        fake: FakeBoard, hardware: Hardware, closing: list[Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The hardware thread writes to the port's descriptor itself; were the board's
    # thread to close the port meanwhile (a lost board), the number could be reused by
    # another file before the write lands. Closing waits for the write.
    board, listener = started(hardware, closing, str(fake.path))
    assert listener.connection.get(timeout=5) == (True, None)
    inside, finish = threading.Event(), threading.Event()
    real_write = serial_module.os.write

    def slow_write(fd: int, data: bytes) -> int:
        if threading.current_thread().name == "writer":  # os.write is everybody's
            inside.set()
            assert finish.wait(10)
        return real_write(fd, data)

    monkeypatch.setattr(serial_module.os, "write", slow_write)
    writer = threading.Thread(target=board.send, args=(b"fan=1\n", lambda error: None),
                              name="writer")
    writer.start()
    assert inside.wait(5)
    closer = threading.Thread(target=board._drop_port)
    closer.start()
    # A wait for something that must not happen: half a second is the window.
    closer.join(0.5)
    assert closer.is_alive(), "the port was closed while a write to it was under way"
    finish.set()
    writer.join(5)
    closer.join(5)
    assert not board.connected
