"""The bike's promises: one slow board stalls nothing, commands are never silently
dropped, safe values when they are due (and once), health states once per change,
and a reload that changes only what changed.

The bike's decisions run on a fake clock (FakeClock) the test moves; ``bike.sync()``
waits until the hardware thread has acted on everything before it. Serial waits
(acknowledgements) are real time, and the tests that involve them assert on the order
of events, never on how long something took.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from smartbiked import config as configuration
from smartbiked.fakeboard import FakeBoard
from smartbiked.topics import Command
from tests.conftest import wait_until
from tests.test_bike import FakeClock, Recorder, bike_starter, mock_factory, motor_board

BIKE = '[bike]\nid = "000001"\n'


@pytest.fixture
def factory() -> Iterator[Any]:
    yield from mock_factory()


@pytest.fixture
def start_bike(tmp_path, factory) -> Iterator[Callable[..., Any]]:
    yield from bike_starter(tmp_path, factory)


FAN = """
[fan]
driver = "gpio_pwm"
pin = "GPIO12"
{extra}
"""

SLOW_INCLINE = """
[serial.motors]
url = "{motors}"

[incline]
driver = "serial_actuator"
port = "motors"
template = "I{{value}}\\n"
ack = 'OK I(?P<value>-?[0-9.]+)'
ack_timeout = {ack_timeout}
retries = 2
"""

HEART = """
[serial.arduino]
url = "{arduino}"

[heartrate]
driver = "serial_sensor"
port = "arduino"
field = "hr"
interval = {interval}
"""


def fan_states(factory: Any) -> list[float]:
    """Every duty cycle the fan's mock pin went through, in order."""
    return [float(s.state) for s in factory.pin(12).states]


def gated(answer: bool = True) -> tuple[threading.Event, Any]:
    """A motor board responder that answers "OK <line>" only once the gate is open."""
    gate = threading.Event()

    def respond(line: str) -> str | None:
        gate.wait(30)
        return f"OK {line}" if answer else None
    return gate, respond


# --------------------------------------------------------------------------- isolation


def test_a_silent_incline_board_delays_neither_heart_rate_nor_the_fan(
        tmp_path, start_bike, factory):
    # The shipped incline settings (1 s acknowledgement, 2 retries) on a board that never
    # answers: the incline command takes 3 s to fail. Everything else goes on meanwhile.
    clock = FakeClock()
    with FakeBoard(tmp_path, "usb-motors", responder=lambda line: None) as motors, \
            FakeBoard(tmp_path, "usb-arduino") as arduino:
        text = BIKE + SLOW_INCLINE.format(motors=motors.path, ack_timeout=1.0) + HEART.format(
            arduino=arduino.path, interval=1) + FAN.format(extra="")
        bike, out = start_bike(text, clock=clock)
        out.wait(lambda i: i == ("state", "heartrate", "running", None))
        arduino.send_line("hr=70")
        wait_until(lambda: "hr" in bike.hardware.ports["arduino"].latest, 5, "hr read")

        bike.submit(Command("incline", 5.0))
        assert motors.next_line() == "I5"  # its board now waits for an answer
        bike.submit(Command("fan", 60.0))
        out.wait(lambda i: i == ("report", "fan", 60.0))
        assert factory.pin(12).state == pytest.approx(0.6)
        for beat in range(1, 4):  # three heart-rate intervals pass on the bike's clock
            clock.advance(1.0)
            assert bike.sync()
            out.wait(lambda i: i == ("report", "heartrate", 70.0), count=beat)
        assert bike.alive(3)  # the watchdog's view: the hardware thread is fine

        failed = out.wait(lambda i: i[:2] == ("outcome", "incline"), timeout=15)
        assert failed[2] is None and "no acknowledgement" in failed[3]
        assert motors.received == ["I5", "I5", "I5"]
        # All of it happened while the incline's acknowledgement was still pending.
        end = out.index(failed)
        assert out.index(("report", "fan", 60.0)) < end
        heart = [n for n, i in enumerate(out.items) if i == ("report", "heartrate", 70.0)]
        assert len(heart) == 3 and max(heart) < end


