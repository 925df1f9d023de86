"""Serial boards (Arduino and the like) as sensors and actuators.

One physical board, configured by a ``[serial.NAME]`` table, is a :class:`SerialBoard`.
Several drivers may share it: a board printing ``hr=72,power=180`` feeds both the
heartrate and the power topic through two :class:`SerialSensor` drivers, and a motor
controller on the same port can take commands through a :class:`SerialActuator`.

Each board has its own I/O thread (see :class:`~smartbiked.hardware.base.Board`): it
sleeps on the port until bytes arrive, parses each line the moment it is complete and
hands the readings to the sensors; it also writes the actuators' commands and waits for
their acknowledgements (at most ``ack_timeout`` per attempt). A silent board therefore
delays its own commands and nothing else.

What a board must print, one reading per line (``\\n``, ``\\r\\n`` or ``\\r`` ends a line;
at most 256 bytes; keys are case-insensitive; numbers are plain decimals such as
``72``, ``-3.5`` or ``1.2e3``)::

    72                         format "number":   key "value"
    hr=72,power=180            format "keyvalue": "=" or ":" between key and value,
    hr:72; power:180              "," ";" or spaces between pairs
    {"hr": 72, "power": 180}   format "json":     an object; non-number members ignored
    72,180                     format "csv":      keys from ``columns``, else "0", "1", ...

Format "auto" (the default) accepts all four, trying json, keyvalue, number and csv in
that order. Lines that fit no format are counted in :attr:`SerialBoard.bad_lines` and
logged at most once every 10 seconds; they never stop the daemon.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import string
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import serial

from smartbiked.errors import HardwareError
from smartbiked.hardware.base import (
    REQUIRED,
    Actuator,
    Board,
    Hardware,
    Option,
    Sensor,
    at_least,
    regex,
)

log = logging.getLogger("smartbiked.serial")

#: Longer lines are noise (a wrong baud rate, a binary protocol): dropped and counted.
MAX_LINE_BYTES = 256

#: Bad-line warnings per board are at most this many seconds apart.
WARN_INTERVAL = 10.0

#: A sensor whose field the board has left out of this many good lines in a row (and
#: never sent) is logged once, with the fields the board does send.
MISSING_FIELD_LINES = 5

#: Per read, take at most this many chunks, so a board flooding the port cannot keep its
#: thread from its jobs; the rest is read right after.
_MAX_CHUNKS = 16
_CHUNK = 4096

#: pyserial URL schemes; "exclusive" means the port is a native tty that flock() can lock.
_SCHEMES = {"loop", "socket", "rfc2217", "spy", "hwgrep", "alt", "cp2110"}
_NATIVE_SCHEMES = {"", "spy", "hwgrep", "alt"}

FORMATS = ("auto", "number", "keyvalue", "json", "csv")

#: The port class whose descriptor send() may write to directly (None: there is none).
_NATIVE_PORT: Any = getattr(serial, "Serial", None) if os.name == "posix" else None

_NEVER: Any = object()  # a device never tried yet
_AGAIN: Any = object()  # a device lost: try it at once when it is there

_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_KEY = r"[A-Za-z_][A-Za-z0-9_.-]*"
_PAIR_RE = re.compile(rf"\s*({_KEY})\s*[=:]\s*({_NUMBER})\s*")
_PAIR_SEPARATOR_RE = re.compile(r"[,;\s]*")
_CSV_SPLIT_RE = re.compile(r"\s*[,;\t]\s*|\s+")


class Reading(NamedTuple):
    """One key's latest value and the ``hardware.clock`` time it arrived."""

    value: float
    time: float


# --------------------------------------------------------------------------- parsing


def _finite(text: str) -> float | None:
    if not _NUMBER_RE.fullmatch(text):
        return None
    number = float(text)
    # "1e999" fits the grammar but is inf: refuse it rather than publish it.
    return number if math.isfinite(number) else None


