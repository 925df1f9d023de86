"""The gpiozero drivers, on gpiozero's MockFactory with a hand-driven clock."""

from __future__ import annotations

from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory, MockPWMPin

from smartbiked import topics
from smartbiked.errors import HardwareError
from smartbiked.hardware import gpio
from smartbiked.hardware.base import REQUIRED, Actuator, Hardware
from smartbiked.hardware.gpio import (
    GpioButtons,
    GpioPulseSensor,
    GpioPWM,
    GpioRelay,
    GpioServo,
    PinPlace,
    resolve_pin,
)


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def factory():
    # The revision is pinned so GPIOZERO_MOCK_REVISION cannot change the header:
    # a02082 is a Pi 3B, whose 40-pin J8 header gives the BOARD names.
    pin_factory = MockFactory(revision="a02082", pin_class=MockPWMPin)
    yield pin_factory
    pin_factory.reset()


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def make(factory, clock):
    """Build a driver with settings as the config loader would fill them in."""
    drivers = []

    def build(cls, topic, validate=True, **overrides):
        settings: dict[str, Any] = {
            name: opt.default for name, opt in cls.options().items() if opt.default is not REQUIRED
        }
        if issubclass(cls, Actuator):
            spec = topics.TOPICS[topic]
            settings.update(min=float(spec.low), max=float(spec.high), step=float(spec.step),
                            safe=spec.safe)
        settings.update(overrides)
        for name, value in settings.items():
            problem = cls.options()[name].validate(value) if validate else None
            assert problem is None, f"test settings: {name}: {problem}"
        driver = cls(topic, settings, Hardware(pin_factory=factory, clock=clock))
        drivers.append(driver)
        return driver

    yield build
    for driver in drivers:
        driver.close()


# --- buttons -----------------------------------------------------------------------------

def test_buttons_default_board_pins_publish_press_and_release_in_order(make, factory):
    buttons = make(GpioButtons, "button")
    events = []
    buttons.start(events.append)
    # BOARD11, 12 and 15 are GPIO17, 18 and 22.
    factory.pin(17).drive_low()
    factory.pin(17).drive_high()
    factory.pin(22).drive_low()
    factory.pin(18).drive_low()
    factory.pin(22).drive_high()
    factory.pin(18).drive_high()
    assert [(e["button"], e["state"]) for e in events] == [
        ("LEFT", 1), ("LEFT", 0), ("BRAKE", 1), ("RIGHT", 1), ("BRAKE", 0), ("RIGHT", 0)]
    for event in events:
        assert set(event) == {"button", "state", "timestamp"}
        assert isinstance(event["timestamp"], float)
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps)


def test_buttons_pull_down_wiring_presses_on_high(make, factory):
    buttons = make(GpioButtons, "button", pins={"UP": 5}, pull_up=False)
    events = []
    buttons.start(events.append)
    factory.pin(5).drive_high()
    factory.pin(5).drive_low()
    assert [(e["button"], e["state"]) for e in events] == [("UP", 1), ("UP", 0)]


def test_button_callback_survives_a_failing_emit(make, factory):
    buttons = make(GpioButtons, "button", pins={"LEFT": 17})
    calls = []

    def emit(payload):
        calls.append(payload)
        raise RuntimeError("queue full")

    buttons.start(emit)
    factory.pin(17).drive_low()  # must not raise out of the pin callback
    factory.pin(17).drive_high()
    assert [c["state"] for c in calls] == [1, 0]


def test_buttons_close_is_idempotent_and_frees_the_pins(make, factory):
    buttons = make(GpioButtons, "button")
    buttons.close()
    buttons.close()
    # The pins are free again: a second driver can take them.
    second = make(GpioButtons, "button")
    events = []
    second.start(events.append)
    factory.pin(18).drive_low()
    factory.pin(18).drive_high()
    assert [(e["button"], e["state"]) for e in events] == [("RIGHT", 1), ("RIGHT", 0)]


