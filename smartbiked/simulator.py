"""A virtual bike for ``smartbiked --simulate``: the same daemon, virtual hardware.

:class:`VirtualBike` builds the :class:`~smartbiked.hardware.Hardware` the service
gets instead of the real one, from the same config file. Nothing else changes: the
drivers, the service and its MQTT connection cannot tell. The virtual world is:

- gpiozero's ``MockFactory`` (with PWM-capable mock pins) for every GPIO driver.
  A rider thread drives the pins of ``gpio_pulse`` drivers (crank and wheel) at
  the rate the :class:`~smartbiked.rider.Rider` model pedals and rolls, honouring
  ``pulses_per_revolution``, ``circumference`` and ``pull_up``; it reads back the
  duty of ``gpio_pwm``/``gpio_servo`` outputs and the state of ``gpio_relay``
  outputs (a PWM resistance loads the rider; the fan only shows in the state).
- A :class:`~smartbiked.fakeboard.FakeBoard` for every ``[serial.NAME]`` table:
  whatever ``url`` the table names opens that board. It is a pseudo-terminal where
  there are ptys (Linux, macOS) and an in-process port (pyserial URL
  ``fakeboard://``) where there are none (Windows); :data:`SERIAL_ENV`
  (``pty`` or ``inprocess``) chooses.
  Boards feeding ``serial_sensor`` drivers print the rider's values in the
  board's ``format`` (``scale``/``offset`` reversed, so the daemon reports the
  model's value); boards taking ``serial_actuator`` commands decode each line
  with the driver's ``template``, move the model (incline, resistance, fan) and
  answer so that the driver's ``ack`` matches.
- The rider's hand: a small MQTT connection of the virtual world's own (not the
  daemon's) to ``[broker]``. A message on ``smartbike-sim/{bike}/press`` whose
  payload is a button name (``LEFT``), or ``{"button": "LEFT", "hold": 0.3}``,
  presses that button's mock pin and releases it after ``hold`` seconds
  (``smartbike press LEFT`` sends it). A request with an MQTT v5 ResponseTopic
  gets ``{"ok": true, "button": ...}`` or ``{"ok": false, "error": ...}``.
  Once a second the hand publishes the world's state on
  ``smartbike-sim/{bike}/state``: the model's values, the button names and
  every output pin's state (the fan's PWM duty, for instance), for tests,
  ``smartbike watch`` (which marks the bike as simulated) and the curious.

- A recorded ride (``smartbike replay``): a message on ``smartbike-sim/{bike}/ride``
  such as ``{"power": 182, "cadence": 87.5, "hold": 1.0}`` makes the sensors show
  those values (any of speed, cadence, power, heartrate) for ``hold`` seconds, or
  until the next message names the topic again; then the rider model takes over
  again, from the replayed speed.

Given a seed, the rider is repeatable: the model is stepped in fixed ticks of
simulated time, so only the moments at which commands arrive vary between runs.
A SIGHUP reload keeps working, but boards or pins added to the file meanwhile are
not simulated until the daemon restarts.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import os
import queue
import random
import re
import shutil
import string
import tempfile
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import serial
from gpiozero.pins.mock import MockFactory, MockPWMPin
from paho.mqtt.client import MQTTMessage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from smartbiked.config import Config
from smartbiked.fakeboard import FakeBoard, have_ptys
from smartbiked.hardware import Hardware
from smartbiked.hardware.base import device_identity
from smartbiked.mqtt_client import MQTTClient
from smartbiked.rider import Rider
from smartbiked.topics import TOPICS

log = logging.getLogger("smartbiked.simulator")

#: Simulated seconds per model step: fixed, so a seed gives the same trace.
TICK = 0.1
#: After a longer stall (a suspended laptop) the model skips ahead instead of racing.
MAX_CATCH_UP = 5.0
#: Seconds between two publications of the world's state.
STATE_PERIOD = 1.0
#: How long a press holds a button down unless the request says otherwise.
DEFAULT_HOLD = 0.2
#: Environment variable choosing the fake boards' kind: "pty" or "inprocess".
SERIAL_ENV = "SMARTBIKED_SIM_SERIAL"
#: What a ride message may set, and the longest it may hold a value.
RIDE_TOPICS = ("speed", "cadence", "power", "heartrate")
MAX_RIDE_HOLD = 60.0

_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def press_topic(bike_id: str) -> str:
    """Where the virtual rider's hand takes button presses."""
    return f"smartbike-sim/{bike_id}/press"


