"""The hardware thread: safe values, coalescing, motor protection, acks, change reports.

Time that the bike decides on (min_interval, heartbeats) runs on a fake clock moved by
the test; ``bike.sync()`` then waits until the hardware thread has acted on it. Waits
for bytes and events block on conditions with a deadline.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory, MockPWMPin

from smartbiked import config as configuration
from smartbiked.bike import Bike
from smartbiked.fakeboard import FakeBoard
from smartbiked.hardware import Hardware
from smartbiked.topics import Command
from tests.conftest import MOTORS as SHARED_MOTORS


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder:
    """An Outbox that remembers everything, in order, for assertions."""

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

    def driver_state(self, topic: str, state: str, reason: str | None) -> None:
        self._add(("state", topic, state, reason))

    def wait(self, predicate: Callable[[tuple[Any, ...]], bool], timeout: float = 5.0,
             count: int = 1) -> tuple:
        """The ``count``-th item matching ``predicate``, waiting for it with a deadline."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [item for item in self.items if predicate(item)]
                if len(found) >= count:
                    return found[count - 1]
                left = deadline - time.monotonic()
                assert left > 0, f"nothing matched; got {self.items}"
                self._cond.wait(left)

    def index(self, item: tuple[Any, ...]) -> int:
        with self._cond:
            return self.items.index(item)

    def matching(self, predicate: Callable[[tuple[Any, ...]], bool]) -> list[tuple[Any, ...]]:
        with self._cond:
            return [item for item in self.items if predicate(item)]

    def states(self, topic: str) -> list[str]:
        """The states the bike announced for ``topic``, in order."""
        return [i[2] for i in self.matching(lambda i: i[0] == "state" and i[1] == topic)]


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


def mock_factory() -> Iterator[MockFactory]:
    """gpiozero's mock pins (PWM-capable), released afterwards."""
    f = MockFactory(revision="a02082", pin_class=MockPWMPin)
    yield f
    f.reset()


def bike_starter(tmp_path, factory) -> Iterator[Callable[..., tuple[Bike, Recorder]]]:
    """Start Bikes: ``start(text, clock=..., hardware_clock=..., outbox=...)``; stop them after."""
    bikes: list[Bike] = []

    def start(text: str, clock: Callable[[], float] = time.monotonic,
              hardware_clock: Callable[[], float] = time.monotonic,
              outbox: Recorder | None = None) -> tuple[Bike, Recorder]:
        path = tmp_path / "bike.toml"
        path.write_text(text)
        recorder = outbox or Recorder()
        bike = Bike(configuration.load(path, environ={}),
                    Hardware(pin_factory=factory, clock=hardware_clock), recorder, clock=clock)
        bike.start()
        bikes.append(bike)
        return bike, recorder

    yield start
    for bike in bikes:
        assert bike.stop(), "the hardware thread did not stop"


@pytest.fixture
def factory() -> Iterator[MockFactory]:
    yield from mock_factory()


@pytest.fixture
def start_bike(tmp_path, factory) -> Iterator[Callable[..., tuple[Bike, Recorder]]]:
    yield from bike_starter(tmp_path, factory)


def test_safe_values_at_start_up_but_incline_holds_still(tmp_path, start_bike):
    with motor_board(tmp_path) as board:
        bike, out = start_bike(MOTORS.format(url=board.path, min_interval=0))
        assert board.next_line() == "R0"  # a defined state at boot
        out.wait(lambda i: i == ("report", "resistance", 0.0))
        # The board takes its writes in order: an incline move queued at start-up would
        # reach it before this command does.
        bike.submit(Command("resistance", 5.0), reply="req")
        out.wait(lambda i: i == ("report", "resistance", 5.0))
        assert board.received == ["R0", "R5"]  # and nothing for the incline: it holds
        # The start-up write was nobody's command: nobody hears of it but the health state.
        assert out.matching(lambda i: i[0] == "outcome") == [
            ("outcome", "resistance", 5.0, None, ("req",))]


def test_a_burst_coalesces_while_min_interval_holds_the_motor_back(tmp_path, start_bike):
    clock = FakeClock()
    with motor_board(tmp_path) as board:
        bike, out = start_bike(MOTORS.format(url=board.path, min_interval=0.3), clock=clock)
        out.wait(lambda i: i == ("report", "resistance", 0.0))  # the start-up write, at t0
        for value in range(1, 21):
            bike.submit(Command("resistance", float(value)), reply=f"req{value}")
        assert bike.sync()
        clock.advance(0.29)
        assert bike.sync()
        # Held back by min_interval: one waits, the newest; the others are counted.
        assert bike.counters_snapshot()["commands_coalesced"] == 19
        assert out.matching(lambda i: i[:2] == ("report", "resistance")) == [
            ("report", "resistance", 0.0)]
        clock.advance(0.01)
        assert bike.sync()
        out.wait(lambda i: i == ("report", "resistance", 20.0))
        assert board.received == ["R0", "R20"]  # not twenty motor moves, not R1 at once
        answered = {r for i in out.items if i[0] == "outcome" for r in i[4]}
        assert answered == {f"req{v}" for v in range(1, 21)}  # every requester hears back
        assert bike.counters_snapshot()["commands_written"] == 1


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
        out.wait(lambda i: i == ("state", "heartrate", "running", None))
        board.send_line("hr=80,power=150")
        out.wait(lambda i: i == ("report", "power", 150.0))
        out.wait(lambda i: i == ("report", "heartrate", 80.0))
        board.unplug()
        lost = out.wait(lambda i: i[:3] == ("state", "heartrate", "stale"))
        assert "lost" in lost[3]
        board.replug()
        # Reopened as soon as it is back (the next line is then read); stale until then.
        deadline = time.monotonic() + 10
        while ("report", "heartrate", 90.0) not in out.items:
            assert time.monotonic() < deadline, "readings never resumed"
            board.send_line("hr=90,power=160")  # lines sent before it reopens are flushed
            try:
                out.wait(lambda i: i == ("report", "heartrate", 90.0), timeout=0.5)
            except AssertionError:
                continue
        assert out.states("heartrate") == ["running", "stale", "running"]  # once per change
        assert out.states("power") == ["running", "stale", "running"]
        assert bike.states()["heartrate"] == ("running", None)
        assert bike.alive(5)


def test_a_command_parsed_before_a_reload_is_checked_against_the_new_range(tmp_path,
                                                                          start_bike):
    clock = FakeClock()
    with motor_board(tmp_path) as board:
        text = MOTORS.format(url=board.path, min_interval=1)
        bike, out = start_bike(text, clock=clock)
        out.wait(lambda i: i == ("report", "resistance", 0.0))
        # The MQTT side parsed 90 under the old range; min_interval holds it back while
        # the reload narrows the range to 60.
        bike.submit(Command("resistance", 90.0), reply="req")
        assert bike.sync()
        narrowed = text.replace("min_interval = 1", "min_interval = 1\nmax = 60")
        (tmp_path / "bike.toml").write_text(narrowed)
        assert bike.reload(configuration.load(tmp_path / "bike.toml", environ={}))
        clock.advance(1)
        assert bike.sync()
        outcome = out.wait(lambda i: i[0] == "outcome" and i[4] == ("req",))
        assert outcome[2] is None and "90 is out of range" in outcome[3]
        bike.submit(Command("resistance", 10.0))
        out.wait(lambda i: i == ("report", "resistance", 10.0))
        assert board.received == ["R0", "R10"]  # the motor never saw 90