def test_while_a_slow_board_works_every_heart_line_and_fan_command_goes_through(
        tmp_path, start_bike, factory):
    gate, respond = gated()
    with FakeBoard(tmp_path, "usb-motors", responder=respond) as motors, \
            FakeBoard(tmp_path, "usb-arduino") as arduino:
        text = BIKE + SLOW_INCLINE.format(motors=motors.path, ack_timeout=60) + HEART.format(
            arduino=arduino.path, interval=0) + FAN.format(extra="")
        bike, out = start_bike(text)
        out.wait(lambda i: i == ("state", "heartrate", "running", None))
        for value in range(5):  # one incline command a second, on the app's side
            bike.submit(Command("incline", float(value)))
        assert motors.next_line() == "I0"
        for beat in range(60, 70):
            arduino.send_line(f"hr={beat}")
            out.wait(lambda i, b=beat: i == ("report", "heartrate", float(b)))
            bike.submit(Command("fan", float(beat)))
            out.wait(lambda i, b=beat: i == ("report", "fan", float(b)))
        assert not out.matching(lambda i: i[:2] == ("report", "incline"))  # still waiting
        gate.set()
        out.wait(lambda i: i == ("report", "incline", 4.0))
        # One in flight, the rest coalesced to the newest: I0 then I4, never I1..I3.
        assert motors.received == ["I0", "I4"]
        assert bike.counters_snapshot()["commands_coalesced"] == 3


# --------------------------------------------------------------------------- commands


def test_each_command_is_written_while_the_actuator_is_free(tmp_path, start_bike, factory):
    bike, out = start_bike(BIKE + FAN.format(extra=""))
    for value in range(1, 51):  # a burst, faster than anything could be applied
        bike.submit(Command("fan", float(value)), reply=value)
    out.wait(lambda i: i == ("report", "fan", 50.0))
    # min_interval is 0 and a GPIO write is over before the next command: none coalesced.
    assert fan_states(factory)[-50:] == pytest.approx([v / 100 for v in range(1, 51)])
    outcomes = out.matching(lambda i: i[0] == "outcome")
    assert [(i[2], i[4]) for i in outcomes] == [(float(v), (v,)) for v in range(1, 51)]
    counters = bike.counters_snapshot()
    assert (counters["commands_written"], counters["commands_coalesced"]) == (50, 0)


def test_commands_coalesce_only_while_a_write_is_in_flight(tmp_path, start_bike):
    gate, respond = gated()
    gate.set()  # the start-up write goes through
    with FakeBoard(tmp_path, "usb-motors", responder=respond) as motors:
        text = BIKE + SLOW_INCLINE.format(motors=motors.path, ack_timeout=60)
        bike, out = start_bike(text.replace("ack = ", "min = -10\nack = "))
        gate.clear()
        bike.submit(Command("incline", 1.0), reply="first")
        assert motors.next_line() == "I1"
        for value in range(2, 10):
            bike.submit(Command("incline", float(value)), reply=f"r{value}")
        assert bike.sync()
        assert bike.counters_snapshot()["commands_coalesced"] == 7
        gate.set()
        out.wait(lambda i: i == ("report", "incline", 9.0))
        assert motors.received == ["I1", "I9"]
        replies = [i[4] for i in out.matching(lambda i: i[0] == "outcome")]
        assert replies == [("first",), tuple(f"r{v}" for v in range(2, 10))]
        # Free again: the next command is written, not held.
        bike.submit(Command("incline", 3.0))
        out.wait(lambda i: i == ("report", "incline", 3.0))
        assert bike.counters_snapshot()["commands_coalesced"] == 7


# --------------------------------------------------------------------------- safety