def test_buttons_failed_open_releases_the_pins_already_taken(make, factory):
    with pytest.raises(HardwareError, match="NOPE") as failure:
        # The config check refuses "NOPE"; the driver must still fail cleanly without it.
        make(GpioButtons, "button", validate=False, pins={"LEFT": 17, "RIGHT": "NOPE"})
    # Holding the traceback keeps the half-built driver alive, as a logging caller would:
    # its pin must be free without relying on the garbage collector.
    assert failure.traceback
    # GPIO17 was opened before the failure; it must have been released.
    buttons = make(GpioButtons, "button", pins={"LEFT": 17})
    events = []
    buttons.start(events.append)
    factory.pin(17).drive_low()
    factory.pin(17).drive_high()
    assert [(e["button"], e["state"]) for e in events] == [("LEFT", 1), ("LEFT", 0)]


@pytest.mark.parametrize("pins, fragment", [
    ({}, "at least one"),
    ({"": 17}, "non-empty"),
    ({"LEFT": 1.5}, "integer or a string"),
    ({"LEFT": True}, "integer or a string"),
    ({"LEFT": -1}, "negative"),
    ({"LEFT": " "}, "empty"),
    ({"LEFT": "GPIO99"}, "pin of LEFT: no GPIO pin by this name on a Raspberry Pi 3B"),
    ({"LEFT": "BOARD6"}, "pin of LEFT: J8:6 is GND, not a GPIO pin"),
    ({"LEFT": "BOARD11", "RIGHT": 17}, "LEFT and RIGHT are the same pin, GPIO17 (J8:11)"),
    ({"LEFT": 5, "RIGHT": "BCM6", "BRAKE": "J8:29"},
     "LEFT and BRAKE are the same pin, GPIO5 (J8:29)"),
])
def test_buttons_pins_option_refuses_bad_tables(mock_board, pins, fragment):
    problem = GpioButtons.options()["pins"].validate(pins)
    assert problem is not None and fragment in problem


# --- pin names ---------------------------------------------------------------------------

@pytest.fixture
def mock_board(monkeypatch):
    """Pin names are checked against the mock's board, as GPIOZERO_PIN_FACTORY=mock says."""
    monkeypatch.setenv("GPIOZERO_PIN_FACTORY", "mock")
    monkeypatch.setenv("GPIOZERO_MOCK_REVISION", "a02082")
    return monkeypatch


@pytest.mark.parametrize("spec", [5, "5", "GPIO5", "BCM5", "BOARD29", "J8:29", "WPI21"])
def test_every_name_gpiozero_knows_resolves_to_the_pin_it_opens(mock_board, factory, spec):
    place = resolve_pin(spec)
    assert place == PinPlace("J8", 29, "GPIO5") and str(place) == "GPIO5 (J8:29)"
    opened = factory.pin(spec).info  # the very pin a device on this name would drive
    assert (opened.number, opened.name) == (place.number, place.name)


@pytest.mark.parametrize(("spec", "fragment"), [
    ("GPIO99", "no GPIO pin by this name on a Raspberry Pi 3B"),
    (99, "no GPIO pin by this name"),
    ("BOARD41", "no GPIO pin by this name"),
    ("gpio5", "no GPIO pin by this name"),   # gpiozero's names are case-sensitive
    (" GPIO5", "no GPIO pin by this name"),
    ("BOARD1", "J8:1 is 3V3, not a GPIO pin"),
    ("J8:2", "J8:2 is 5V, not a GPIO pin"),
    ("GND", "is GND, not a GPIO pin"),
])
def test_pins_a_device_could_not_open_are_option_errors(mock_board, spec, fragment):
    for cls in (GpioPWM, GpioRelay, GpioServo, GpioPulseSensor):
        problem = cls.options()["pin"].validate(spec)
        assert problem is not None and fragment in problem, (cls, problem)