def state_topic(bike_id: str) -> str:
    """Where the virtual world publishes its state once a second."""
    return f"smartbike-sim/{bike_id}/state"


def ride_topic(bike_id: str) -> str:
    """Where a replayed ride tells the virtual sensors what to show."""
    return f"smartbike-sim/{bike_id}/ride"


def serial_kind(environ: Mapping[str, str] | None = None) -> str:
    """"pty" or "inprocess": :data:`SERIAL_ENV` if set, else pty wherever ptys exist."""
    env = os.environ if environ is None else environ
    wanted = env.get(SERIAL_ENV, "").strip().lower()
    if wanted in ("pty", "inprocess"):
        if wanted == "pty" and not have_ptys():
            log.warning("%s=pty, but this system has no pseudo-terminals: using in-process "
                        "ports", SERIAL_ENV)
            return "inprocess"
        return wanted
    if wanted:
        log.warning("%s=%.20r is neither pty nor inprocess; ignored", SERIAL_ENV, wanted)
    return "pty" if have_ptys() else "inprocess"


def parse_ride(payload: bytes | bytearray) -> tuple[dict[str, float], float]:
    """A ride message's values by topic and its hold (s); ValueError saying why not."""
    try:
        body = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")
    hold = body.get("hold", STATE_PERIOD * 2)
    if (isinstance(hold, bool) or not isinstance(hold, int | float) or not math.isfinite(hold)
            or not 0 < hold <= MAX_RIDE_HOLD):
        raise ValueError(f"hold must be a number of seconds above 0, at most {MAX_RIDE_HOLD:g}")
    values: dict[str, float] = {}
    for key, value in body.items():
        if key == "hold":
            continue
        if key not in RIDE_TOPICS:
            raise ValueError(f"unknown key {str(key)[:20]!r} (known: {', '.join(RIDE_TOPICS)}, "
                             "hold)")
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not math.isfinite(value) or not 0 <= value <= 10_000):
            raise ValueError(f"{key}: not a number from 0 to 10000")
        values[key] = float(value)
    if not values:
        raise ValueError(f"no value (give any of {', '.join(RIDE_TOPICS)})")
    return values, float(hold)


def _num(x: float) -> str:
    """A number as a microcontroller would print it: fixed point, no trailing zeros."""
    text = f"{x:.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


# --------------------------------------------------------------------------- the plan


@dataclass
class _PulseTrain:
    """A reed switch or hall sensor: the pin pulses ``pulses_per_revolution`` times a turn."""

    topic: str
    pin: Any
    per_rev: int
    circumference: float
    pull_up: bool
    active: bool = False
    next_edge: float = math.inf

    def rate(self, speed: float, cadence: float) -> float:
        """Edges per second (each pulse is two) at this speed (m/s) and cadence (RPM)."""
        revs = cadence / 60.0 if self.topic == "cadence" else speed / self.circumference
        return 2.0 * revs * self.per_rev


@dataclass(frozen=True)
class _Button:
    name: str
    pin: Any
    pull_up: bool