def test_offline_safe_after_is_honoured_and_safe_values_are_written_once_per_outage(
        tmp_path, start_bike, factory):
    clock = FakeClock()
    text = BIKE + "[service]\noffline_safe_after = 60\n" + FAN.format(extra="")
    bike, out = start_bike(text, clock=clock)
    out.wait(lambda i: i == ("report", "fan", 0.0))  # start-up
    bike.offline_since = None  # the broker is there
    bike.submit(Command("fan", 80.0))
    out.wait(lambda i: i == ("report", "fan", 80.0))

    def safe_writes() -> int:
        return len(out.matching(lambda i: i == ("report", "fan", 0.0))) - 1

    bike.offline_since = clock()  # the broker drops
    assert bike.sync()
    assert safe_writes() == 0 and factory.pin(12).state == pytest.approx(0.8)  # not at once
    clock.advance(30)
    bike.offline_since = clock()  # paho says "disconnected" again: still the same outage
    clock.advance(29.9)
    assert bike.sync()
    assert safe_writes() == 0 and factory.pin(12).state == pytest.approx(0.8)
    clock.advance(0.1)  # offline_safe_after since the outage began
    assert bike.sync()
    assert safe_writes() == 1 and factory.pin(12).state == 0
    for _ in range(5):  # the outage goes on: the bike loops, the fan is not written again
        clock.advance(30)
        assert bike.sync()
    assert safe_writes() == 1

    bike.offline_since = None  # back; a rider sets the fan; the broker drops again
    bike.submit(Command("fan", 50.0))
    out.wait(lambda i: i == ("report", "fan", 50.0))
    bike.offline_since = clock()
    clock.advance(60)
    assert bike.sync()
    assert safe_writes() == 2 and factory.pin(12).state == 0  # once for this outage too
    assert bike.counters_snapshot()["bike_writes"] == 3  # start-up + two outages


def test_stop_writes_the_safe_value_before_closing_the_pin(tmp_path, start_bike, factory):
    # safe = 20, not 0: gpiozero switches an output off when it closes it, so only a
    # value other than off shows that the bike itself wrote the safe value.
    bike, out = start_bike(BIKE + FAN.format(extra="safe = 20"))
    bike.submit(Command("fan", 75.0))
    out.wait(lambda i: i == ("report", "fan", 75.0))
    assert bike.stop()
    states = fan_states(factory)
    assert states[-3:] == pytest.approx([0.75, 0.2, 0.0])  # 75, the safe 20, then closed
    assert out.items[-1] == ("report", "fan", 20.0)
    assert factory.pin(12).function == "input"  # released


def test_stop_at_the_default_safe_value_is_written_not_left_to_gpiozero(tmp_path, start_bike,
                                                                       factory):
    bike, out = start_bike(BIKE + FAN.format(extra=""))
    bike.submit(Command("fan", 75.0))
    out.wait(lambda i: i == ("report", "fan", 75.0))
    mark = len(out.items)
    assert bike.stop()
    assert out.items[mark:] == [("report", "fan", 0.0)]  # written (and reported) by the bike


def test_a_missing_motor_board_is_a_failed_state_not_a_refusal(tmp_path, start_bike, caplog):
    caplog.set_level(logging.ERROR, logger="smartbiked.bike")
    path = tmp_path / "usb-motors"
    bike, out = start_bike(BIKE + SLOW_INCLINE.format(motors=path, ack_timeout=0.5)
                           .replace("ack = ", 'safe = 0\nack = '))
    state = out.wait(lambda i: i[:3] == ("state", "incline", "failed"))
    assert "motors" in state[3] and "cannot open" in state[3]
    wait_until(lambda: any("not applied (start-up)" in r.getMessage() for r in caplog.records),
               5, "the start-up write's error")
    assert bike.sync()
    assert not out.matching(lambda i: i[0] == "outcome")  # nobody sent a command
    assert out.states("incline") == ["failed"]  # once, though the board and the write failed
    assert bike.states()["incline"][0] == "failed"
    with motor_board(tmp_path) as board:  # plugged in: reopened at once, commands accepted
        out.wait(lambda i: i == ("state", "incline", "running", None))
        # It never had a value: it gets its safe value first, as it would have at boot.
        assert board.next_line() == "I0"
        out.wait(lambda i: i == ("report", "incline", 0.0))
        bike.submit(Command("incline", 2.0), reply="req")
        out.wait(lambda i: i == ("outcome", "incline", 2.0, None, ("req",)))
        assert board.next_line() == "I2"


# --------------------------------------------------------------------------- watchdog