def _parse_number(text: str, columns: tuple[str, ...]) -> dict[str, float] | None:
    number = _finite(text)
    return None if number is None else {"value": number}


def _parse_keyvalue(text: str, columns: tuple[str, ...]) -> dict[str, float] | None:
    values: dict[str, float] = {}
    pos = 0
    while pos < len(text):
        sep = _PAIR_SEPARATOR_RE.match(text, pos)
        pos = sep.end() if sep else pos
        if pos >= len(text):
            break
        pair = _PAIR_RE.match(text, pos)
        if not pair:
            return None
        number = _finite(pair.group(2))
        if number is None:
            return None
        values[pair.group(1).lower()] = number
        pos = pair.end()
    return values or None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number")


def _parse_json(text: str, columns: tuple[str, ...]) -> dict[str, float] | None:
    if not text.startswith("{"):
        return None
    try:
        document = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    values: dict[str, float] = {}
    for key, value in document.items():
        # A board may add an id or a status string; only numbers are readings,
        # and JSON true is not the number 1.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        try:
            number = float(value)
        except OverflowError:  # an integer of 310+ digits
            return None
        if not math.isfinite(number):
            return None
        values[key.strip().lower()] = number
    return values or None


def _parse_csv(text: str, columns: tuple[str, ...]) -> dict[str, float] | None:
    fields = _CSV_SPLIT_RE.split(text)
    if columns and len(fields) != len(columns):
        # A line with a field missing or extra would shift every value to the wrong key.
        return None
    names = columns or tuple(str(i) for i in range(len(fields)))
    values: dict[str, float] = {}
    for name, field_text in zip(names, fields, strict=True):
        number = _finite(field_text)
        if number is None:
            return None
        if name != "_":
            values[name] = number
    return values or None


_PARSERS: dict[str, Callable[[str, tuple[str, ...]], dict[str, float] | None]] = {
    "json": _parse_json,
    "keyvalue": _parse_keyvalue,
    "number": _parse_number,
    "csv": _parse_csv,
}


def parse_line(text: str, fmt: str = "auto", columns: tuple[str, ...] = ()) -> (
        dict[str, float] | None):
    """The readings in one line (key -> finite number), or None if it is unreadable.

    ``fmt`` is one of :data:`FORMATS`; ``columns`` names the csv columns (lower-case;
    a column named ``_`` is skipped). Never raises.
    """
    text = text.strip()
    if not text:
        return None
    names = ("json", "keyvalue", "number", "csv") if fmt == "auto" else (fmt,)
    for name in names:
        values = _PARSERS[name](text, columns)
        if values is not None:
            return values
    return None


# --------------------------------------------------------------------------- options


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"
    return check


def _check_url(url: Any) -> str | None:
    if not url.strip():
        return "must name a device, e.g. /dev/serial/by-id/usb-Arduino..."
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme and scheme not in _SCHEMES:
        return f"unknown URL scheme {scheme}:// (known: {', '.join(sorted(_SCHEMES))})"
    return None


def _check_columns(columns: Any) -> str | None:
    if not all(isinstance(c, str) and c.strip() for c in columns):
        return "must be a list of non-empty strings"
    names = [c.strip().lower() for c in columns if c.strip() != "_"]
    if len(set(names)) != len(names):
        return "must not name a column twice"
    return None


def _check_template(template: Any) -> str | None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        template.format(value=_Number(40.0), topic="resistance")
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
        return (f"is not a usable template ({type(exc).__name__}: {exc}); "
                "use {value} and {topic}, and {{ }} for literal braces")
    if not any(re.match(r"value\b", f) for f in fields):
        return "must contain {value}"
    return None


def _setting(settings: Mapping[str, Any], option: Option) -> Any:
    # The config loader fills every default in; this fallback only serves code
    # (the simulator, tests) that builds settings by hand.
    if option.name in settings or option.default is REQUIRED:
        return settings[option.name]
    return option.default


# --------------------------------------------------------------------------- the board