@dataclass(frozen=True)
class _PinOutput:
    """A GPIO actuator whose pin the model reads back."""

    topic: str
    kind: str
    settings: Mapping[str, Any]

    def value(self, pin: Any) -> float | None:
        """The topic value the pin's state stands for; None while it is not driven."""
        if pin.function != "output":
            return None
        spec, s = TOPICS[self.topic], self.settings
        state = float(pin.state)
        if self.kind == "gpio_relay":
            on = bool(state) == s["active_high"]
            return float(s["max"] if on else s["min"])
        if self.kind == "gpio_pwm":
            duty = state if s["active_high"] else 1.0 - state
            return spec.low + duty * (spec.high - spec.low)
        if self.kind == "gpio_servo":
            frequency = pin.frequency
            if not frequency or state <= 0:
                return None  # no pulses yet: the lever has not been moved
            low, high = float(s["min_pulse_width"]), float(s["max_pulse_width"])
            fraction = min(1.0, max(0.0, (state / frequency - low) / (high - low)))
            return float(spec.low + fraction * (spec.high - spec.low))
        return None


@dataclass
class _Feed:
    """What one sensor board prints: each served topic's field, scaled back to raw."""

    board: str
    format: str
    columns: tuple[str, ...]
    #: (topic, key, scale, offset) of each serial_sensor reading this board.
    fields: list[tuple[str, str, float, float]] = field(default_factory=list)
    period: float = 0.5

    def line(self, values: Mapping[str, float]) -> str | None:
        """One line in the board's format carrying ``values`` (by topic), or None."""
        raw: dict[str, str] = {}
        for topic, key, scale, offset in self.fields:
            if scale != 0:
                raw.setdefault(key, _num((values[topic] - offset) / scale))
        if not raw:
            return None
        fmt = self.format
        if fmt == "auto":
            # Keys decide: a bare number is "value"; a one-column csv line would read as one.
            if set(raw) == {"value"}:
                fmt = "number"
            else:
                fmt = "keyvalue" if all(_KEY.fullmatch(k) for k in raw) else "json"
        if fmt == "number":
            return raw.get("value")
        if fmt == "keyvalue":
            return ",".join(f"{k}={v}" for k, v in raw.items())
        if fmt == "json":
            return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in raw.items()) + "}"
        names = self.columns
        if not names:
            # Without names the columns are 0, 1, ...; other keys cannot be placed.
            indexes = [int(k) for k in raw if k.isdigit()]
            if not indexes:
                return None
            names = tuple(str(i) for i in range(max(indexes) + 1))
        return ",".join(raw.get(name, "0") for name in names)

    def problems(self) -> list[str]:
        """Why some fields cannot be fed in this format (said once, at start)."""
        out = []
        for topic, key, scale, _ in self.fields:
            if scale == 0:
                out.append(f"{topic}: scale 0 cannot be reversed; nothing fed")
            elif self.format == "number" and key != "value":
                out.append(f'{topic}: format "number" only carries the field "value", not {key!r}')
            elif self.format == "csv" and self.columns and key not in self.columns:
                out.append(f"{topic}: field {key!r} is none of the columns {list(self.columns)}")
            elif self.format == "csv" and not self.columns and not key.isdigit():
                out.append(f"{topic}: csv without columns has fields 0, 1, ..., not {key!r}")
        return out


@dataclass
class _Decoder:
    """Recognises one serial actuator's command lines and answers them."""

    topic: str
    pattern: re.Pattern[str]
    ack: re.Pattern[str] | None
    answer: int | None = None  # index into _ANSWERS that satisfied the ack last time
    warned: bool = False


#: Replies tried, in order, until one matches a driver's ack (formatted with the line
#: received, the value as sent, the topic, and the topic's initial in capitals).
_ANSWERS = (
    "OK {line}", "ok {line}", "{line}", "OK", "ok", "ACK", "OK {value}", "ok {value}",
    "OK {topic}={value}", "ok {topic}={value}", "{topic}={value}", "OK {topic} {value}",
    "ok {topic} {value}", "{topic} {value}", "OK {initial}{value}", "{initial}{value}",
    "OK:{value}", "ACK {value}", "ACK {line}", "{line} OK", "{line} ok", "DONE", "done",
    "OK {TOPIC}={value}", "{TOPIC}={value}", "OK {TOPIC} {value}",
)


