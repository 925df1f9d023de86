"""The interface every driver shares, and the options it declares for the config file.

A driver is one piece of bike hardware serving one topic. Drivers never talk MQTT and
never decide anything: the bike's single ``hardware`` thread (:class:`smartbiked.bike.Bike`)
owns them, reads them, moves them and keeps their state. What a pin or a port says
reaches that thread as an event, the moment it is said: gpiozero calls back on its own
thread for an edge, and every :class:`Board` (a serial board) has an I/O thread of its
own that reads lines as they arrive and performs its actuators' writes and
acknowledgement waits, so a slow or silent board delays nothing but itself.

Subclasses **must**:

- set ``KIND`` (the ``driver = "..."`` name in the config file) and ``TOPICS``
  (the topic names the driver can serve);
- extend ``OPTIONS`` with the config keys they read (each an :class:`Option`);
- open their pins or ports in ``__init__`` through the :class:`Hardware` they are given,
  never through a global, so tests and the simulator can swap the hardware;
- guard state shared with callbacks: pin callbacks run on lgpio's thread, a board's
  callbacks on the board's thread (everything else runs on the hardware thread);
- implement :meth:`Sensor.read`, :meth:`EventSource.start` or :meth:`Actuator.apply`.

Subclasses **may** override :meth:`Driver.close` (release pins and ports),
:meth:`Driver.check_settings` (checks between keys), :meth:`Sensor.start` (push
readings as they arrive instead of waiting to be read), :meth:`Sensor.stale_reason`,
:meth:`Sensor.watch_revolutions` (count crank or wheel revolutions), and
:meth:`Actuator.apply_async` (move without blocking the hardware thread, e.g. on
a board's thread). A driver on a shared :class:`Board` sets ``self.board`` to it, so the
bike can tell which topics a lost board takes with it.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import serial

from smartbiked.errors import HardwareError
from smartbiked.topics import TOPICS, Limits

log = logging.getLogger("smartbiked.hardware")

T = TypeVar("T")


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


def device_identity(url: str) -> Hashable | None:
    """What the device a serial URL names looks like right now, to notice it come back.

    For a device path (``/dev/serial/by-id/...``, a symlink followed): its device,
    inode and change time, or None while the path does not exist. A plug-in makes a new
    node (or a udev chmod changes its ctime), so the identity changes the moment the board
    is back. Network URLs (``socket://``) have no such thing: the URL itself.
    """
    if "://" in url:
        return url
    try:
        st = os.stat(url)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_rdev, st.st_ctime_ns)


@dataclass
class Hardware:
    """Where drivers get their pins and ports: swapped wholesale by tests and the simulator.

    ``pin_factory`` is a gpiozero pin factory (None: gpiozero's default for this machine).
    ``open_serial`` opens a pyserial port by URL, with ``serial_for_url``'s arguments.
    ``device_identity`` tells a board whether (and which) device its URL names now.
    ``ports`` holds the shared serial boards, by the name of their ``[serial.NAME]`` table.
    ``clock`` is the monotonic clock drivers time edges, readings and reconnects with.
    """

    pin_factory: Any = None
    open_serial: Callable[..., serial.SerialBase] = serial.serial_for_url
    device_identity: Callable[[str], Hashable | None] = device_identity
    ports: dict[str, Any] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic


# --------------------------------------------------------------------------- boards

#: While a board is absent its thread looks for it this often (one stat() of the device
#: path, about a microsecond): a replugged board is back within 50 ms, and a board that
#: is present costs nothing, since its thread then sleeps on the port itself.
WATCH_INTERVAL = 0.05
#: Ports without a file descriptor to wait on (loop://, rfc2217://) are read this often.
NO_FD_INTERVAL = 0.01
#: How long close() waits for the board's thread (a write may block up to its timeout).
JOIN_TIMEOUT = 5.0

Subscriber = tuple[Callable[[dict[str, float]], None] | None,
                   Callable[[bool, str | None], None] | None]


_held_wakes = threading.local()


def hold_wakes() -> None:
    """From now on, a job this thread hands to a board wakes that board's thread only at
    the next :func:`release_wakes`.

    For a thread that hands jobs over and then waits (the bike's hardware thread): a
    board thread woken at once would find the GIL held and wait for it, a context
    switch more per job. Waits on a board (:meth:`Board.call`, :meth:`Board.close`)
    are not held back.
    """
    _held_wakes.boards = set()


def release_wakes() -> None:
    """Wake every board this thread handed a job to since the last call."""
    boards: set[Board] | None = getattr(_held_wakes, "boards", None)
    while boards:
        boards.pop()._wake()


class Board:
    """A device several drivers share, with an I/O thread of its own (a serial board).

    Like gpiozero's callback thread for pins, the board's thread waits on the device
    (never on a timer) and delivers what it says the moment it says it: each message to
    every subscriber's ``on_values``, each connect and loss to ``on_connection`` (once
    after the first attempt to open, then on every change). It also runs the jobs drivers
    hand to :meth:`run` (an actuator's write and acknowledgement wait) one at a time, in
    order, so a slow or silent device delays only its own jobs. While the device is
    absent, the thread looks for it every :data:`WATCH_INTERVAL` seconds.

    Without :meth:`start` (tests, tools) no thread runs: :meth:`run` and :meth:`call` run
    a job at once on the caller's thread, and the subclass reads on demand.

    Subclasses **must** implement :attr:`connected`, :meth:`_attempt` (open the device if
    it is absent and may be tried now; never raise; call :meth:`_announce` on success),
    :meth:`_receive` (read what is waiting without blocking, hand each message to
    :meth:`_deliver`; on failure drop the device and :meth:`_announce` the loss),
    :meth:`_fileno` (what to wait on: a file descriptor, or None) and :meth:`_release`
    (close the device). They **may** override :meth:`_idle_timeout` (when the thread must
    wake without input) and :meth:`_housekeeping` (what it then does). ``why_down`` says
    why the device is not connected.
    """

    def __init__(self, name: str, hardware: Hardware) -> None:
        self.name = name
        self.hardware = hardware
        self.why_down: str | None = "not opened yet"
        self._closed = False
        self._lock = threading.Lock()
        self._subscribers: list[Subscriber] = []
        self._announced: bool | None = None
        self._jobs: collections.deque[Callable[[], None]] = collections.deque()
        self._busy = False  # the thread is running a job
        self._thread: threading.Thread | None = None
        self._ended = False  # the thread is gone (closed, or crashed): jobs run at once
        # Writing a byte here wakes the thread from its wait on the device: a job, a close.
        # A socket pair, not a pipe: Windows' select() takes sockets only.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._pipe_closed = False

    # -- for the owner and the drivers

    @property
    def connected(self) -> bool:
        """True while the device is open."""
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def subscribe(self, on_values: Callable[[dict[str, float]], None] | None = None,
                  on_connection: Callable[[bool, str | None], None] | None = None) -> (
                      Callable[[], None]):
        """Be called with each message and each connection change; returns an unsubscribe.

        Callbacks run on the board's thread: they must be quick (hand over, never wait).
        """
        entry: Subscriber = (on_values, on_connection)
        with self._lock:
            self._subscribers = [*self._subscribers, entry]

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = [s for s in self._subscribers if s is not entry]
        return unsubscribe

    def start(self) -> None:
        """Start the board's thread (once); it opens the device if it is not open yet."""
        if self._thread is not None or self._closed:
            return
        self._thread = threading.Thread(target=self._loop, name=f"board-{self.name}",
                                        daemon=True)
        self._thread.start()

    @property
    def on_thread(self) -> bool:
        """True when called from the board's own thread."""
        return threading.current_thread() is self._thread

    def run(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the board's thread, after the jobs before it; at once without one.

        On a closed board the job runs at once on the caller's thread, so whatever waits
        for it hears back (its device calls fail as soon as the board is closed).
        """
        with self._lock:
            queued = self._takes_jobs()
            if queued:
                self._jobs.append(job)
        if not queued:
            self._run_job(job)
            return
        self._wake_soon()

    def _wake_soon(self) -> None:
        """Wake the thread for a job just queued: now, or at the caller's release_wakes()."""
        held = getattr(_held_wakes, "boards", None)
        if held is not None:
            held.add(self)  # the caller wakes it with release_wakes()
        else:
            self._wake()

    def _takes_jobs(self) -> bool:
        """With the lock held: True when a job must be queued for the board's thread."""
        return self._thread is not None and not self._ended and not self.on_thread

    def _idle(self) -> bool:
        """With the lock held: True when the board's thread has no job and runs none.

        A caller that sees this (and keeps the lock) may use the device briefly itself,
        without waiting on it, and still comes after every job handed over before.
        """
        return not self._busy and not self._jobs and not self._closed

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` as a job and wait for its result (or its exception), from any thread."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def job() -> None:
            try:
                box["result"] = fn()
            except BaseException as exc:
                box["error"] = exc
            finally:
                done.set()

        self.run(job)
        release_wakes()  # this thread waits for the job: the board's thread must run it
        done.wait()  # every job ends: device waits are bounded and close() fails the rest
        if "error" in box:
            raise box["error"]
        return box["result"]  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop the thread, fail the jobs it did not take, close the device; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._thread is None:
                self._ended = True
        self._wake()
        thread = self._thread
        stuck = False
        if thread is not None and not self.on_thread:
            thread.join(JOIN_TIMEOUT)
            stuck = thread.is_alive()
            if stuck:
                log.error("board %s: its thread did not stop within %g s", self.name,
                          JOIN_TIMEOUT)
        with self._lock:
            self._ended = True
        while self._jobs:
            self._run_job(self._jobs.popleft())
        self._release()
        self.why_down = "closed"
        if not stuck:  # a stuck thread may still wait on the pipe: leave it to the process
            self._pipe_closed = True
            self._wake_r.close()
            self._wake_w.close()

    def wait_input(self, timeout: float | None) -> bool:
        """Block until the device may have input, a job or close() arrives, or ``timeout``.

        Returns True when input may be waiting. While disconnected it only waits (for
        a job, a close or the timeout) and returns False.
        """
        if self._closed:
            return False
        fd = self._fileno()
        wake = self._wake_r.fileno()
        watched = [wake] if fd is None else [wake, fd]
        if fd is None and self.connected:
            timeout = NO_FD_INTERVAL if timeout is None else min(timeout, NO_FD_INTERVAL)
        ready, _, _ = select.select(watched, [], [], None if timeout is None
                                    else max(timeout, 0.0))
        if wake in ready:
            try:
                self._wake_r.recv(4096)
            except BlockingIOError:
                pass
        if fd is None:
            return self.connected
        return fd in ready

    # -- for subclasses

    def _attempt(self) -> None:
        raise NotImplementedError

    def _receive(self) -> None:
        raise NotImplementedError

    def _fileno(self) -> int | None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def _idle_timeout(self) -> float | None:
        """Seconds the thread may sleep without input (None: until input comes)."""
        return None

    def _housekeeping(self) -> None:
        """Run after each wait (e.g. flush a rate-limited warning); default: nothing."""

    def _deliver(self, values: dict[str, float]) -> None:
        """Hand one message to every subscriber; a failing callback is logged, not raised."""
        for on_values, _ in self._subscribers:
            if on_values is not None:
                try:
                    on_values(values)
                except Exception:
                    log.exception("board %s: a subscriber failed", self.name)

    def _announce(self, connected: bool, why: str | None = None) -> None:
        """Tell subscribers the device came or went (only when that changed)."""
        self.why_down = None if connected else why
        if connected == self._announced:
            return
        self._announced = connected
        for _, on_connection in self._subscribers:
            if on_connection is not None:
                try:
                    on_connection(connected, self.why_down)
                except Exception:
                    log.exception("board %s: a subscriber failed", self.name)

    # -- the thread

    def _wake(self) -> None:
        if self._pipe_closed:
            return  # its number may belong to another file by now
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # already woken: the buffer is full

    def _run_job(self, job: Callable[[], None]) -> None:
        try:
            job()
        except Exception:
            log.exception("board %s: a job failed", self.name)

    def _loop(self) -> None:
        try:
            self._attempt()
            if self._announced is None:  # the first word, whatever it is
                self._announce(self.connected, self.why_down)
            while not self._closed:
                with self._lock:
                    job = self._jobs.popleft() if self._jobs else None
                    self._busy = job is not None
                if job is not None:
                    try:
                        self._run_job(job)
                    finally:
                        self._busy = False
                    continue
                if not self.connected:
                    self._attempt()
                    if not self.connected:
                        self.wait_input(WATCH_INTERVAL)
                    continue
                if self.wait_input(self._idle_timeout()):
                    self._receive()
                self._housekeeping()
        except Exception:
            log.exception("board %s: I/O thread failed", self.name)
            self._announce(False, "its I/O thread failed (see the log)")
        finally:
            with self._lock:
                self._ended = True
            while self._jobs:  # taken by nobody else now: whoever waits must hear back
                self._run_job(self._jobs.popleft())


# --------------------------------------------------------------------------- drivers


class Driver:
    """Base of all drivers; see the module docstring for what subclasses must and may do."""

    KIND: ClassVar[str] = ""
    TOPICS: ClassVar[frozenset[str]] = frozenset()
    OPTIONS: ClassVar[tuple[Option, ...]] = ()
    #: The shared board this driver talks through, if any (set by drivers that use one).
    board: Board | None = None

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

        May be overridden (call the base class's too); called by the config loader, so a
        bad combination is a config error, not a driver that fails to start.
        """
        return []

    def retune(self, settings: Mapping[str, Any]) -> None:
        """Take new settings that differ only in the base class's keys (a reload).

        Those keys (a sensor's interval, an actuator's range) are the bike's business,
        not the hardware's, so the driver keeps running. Subclasses extend it when they
        derive state from such keys.
        """
        self.settings = settings

    def close(self) -> None:
        """Release pins and ports; must be safe to call twice. Default: nothing."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.topic}>"


def _interval_problem(value: Any) -> str | None:
    return None if value == 0 or value >= 0.05 else (
        "must be 0 (every reading, as it arrives) or at least 0.05")


class Sensor(Driver):
    """A value the bike reports. Must implement :meth:`read`.

    The bike reads it every ``interval`` seconds (a heartbeat) and, with a dead band,
    also reports at once a reading that moved past it. A sensor that **pushes** readings
    (``PUSHES = True``, :meth:`start`) is heard the moment each arrives; only those may
    have ``interval = 0``: every reading reported, as it arrives.
    """

    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option("interval", (float,), 1.0,
               "seconds between reports; 0: report every reading as it arrives "
               "(serial sensors)", _interval_problem),
        Option("deadband", (float,), 0.0,
               "also report at once when the value moves more than this; 0: off", at_least(0)),
        Option("max_rate", (float,), 5.0, "at most this many change reports per second",
               at_least(0.01)),
    )
    #: True when :meth:`start` pushes each reading as it arrives.
    PUSHES: ClassVar[bool] = False
    #: Seconds without a fresh reading before the sensor is stale; None: never stale.
    stale_after: float | None = None

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> list[tuple[str, str]]:
        """``interval = 0`` only for sensors that push their readings."""
        problems = super().check_settings(settings)
        if settings.get("interval") == 0 and not cls.PUSHES:
            problems.append(("interval", f"0 (every reading) needs a sensor that pushes its "
                             f"readings, such as serial_sensor; {cls.KIND} is read on its "
                             "interval: use at least 0.05"))
        return problems

    def read(self) -> float | None:
        """The current value, or None when there is no fresh one."""
        raise NotImplementedError

    def start(self, emit: Callable[[float], None]) -> None:
        """May push readings: call ``emit(value)`` from any thread as each one arrives.

        Default: nothing (the sensor is read on its interval).
        """

    def watch_revolutions(self, callback: Callable[[int, float], None]) -> bool:
        """May count revolutions: call ``callback(count, at)`` from any thread for whole
        crank or wheel revolutions, ``at`` on the hardware clock. True if it will.

        Default: False (Bluetooth Cycling Power then leaves revolution data out rather
        than make it up from the cadence).
        """
        return False

    def stale_reason(self) -> str:
        """Why there is no fresh reading (for the health report); may be overridden."""
        return f"no fresh reading for {self.stale_after or 0:g} s"


class EventSource(Driver):
    """Pushes events as they happen (buttons). Must implement :meth:`start`."""

    def start(self, emit: Callable[[dict[str, Any]], None]) -> None:
        """Begin calling ``emit(payload)`` on each event; emit is safe from any thread."""
        raise NotImplementedError


class Actuator(Driver):
    """Something the apps move. Must implement :meth:`apply`; may :meth:`apply_async`.

    ``min``, ``max``, ``step`` and ``safe`` default to the topic's documented values
    (see :mod:`smartbiked.topics`); the config may narrow the range, never widen it.
    The config loader fills them in, so a driver finds them all in ``settings``.
    """

    OPTIONS: ClassVar[tuple[Option, ...]] = (
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

    def retune(self, settings: Mapping[str, Any]) -> None:
        """New range, safe value or min_interval, without touching the hardware."""
        super().retune(settings)
        self.limits = Limits(settings["min"], settings["max"], settings["step"])
        self.safe_value = None if settings["safe"] == "hold" else settings["safe"]

    def nearest(self, value: float) -> float:
        """The allowed value closest to ``value`` (itself when it is allowed)."""
        low, high, step = self.limits.low, self.limits.high, self.limits.step
        value = min(high, max(low, value))
        if step:
            steps = math.floor((value - low) / step + 0.5)
            value = low + steps * step
            if value > high + 1e-9:
                value -= step
        return value

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
        May block (a serial acknowledgement); the bike calls :meth:`apply_async`.
        """
        raise NotImplementedError

    def apply_async(self, value: float,
                    done: Callable[[float | None, str | None], None]) -> None:
        """Start moving to ``value``; call ``done(reached, None)`` or ``done(None, why)`` once.

        ``done`` may be called from any thread, before or after this returns. Default:
        :meth:`apply` at once, on the caller's thread (a GPIO output switches in
        microseconds). Drivers that wait for hardware override it to wait elsewhere.
        """
        try:
            reached = self.apply(value)
        except HardwareError as exc:
            done(None, str(exc))
            return
        except Exception as exc:  # a driver bug must not leave the bike waiting forever
            log.exception("%s: apply(%g) failed", self.topic, value)
            done(None, f"{type(exc).__name__}: {exc}")
            return
        done(reached, None)