class SerialBoard(Board):
    """One serial board, shared by every driver whose ``port`` names it.

    The board prints readings one per line in one of the formats of the module
    docstring (9600 baud 8N1 unless ``baudrate`` says otherwise) and, when it drives
    motors, accepts one command per line (see :class:`SerialActuator`).

    Once started (:meth:`~Board.start`), its own thread reads each line as it arrives
    and hands its readings to the subscribed drivers, and performs its actuators'
    writes and acknowledgement waits (see :class:`~smartbiked.hardware.base.Board`).
    Without a thread (tests, tools) :meth:`poll` reads what is waiting.

    A board that is absent at start or unplugged later is no error: a device path is
    watched and the board reopened the moment it reappears; a board that is there but
    cannot be opened (busy, no permission) and a network URL are retried every
    ``reconnect_interval`` seconds. Native ports are opened exclusively, so a second
    program (or a forgotten ``screen`` session) cannot steal half the lines.

    The owner (the bike) creates boards before the drivers, puts them in
    ``hardware.ports[name]`` and closes them after the drivers; drivers never close
    a board they share.
    """

    OPTIONS: tuple[Option, ...] = (
        Option("url", (str,), REQUIRED,
               "device path (prefer /dev/serial/by-id/...), loop://, socket://host:port "
               "or rfc2217://host:port", _check_url),
        Option("baudrate", (int,), 9600, "bits per second", at_least(50)),
        Option("format", (str,), "auto",
               "line format: auto, number, keyvalue, json or csv", _one_of(FORMATS)),
        Option("columns", (list,), [], "csv column names, in order (\"_\" skips one)",
               _check_columns),
        Option("reconnect_interval", (float,), 2.0,
               "seconds between attempts to open a board that is there but cannot be "
               "opened, or a network URL (a device path is reopened as soon as it "
               "reappears)", at_least(0.1)),
    )

    def __init__(self, name: str, settings: Mapping[str, Any], hardware: Hardware,
                 open_now: bool = True) -> None:
        """``open_now=False`` leaves the first attempt to the board's thread."""
        super().__init__(name, hardware)
        opts = {o.name: _setting(settings, o) for o in self.OPTIONS}
        self.url: str = opts["url"]
        self.baudrate = int(opts["baudrate"])
        self.format: str = opts["format"]
        self.columns = tuple(c.strip().lower() for c in opts["columns"])
        self.reconnect_interval = float(opts["reconnect_interval"])
        #: Latest value of every key the board has printed, with its arrival time.
        self.latest: dict[str, Reading] = {}
        #: Lines parsed into readings, lines dropped as unreadable, and reopenings after
        #: a loss, since start.
        self.good_lines = 0
        self.bad_lines = 0
        self.reconnects = 0
        self._port: serial.SerialBase | None = None
        self._buffer = bytearray()
        self._discarding = False  # inside an oversized line: drop up to its end
        self._next_attempt = -math.inf
        self._seen: Hashable | None = _NEVER  # the device as of the last attempt to open it
        self._failing_logged = False
        self._was_connected = False
        self._unreported_bad = 0
        self._last_bad_text = ""
        self._last_warning = -math.inf
        self._ack_patterns: list[re.Pattern[str]] = []
        if open_now:
            self._attempt()

    # -- connection

    @property
    def connected(self) -> bool:
        """True while the port is open."""
        return self._port is not None

    def _open_kwargs(self) -> dict[str, Any]:
        scheme = self.url.split("://", 1)[0].lower() if "://" in self.url else ""
        kwargs: dict[str, Any] = {"baudrate": self.baudrate, "timeout": 0}
        if scheme in _NATIVE_SCHEMES:
            kwargs["exclusive"] = True  # flock(); other port types accept and ignore it
        if scheme != "rfc2217":
            # A board that stops reading must not hang its thread on a write for long;
            # pyserial's rfc2217 raises NotImplementedError for any write_timeout.
            kwargs["write_timeout"] = 1.0
        return kwargs

    def _attempt(self) -> None:
        """Open the port if it is absent and may be tried now; never raises.

        Tried at once when the device looks different from the last try (it just
        appeared), else every ``reconnect_interval``; never while a device path is absent.
        """
        if self._port is not None or self._closed:
            return
        now = self.hardware.clock()
        identity = self.hardware.device_identity(self.url)
        if identity is None:
            if self._seen is not _NEVER:  # the very first try says why, in the log
                self._seen = None  # gone: its return, whatever node it gets, is a change
                return
        elif identity == self._seen and now < self._next_attempt:
            return
        self._seen = identity
        self._next_attempt = now + self.reconnect_interval
        try:
            port = self.hardware.open_serial(self.url, **self._open_kwargs())
        except (serial.SerialException, OSError, ValueError) as exc:
            self.why_down = f"cannot open {self.url}: {exc}"
            if not self._failing_logged:
                log.warning("serial board %s: cannot open %s (%s); opening it as soon as it "
                            "(re)appears, else retrying every %g s", self.name, self.url,
                            exc, self.reconnect_interval)
                self._failing_logged = True
            else:
                log.debug("serial board %s: still cannot open %s: %s", self.name, self.url, exc)
            return
        self._port = port
        self._buffer.clear()
        self._discarding = False
        self._failing_logged = False
        if self._was_connected:
            self.reconnects += 1
        self._was_connected = True
        log.info("serial board %s: connected on %s", self.name, self.url)
        self._announce(True)

    def _lost(self, exc: BaseException) -> None:
        log.warning("serial board %s: lost %s (%s); reopening it as soon as it is back",
                    self.name, self.url, exc)
        self._drop_port()
        # What it said before it went is no fresh reading once it is back.
        self.latest.clear()
        # The next look tries at once if the device is (again) there: a replug can be
        # faster than the thread's look, and a pty or tty may come back under the same node.
        self._seen = _AGAIN
        # Logged just now: the failed reopen attempts that follow stay at debug level.
        self._failing_logged = True
        self._next_attempt = self.hardware.clock() + self.reconnect_interval
        self._announce(False, f"lost {self.url}: {exc}")

    def _drop_port(self) -> None:
        # Under the lock: send() may be writing to the port's descriptor from another
        # thread, and a closed descriptor's number can soon belong to another file.
        with self._lock:
            port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except (serial.SerialException, OSError):
                pass  # the device is gone already; nothing left to release

    def _release(self) -> None:
        self._drop_port()

    def _fileno(self) -> int | None:
        port = self._port
        if port is None:
            return None
        try:
            return int(port.fileno())
        except (AttributeError, OSError, ValueError, NotImplementedError):
            return None  # loop://, rfc2217://: read every NO_FD_INTERVAL

    # -- reading

    def _read_lines(self) -> list[str]:
        """Complete lines waiting on the port, without blocking.

        Raises HardwareError (after marking the board disconnected) if the port failed.
        """
        port = self._port
        if port is None:
            return []
        lines: list[str] = []
        try:
            for _ in range(_MAX_CHUNKS):
                data = self._read_chunk(port)
                if not data:
                    break
                lines.extend(self._split(data))
                if len(data) < _CHUNK:
                    break  # all there was: a look for more would find nothing (a syscall)
        except (serial.SerialException, OSError) as exc:
            self._lost(exc)
            raise HardwareError(f"serial board {self.name}: {self.url} failed: {exc}") from exc
        return lines

    @staticmethod
    def _read_chunk(port: serial.SerialBase) -> bytes:
        """What the port holds now, at most one chunk (b"" if nothing); raises on failure."""
        if type(port) is _NATIVE_PORT:
            # Straight from the descriptor (O_NONBLOCK): pyserial's read() costs two
            # select() calls more per line. Nothing read is either "nothing yet" or a
            # device gone; pyserial's read() tells which.
            try:
                data = os.read(port.fileno(), _CHUNK)
            except BlockingIOError:
                return b""
            if data:
                return data
        return port.read(_CHUNK)

    def _split(self, data: bytes) -> list[str]:
        # readline() would hand back half a line on timeout: keep the tail ourselves.
        self._buffer += data
        parts = re.split(rb"[\r\n]", bytes(self._buffer))
        tail = parts.pop()
        lines: list[str] = []
        for raw in parts:
            if self._discarding:
                self._discarding = False  # the end of an oversized line: drop it
                continue
            if len(raw) > MAX_LINE_BYTES:
                self._bad(raw[:40].decode("utf-8", "replace") + "...")
            elif raw:
                lines.append(raw.decode("utf-8", "replace"))
        if len(tail) > MAX_LINE_BYTES:
            if not self._discarding:
                self._bad(tail[:40].decode("utf-8", "replace") + "...")
            self._discarding = True
            tail = b""
        self._buffer = bytearray(tail)
        return lines

    def _handle_line(self, line: str) -> None:
        values = parse_line(line, self.format, self.columns)
        if values is None:
            # A late or repeated acknowledgement is expected chatter, not noise.
            if any(p.search(line.strip()) for p in self._ack_patterns):
                return
            self._bad(line)
            return
        now = self.hardware.clock()
        for key, value in values.items():
            self.latest[key] = Reading(value, now)
        self.good_lines += 1
        self._deliver(values)

    def _bad(self, text: str) -> None:
        self.bad_lines += 1
        self._unreported_bad += 1
        self._last_bad_text = text
        self._warn_bad()

    def _warn_bad(self) -> None:
        if not self._unreported_bad:
            return
        now = self.hardware.clock()
        if now - self._last_warning < WARN_INTERVAL:
            return
        log.warning("serial board %s: dropped %d unreadable line(s) (format %s), last: %r",
                    self.name, self._unreported_bad, self.format, self._last_bad_text[:60])
        self._unreported_bad = 0
        self._last_warning = now

    def _receive(self) -> None:
        self.drain()

    def _idle_timeout(self) -> float | None:
        # Unreported bad lines are flushed within a second of their 10 s window ending.
        return 1.0 if self._unreported_bad else None

    def _housekeeping(self) -> None:
        self._warn_bad()

    def drain(self) -> None:
        """Parse every complete line waiting, without blocking; never raises.

        Call it only on the board's thread, or when it has none.
        """
        try:
            lines = self._read_lines()
        except HardwareError:
            lines = []
        for line in lines:
            self._handle_line(line)

    def poll(self) -> None:
        """Without a thread: reopen if due, then parse every line waiting; never raises.

        While the board's thread runs it does this itself, and poll() does nothing.
        """
        if self._thread is not None:
            return
        self._attempt()
        self.drain()
        self._warn_bad()

    def wait_readable(self, timeout: float) -> bool:
        """Block until bytes may be waiting, at most ``timeout`` s (tests, without a thread).

        Returns False at once when disconnected.
        """
        return self.connected and self.wait_input(timeout)

    # -- for actuators (on the board's thread, or without one)

    def ignore_lines_matching(self, pattern: re.Pattern[str]) -> None:
        """Do not count lines matching ``pattern`` as bad (a motor board's late acks)."""
        self._ack_patterns.append(pattern)

    def write(self, data: bytes) -> None:
        """Send ``data`` to the board; raise HardwareError when it is absent or fails."""
        if self._closed:
            raise HardwareError(f"serial board {self.name} is closed")
        self._attempt()
        port = self._port
        if port is None:
            raise HardwareError(f"serial board {self.name} ({self.url}) is not connected"
                                + (f": {self.why_down}" if self.why_down else ""))
        try:
            port.write(data)
        except (serial.SerialException, OSError) as exc:
            self._lost(exc)
            raise HardwareError(f"serial board {self.name}: write to {self.url} failed: "
                                f"{exc}") from exc

    def send(self, data: bytes, done: Callable[[str | None], None]) -> None:
        """Write ``data`` and then call ``done`` with None, or with why it failed.

        When the board's thread is idle (no job waiting or running) and the port is a
        native one that takes every byte at once, the bytes are written here, on the
        caller's thread, and ``done`` is called before this returns: no thread is woken,
        which is most of what a command costs. Otherwise (a job under way, a port that
        would block, a network URL, the port absent) the rest is a job for the board's
        thread, which calls ``done`` when it is written. Either way the bytes follow
        every job handed over before, and a write never blocks the caller.
        """
        def job(rest: bytes) -> Callable[[], None]:
            def write() -> None:
                try:
                    self.write(rest)
                except HardwareError as exc:
                    done(str(exc))
                except Exception as exc:  # a bug must not leave the bike waiting forever
                    log.exception("serial board %s: writing %r failed", self.name, rest[:40])
                    done(f"{type(exc).__name__}: {exc}")
                else:
                    done(None)
            return write

        with self._lock:
            queued = self._takes_jobs()
            written = self._write_now(data) if queued and self._idle() else None
            if queued and written != len(data):
                self._jobs.append(job(data[written or 0:]))
        if not queued:
            job(data)()  # no thread (or on it): written here, like any job
        elif written == len(data):
            done(None)
        else:
            self._wake_soon()

    def _write_now(self, data: bytes) -> int | None:
        """With the lock held: write what the port takes without waiting; None if not tried."""
        port = self._port
        if port is None or type(port) is not _NATIVE_PORT or not port.is_open:
            return None  # a network URL or loop:// may block: the board's thread writes
        try:
            return os.write(port.fileno(), data)  # pyserial opens it O_NONBLOCK
        except BlockingIOError:
            return 0
        except OSError:
            return None  # a failing port: the board's thread writes, fails, reopens

    def readline_until(self, pattern: str | re.Pattern[str], timeout: float) -> (
            re.Match[str] | None):
        """Wait up to ``timeout`` real seconds for a line matching ``pattern`` (re.search).

        Other lines arriving meanwhile are readings, delivered as usual, not lost.
        Returns the match, or None on timeout; raises HardwareError if the board fails
        or is closed meanwhile. The deadline is real time, not ``hardware.clock``: this
        waits on actual bytes.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            if self._closed:
                raise HardwareError(f"serial board {self.name} was closed")
            if self._port is None:
                raise HardwareError(f"serial board {self.name} ({self.url}) is not connected")
            match: re.Match[str] | None = None
            for line in self._read_lines():
                found = regex.search(line.strip()) if match is None else None
                if found:
                    match = found
                else:
                    self._handle_line(line)
            if match is not None:
                return match
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.wait_input(left)

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<SerialBoard {self.name} {self.url} {state}>"


def _board(hardware: Hardware, name: str) -> SerialBoard:
    board = hardware.ports.get(name)
    if board is None:
        raise HardwareError(f"no serial board named {name!r}: add a [serial.{name}] table")
    return board  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- drivers


class SerialSensor(Sensor):
    """A sensor topic fed by one key of a serial board's lines.

    The board (``port``) prints lines such as ``72`` or ``hr=72,power=180``; this
    driver reports ``latest[field] * scale + offset``, or nothing while the board is
    away or that key has not been printed for ``stale_after`` seconds.
    Once started it pushes each reading as its line arrives. If the board keeps
    printing good lines without the key, that is logged once, with the keys it prints.
    """

    KIND = "serial_sensor"
    TOPICS = frozenset({"heartrate", "power", "speed", "cadence"})
    PUSHES = True
    OPTIONS = (
        Option("port", (str,), REQUIRED, "name of the [serial.NAME] board"),
        Option("field", (str,), "value",
               'key of the board\'s readings ("value" for bare numbers, "0".. for csv)'),
        Option("scale", (float,), 1.0, "reported value = reading * scale + offset"),
        Option("offset", (float,), 0.0, "added after scaling"),
        Option("stale_after", (float,), 5.0,
               "seconds without a new reading before nothing is reported",
               at_least(0, strict=True)),
    )

    def __init__(self, topic: str, settings: Mapping[str, Any], hardware: Hardware) -> None:
        super().__init__(topic, settings, hardware)
        opts = {o.name: _setting(settings, o) for o in SerialSensor.OPTIONS}
        self.board: SerialBoard = _board(hardware, opts["port"])
        self.field = opts["field"].strip().lower()
        self.scale = float(opts["scale"])
        self.offset = float(opts["offset"])
        self.stale_after: float = float(opts["stale_after"])
        self._unsubscribe: Callable[[], None] | None = None
        # The board's thread alone touches these (in _values).
        self._field_seen = False
        self._lines_without = 0
        self._keys_seen: set[str] = set()
        self.missing_field: str | None = None  # set once the key is known to be missing

    def start(self, emit: Callable[[float], None]) -> None:
        """Push ``value * scale + offset`` from every line of the board that carries it."""
        def on_values(values: dict[str, float]) -> None:
            value = values.get(self.field)
            if value is None:
                self._note_missing(values)
                return
            self._field_seen = True
            emit(value * self.scale + self.offset)

        self._unsubscribe = self.board.subscribe(on_values=on_values)

    def _note_missing(self, values: dict[str, float]) -> None:
        if self._field_seen or self.missing_field is not None:
            return
        self._lines_without += 1
        self._keys_seen.update(values)
        if self._lines_without >= MISSING_FIELD_LINES:
            sends = ", ".join(sorted(self._keys_seen))
            self.missing_field = (f"serial board {self.board.name} sends no field "
                                  f"{self.field!r} (it sends: {sends})")
            log.warning("%s: %s; check field in [%s]", self.topic, self.missing_field,
                        self.topic, extra={"TOPIC": self.topic, "DRIVER": self.KIND})

    def read(self) -> float | None:
        """The scaled latest reading, or None when it is missing or stale.

        A board that is lost forgets its readings: nothing from before is fresh.
        """
        reading = self.board.latest.get(self.field)
        if reading is None or self.hardware.clock() - reading.time > self.stale_after:
            return None
        return reading.value * self.scale + self.offset

    def stale_reason(self) -> str:
        """The board is away, does not send the field, or went quiet."""
        if not self.board.connected:
            return f"serial board {self.board.name} is not connected: {self.board.why_down}"
        if self.missing_field:
            return self.missing_field
        return (f"no {self.field!r} from serial board {self.board.name} for "
                f"{self.stale_after:g} s")

    def close(self) -> None:
        """Stop hearing the board (which stays open for its other drivers)."""
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()


class _Number(float):
    """A command value that prints without a trailing ``.0`` (40.0 -> "40", 5.5 -> "5.5").

    An explicit format spec in the template (``{value:.1f}``) still works as for a float.
    """

    def __format__(self, spec: str) -> str:
        return float.__format__(self, spec) if spec else str(self)

    def __str__(self) -> str:
        # Fixed point: small microcontroller parsers (Arduino's parseFloat) know no exponents.
        text = f"{float(self):.6f}".rstrip("0").rstrip(".")
        return "0" if text in ("-0", "") else text


class SerialActuator(Actuator):
    """An actuator topic moved by a serial motor-controller board.

    Each command is one line made from ``template`` (default ``resistance=40\\n``).
    With ``ack`` set, the board must answer each command with a line matching that
    regular expression within ``ack_timeout`` seconds, e.g. ``ok 40`` for
    ``ack = "^ok (?P<value>\\S+)"``; the ``value`` group, when present, is the value
    reported as reached. Unanswered commands are sent again ``retries`` times, then
    the command fails. Other lines the board prints meanwhile still count as readings.
    The write and the wait happen on the board's thread: they hold up this board only.
    """

    KIND = "serial_actuator"
    TOPICS = frozenset({"resistance", "incline", "fan"})
    OPTIONS = (
        Option("port", (str,), REQUIRED, "name of the [serial.NAME] board"),
        Option("template", (str,), "{topic}={value}\n",
               "command line sent, with {value} and {topic}", _check_template),
        Option("ack", (str,), "",
               'regular expression the answer must match ("": no answer expected); '
               "a group named value is the value reached", regex),
        Option("ack_timeout", (float,), 0.5, "seconds to wait for each answer",
               at_least(0, strict=True)),
        Option("retries", (int,), 2, "times an unanswered command is sent again",
               at_least(0)),
    )

    def __init__(self, topic: str, settings: Mapping[str, Any], hardware: Hardware) -> None:
        super().__init__(topic, settings, hardware)
        opts = {o.name: _setting(settings, o) for o in SerialActuator.OPTIONS}
        self.board: SerialBoard = _board(hardware, opts["port"])
        self.template: str = opts["template"]
        self.ack: re.Pattern[str] | None = re.compile(opts["ack"]) if opts["ack"] else None
        self.ack_timeout = float(opts["ack_timeout"])
        self.retries = int(opts["retries"])
        if self.ack is not None:
            self.board.ignore_lines_matching(self.ack)

    def command(self, value: float) -> bytes:
        """The bytes sent for ``value``."""
        return self.template.format(value=_Number(value), topic=self.topic).encode("utf-8")

    def apply(self, value: float) -> float:
        """Send the command and, with ``ack``, wait for the answer; return the value reached.

        Blocks the caller (the work runs on the board's thread when it has one).
        Raises HardwareError when the board is absent, fails, or never acknowledges.
        """
        return self.board.call(lambda: self._move(value))

    def apply_async(self, value: float,
                    done: Callable[[float | None, str | None], None]) -> None:
        """Send the command; ``done`` is called once it is written (and acknowledged).

        Without ``ack`` the line may go out at once on the caller's thread (see
        :meth:`SerialBoard.send`), and then ``done`` is called before this returns;
        otherwise the write and the wait are a job on the board's thread.
        """
        if self.ack is None:
            self.board.send(self.command(value),
                            lambda error: done(None, error) if error else done(value, None))
            return

        def job() -> None:
            try:
                reached = self._move(value)
            except HardwareError as exc:
                done(None, str(exc))
            except Exception as exc:  # a bug must not leave the bike waiting forever
                log.exception("%s: writing %g failed", self.topic, value)
                done(None, f"{type(exc).__name__}: {exc}")
            else:
                done(reached, None)
        self.board.run(job)

    def _move(self, value: float) -> float:
        data = self.command(value)
        ack = self.ack
        attempts = 1 + self.retries
        for attempt in range(1, attempts + 1):
            if ack is not None:
                # An answer to an earlier command still in the pipe must not pass for
                # this one's: read everything waiting before sending. (Without an ack
                # nothing is waited for: readings waiting are read right after.)
                self.board.drain()
            self.board.write(data)
            if ack is None:
                return value
            match = self.board.readline_until(ack, self.ack_timeout)
            if match is not None:
                reached = self._reached(match, value)
                if reached is not None:
                    return reached
            log.debug("%s: no acknowledgement from serial board %s (attempt %d of %d)",
                      self.topic, self.board.name, attempt, attempts)
        raise HardwareError(
            f"{self.topic}: no acknowledgement from serial board {self.board.name} after "
            f"{attempts} attempt(s) of {data!r} (expected a line matching "
            f"{ack.pattern if ack else ''!r} within {self.ack_timeout:g} s)")

    @staticmethod
    def _reached(match: re.Match[str], commanded: float) -> float | None:
        """The value the ack reports, the commanded one if it reports none, or None."""
        if "value" not in match.re.groupindex:
            return commanded
        text = match.group("value")
        number = _finite(text.strip()) if text is not None else None
        if number is None:
            log.warning("acknowledgement %r carries no readable value", match.string)
        return number