def _template_pattern(template: str, topic: str) -> re.Pattern[str]:
    """A regex matching the line a SerialActuator sends from ``template`` (line end stripped)."""
    parts: list[str] = []
    value_seen = False
    for literal, name, spec, _conversion in string.Formatter().parse(template.strip("\r\n")):
        parts.append(re.escape(literal))
        if name is None:
            continue
        if name.split(".")[0].split("[")[0] == "value":
            parts.append(f"(?P<value>{_NUMBER})" if not value_seen else _NUMBER)
            value_seen = True
        elif name == "topic":
            parts.append(re.escape(format(topic, spec or "")))
        else:
            parts.append(".*?")
    return re.compile("".join(parts))


# --------------------------------------------------------------------------- the bike


class VirtualBike:
    """Virtual hardware for one config: mock pins, fake serial boards and a rider.

    Use as a context manager; :attr:`hardware` is what the service is given.
    """

    def __init__(self, config: Config, seed: int | None = None,
                 serial_ports: str | None = None) -> None:
        """``serial_ports``: "pty" or "inprocess"; None decides by :func:`serial_kind`."""
        self.config = config
        self.serial_ports = serial_ports or serial_kind()
        if self.serial_ports not in ("pty", "inprocess"):
            raise ValueError(f"serial_ports must be pty or inprocess, not {serial_ports!r}")
        #: The rider's seed; drawn at random (and logged) when none is given.
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
        self.rider = Rider(self.seed)
        self.factory = MockFactory(pin_class=MockPWMPin)
        self.hardware = Hardware(pin_factory=self.factory, open_serial=self._open_serial,
                                 device_identity=self._device_identity)
        self.directory: Path | None = None
        #: The fake board of each [serial.NAME] table, while running.
        self.boards: dict[str, FakeBoard] = {}
        self._by_url: dict[str, FakeBoard] = {}
        # The rider is shared by the rider thread, the feeders and the boards' readers.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._presses: queue.SimpleQueue[tuple[_Button, float]] = queue.SimpleQueue()
        self._outputs_seen: dict[str, float] = {}
        self._bad_pins: set[str] = set()
        self._hand: _Hand | None = None
        # A replayed ride: topic -> (value, monotonic time until which it holds).
        self._ride: dict[str, tuple[float, float]] = {}
        self._plan(config)

    def _plan(self, config: Config) -> None:
        """Sort the configured drivers into what the virtual world must drive or read."""
        self.pulses: list[_PulseTrain] = []
        self.buttons: dict[str, _Button] = {}
        self.outputs: list[_PinOutput] = []
        self.feeds: dict[str, _Feed] = {}
        self.decoders: dict[str, list[_Decoder]] = {}
        for d in config.drivers:
            o = d.options
            if d.kind == "gpio_pulse":
                self.pulses.append(_PulseTrain(d.topic, o["pin"], o["pulses_per_revolution"],
                                               o["circumference"], o["pull_up"]))
            elif d.kind == "gpio_buttons":
                for name, pin in o["pins"].items():
                    self.buttons[name] = _Button(name, pin, o["pull_up"])
            elif d.kind in ("gpio_pwm", "gpio_relay", "gpio_servo"):
                self.outputs.append(_PinOutput(d.topic, d.kind, o))
            elif d.kind == "serial_sensor":
                board = config.serial.get(o["port"], {})
                feed = self.feeds.setdefault(o["port"], _Feed(
                    o["port"], board.get("format", "auto"),
                    tuple(c.strip().lower() for c in board.get("columns", []))))
                feed.fields.append((d.topic, o["field"].strip().lower(), o["scale"], o["offset"]))
                # Twice per report interval, as a real board printing every 500 ms would.
                feed.period = min(feed.period, max(0.05, o["interval"] / 2))
            elif d.kind == "serial_actuator":
                ack = re.compile(o["ack"]) if o["ack"] else None
                self.decoders.setdefault(o["port"], []).append(
                    _Decoder(d.topic, _template_pattern(o["template"], d.topic), ack))
            else:
                log.warning("%s: the simulator does not know %s drivers; left alone",
                            d.topic, d.kind)
        for feed in self.feeds.values():
            for problem in feed.problems():
                log.warning("serial board %s: %s", feed.board, problem)

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> VirtualBike:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        """Plug the fake boards in and start the rider, the feeders and the hand."""
        # Every pin made now, on this thread: MockFactory.pin() creates a pin on first use
        # without a lock, and the rider thread racing the daemon's hardware thread there
        # could leave each holding its own object for one pin (pulses nobody hears).
        specs = ([t.pin for t in self.pulses] + [b.pin for b in self.buttons.values()]
                 + [o.settings["pin"] for o in self.outputs])
        for spec in specs:
            try:
                pin = self.factory.pin(spec)
            except Exception as exc:  # the daemon's driver will say so too
                log.warning("virtual pin %r: %s", spec, exc)
                continue
            # A mock pin keeps every change it ever saw: bounded, a day-long demo stays small.
            pin.states = collections.deque(pin.states, maxlen=64)
        in_process = self.serial_ports == "inprocess"
        if not in_process:
            self.directory = Path(tempfile.mkdtemp(prefix="smartbike-sim-"))
        for name, settings in self.config.serial.items():
            link = re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "board"
            board = FakeBoard(self.directory, name=f"usb-Virtual_{link}-if00",
                              responder=self._responder(self.decoders.get(name, [])),
                              in_process=in_process)
            self.boards[name] = board
            if settings["url"] in self._by_url:
                log.warning("serial board %s: url %s is also another board's; both open the "
                            "first", name, settings["url"])
            self._by_url.setdefault(settings["url"], board)
            log.info("virtual serial board %s: %s is %s", name, settings["url"], board.url)
        self._spawn("rider", self._run)
        for name, feed in self.feeds.items():
            self._spawn(f"feed-{name}", functools.partial(self._feed, feed))
        self._hand = _Hand(self)
        self._hand.setup_mqtt_client()
        self._hand.subscribe(press_topic(self.config.bike_id))
        self._hand.subscribe(ride_topic(self.config.bike_id))
        self._hand.loop_start()
        log.info("virtual rider (seed %d) on %d pulse pin(s), %d button(s), %d board(s); "
                 "press a button: publish its name to %s", self.seed, len(self.pulses),
                 len(self.buttons), len(self.boards), press_topic(self.config.bike_id))

    def stop(self) -> None:
        """Stop every thread, unplug the boards, remove their directory; safe to call twice."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2.0)
        stuck = {t.name for t in self._threads if t.is_alive()}
        self._threads.clear()
        hand, self._hand = self._hand, None
        if hand is not None and hand.client is not None:
            hand.disconnect()
            hand.loop_stop()
        for name, board in self.boards.items():
            if f"feed-{name}" in stuck:
                # Its feeder is blocked writing to a board nobody reads; closing would wait
                # for it forever. The process is ending: leave the pty to the kernel.
                log.warning("virtual serial board %s: feeder stuck; not closed", name)
                continue
            board.close()
        self.boards.clear()
        self._by_url.clear()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=f"sim-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()

    # -- what the daemon opens --------------------------------------------------------------

    def _open_serial(self, url: str, **kwargs: Any) -> serial.SerialBase:
        """Open the fake board standing in for ``url`` (a ``[serial.NAME]`` table's)."""
        board = self._by_url.get(url)
        if board is None:
            raise serial.SerialException(f"no virtual board for {url} (added after the start?)")
        return serial.serial_for_url(board.url, **kwargs)

    def _device_identity(self, url: str) -> Hashable | None:
        """What the fake board standing in for ``url`` looks like (None: unplugged)."""
        board = self._by_url.get(url)
        if board is None:
            return None
        if board.in_process:
            # Each plug-in is a new cable: its identity, so a replug is noticed at once.
            return (board.url, board.plugs) if board.plugged else None
        return device_identity(board.url)

    # -- the world, for tests and the hand --------------------------------------------------

    def press(self, button: str, hold: float = DEFAULT_HOLD) -> None:
        """Press ``button`` (a configured name, any case) and release it ``hold`` s later.

        Raises KeyError, naming the buttons there are, for an unknown name.
        """
        found = {name.upper(): b for name, b in self.buttons.items()}.get(button.strip().upper())
        if found is None:
            names = ", ".join(self.buttons) or "none configured"
            raise KeyError(f"no button {button!r} (buttons: {names})")
        self._presses.put((found, max(0.0, min(hold, 10.0))))

    def ride(self, values: Mapping[str, float], hold: float) -> None:
        """Show ``values`` (by sensor topic) on the sensors for ``hold`` seconds (a replay)."""
        unknown = set(values) - set(RIDE_TOPICS)
        if unknown:
            raise ValueError(f"not a sensor the ride sets: {sorted(unknown)}")
        until = time.monotonic() + hold
        with self._lock:
            for topic, value in values.items():
                self._ride[topic] = (float(value), until)
                if topic == "speed":
                    self.rider.speed = float(value)  # the model goes on from there after

    def _sensed(self, now: float) -> dict[str, float]:
        """What the sensors show: the model's values, or a replayed ride's (caller locks)."""
        s = self.rider.state()
        values = {"power": s.power, "cadence": s.cadence, "speed": s.speed,
                  "heartrate": s.heartrate}
        for topic, (value, until) in list(self._ride.items()):
            if now >= until:
                del self._ride[topic]
            else:
                values[topic] = value
        return values

    def world(self) -> dict[str, Any]:
        """The rider's values and every output pin's state, as published on the state topic."""
        with self._lock:
            s = self.rider.state()
            sensed = self._sensed(time.monotonic())
            replayed = sorted(self._ride)
        body: dict[str, Any] = {
            "time": round(s.time, 3), "seed": self.seed, **sensed,
            "incline": s.incline, "resistance": s.resistance, "fan": s.fan,
            "buttons": list(self.buttons), "replayed": replayed,
        }
        pins: dict[str, Any] = {}
        for out in self.outputs:
            try:
                pin = self.factory.pin(out.settings["pin"])
                pins[out.topic] = {"pin": str(out.settings["pin"]), "function": pin.function,
                                   "state": float(pin.state), "frequency": pin.frequency}
            except Exception as exc:  # a misconfigured pin: show why, keep publishing
                pins[out.topic] = {"pin": str(out.settings["pin"]), "error": str(exc)}
        body["outputs"] = pins
        return body

    # -- the rider thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:
            log.exception("virtual rider stopped")

    def _loop(self) -> None:
        start = time.monotonic()
        simulated = 0.0
        releases: list[tuple[float, _Button]] = []
        next_state = start + STATE_PERIOD
        while not self._stop.is_set():
            now = time.monotonic()
            behind = now - start - simulated
            if behind > MAX_CATCH_UP:
                start += behind - TICK  # skip the stall rather than replay it
            with self._lock:
                self._read_outputs()
                while simulated + TICK <= now - start:
                    self.rider.step(TICK)
                    simulated += TICK
                sensed = self._sensed(now)
                if "speed" in self._ride:
                    self.rider.speed = sensed["speed"]  # a replayed speed is the wheel's
                speed, cadence = sensed["speed"], sensed["cadence"]
            while True:
                try:
                    button, hold = self._presses.get_nowait()
                except queue.Empty:
                    break
                log.info("virtual hand: pressing %s", button.name)
                self._drive(button.pin, high=not button.pull_up)
                releases.append((now + hold, button))
            for due, button in [r for r in releases if r[0] <= now]:
                releases.remove((due, button))
                self._drive(button.pin, high=button.pull_up)
            for train in self.pulses:
                self._pulse(train, now, train.rate(speed, cadence))
            if now >= next_state:
                next_state = max(next_state + STATE_PERIOD, now)
                self._publish_state()
            wake = min([start + simulated + TICK, next_state]
                       + [t.next_edge for t in self.pulses] + [r[0] for r in releases])
            self._stop.wait(max(0.0, wake - time.monotonic()))

    def _pulse(self, train: _PulseTrain, now: float, rate: float) -> None:
        """Toggle the train's pin when its next edge is due; schedule the one after."""
        if rate <= 0:
            train.next_edge = math.inf
            return
        half = 1.0 / rate
        if train.next_edge == math.inf:
            train.next_edge = now + half  # the wheel starts turning
            return
        if now < train.next_edge:
            return
        train.active = not train.active
        # Active means the magnet closes the switch: low with a pull-up, high without.
        self._drive(train.pin, high=train.active != train.pull_up)
        # Keep the cadence from the planned edge, not the late wake-up, unless far behind.
        base = train.next_edge if now - train.next_edge < half else now
        train.next_edge = base + half

    def _drive(self, spec: Any, high: bool) -> None:
        """Drive an input pin high or low; the driver's callbacks run here, as on a Pi."""
        try:
            pin = self.factory.pin(spec)
            if high:
                pin.drive_high()
            else:
                pin.drive_low()
        except TypeError:
            pass  # a reload swapped the pin's callback under us: the next edge is fine
        except Exception as exc:
            if str(spec) not in self._bad_pins:
                self._bad_pins.add(str(spec))
                log.warning("virtual pin %s cannot be driven (%s: %s); is it an output too?",
                            spec, type(exc).__name__, exc)

    def _read_outputs(self) -> None:
        """Let PWM, servo and relay outputs act on the model (caller holds the lock)."""
        for out in self.outputs:
            try:
                value = out.value(self.factory.pin(out.settings["pin"]))
            except Exception:
                value = None
            if value is None:
                continue
            if self._outputs_seen.get(out.topic) != value:
                self._outputs_seen[out.topic] = value
                log.info("virtual %s: pin %s now means %s %g", out.topic, out.settings["pin"],
                         out.topic, value)
            self._apply(out.topic, value)

    def _apply(self, topic: str, value: float) -> None:
        """An actuator moved: tell the model (caller holds the lock)."""
        if topic == "incline":
            self.rider.set_incline(value)
        elif topic == "resistance":
            self.rider.set_resistance(value)
        elif topic == "fan":
            self.rider.set_fan(value)

    def _publish_state(self) -> None:
        hand = self._hand
        if hand is None or not hand.is_connected():
            return
        try:
            # QoS 0: a state that missed its moment is worthless later.
            hand.publish(state_topic(self.config.bike_id), self.world(), qos=0)
        except Exception:
            log.exception("virtual world: publishing the state failed")

    # -- serial boards ----------------------------------------------------------------------

    def _feed(self, feed: _Feed) -> None:
        """Print the model's values on a sensor board, ``feed.period`` apart."""
        board = self.boards[feed.board]
        next_line = time.monotonic()
        while not self._stop.wait(max(0.0, next_line - time.monotonic())):
            next_line += feed.period
            with self._lock:
                s = self._sensed(time.monotonic())
            # At the resolution real sensors print: whole BPM and watts.
            values = {"power": round(s["power"]), "cadence": round(s["cadence"], 1),
                      "speed": round(s["speed"], 2), "heartrate": round(s["heartrate"])}
            line = feed.line(values)
            if line is None:
                continue
            try:
                # May block while nobody reads the port: that blocks only this feeder.
                board.send_line(line)
            except (OSError, RuntimeError):
                return  # unplugged at shutdown

    def _responder(self, decoders: list[_Decoder]) -> Callable[[str], str | None]:
        def respond(line: str) -> str | None:
            for decoder in decoders:
                match = decoder.pattern.fullmatch(line.strip())
                if match is None:
                    continue
                text = match.group("value") if "value" in decoder.pattern.groupindex else ""
                try:
                    value = float(text)
                except ValueError:
                    continue
                with self._lock:
                    self._apply(decoder.topic, value)
                log.info("virtual %s motor: %r -> %s %g", decoder.topic, line, decoder.topic,
                         value)
                return self._answer(decoder, line.strip(), text, value)
            log.warning("virtual board: command %r matches no configured template", line)
            return None
        return respond

    @staticmethod
    def _answer(decoder: _Decoder, line: str, text: str, value: float) -> str | None:
        """A reply the driver's ``ack`` accepts as reaching ``value``; None if none can be."""
        ack = decoder.ack
        if ack is None:
            return None
        words = {"line": line, "value": text, "topic": decoder.topic,
                 "TOPIC": decoder.topic.upper(), "initial": decoder.topic[:1].upper()}
        order = list(range(len(_ANSWERS)))
        if decoder.answer is not None:
            order.insert(0, decoder.answer)
        for i in order:
            reply = _ANSWERS[i].format(**words)
            match = ack.search(reply)
            if match is None:
                continue
            if "value" in ack.groupindex:
                reached = match.group("value")
                try:
                    if reached is None or not math.isclose(float(reached), value,
                                                            abs_tol=1e-9):
                        continue
                except ValueError:
                    continue
            decoder.answer = i
            return reply
        if not decoder.warned:
            decoder.warned = True
            log.warning("virtual %s motor: no reply of mine matches ack %r; its commands will "
                        "time out", decoder.topic, ack.pattern)
        return None


class _Hand(MQTTClient):
    """The virtual rider's hand: its own MQTT connection, not the daemon's."""

    def __init__(self, bike: VirtualBike) -> None:
        b = bike.config.broker
        super().__init__(b.host, b.username, b.password, b.port, client_id="",
                         keepalive=b.keepalive, tls=b.tls, ca_file=b.ca_file,
                         certfile=b.certfile, keyfile=b.keyfile, reconnect_max=b.reconnect_max)
        self.bike = bike

    def on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                   properties: Any) -> None:
        log.info("virtual hand: connected (its own connection, not the daemon's)")

    def on_message(self, client: Any, userdata: Any, msg: MQTTMessage) -> None:
        super().on_message(client, userdata, msg)
        if msg.retain:
            return  # a stale press or ride must not fire at start
        if msg.topic == ride_topic(self.bike.config.bike_id):
            try:
                values, hold = parse_ride(msg.payload)
                self.bike.ride(values, hold)
                body: dict[str, Any] = {"ok": True, "values": values, "hold": hold}
            except ValueError as exc:
                body = {"ok": False, "error": str(exc)}
                log.warning("virtual world: ride message refused: %s", exc)
            self._answer(msg, body)
            return
        try:
            text = msg.payload.decode("utf-8").strip()
            hold = DEFAULT_HOLD
            if text.startswith("{"):
                request = json.loads(text)
                text = str(request.get("button", ""))
                hold = float(request.get("hold", DEFAULT_HOLD))
            self.bike.press(text, hold)
            body = {"ok": True, "button": text.upper()}
        except KeyError as exc:
            body = {"ok": False, "error": exc.args[0]}
        except (ValueError, TypeError, AttributeError) as exc:
            body = {"ok": False, "error": f"not a press request: {exc}"}
        if not body["ok"]:
            log.warning("virtual hand: %s", body["error"])
        self._answer(msg, body)

    def _answer(self, msg: MQTTMessage, body: dict[str, Any]) -> None:
        """Answer a request that carries an MQTT v5 ResponseTopic; others get nothing."""
        props = getattr(msg, "properties", None)
        reply_to = getattr(props, "ResponseTopic", None)
        if reply_to:
            answer = Properties(PacketTypes.PUBLISH)
            correlation = getattr(props, "CorrelationData", None)
            if correlation is not None:
                answer.CorrelationData = correlation
            self.publish(reply_to, body, properties=answer)