def test_the_board_is_gpiozeros_data_for_the_configured_pi(mock_board):
    # A first Model B (26-pin P1 header): physical pin 29 and J8 do not exist there.
    mock_board.setenv("GPIOZERO_MOCK_REVISION", "000e")
    assert resolve_pin("BOARD11") == PinPlace("P1", 11, "GPIO17")
    assert resolve_pin("GPIO28") == PinPlace("P5", 3, "GPIO28")  # its second header
    for spec in ("BOARD29", "J8:11", "GPIO5"):
        with pytest.raises(ValueError, match="on a Raspberry Pi B rev 2.0"):
            resolve_pin(spec)


def test_without_a_pi_names_are_checked_against_a_40_pin_header(monkeypatch):
    def no_pi() -> int:
        raise gpio.GPIOZeroError("unable to locate Pi revision")

    monkeypatch.delenv("GPIOZERO_PIN_FACTORY", raising=False)
    monkeypatch.setattr(gpio, "get_pi_revision", no_pi)
    gpio._this_pi.cache_clear()
    try:
        assert gpio.board_info().revision == f"{gpio.DEFAULT_REVISION:x}"
        assert resolve_pin("BOARD40") == PinPlace("J8", 40, "GPIO21")
    finally:
        gpio._this_pi.cache_clear()


def test_pin_lists_name_every_pin_a_driver_takes():
    assert GpioButtons.pins({"pins": {"LEFT": "BOARD11", "RIGHT": 18}}) == [
        ("pins.LEFT", "BOARD11"), ("pins.RIGHT", 18)]
    assert GpioPWM.pins({"pin": 12}) == [("pin", 12)]
    assert GpioPulseSensor.pins({"pin": "GPIO5"}) == [("pin", "GPIO5")]


# --- PWM ---------------------------------------------------------------------------------

def test_pwm_starts_off_and_sets_the_duty(make, factory):
    fan = make(GpioPWM, "fan", pin=12)
    assert factory.pin(12).state == 0
    assert fan.apply(60) == 60
    assert factory.pin(12).state == pytest.approx(0.6)
    assert fan.apply(100) == 100
    assert factory.pin(12).state == pytest.approx(1.0)
    assert fan.apply(0) == 0
    assert factory.pin(12).state == pytest.approx(0.0)


def test_pwm_narrowed_range_caps_the_duty_instead_of_rescaling_it(make, factory):
    resistance = make(GpioPWM, "resistance", pin="BOARD32", min=20.0, max=70.0)
    assert resistance.apply(45) == 45
    assert factory.pin(12).state == pytest.approx(0.45)
    resistance.apply(20)
    assert factory.pin(12).state == pytest.approx(0.2)
    resistance.apply(70)
    assert factory.pin(12).state == pytest.approx(0.7)


def test_pwm_active_low_inverts_the_pin(make, factory):
    fan = make(GpioPWM, "fan", pin=13, active_high=False)
    assert factory.pin(13).state == pytest.approx(1.0)  # off means high
    fan.apply(25)
    assert factory.pin(13).state == pytest.approx(0.75)


def test_pwm_frequency_reaches_the_pin(make, factory):
    make(GpioPWM, "fan", pin=12, frequency=250.0)
    assert factory.pin(12).frequency == pytest.approx(250)


def test_pwm_close_is_idempotent_and_apply_after_close_raises(make):
    fan = make(GpioPWM, "fan", pin=12)
    fan.close()
    fan.close()
    with pytest.raises(HardwareError):
        fan.apply(10)


def test_a_pin_taken_under_another_name_is_a_hardware_error(make):
    make(GpioPWM, "fan", pin=17)
    with pytest.raises(HardwareError, match="in use"):
        make(GpioRelay, "fan", pin="BOARD11")


def test_pwm_bad_pin_is_a_hardware_error(make):
    with pytest.raises(HardwareError, match="BOARD1"):
        make(GpioPWM, "fan", validate=False, pin="BOARD1")  # 3V3, not a GPIO


# --- relay -------------------------------------------------------------------------------

def test_relay_switches_at_the_threshold_and_reports_what_it_did(make, factory):
    fan = make(GpioRelay, "fan", pin=23)
    assert factory.pin(23).state == 0
    assert fan.apply(49.9) == 0
    assert factory.pin(23).state == 0
    assert fan.apply(50) == 100
    assert factory.pin(23).state == 1
    assert fan.apply(10) == 0
    assert factory.pin(23).state == 0


