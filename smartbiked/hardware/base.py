"""The interface every driver shares, and the options it declares for the config file.

A driver is one piece of bike hardware serving one topic. Drivers never talk MQTT:
the service calls them from its single hardware thread, so they need no locks.

Subclasses **must**:

- set ``KIND`` (the ``driver = "..."`` name in the config file) and ``TOPICS``
  (the topic names the driver can serve);
- extend ``OPTIONS`` with the config keys they read (each an :class:`Option`);
- open their pins or ports in ``__init__`` through the :class:`Hardware` they are given,
  never through a global, so tests and the simulator can swap the hardware;
- guard state shared with pin callbacks: on a Pi those run on lgpio's thread (everything
  else runs on the one hardware thread and needs no lock);
- implement :meth:`Sensor.read`, :meth:`EventSource.start` or :meth:`Actuator.apply`.

Subclasses **may** override :meth:`Driver.close` (release pins and ports),
:meth:`Driver.poll` (housekeeping run on every scheduler tick) and
:meth:`Driver.check_settings` (checks between keys).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import serial

from smartbiked.topics import TOPICS, Limits


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             dict: "a table", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


@dataclass(frozen=True)
class Option:
    """One config key a driver reads: its type, default and an optional extra check.

    ``check`` returns a problem text for a bad value, or None when the value is fine.
    """

    name: str
    kinds: tuple[type, ...]
    default: Any = REQUIRED
    doc: str = ""
    check: Callable[[Any], str | None] | None = None

    def validate(self, value: Any) -> str | None:
        """Return why ``value`` is unacceptable for this key, or None."""
        # TOML booleans are ints to Python: refuse them wherever a number is wanted.
        if isinstance(value, bool) and bool not in self.kinds:
            return f"must be {_kind_name(self.kinds)}"
        if not isinstance(value, self.kinds):
            if float in self.kinds and isinstance(value, int):
                value = float(value)
            else:
                return f"must be {_kind_name(self.kinds)}"
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        return self.check(value) if self.check else None


def at_least(low: float, *, strict: bool = False) -> Callable[[Any], str | None]:
    """An Option check: value >= low (or > low when strict)."""
    def check(v: Any) -> str | None:
        ok = v > low if strict else v >= low
        return None if ok else f"must be {'greater than' if strict else 'at least'} {low}"
    return check


def between(low: float, high: float) -> Callable[[Any], str | None]:
    """An Option check: low <= value <= high."""
    def check(v: Any) -> str | None:
        return None if low <= v <= high else f"must be between {low} and {high}"
    return check


def regex(value: Any) -> str | None:
    """An Option check: the value compiles as a regular expression."""
    try:
        re.compile(value)
    except re.error as exc:
        return f"not a regular expression: {exc}"
    return None


@dataclass
class Hardware:
    """Where drivers get their pins and ports: swapped wholesale by tests and the simulator.

    ``pin_factory`` is a gpiozero pin factory (None: gpiozero's default for this machine).
    ``open_serial`` opens a pyserial port by URL, with ``serial_for_url``'s arguments.
    ``ports`` holds the shared serial boards, by the name of their ``[serial.NAME]`` table.
    ``clock`` is the monotonic clock drivers time edges and timeouts with.
    """

    pin_factory: Any = None
    open_serial: Callable[..., serial.SerialBase] = serial.serial_for_url
    ports: dict[str, Any] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic


class Driver:
    """Base of all drivers; see the module docstring for what subclasses must and may do."""

    KIND: ClassVar[str] = ""
    TOPICS: ClassVar[frozenset[str]] = frozenset()
    OPTIONS: ClassVar[tuple[Option, ...]] = ()

    def __init__(self, topic: str, settings: Mapping[str, Any], hardware: Hardware) -> None:
        self.topic = topic
        self.settings = settings
        self.hardware = hardware

    @classmethod
    def options(cls) -> dict[str, Option]:
        """Every config key of this driver kind, the base classes' included."""
        merged: dict[str, Option] = {}
        for klass in reversed(cls.__mro__):
            for opt in getattr(klass, "OPTIONS", ()):
                merged[opt.name] = opt
        return merged

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Problems between keys, as (key, problem) pairs; each key alone is already valid.

        May be overridden; called by the config loader, so a bad combination is a
        config error, not a driver that fails to start.
        """
        return []

    def poll(self) -> None:
        """Housekeeping on every scheduler tick (drain a port, reconnect); default: nothing."""

    def close(self) -> None:
        """Release pins and ports; must be safe to call twice. Default: nothing."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.topic}>"


class Sensor(Driver):
    """A value read on the scheduler's clock. Must implement :meth:`read`."""

    OPTIONS = (
        Option("interval", (float,), 1.0, "seconds between reports", at_least(0.05)),
        Option("deadband", (float,), 0.0,
               "also report at once when the value moves more than this; 0: off", at_least(0)),
        Option("max_rate", (float,), 5.0, "at most this many change reports per second",
               at_least(0.01)),
    )

    def read(self) -> float | None:
        """The current value, or None when there is nothing to report yet."""
        raise NotImplementedError


class EventSource(Driver):
    """Pushes events as they happen (buttons). Must implement :meth:`start`."""

    def start(self, emit: Callable[[dict[str, Any]], None]) -> None:
        """Begin calling ``emit(payload)`` on each event; emit is safe from any thread."""
        raise NotImplementedError


class Actuator(Driver):
    """Something the apps move. Must implement :meth:`apply`.

    ``min``, ``max``, ``step`` and ``safe`` default to the topic's documented values
    (see :mod:`smartbiked.topics`); the config may narrow the range, never widen it.
    The config loader fills them in, so a driver finds them all in ``settings``.
    """

    OPTIONS = (
        Option("min", (float,), None, "lowest accepted value (default: the topic's)"),
        Option("max", (float,), None, "highest accepted value (default: the topic's)"),
        Option("step", (float,), None, "values must lie on this step from min; 0: any",
               at_least(0)),
        Option("safe", (float, str), None,
               'value at start, stop and long broker loss; "hold" keeps still'),
        Option("min_interval", (float,), 0.0, "seconds between two writes (protects motors)",
               at_least(0)),
    )

    def __init__(self, topic: str, settings: Mapping[str, Any], hardware: Hardware) -> None:
        super().__init__(topic, settings, hardware)
        self.limits = Limits(settings["min"], settings["max"], settings["step"])
        safe = settings["safe"]
        #: None means "hold still" (the incline's default: never move a bike under a rider).
        self.safe_value: float | None = None if safe == "hold" else safe

    def fraction(self, value: float) -> float:
        """Where ``value`` lies in the topic's documented range, 0..1.

        Output scaling uses the documented range, not the configured one: narrowing
        ``max`` to 80 caps a fan at 80 %, it does not make 80 mean full speed.
        """
        spec = TOPICS[self.topic]
        return min(1.0, max(0.0, (value - spec.low) / (spec.high - spec.low)))

    def apply(self, value: float) -> float:
        """Move the hardware to ``value`` (already range-checked); return the value reached.

        Raise :class:`smartbiked.errors.HardwareError` when the hardware did not move.
        """
        raise NotImplementedError
