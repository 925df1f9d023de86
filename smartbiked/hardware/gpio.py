"""Drivers for hardware wired straight to the Raspberry Pi's GPIO header, through gpiozero.

Pins may be named any way gpiozero understands: ``17``, ``"GPIO17"``, ``"BCM17"``,
``"BOARD11"`` (physical pin 11 of the header) or ``"J8:11"`` all mean the same pin.
The config check resolves each name with gpiozero's own board data (:func:`resolve_pin`),
so a pin that is not on the header, or one pin under two names, is a config error
rather than a driver that fails to start. Every device is opened through
``hardware.pin_factory``, so tests and the simulator can hand in gpiozero's ``MockFactory``.

- :class:`GpioButtons`: handlebar buttons, one event per press and per release.
- :class:`GpioPWM`: a fan or resistance driven by a PWM duty cycle.
- :class:`GpioRelay`: a fan switched on and off by a relay.
- :class:`GpioServo`: a resistance lever moved by a hobby servo.
- :class:`GpioPulseSensor`: cadence or speed from a reed switch or hall sensor.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

from gpiozero import (
    Button,
    Device,
    DigitalInputDevice,
    DigitalOutputDevice,
    PWMOutputDevice,
    Servo,
)
from gpiozero.exc import BadPinFactory, GPIOZeroError, PinFactoryFallback
from gpiozero.pins import BoardInfo
from gpiozero.pins.local import get_pi_revision
from gpiozero.pins.pi import PiBoardInfo

from smartbiked import topics
from smartbiked.errors import HardwareError
from smartbiked.hardware.base import (
    Actuator,
    EventSource,
    Hardware,
    Option,
    Sensor,
    at_least,
)

log = logging.getLogger(__name__)


#: The board pin names are checked against where no Raspberry Pi can be detected, and
#: gpiozero's MockFactory default: a Pi 3B, whose 40-pin J8 header every Pi since the
#: B+ (2014) shares, so a file checked on a laptop means the same on a bike.
DEFAULT_REVISION = 0xA02082


@functools.cache
def _board_of(revision: int) -> BoardInfo:
    return PiBoardInfo.from_revision(revision)


@functools.cache
def _this_pi() -> int | None:
    # The Pi's revision never changes while we run; reading it is /proc I/O, so once.
    try:
        return int(get_pi_revision())
    except (GPIOZeroError, OSError, ValueError):
        return None  # not a Pi (a laptop, CI, a container)


def board_info() -> BoardInfo:
    """The board whose header pin names are resolved against (gpiozero's data for it).

    Under ``GPIOZERO_PIN_FACTORY=mock`` it is the mock's board (``GPIOZERO_MOCK_REVISION``,
    as gpiozero's MockFactory reads it); on a Raspberry Pi, that Pi; elsewhere a 40-pin Pi.
    """
    revision: int | None
    if os.environ.get("GPIOZERO_PIN_FACTORY", "").lower() == "mock":
        try:
            revision = int(os.environ.get("GPIOZERO_MOCK_REVISION", ""), 16)
        except ValueError:
            revision = None
    else:
        revision = _this_pi()
    try:
        return _board_of(revision if revision is not None else DEFAULT_REVISION)
    except GPIOZeroError:  # a board newer than this gpiozero knows: the common header
        return _board_of(DEFAULT_REVISION)


class PinPlace(NamedTuple):
    """Where a pin name lands on the board: one physical pin, however it was named."""

    header: str
    number: int
    name: str  # gpiozero's usual name for it, e.g. "GPIO5"

    def __str__(self) -> str:
        return f"{self.name} ({self.header}:{self.number})"


def resolve_pin(spec: Any, board: BoardInfo | None = None) -> PinPlace:
    """The physical GPIO pin ``spec`` names; ValueError saying why when there is none.

    Uses gpiozero's board data (``BoardInfo.find_pin``), the same lookup its pin
    factories make, so what passes here is what a device will open.
    """
    board = board if board is not None else board_info()
    # bool is an int to Python (True would find GPIO1): refuse it as gpiozero would fail.
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise ValueError("must be an integer or a string")
    for header, pin in board.find_pin(spec):
        if "gpio" not in pin.interfaces:
            raise ValueError(f"{header.name}:{pin.number} is {pin.name}, not a GPIO pin")
        return PinPlace(header.name, pin.number, pin.name)
    raise ValueError(f"no GPIO pin by this name on a {board.description} "
                     '(name pins like 17, "GPIO17", "BCM17", "BOARD11" or "J8:11")')


def _pin_problem(pin: Any) -> str | None:
    # bool is refused before this runs (Option.validate), so an int here is a real number.
    if isinstance(pin, int) and pin < 0:
        return "must not be negative"
    if isinstance(pin, str) and not pin.strip():
        return "must not be empty"
    try:
        resolve_pin(pin)
    except ValueError as exc:
        return str(exc)
    return None


def _pins_problem(pins: Any) -> str | None:
    if not pins:
        return "must name at least one button"
    seen: dict[PinPlace, str] = {}
    for name, pin in pins.items():
        if not isinstance(name, str) or not name.strip():
            return "button names must be non-empty strings"
        if isinstance(pin, bool) or not isinstance(pin, (int, str)):
            return f"pin of {name} must be an integer or a string"
        problem = _pin_problem(pin)
        if problem:
            return f"pin of {name}: {problem}"
        place = resolve_pin(pin)
        if place in seen:
            return f"{seen[place]} and {name} are the same pin, {place}"
        seen[place] = name
    return None


def _pulse_width_problem(width: Any) -> str | None:
    # gpiozero's servo frame is 20 ms: a pulse must fit inside it.
    return None if 0 < width < 0.02 else "must be between 0 and 0.02 seconds"


def _open(what: str, pin: Any, factory: Callable[[], Any]) -> Any:
    """Open one gpiozero device, turning gpiozero's errors into a HardwareError."""
    try:
        return factory()
    except GPIOZeroError as exc:
        raise HardwareError(f"cannot open {what} on pin {pin!r}: {exc}") from exc


def _pin_option(doc: str) -> Option:
    return Option("pin", (int, str), doc=f'{doc}: 17, "GPIO17", "BOARD11" or "J8:11"; '
                  "a pin serves one topic", check=_pin_problem)


class GpioDriver:
    """Mixin of every driver that takes GPIO pins: says which, so the config check can
    refuse one pin used twice (a second device on a pin fails at start-up)."""

    PIN_KEY: ClassVar[str] = "pin"

    @classmethod
    def pins(cls, settings: Mapping[str, Any]) -> list[tuple[str, Any]]:
        """(config key, pin name) of every pin these settings use."""
        return [(cls.PIN_KEY, settings[cls.PIN_KEY])] if cls.PIN_KEY in settings else []


class _OneDevice(GpioDriver):
    """For drivers built on one gpiozero device kept in ``_device``: closes it once."""

    _device: Any = None

    def close(self) -> None:
        """Release the pin (gpiozero switches an output off as it closes it)."""
        device, self._device = self._device, None
        if device is not None:
            device.close()


class GpioButtons(GpioDriver, EventSource):
    """Handlebar buttons (turn left, turn right, brake): one ``button`` event per edge.

    Wire each push button between its GPIO pin and ground and keep ``pull_up = true``
    (the Pi's internal pull-up holds the pin high; pressing pulls it low). With
    ``pull_up = false`` wire the button to 3.3 V and add a pull-down resistor.
    The defaults are the old bikes' wiring: physical pins 11, 12 and 15.
    """

    KIND = "gpio_buttons"
    TOPICS = frozenset({"button"})
    OPTIONS = (
        Option("pins", (dict,), {"LEFT": "BOARD11", "RIGHT": "BOARD12", "BRAKE": "BOARD15"},
               "button name -> pin (named as for `pin`); each pin once, in no other topic",
               _pins_problem),
        Option("pull_up", (bool,), True, "button connects the pin to ground (internal pull-up)"),
        Option("bounce_time", (float,), 0.02, "seconds of contact bounce to ignore; 0: none",
               at_least(0)),
    )

    @classmethod
    def pins(cls, settings: Mapping[str, Any]) -> list[tuple[str, Any]]:
        """(``pins.NAME``, pin name) of every button."""
        return [(f"pins.{name}", pin) for name, pin in settings.get("pins", {}).items()]

    def __init__(self, topic: str, settings: Mapping[str, Any], hardware: Hardware) -> None:
        super().__init__(topic, settings, hardware)
        bounce = settings["bounce_time"] or None  # gpiozero wants None, not 0, for "no debounce"
        self._buttons: dict[str, Button] = {}
        try:
            for name, pin in settings["pins"].items():
                self._buttons[name] = _open(
                    f"button {name}", pin,
                    functools.partial(Button, pin, pull_up=settings["pull_up"],
                                      bounce_time=bounce, pin_factory=hardware.pin_factory))
        except BaseException:
            # Release the buttons already opened, or their pins stay reserved.
            self.close()
            raise

    def start(self, emit: Callable[[dict[str, Any]], None]) -> None:
        """Call ``emit`` with a button payload on every press and release."""
        for name, button in self._buttons.items():
            button.when_pressed = self._handler(emit, name, True)
            button.when_released = self._handler(emit, name, False)

    @staticmethod
    def _handler(emit: Callable[[dict[str, Any]], None], name: str,
                 pressed: bool) -> Callable[[], None]:
        def handle() -> None:
            # Runs on lgpio's thread: an exception here would end up in gpiozero, not in
            # the service, and might stop further events. Log it and carry on.
            try:
                emit(topics.button_payload(name, pressed, time.time()))
            except Exception:
                log.exception("button %s: could not emit the event", name)
        return handle

    def close(self) -> None:
        """Release every button's pin."""
        buttons, self._buttons = self._buttons, {}
        for button in buttons.values():
            button.close()


class GpioPWM(_OneDevice, Actuator):
    """A fan or a resistance brake driven by PWM: a 60 % command is a 60 % duty cycle.

    The duty follows the topic's documented 0..100 range; a config that narrows
    ``max`` to 80 caps the output at 80 %, it does not rescale it.
    Drive a MOSFET or motor driver from the pin (never a motor directly).
    ``active_high = false`` for drivers that switch on when the pin is low.
    The output starts off.
    """

    KIND = "gpio_pwm"
    TOPICS = frozenset({"fan", "resistance"})
    OPTIONS = (
        _pin_option("GPIO pin driving the MOSFET or motor driver"),
        Option("frequency", (float,), 100.0, "PWM frequency in Hz", at_least(0, strict=True)),
        Option("active_high", (bool,), True, "false: the load is on while the pin is low"),
    )

    def __init__(self, topic: str, settings: Mapping[str, Any], hardware: Hardware) -> None:
        super().__init__(topic, settings, hardware)
        self._device: PWMOutputDevice | None = _open(
            "PWM output", settings["pin"],
            lambda: PWMOutputDevice(settings["pin"], active_high=settings["active_high"],
                                    initial_value=0, frequency=settings["frequency"],
                                    pin_factory=hardware.pin_factory))

    def apply(self, value: float) -> float:
        """Set the duty cycle to ``value``'s place in the topic's range (fan 60 -> 60 %)."""
        if self._device is None:
            raise HardwareError(f"{self.topic}: PWM output is closed")
        try:
            self._device.value = self.fraction(value)
        except GPIOZeroError as exc:
            raise HardwareError(f"{self.topic}: cannot set PWM: {exc}") from exc
        return value


def _threshold_problem(value: Any) -> str | None:
    # At 0 the relay would be on at the safe value 0; above 100 it could never switch on.
    return None if 0 < value <= 100 else "must be above 0 and at most 100"


class GpioRelay(_OneDevice, Actuator):
    """A fan switched by a relay: on at or above ``threshold`` percent, off below it.

    Drive the relay module's input from the pin; most modules switch on when their
    input is low, so set ``active_high = false`` for them. The relay starts off.
    The value reported back is what the fan really does: ``max`` when on, ``min`` when off.
    """

    KIND = "gpio_relay"
    TOPICS = frozenset({"fan"})
    OPTIONS = (
        _pin_option("GPIO pin driving the relay module"),
        Option("active_high", (bool,), True, "false: the relay closes while the pin is low"),
        Option("threshold", (float,), 50.0, "values at or above this switch the relay on",
               _threshold_problem),
    )

    def __init__(self, topic: str, settings: Mapping[str, Any], hardware: Hardware) -> None:
        super().__init__(topic, settings, hardware)
        self._threshold = settings["threshold"]
        self._device: DigitalOutputDevice | None = _open(
            "relay", settings["pin"],
            lambda: DigitalOutputDevice(settings["pin"], active_high=settings["active_high"],
                                        initial_value=False, pin_factory=hardware.pin_factory))

    def apply(self, value: float) -> float:
        """Switch on when ``value >= threshold``; return max when on, min when off."""
        if self._device is None:
            raise HardwareError(f"{self.topic}: relay is closed")
        on = value >= self._threshold
        try:
            self._device.value = on
        except GPIOZeroError as exc:
            raise HardwareError(f"{self.topic}: cannot switch the relay: {exc}") from exc
        return self.limits.high if on else self.limits.low


class GpioServo(_OneDevice, Actuator):
    """A resistance lever moved by a hobby servo: 0 % at one end stop, 100 % at the other.

    Connect the servo's signal wire to the pin, its power to a 5 V supply able to
    carry its stall current (not the Pi's 5 V pin for anything bigger than a micro
    servo) and its ground to the Pi's ground. Tune ``min_pulse_width`` and
    ``max_pulse_width`` to the servo's end stops. No pulses are sent until the first
    value arrives, so the lever does not jump to mid travel at start.
    """

    KIND = "gpio_servo"
    TOPICS = frozenset({"resistance"})
    OPTIONS = (
        _pin_option("GPIO pin wired to the servo's signal wire"),
        Option("min_pulse_width", (float,), 0.001, "pulse in seconds at min",
               _pulse_width_problem),
        Option("max_pulse_width", (float,), 0.002, "pulse in seconds at max",
               _pulse_width_problem),
    )

    def __init__(self, topic: str, settings: Mapping[str, Any], hardware: Hardware) -> None:
        super().__init__(topic, settings, hardware)
        low, high = settings["min_pulse_width"], settings["max_pulse_width"]
        self._device: Servo | None = _open(
            "servo", settings["pin"],
            lambda: Servo(settings["pin"], initial_value=None, min_pulse_width=low,
                          max_pulse_width=high, pin_factory=hardware.pin_factory))

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> list[tuple[str, str]]:
        """The pulse widths must not cross."""
        if settings["min_pulse_width"] >= settings["max_pulse_width"]:
            return [("min_pulse_width", "must be below max_pulse_width")]
        return []

    def apply(self, value: float) -> float:
        """Move the servo to ``value``'s place in the topic's range (0 -> -1, 100 -> +1)."""
        if self._device is None:
            raise HardwareError(f"{self.topic}: servo is closed")
        try:
            self._device.value = 2 * self.fraction(value) - 1
        except GPIOZeroError as exc:
            raise HardwareError(f"{self.topic}: cannot move the servo: {exc}") from exc
        return value


class GpioPulseSensor(_OneDevice, Sensor):
    """Cadence (RPM) or speed (m/s) from a reed switch or hall sensor pulsing per revolution.

    Wire a reed switch, or an open-collector hall sensor's output, between the pin and
    ground and keep ``pull_up = true``; a sensor that drives its output high on each
    magnet wants ``pull_up = false`` (and a pull-down resistor if its output floats).
    Put ``pulses_per_revolution`` magnets on the crank or wheel.

    The value comes from the times of the last edges, taken on the clock as they
    happen: one revolution's period is the sum of the last ``pulses_per_revolution``
    intervals (uneven magnet spacing cancels out), so a change shows within one
    revolution. When the wheel slows, the time since the last edge is used as soon as
    it exceeds that period, so the value decays smoothly; after ``timeout`` seconds
    without an edge it is 0.
    """

    KIND = "gpio_pulse"
    TOPICS = frozenset({"cadence", "speed"})
    OPTIONS = (
        _pin_option("GPIO pin wired to the reed switch or hall sensor"),
        Option("pull_up", (bool,), True, "the sensor connects the pin to ground"),
        Option("pulses_per_revolution", (int,), 1, "magnets on the crank or wheel", at_least(1)),
        Option("circumference", (float,), 2.1, "wheel circumference in metres (speed only)",
               at_least(0, strict=True)),
        Option("debounce", (float,), 0.005,
               "seconds after an edge during which another edge is contact bounce", at_least(0)),
        Option("timeout", (float,), 3.0, "seconds without an edge before the value is 0",
               at_least(0, strict=True)),
    )

    def __init__(self, topic: str, settings: Mapping[str, Any], hardware: Hardware) -> None:
        super().__init__(topic, settings, hardware)
        self._clock = hardware.clock
        self._per_rev: int = settings["pulses_per_revolution"]
        self._debounce: float = settings["debounce"]
        self._timeout: float = settings["timeout"]
        self._scale: float = 60.0 if topic == "cadence" else settings["circumference"]
        # One revolution needs per_rev intervals, so per_rev + 1 edges.
        self._edges: collections.deque[float] = collections.deque(maxlen=self._per_rev + 1)
        # The callback runs on lgpio's thread and read() on the service's: the lock keeps
        # read() from copying the edges halfway through an update.
        self._lock = threading.Lock()
        self._device: DigitalInputDevice | None = _open(
            "pulse input", settings["pin"],
            lambda: DigitalInputDevice(settings["pin"], pull_up=settings["pull_up"],
                                       pin_factory=hardware.pin_factory))
        self._pulses = 0  # counted edges, for whole revolutions
        self._revolution: Callable[[int, float], None] | None = None
        self._device.when_activated = self._edge

    def watch_revolutions(self, callback: Callable[[int, float], None]) -> bool:
        """Every ``pulses_per_revolution`` counted edges are one revolution."""
        self._revolution = callback
        return True

    def _edge(self) -> None:
        try:
            now = self._clock()
            with self._lock:
                if self._edges:
                    since = now - self._edges[-1]
                    if since <= 0 or since < self._debounce:
                        return
                    if since > self._timeout:
                        # After a stop the gap is no revolution: start measuring afresh.
                        self._edges.clear()
                self._edges.append(now)
                self._pulses += 1
                whole = self._pulses % self._per_rev == 0
            callback = self._revolution
            if whole and callback is not None:
                callback(1, now)
        except Exception:
            log.exception("%s: pulse edge lost", self.topic)

    def read(self) -> float:
        """RPM (cadence) or m/s (speed); 0.0 until two edges are seen and after a timeout."""
        with self._lock:
            edges = tuple(self._edges)
        if len(edges) < 2:
            return 0.0
        now = self._clock()
        if now - edges[-1] > self._timeout:
            return 0.0
        # The second estimate pretends an edge came now: it is the shortest period the
        # revolution in progress can still have, so it only counts once it is the longer.
        period = max(self._period(edges), self._period((*edges, now)))
        return self._scale / period

    def _period(self, edges: tuple[float, ...]) -> float:
        # Before a whole revolution is seen, scale up the intervals there are.
        count = min(len(edges) - 1, self._per_rev)
        return (edges[-1] - edges[-1 - count]) * self._per_rev / count



def check_pin_factory() -> str | None:
    """Why gpiozero has no pin factory on this machine, or None when it has one.

    gpiozero warns once per back end it tries (lgpio, RPi.GPIO, pigpio, native) before
    it gives up: four warnings that bury the one fact an operator needs. Those warnings
    are silenced for the whole process; the caller says it in one line instead.
    """
    warnings.filterwarnings("ignore", category=PinFactoryFallback)
    try:
        Device.ensure_pin_factory()
    except (BadPinFactory, ImportError, OSError, RuntimeError) as exc:
        return str(exc) or type(exc).__name__
    return None