def test_relay_threshold_option_and_narrowed_range(make, factory):
    fan = make(GpioRelay, "fan", pin=23, threshold=20.0, min=0.0, max=80.0)
    assert fan.apply(20) == 80
    assert factory.pin(23).state == 1
    assert fan.apply(19) == 0


def test_relay_active_low_module(make, factory):
    fan = make(GpioRelay, "fan", pin=23, active_high=False)
    assert factory.pin(23).state == 1  # off: input held high
    fan.apply(100)
    assert factory.pin(23).state == 0


@pytest.mark.parametrize("threshold", [0.0, -5.0, 100.5])
def test_relay_threshold_must_be_able_to_switch(threshold):
    assert GpioRelay.options()["threshold"].validate(threshold) is not None


# --- servo -------------------------------------------------------------------------------

def test_servo_sends_nothing_until_the_first_value(make, factory):
    make(GpioServo, "resistance", pin=18)
    assert factory.pin(18).state == 0


def test_servo_maps_the_range_onto_its_travel(make, factory):
    servo = make(GpioServo, "resistance", pin=18)
    # Duty is pulse / 20 ms frame: 1 ms -> 0.05, 1.5 ms -> 0.075, 2 ms -> 0.1.
    assert servo.apply(0) == 0
    assert factory.pin(18).state == pytest.approx(0.05)
    assert servo.apply(100) == 100
    assert factory.pin(18).state == pytest.approx(0.1)
    servo.apply(50)
    assert factory.pin(18).state == pytest.approx(0.075)
    assert factory.pin(18).frequency == pytest.approx(50)


def test_servo_pulse_widths_and_narrowed_range(make, factory):
    servo = make(GpioServo, "resistance", pin=18, min_pulse_width=0.0005,
                 max_pulse_width=0.0025, min=10.0, max=60.0)
    servo.apply(0)  # the documented range's ends are the servo's ends
    assert factory.pin(18).state == pytest.approx(0.0005 / 0.02)
    servo.apply(100)
    assert factory.pin(18).state == pytest.approx(0.0025 / 0.02)
    servo.apply(60)
    assert factory.pin(18).state == pytest.approx((0.0005 + 0.6 * 0.002) / 0.02)


def test_servo_refuses_crossed_pulse_widths():
    problems = GpioServo.check_settings({"min_pulse_width": 0.002, "max_pulse_width": 0.001})
    assert problems == [("min_pulse_width", "must be below max_pulse_width")]
    assert GpioServo.check_settings({"min_pulse_width": 0.001, "max_pulse_width": 0.002}) == []


def test_servo_close_is_idempotent(make, factory):
    servo = make(GpioServo, "resistance", pin=18)
    servo.apply(30)
    servo.close()
    servo.close()
    with pytest.raises(HardwareError):
        servo.apply(30)


# --- pulse sensor ------------------------------------------------------------------------

class Wheel:
    """Drives a reed switch input: ``pulse()`` closes then opens the contact."""

    def __init__(self, factory: MockFactory, clock: FakeClock, pin: int = 27) -> None:
        self.pin = factory.pin(pin)
        self.clock = clock

    def pulse(self) -> None:
        self.pin.drive_low()
        self.pin.drive_high()

    def spin(self, count: int, interval: float) -> None:
        """``count`` pulses, ``interval`` seconds apart, the first one now."""
        for i in range(count):
            if i:
                self.clock.advance(interval)
            self.pulse()


def test_pulse_nothing_before_the_first_interval(make, factory, clock):
    sensor = make(GpioPulseSensor, "cadence", pin=27)
    assert sensor.read() == 0.0
    Wheel(factory, clock).pulse()
    assert sensor.read() == 0.0
    clock.advance(0.5)
    assert sensor.read() == 0.0