class BlockingRecorder(Recorder):
    """Blocks the hardware thread inside report() while ``gate`` is closed."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.inside = threading.Event()

    def report(self, topic: str, value: float, *, sensor: bool) -> None:
        if not self.gate.is_set():
            self.inside.set()
            self.gate.wait(30)
        super().report(topic, value, sensor=sensor)


def test_heartbeat_goes_on_during_an_ack_wait_and_stops_when_the_thread_is_stuck(
        tmp_path, start_bike):
    clock = FakeClock()
    out = BlockingRecorder()
    gate, respond = gated()
    with FakeBoard(tmp_path, "usb-motors", responder=respond) as motors:
        text = BIKE + SLOW_INCLINE.format(motors=motors.path, ack_timeout=60) + FAN.format(
            extra="")
        bike, _ = start_bike(text, clock=clock, outbox=out)
        bike.submit(Command("incline", 5.0))
        assert motors.next_line() == "I5"
        clock.advance(10)
        # The board waits for its answer; the idle hardware thread still beats on its own.
        wait_until(lambda: bike.alive(3), 5, "a heartbeat while the board waits")

        out.gate.clear()
        bike.submit(Command("fan", 30.0))  # its report blocks the hardware thread
        assert out.inside.wait(5)
        clock.advance(10)
        assert not bike.alive(3)  # stuck: the heartbeat stopped, the watchdog will notice
        out.gate.set()
        gate.set()
        assert bike.sync() and bike.alive(3)


def test_a_stop_handles_what_arrived_with_it(tmp_path, start_bike):
    # The stop and the end of a write in flight reach the hardware thread together: the
    # stop must see that write end, not wait for it until its deadline.
    out = BlockingRecorder()
    gate, respond = gated()
    with FakeBoard(tmp_path, "usb-motors", responder=respond) as motors:
        text = BIKE + SLOW_INCLINE.format(motors=motors.path, ack_timeout=60) + FAN.format(
            extra="")
        bike, _ = start_bike(text, outbox=out)
        bike.submit(Command("incline", 5.0), reply="req")
        assert motors.next_line() == "I5"
        out.gate.clear()
        bike.submit(Command("fan", 30.0))
        assert out.inside.wait(5)  # the hardware thread is held inside report()
        stopped: list[bool] = []
        stopper = threading.Thread(target=lambda: stopped.append(bike.stop(timeout=60)))
        stopper.start()
        wait_until(lambda: bike._inbox.qsize() == 1, 5, "the stop to be queued")
        gate.set()  # the motor answers: the write's end is queued behind the stop
        wait_until(lambda: bike._inbox.qsize() == 2, 5, "the write's end to be queued")
        out.gate.set()
        stopper.join(60)
        assert stopped == [True]
        assert ("outcome", "incline", 5.0, None, ("req",)) in out.items


# --------------------------------------------------------------------------- sensors


def test_interval_0_reports_every_line_in_order(tmp_path, start_bike):
    with FakeBoard(tmp_path, "usb-arduino") as arduino:
        bike, out = start_bike(BIKE + HEART.format(arduino=arduino.path, interval=0))
        out.wait(lambda i: i == ("state", "heartrate", "running", None))
        lines = [f"hr={n}" for n in range(500)]
        arduino.send(("\n".join(lines) + "\n").encode())  # one burst, as fast as a pty goes
        out.wait(lambda i: i == ("report", "heartrate", 499.0))
        reports = [i[2] for i in out.matching(lambda i: i[:2] == ("report", "heartrate"))]
        assert reports == [float(n) for n in range(500)]
        assert bike.counters_snapshot()["sensor_reports"] == 500


def test_a_sensor_goes_stale_after_stale_after_and_comes_back_with_a_reading(
        tmp_path, start_bike):
    clock = FakeClock()
    with FakeBoard(tmp_path, "usb-arduino") as arduino:
        text = BIKE + HEART.format(arduino=arduino.path, interval=0) + "stale_after = 5\n"
        bike, out = start_bike(text, clock=clock, hardware_clock=clock)
        out.wait(lambda i: i == ("state", "heartrate", "running", None))
        clock.advance(2)
        arduino.send_line("hr=70")
        out.wait(lambda i: i == ("report", "heartrate", 70.0))
        clock.advance(4.9)
        assert bike.sync()
        assert out.states("heartrate") == ["running"]
        clock.advance(0.1)
        assert bike.sync()
        stale = out.wait(lambda i: i[:3] == ("state", "heartrate", "stale"))
        assert "'hr'" in stale[3] and "5 s" in stale[3]
        clock.advance(60)
        assert bike.sync()
        assert out.states("heartrate") == ["running", "stale"]  # said once
        arduino.send_line("hr=72")
        out.wait(lambda i: i == ("report", "heartrate", 72.0))
        assert out.states("heartrate") == ["running", "stale", "running"]
        assert bike.states() == {"heartrate": ("running", None)}
        clock.advance(5)  # and again, without a reading
        assert bike.sync()
        assert out.states("heartrate") == ["running", "stale", "running", "stale"]


# --------------------------------------------------------------------------- reload


RELOADABLE = """
[serial.motors]
url = "{motors}"
{baud}

