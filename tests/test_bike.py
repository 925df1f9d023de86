"""The hardware thread: safe values, coalescing, motor protection, acks, change reports."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from smartbiked import config as configuration
from smartbiked.bike import Bike
from smartbiked.fakeboard import FakeBoard
from smartbiked.hardware import Hardware
from smartbiked.topics import Command
from tests.conftest import MOTORS as SHARED_MOTORS


class Recorder:
    """An Outbox that remembers everything, for assertions."""

    def __init__(self) -> None:
        self.items: list[tuple[Any, ...]] = []
        self._cond = threading.Condition()

    def _add(self, item: tuple[Any, ...]) -> None:
        with self._cond:
            self.items.append(item)
            self._cond.notify_all()

    def report(self, topic: str, value: float, *, sensor: bool) -> None:
        self._add(("report", topic, value))

    def event(self, topic: str, payload: dict[str, Any]) -> None:
        self._add(("event", topic, payload))

    def outcome(self, command: Command, replies: list[Any], value: float | None,
                error: str | None) -> None:
        self._add(("outcome", command.topic, value, error, tuple(replies)))

    def wait(self, predicate: Callable[[tuple[Any, ...]], bool], timeout: float = 5.0) -> tuple:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for item in self.items:
                    if predicate(item):
                        return item
                left = deadline - time.monotonic()
                assert left > 0, f"nothing matched; got {self.items}"
                self._cond.wait(left)


def motor_board(directory, delay_first: int = 0) -> FakeBoard:
    """A motor controller that acknowledges "R40" with "OK R40" (and "I5" with "OK I5")."""
    times: list[float] = []

    def answer(line: str) -> str | None:
        times.append(time.monotonic())
        match = re.fullmatch(r"([RI])(-?[0-9.]+)", line)
        return f"OK {match[1]}{match[2]}" if match else "ERR"

    board = FakeBoard(directory, "usb-motors", responder=answer)
    board.times = times  # type: ignore[attr-defined]
    return board


MOTORS = '[bike]\nid = "000001"\n' + SHARED_MOTORS


@pytest.fixture
def start_bike(tmp_path) -> Iterator[Callable[..., tuple[Bike, Recorder]]]:
    bikes: list[Bike] = []

    def start(text: str) -> tuple[Bike, Recorder]:
        path = tmp_path / "bike.toml"
        path.write_text(text)
        recorder = Recorder()
        bike = Bike(configuration.load(path, environ={}), Hardware(), recorder)
        bike.start()
        bikes.append(bike)
        return bike, recorder

    yield start
    for bike in bikes:
        bike.stop()


def test_safe_values_at_start_up_but_incline_holds_still(tmp_path, start_bike):
    with motor_board(tmp_path) as board:
        start_bike(MOTORS.format(url=board.path, min_interval=0))
        assert board.next_line() == "R0"  # a defined state at boot
        with pytest.raises(TimeoutError):
            board.next_line(timeout=0.3)  # and nothing for the incline: it holds


def test_burst_of_commands_coalesces_and_respects_min_interval(tmp_path, start_bike):
    with motor_board(tmp_path) as board:
        bike, out = start_bike(MOTORS.format(url=board.path, min_interval=0.3))
        assert board.next_line() == "R0"
        for value in range(1, 21):
            bike.submit(Command("resistance", float(value)), reply=f"req{value}")
        out.wait(lambda i: i[:3] == ("report", "resistance", 20.0))
        writes = board.received[1:]
        assert writes[-1] == "R20"
        assert len(writes) <= 3, writes  # not twenty motor moves
        gaps = [b - a for a, b in zip(board.times, board.times[1:], strict=False)]
        assert all(gap >= 0.25 for gap in gaps), gaps  # 0.3 s less the fake board's jitter
        answered = {r for i in out.items if i[0] == "outcome" for r in i[4]}
        assert answered == {f"req{v}" for v in range(1, 21)}  # every requester hears back


def test_reported_value_comes_from_the_acknowledgement(tmp_path, start_bike):
    def answer(line: str) -> str:
        return "OK I4.5" if line.startswith("I") else "OK R0"

    with FakeBoard(tmp_path, "usb-motors", responder=answer) as board:
        bike, out = start_bike(MOTORS.format(url=board.path, min_interval=0))
        bike.submit(Command("incline", 5.0))
        assert out.wait(lambda i: i[0] == "report" and i[1] == "incline")[2] == 4.5


def test_a_board_that_never_answers_is_a_refusal_not_a_crash(tmp_path, start_bike):
    with FakeBoard(tmp_path, "usb-motors", responder=lambda line: None) as board:
        bike, out = start_bike(MOTORS.format(url=board.path, min_interval=0))
        bike.submit(Command("incline", 5.0))
        outcome = out.wait(lambda i: i[0] == "outcome" and i[1] == "incline", timeout=10)
        assert outcome[2] is None and "no acknowledgement" in outcome[3]
        assert bike.alive(5)


SENSORS = """
[bike]
id = "000001"

[serial.arduino]
url = "{url}"

[power]
driver = "serial_sensor"
port = "arduino"
field = "power"
interval = 60
deadband = 5
max_rate = 20

[heartrate]
driver = "serial_sensor"
port = "arduino"
field = "hr"
interval = 0.1
"""


def test_change_beyond_the_dead_band_is_reported_at_once(tmp_path, start_bike):
    with FakeBoard(tmp_path, "usb-arduino") as board:
        bike, out = start_bike(SENSORS.format(url=board.path))
        board.send_line("hr=70,power=100")
        out.wait(lambda i: i[:2] == ("report", "heartrate"))
        board.send_line("hr=71,power=103")   # inside the dead band: no power report
        out.wait(lambda i: i == ("report", "heartrate", 71.0))
        board.send_line("hr=72,power=130")   # beyond it: reported without waiting 60 s
        out.wait(lambda i: i == ("report", "power", 130.0))
        assert ("report", "power", 103.0) not in out.items


def test_one_board_feeds_two_topics_and_survives_being_unplugged(tmp_path, start_bike):
    with FakeBoard(tmp_path, "usb-arduino") as board:
        bike, out = start_bike(SENSORS.replace("interval = 60", "interval = 0.1")
                               .format(url=board.path))
        board.send_line("hr=80,power=150")
        out.wait(lambda i: i == ("report", "power", 150.0))
        out.wait(lambda i: i == ("report", "heartrate", 80.0))
        board.unplug()
        board.replug()
        deadline = time.monotonic() + 10
        while ("report", "heartrate", 90.0) not in out.items:
            assert time.monotonic() < deadline, "readings never resumed"
            board.send_line("hr=90,power=160")  # until the daemon has reopened the port
            try:
                out.wait(lambda i: i == ("report", "heartrate", 90.0), timeout=0.5)
            except AssertionError:
                continue
        assert bike.alive(5)


def test_a_command_parsed_before_a_reload_is_checked_against_the_new_range(tmp_path,
                                                                          start_bike):
    # The MQTT side parsed 90 under the old range; the hardware now allows 60 at most.
    with motor_board(tmp_path) as board:
        narrowed = MOTORS.format(url=board.path, min_interval=0).replace(
            "min_interval = 0", "min_interval = 0\nmax = 60")
        bike, out = start_bike(narrowed)
        assert board.next_line() == "R0"
        bike.submit(Command("resistance", 90.0), reply="req")
        outcome = out.wait(lambda i: i[0] == "outcome" and i[4] == ("req",))
        assert outcome[2] is None and "90 is out of range" in outcome[3]
        with pytest.raises(TimeoutError):
            board.next_line(timeout=0.3)  # the motor never saw it