def test_cadence_90_rpm_one_magnet(make, factory, clock):
    sensor = make(GpioPulseSensor, "cadence", pin=27)
    Wheel(factory, clock).spin(5, 60 / 90)
    assert sensor.read() == pytest.approx(90, rel=0.01)


def test_cadence_90_rpm_two_magnets(make, factory, clock):
    sensor = make(GpioPulseSensor, "cadence", pin=27, pulses_per_revolution=2)
    Wheel(factory, clock).spin(7, 60 / 90 / 2)
    assert sensor.read() == pytest.approx(90, rel=0.01)


def test_two_unevenly_spaced_magnets_still_give_the_revolution_rate(make, factory, clock):
    sensor = make(GpioPulseSensor, "cadence", pin=27, pulses_per_revolution=2)
    wheel = Wheel(factory, clock)
    wheel.pulse()
    for _ in range(4):  # 0.25 s + 0.4167 s = 0.6667 s per revolution
        clock.advance(0.25)
        wheel.pulse()
        clock.advance(60 / 90 - 0.25)
        wheel.pulse()
        assert sensor.read() == pytest.approx(90, rel=0.01)


def test_first_interval_with_two_magnets_gives_a_value(make, factory, clock):
    sensor = make(GpioPulseSensor, "cadence", pin=27, pulses_per_revolution=2)
    Wheel(factory, clock).spin(2, 60 / 90 / 2)
    assert sensor.read() == pytest.approx(90, rel=0.01)


def test_speed_from_the_circumference(make, factory, clock):
    sensor = make(GpioPulseSensor, "speed", pin=27, circumference=2.1)
    Wheel(factory, clock).spin(6, 2.1 / 8.33)
    assert sensor.read() == pytest.approx(8.33, rel=0.01)


def test_speed_with_another_circumference(make, factory, clock):
    sensor = make(GpioPulseSensor, "speed", pin=27, circumference=1.5)
    Wheel(factory, clock).spin(3, 0.5)
    assert sensor.read() == pytest.approx(3.0, rel=0.01)


@pytest.mark.parametrize("magnets", [1, 2, 4])
def test_rate_change_shows_within_one_revolution(make, factory, clock, magnets):
    sensor = make(GpioPulseSensor, "cadence", pin=27, pulses_per_revolution=magnets)
    wheel = Wheel(factory, clock)
    wheel.spin(3 * magnets + 1, 60 / 60 / magnets)
    assert sensor.read() == pytest.approx(60, rel=0.01)
    for _ in range(magnets):  # one revolution at 120 RPM
        clock.advance(60 / 120 / magnets)
        wheel.pulse()
    assert sensor.read() == pytest.approx(120, rel=0.01)


def test_contact_bounce_is_rejected(make, factory, clock):
    sensor = make(GpioPulseSensor, "cadence", pin=27)
    wheel = Wheel(factory, clock)
    wheel.spin(4, 60 / 90)
    clock.advance(0.002)
    wheel.pulse()  # a bounce 2 ms after the real edge
    assert sensor.read() == pytest.approx(90, rel=0.01)
    clock.advance(60 / 90 - 0.002)
    wheel.pulse()  # the next real edge, timed from the real one
    assert sensor.read() == pytest.approx(90, rel=0.01)


def test_debounce_option_is_honoured(make, factory, clock):
    sensor = make(GpioPulseSensor, "cadence", pin=27, debounce=0.0)
    wheel = Wheel(factory, clock)
    wheel.spin(3, 60 / 90)
    clock.advance(0.002)
    wheel.pulse()  # with no debounce this counts: 2 ms is one revolution
    assert sensor.read() == pytest.approx(30000, rel=0.01)


def test_value_decays_when_the_rider_slows(make, factory, clock):
    sensor = make(GpioPulseSensor, "cadence", pin=27)
    Wheel(factory, clock).spin(4, 60 / 90)
    clock.advance(0.5)  # less than one period: still 90
    assert sensor.read() == pytest.approx(90, rel=0.01)
    clock.advance(0.5)  # 1.0 s since the last edge: at most 60 RPM now
    assert sensor.read() == pytest.approx(60, rel=0.01)
    clock.advance(1.0)
    assert sensor.read() == pytest.approx(30, rel=0.01)