[resistance]
driver = "serial_actuator"
port = "motors"
template = "R{{value}}\\n"
ack = 'OK R(?P<value>-?[0-9.]+)'
{resistance}

[fan]
driver = "gpio_pwm"
pin = "GPIO12"
{fan}

[serial.arduino]
url = "{arduino}"

[heartrate]
driver = "serial_sensor"
port = "arduino"
field = "hr"
interval = 0
"""


def reloadable(tmp_path, motors, arduino, baud="", resistance="", fan="", extra=""):
    path = tmp_path / "bike.toml"
    path.write_text(BIKE + RELOADABLE.format(motors=motors.path, arduino=arduino.path, baud=baud,
                                             resistance=resistance, fan=fan) + extra)
    return configuration.load(path, environ={})


def settled(tmp_path, start_bike, motors, arduino):
    """A running bike with resistance at 40, fan at 90 and a heart rate reported."""
    config = reloadable(tmp_path, motors, arduino)
    bike, out = start_bike((tmp_path / "bike.toml").read_text())
    out.wait(lambda i: i == ("state", "heartrate", "running", None))
    bike.submit(Command("resistance", 40.0))
    bike.submit(Command("fan", 90.0))
    out.wait(lambda i: i == ("report", "resistance", 40.0))
    out.wait(lambda i: i == ("report", "fan", 90.0))
    arduino.send_line("hr=70")
    out.wait(lambda i: i == ("report", "heartrate", 70.0))
    return config, bike, out


def test_a_reload_with_nothing_changed_touches_nothing(tmp_path, start_bike, factory):
    with motor_board(tmp_path) as motors, FakeBoard(tmp_path, "usb-arduino") as arduino:
        config, bike, out = settled(tmp_path, start_bike, motors, arduino)
        boards = dict(bike.hardware.ports)
        ports = {name: b._port for name, b in boards.items()}
        drivers = dict(bike.drivers)
        pins = fan_states(factory)
        mark = len(out.items)
        for _ in range(20):  # a burst of reloads (SIGHUPs) is cheap and harmless
            assert bike.reload(reloadable(tmp_path, motors, arduino))
        arduino.send_line("hr=71")  # readings flow on, from the same open port
        out.wait(lambda i: i == ("report", "heartrate", 71.0))
        assert out.items[mark:] == [("report", "heartrate", 71.0)]  # no write, no state
        assert motors.received == ["R0", "R40"]
        assert fan_states(factory) == pins  # the fan never left 90
        assert bike.hardware.ports == boards and bike.drivers == drivers
        assert all(bike.hardware.ports[n]._port is p for n, p in ports.items())  # not reopened
        assert bike.counters_snapshot()["serial_reconnects"] == 0


def test_a_reload_moves_an_actuator_only_when_its_new_range_excludes_it(
        tmp_path, start_bike, factory, caplog):
    caplog.set_level(logging.WARNING, logger="smartbiked.bike")
    with motor_board(tmp_path) as motors, FakeBoard(tmp_path, "usb-arduino") as arduino:
        _, bike, out = settled(tmp_path, start_bike, motors, arduino)
        drivers = dict(bike.drivers)
        mark = len(out.items)
        narrowed = reloadable(tmp_path, motors, arduino, resistance="max = 60\nstep = 10",
                              fan="max = 75\nstep = 5\nsafe = 5")
        assert bike.reload(narrowed)
        # The fan at 90 is outside 0..75: moved to the nearest allowed value, and said so.
        assert out.items[mark:] == [("report", "fan", 75.0)]
        assert factory.pin(12).state == pytest.approx(0.75)
        assert any("fan: 90 is outside the new range" in r.getMessage() and "75" in
                   r.getMessage() for r in caplog.records)
        # The resistance at 40 is still allowed: it did not move, its motor heard nothing.
        assert motors.received == ["R0", "R40"]
        assert bike.drivers == drivers  # retuned in place, nothing reopened
        bike.submit(Command("resistance", 70.0), reply="req")  # parsed under the old range
        refused = out.wait(lambda i: i[0] == "outcome" and i[4] == ("req",))
        assert "70 is out of range" in refused[3]
        assert bike.stop()
        # The new safe value is the one used from now on.
        assert set(out.items[-2:]) == {("report", "resistance", 0.0), ("report", "fan", 5.0)}


def test_a_reload_closes_what_went_opens_what_came_and_reopens_what_changed(
        tmp_path, start_bike, factory):
    with motor_board(tmp_path) as motors, FakeBoard(tmp_path, "usb-arduino") as arduino:
        _, bike, out = settled(tmp_path, start_bike, motors, arduino)
        old_motors = bike.hardware.ports["motors"]
        heart = bike.drivers["heartrate"]
        path = tmp_path / "bike.toml"
        text = path.read_text()
        fan_table = text[text.index("[fan]"):text.index("[serial.arduino]")]
        changed = text.replace(fan_table, "").replace(
            'url = "' + str(motors.path) + '"', f'url = "{motors.path}"\nbaudrate = 19200') + (
            '\n[button]\ndriver = "gpio_buttons"\npins = { LEFT = "GPIO17" }\n')
        path.write_text(changed)
        mark = len(out.items)
        assert bike.reload(configuration.load(path, environ={}))
        # The fan went: to its safe value first (written, reported), then its pin closed.
        assert ("report", "fan", 0.0) in out.items[mark:]
        assert fan_states(factory)[-1] == 0 and factory.pin(12).function == "input"
        assert "fan" not in bike.drivers and "fan" not in bike.states()
        # The motor board changed (baud rate): reopened, and the resistance told its value
        # again rather than sent to its safe value.
        assert bike.hardware.ports["motors"] is not old_motors and old_motors.closed
        assert motors.received == ["R0", "R40", "R40"]
        # The heart-rate board did not change: its sensor runs on untouched.
        assert bike.drivers["heartrate"] is heart
        # The button came: it works.
        factory.pin(17).drive_low()
        out.wait(lambda i: i[:2] == ("event", "button") and i[2]["button"] == "LEFT")
        assert bike.states()["button"] == ("running", None)
        bike.submit(Command("fan", 10.0), reply="req")
        refused = out.wait(lambda i: i[:2] == ("outcome", "fan") and i[4] == ("req",))
        assert refused[2] is None and "no fan driver" in refused[3]


def test_a_reload_waits_for_a_write_in_flight_and_says_when_it_did_not_finish(
        tmp_path, start_bike):
    gate, respond = gated()
    gate.set()
    with FakeBoard(tmp_path, "usb-motors", responder=respond) as motors:
        path = tmp_path / "bike.toml"
        text = BIKE + SLOW_INCLINE.format(motors=motors.path, ack_timeout=60)
        bike, out = start_bike(text)
        gate.clear()
        bike.submit(Command("incline", 8.0), reply="req")
        assert motors.next_line() == "I8"
        path.write_text(text.replace("ack = ", "max = 5\nack = "))
        assert not bike.reload(configuration.load(path, environ={}), timeout=0.2)
        gate.set()  # the motor answers: the command completes, then the range applies
        out.wait(lambda i: i == ("outcome", "incline", 8.0, None, ("req",)))
        out.wait(lambda i: i == ("report", "incline", 5.0))
        assert motors.received == ["I8", "I5"]
        assert bike.sync() and bike.config.drivers[0].options["max"] == 5


def test_counters_and_states_are_snapshots(tmp_path, start_bike):
    with FakeBoard(tmp_path, "usb-arduino") as arduino:
        bike, out = start_bike(BIKE + HEART.format(arduino=arduino.path, interval=0))
        out.wait(lambda i: i == ("state", "heartrate", "running", None))
        arduino.send(b"garbage\nhr=1\n")
        out.wait(lambda i: i == ("report", "heartrate", 1.0))
        snapshot = bike.counters_snapshot()
        assert snapshot["bad_lines"] == 1 and snapshot["sensor_reports"] == 1
        snapshot["bad_lines"] = 99
        states = bike.states()
        states["heartrate"] = ("failed", "x")
        assert bike.counters_snapshot()["bad_lines"] == 1  # copies, not the bike's own
        assert bike.states() == {"heartrate": ("running", None)}