def test_decay_with_two_magnets_counts_the_half_turn_already_done(make, factory, clock):
    sensor = make(GpioPulseSensor, "cadence", pin=27, pulses_per_revolution=2)
    Wheel(factory, clock).spin(5, 0.5)  # 60 RPM
    clock.advance(0.75)  # the last half turn took 0.5 s, this one 0.75 s so far
    assert sensor.read() == pytest.approx(60 / 1.25, rel=0.01)


def test_value_falls_to_zero_after_the_timeout(make, factory, clock):
    sensor = make(GpioPulseSensor, "cadence", pin=27, timeout=2.0)
    Wheel(factory, clock).spin(4, 0.5)
    clock.advance(1.99)
    assert sensor.read() > 0
    clock.advance(0.02)
    assert sensor.read() == 0.0


def test_restart_after_a_stop_measures_afresh(make, factory, clock):
    sensor = make(GpioPulseSensor, "cadence", pin=27)
    wheel = Wheel(factory, clock)
    wheel.spin(4, 0.5)
    clock.advance(10)
    wheel.pulse()
    assert sensor.read() == 0.0  # one edge after the stop is no rate yet
    clock.advance(0.75)
    wheel.pulse()
    assert sensor.read() == pytest.approx(80, rel=0.01)


def test_pull_down_sensor_counts_rising_edges(make, factory, clock):
    sensor = make(GpioPulseSensor, "cadence", pin=27, pull_up=False)
    pin = factory.pin(27)
    for i in range(3):
        if i:
            clock.advance(0.4)
        pin.drive_high()
        clock.advance(0.1)  # the falling edge must not count
        pin.drive_low()
    assert sensor.read() == pytest.approx(120, rel=0.01)


def test_whole_revolutions_are_counted_at_their_edge_times(make, factory, clock):
    """What Bluetooth Cycling Power sends: real revolutions, each at its own edge."""
    sensor = make(GpioPulseSensor, "cadence", pin=27, pulses_per_revolution=2)
    heard: list[tuple[int, float]] = []
    assert sensor.watch_revolutions(lambda count, at: heard.append((count, at)))
    wheel = Wheel(factory, clock)
    start = clock()
    wheel.spin(5, 0.25)  # edges at 0, .25, .5, .75, 1.0: the 2nd and 4th end revolutions
    assert heard == [(1, pytest.approx(start + 0.25)), (1, pytest.approx(start + 0.75))]
    wheel.pulse()  # contact bounce inside the debounce time is no edge, no revolution
    clock.advance(0.25)
    wheel.pulse()
    assert len(heard) == 3 and heard[-1][1] == pytest.approx(start + 1.25)


def test_pulse_close_is_idempotent_and_frees_the_pin(make, factory, clock):
    sensor = make(GpioPulseSensor, "cadence", pin=27)
    sensor.close()
    sensor.close()
    again = make(GpioPulseSensor, "cadence", pin=27)
    Wheel(factory, clock).spin(2, 1.0)
    assert again.read() == pytest.approx(60, rel=0.01)
    assert sensor.read() == 0.0  # the closed one heard nothing


@pytest.mark.parametrize("name, value", [
    ("pulses_per_revolution", 0),
    ("pulses_per_revolution", 1.5),
    ("circumference", 0.0),
    ("timeout", 0.0),
    ("debounce", -0.001),
    ("pin", True),
])
def test_pulse_options_refuse_bad_values(name, value):
    assert GpioPulseSensor.options()[name].validate(value) is not None


def test_every_driver_declares_its_kind_and_topics():
    for cls in (GpioButtons, GpioPWM, GpioRelay, GpioServo, GpioPulseSensor):
        assert cls.KIND.startswith("gpio_")
        assert cls.TOPICS and cls.TOPICS <= set(topics.TOPICS)
        assert "pin" in cls.options() or "pins" in cls.options()
