"""The hardware side of the daemon: one thread decides, each board talks for itself.

Threads: the ``hardware`` thread (:class:`Bike`) is the single owner of the drivers'
state and of every decision: it opens and closes drivers, reports sensors, applies
commands, makes actuators safe and keeps each topic's health state. Each serial board
has an I/O thread of its own (:class:`~smartbiked.hardware.base.Board`) that reads lines
the moment they arrive and performs its actuators' writes that could wait (an
acknowledgement, a full port; a line an idle board takes whole is written at once
from this thread: :meth:`~smartbiked.hardware.serial.SerialBoard.send`), and gpiozero
calls back on its own thread for pin edges. Those threads only hand events to the
hardware thread's inbox (a reading, a button, a write's outcome, a board lost or
back), so a silent board delays nothing but its own commands. The hardware
thread's scheduler runs heartbeats and timeouts; nothing polls a port.

The bike never talks MQTT: what it has to say goes to an :class:`Outbox`, which the
service turns into messages.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from smartbiked.config import Config, DriverSettings
from smartbiked.hardware import (
    DRIVERS,
    Actuator,
    Driver,
    EventSource,
    Hardware,
    Sensor,
    SerialBoard,
)
from smartbiked.hardware.base import Board, hold_wakes, release_wakes
from smartbiked.scheduler import Job, Scheduler
from smartbiked.topics import Command

log = logging.getLogger("smartbiked.bike")

#: The thread wakes at least this often (seconds), so its heartbeat proves it is alive;
#: the service sets :attr:`Bike.max_sleep` from the systemd watchdog's period.
MAX_SLEEP = 1.0
#: At start, how long to wait for every board's first word (connected or not).
START_WAIT = 5.0
#: Inbox items handled per pass, so heartbeats and timers run even under a flood.
MAX_BATCH = 256

RUNNING, STALE, FAILED = "running", "stale", "failed"

#: What the bike counts (see :meth:`Bike.counters_snapshot`).
COUNTERS = ("commands_written", "commands_coalesced", "commands_failed", "bike_writes",
            "bike_writes_failed", "sensor_reports")

#: Keys the bike itself acts on (a report interval, an actuator's range): a reload that
#: changes only these retunes a running driver instead of reopening its hardware.
_BIKE_KEYS = frozenset(o.name for o in (*Sensor.OPTIONS, *Actuator.OPTIONS))
#: Inbox items that wait while a reload runs (and are refused while stopping).
_HELD = frozenset({"command", "reload", "stop"})


class Outbox(Protocol):
    """Where the hardware thread sends what it has to say; implemented by the service."""

    def report(self, topic: str, value: float, *, sensor: bool) -> None:
        """A sensor reading, or an actuator's new value."""

    def event(self, topic: str, payload: dict[str, Any]) -> None:
        """An event such as a button press, in its documented payload."""

    def outcome(self, command: Command, replies: list[Any], value: float | None,
                error: str | None) -> None:
        """How a command ended: the value reached, or why it failed."""

    def driver_state(self, topic: str, state: str, reason: str | None) -> None:
        """A topic's driver changed state: "running", "stale" or "failed" (with why)."""


@dataclass(eq=False)
class _Write:
    """One value on its way to an actuator: a command, or a move the bike makes itself."""

    value: float
    why: str  # "command", or why the bike moves it ("shutdown", "broker lost", ...)
    command: Command | None = None
    replies: list[Any] = field(default_factory=list)


@dataclass(eq=False)
class _Slot:
    """An actuator's write pipeline: at most one write in flight, one waiting (latest wins)."""

    topic: str
    driver: Actuator
    busy: _Write | None = None
    pending: _Write | None = None
    last_write: float = -math.inf
    value: float | None = None  # the last value reached
    retired: bool = False  # its driver was closed (a reload or stop)


@dataclass(eq=False)
class _Watch:
    """A sensor's bookkeeping: its jobs, its last report, when it last had a reading."""

    driver: Sensor
    every_line: bool
    jobs: list[Job] = field(default_factory=list)
    last_report: tuple[float, float] | None = None  # (clock time, value)
    fresh_at: float = -math.inf
    stale_timer: Job | None = None
    change_timer: Job | None = None
    # The newest pushed reading not yet taken by the hardware thread (latest wins).
    lock: threading.Lock = field(default_factory=threading.Lock)
    latest: float | None = None
    queued: bool = False


@dataclass(eq=False)
class _ReloadRequest:
    config: Config
    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = False


class Bike:
    """Owns the drivers and the hardware thread; every public method is safe from any thread.

    ``clock`` is the monotonic clock of every decision (heartbeats, staleness,
    ``min_interval``, ``offline_safe_after``); tests inject a fake one. Waits for
    hardware (acknowledgements, stop) are real time.
    """

    def __init__(self, config: Config, hardware: Hardware, outbox: Outbox,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.hardware = hardware
        self.outbox = outbox
        self.clock = clock
        self.heartbeat = clock()
        #: The longest the thread sleeps with nothing due: only its heartbeat needs it
        #: awake, so the watchdog's needs decide (every wake costs an idle bike CPU).
        self.max_sleep = MAX_SLEEP
        self.drivers: dict[str, Driver] = {}
        self.failed: dict[str, str] = {}  # topic -> why its driver did not start
        #: Running totals (see COUNTERS); read them with counters_snapshot().
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._offline_since: float | None = None
        self._outage = 0  # numbers the outages, so each is made safe once
        self._safe_for = 0
        # Guards what other threads read: states, counters, boards.
        self._lock = threading.Lock()
        self._states: dict[str, tuple[str, str | None]] = {}
        self._boards: dict[str, Board] = {}
        self._retired = {"bad_lines": 0, "serial_reconnects": 0}
        self._board_up: dict[Board, bool] = {}
        self._slots: dict[str, _Slot] = {}
        self._watches: dict[str, _Watch] = {}
        self._scheduler = Scheduler(clock)
        # Taken from the inbox, not yet handled (a nested stop or reload handles them).
        self._backlog: collections.deque[tuple[str, Any]] = collections.deque()
        self._deferred: collections.deque[tuple[str, Any]] = collections.deque()
        self._syncs: list[threading.Event] = []
        self._finished = False
        self._ident: int | None = None
        self._opened = threading.Event()
        self._thread: threading.Thread | None = None
        #: Told ``(topic, count, at)`` of whole revolutions by the sensors that count
        #: them (Bluetooth Cycling Power); set before :meth:`start`.
        self.on_revolutions: Callable[[str, int, float], None] | None = None

    # -- called from other threads --------------------------------------------------------

    @property
    def offline_since(self) -> float | None:
        """Monotonic time the broker went away, or None while connected (set by the service).

        An outage starts once: setting a time while already offline keeps the earlier one,
        so ``offline_safe_after`` counts from the real start.
        """
        return self._offline_since

    @offline_since.setter
    def offline_since(self, since: float | None) -> None:
        if since is not None and self._offline_since is not None:
            return
        if since is not None:
            self._outage += 1
        self._offline_since = since
        self._inbox.put(("wake", None))  # the safe-values deadline moved

    def start(self, timeout: float = 30.0) -> None:
        """Start the hardware thread; return once drivers are open and boards have spoken."""
        self._thread = threading.Thread(target=self._run, name="hardware", daemon=True)
        self._thread.start()
        self._opened.wait(timeout)

    def submit(self, command: Command, reply: Any = None) -> None:
        """Queue a parsed command; ``reply`` is handed back with its outcome."""
        self._inbox.put(("command", (command, reply)))

    def reload(self, config: Config, timeout: float | None = None) -> bool:
        """Change to ``config``: only what changed, and nothing that is still allowed moves.

        Returns True once the new settings are in force (drivers opened and closed, every
        actuator within its new range), False if that took longer than ``timeout``
        (default: every actuator's full acknowledgement time, twice) or the bike stopped.
        """
        if self._thread is None:
            self.config = config
            return True
        if not self._thread.is_alive():
            return False
        request = _ReloadRequest(config)
        self._inbox.put(("reload", request))
        wait = self.stop_time(config) + self.stop_time() if timeout is None else timeout
        return request.done.wait(wait) and request.ok

    def stop(self, timeout: float | None = None) -> bool:
        """Move actuators to their safe values, close everything, end the thread.

        Returns False when the thread did not finish in time (safe values unconfirmed).
        The default timeout allows every actuator its full acknowledgement time.
        """
        self._inbox.put(("stop", None))
        if self._thread is None:
            return True
        self._thread.join(self.stop_time() if timeout is None else timeout)
        return not self._thread.is_alive()

    def stop_time(self, config: Config | None = None) -> float:
        """Seconds a stop may take: one command in flight plus every safe value, acknowledged."""
        waits = [float(d.options.get("ack_timeout", 0.0)) * (int(d.options.get("retries", 0)) + 1)
                 for d in (config or self.config).drivers]
        return 2.0 + 2 * sum(waits)

    def alive(self, within: float) -> bool:
        """True if the hardware thread has shown life in the last ``within`` seconds."""
        return (self._thread is not None and self._thread.is_alive()
                and self.clock() - self.heartbeat < within)

    def sync(self, timeout: float = 5.0) -> bool:
        """Wait until the hardware thread has handled everything queued before this call.

        For tests and tools: after it, what was submitted has been acted on (a serial
        write may still be on its board's thread). False if the thread did not answer.
        """
        if self._thread is None or not self._thread.is_alive():
            return False
        done = threading.Event()
        self._inbox.put(("sync", done))
        return done.wait(timeout)

    def states(self) -> dict[str, tuple[str, str | None]]:
        """Each topic's driver state ("running", "stale", "failed") and why, right now."""
        with self._lock:
            return dict(self._states)

    def counters_snapshot(self) -> dict[str, int]:
        """The counters, plus the boards' unreadable lines and reconnections."""
        with self._lock:
            snapshot = dict(self.counters)
            boards = list(self._boards.values())
            retired = dict(self._retired)
        snapshot["bad_lines"] = retired["bad_lines"] + sum(
            getattr(b, "bad_lines", 0) for b in boards)
        snapshot["serial_reconnects"] = retired["serial_reconnects"] + sum(
            getattr(b, "reconnects", 0) for b in boards)
        return snapshot

    # -- the hardware thread: its loop --------------------------------------------------------

    def _run(self) -> None:
        self._ident = threading.get_ident()
        hold_wakes()
        try:
            self._open_all()
            # Boards open on their own threads; their first word sets their drivers' state.
            self._serve(lambda: all(b in self._board_up for b in self._boards.values()),
                        time.monotonic() + START_WAIT, hold="defer")
        except Exception:
            log.exception("opening the hardware failed")
        self._opened.set()
        while not self._finished:
            try:
                self._serve(lambda: self._finished)
            except Exception:
                # Nothing may end this thread early: it is the only one that can make
                # the bike safe at shutdown.
                log.exception("hardware thread error")

    def _serve(self, until: Callable[[], bool], deadline: float = math.inf,
               hold: str | None = None) -> bool:
        """Handle events until ``until()`` holds (True) or the real-time deadline (False).

        ``hold``: "defer" keeps commands, reloads and stops for later (a reload or the
        start is under way); "refuse" answers them at once (stopping). A stop or reload
        serves nested: items still waiting in the backlog are its to handle, in order.
        """
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                release_wakes()
                return False
            self.heartbeat = self.clock()
            wait = min(self._scheduler.run_due(), self._next_due(), self.max_sleep, left)
            release_wakes()  # the boards handed writes this pass, now that this thread waits
            self._fill(wait, hold)
            for _ in range(MAX_BATCH):
                if not self._backlog:
                    break
                kind, item = self._backlog.popleft()
                try:
                    self._handle(kind, item, hold)
                except Exception:
                    log.exception("hardware thread: handling %s failed", kind)
            try:
                self._after_pass()
            except Exception:
                log.exception("hardware thread error")
        release_wakes()  # whoever serves next may not wait before it closes a board
        return True

    def _fill(self, wait: float, hold: str | None) -> None:
        """Move what the inbox holds to the backlog, waiting up to ``wait`` if there is none."""
        if hold is None and self._deferred:
            self._backlog.extendleft(reversed(self._deferred))
            self._deferred.clear()
        if not self._backlog:
            try:
                self._backlog.append(self._inbox.get(timeout=max(wait, 0.0)))
            except queue.Empty:
                return
        # empty() first: an Empty exception per pass costs more than the item itself.
        while len(self._backlog) < MAX_BATCH and not self._inbox.empty():
            self._backlog.append(self._inbox.get_nowait())  # only this thread takes

    def _handle(self, kind: str, item: Any, hold: str | None) -> None:
        if kind in _HELD and (hold is not None or self._finished):
            if hold == "defer":
                self._deferred.append((kind, item))
            else:
                self._refuse_held(kind, item)
            return
        if kind == "command":
            self._command(*item)
        elif kind == "event":
            self.outbox.event(*item)
        elif kind == "reading":
            self._reading(*item)
        elif kind == "latest":
            watch: _Watch = item
            with watch.lock:
                value, watch.latest, watch.queued = watch.latest, None, False
            if value is not None:
                self._reading(watch, value)
        elif kind == "written":
            self._written(*item)
        elif kind == "board":
            self._board_event(*item)
        elif kind == "reload":
            self._reload(item)
        elif kind == "stop":
            self._stop()
        elif kind == "sync":
            self._syncs.append(item)
        # "wake": only to recompute the wait

    def _refuse_held(self, kind: str, item: Any) -> None:
        if kind == "command":
            command, reply = item
            self.outbox.outcome(command, [] if reply is None else [reply], None,
                                "not applied: the bike is stopping")
        elif kind == "reload":
            item.done.set()  # ok stays False

    def _after_pass(self) -> None:
        if self._syncs:
            # A sync sees the bike as of now: whatever fell due meanwhile has run.
            self.heartbeat = self.clock()
            self._scheduler.run_due()
        self._check_offline()
        for slot in list(self._slots.values()):
            if slot.pending is not None and slot.busy is None:
                self._start(slot)  # a command held back by min_interval may be due now
        syncs, self._syncs = self._syncs, []
        for done in syncs:
            done.set()

    def _next_due(self) -> float:
        """Seconds until a held-back command may be written or the broker's outage is due."""
        dues = [s.last_write + s.driver.settings["min_interval"] for s in self._slots.values()
                if s.busy is None and s.pending is not None and s.pending.command is not None]
        since = self._offline_since
        if not dues and since is None:
            return math.inf
        now = self.clock()
        if since is not None and self._safe_for != self._outage:
            dues.append(since + self.config.offline_safe_after)
        return max(0.0, min(dues) - now) if dues else math.inf

    # -- opening and closing ------------------------------------------------------------------

    def _open_all(self) -> None:
        """Open boards and drivers; one that fails is reported and the rest carry on."""
        for name, settings in self.config.serial.items():
            self._open_board(name, settings)
        for spec in self.config.drivers:
            try:
                self._open_driver(spec)
            except Exception:
                log.exception("%s: opening the driver failed", spec.topic)
        for board in list(self._boards.values()):
            board.start()
        self._go_safe("start-up")  # a defined state at boot, not the last commanded one

    def _open_board(self, name: str, settings: Any) -> None:
        # Opened on its own thread: a board slow to connect (socket://) holds up nobody.
        board = SerialBoard(name, settings, self.hardware, open_now=False)
        board.subscribe(on_connection=lambda up, why: self._inbox.put(
            ("board", (board, up, why))))
        self.hardware.ports[name] = board
        with self._lock:
            self._boards[name] = board

    def _close_board(self, name: str) -> None:
        board = self._boards.get(name)
        self.hardware.ports.pop(name, None)
        if board is None:
            return
        self._board_up.pop(board, None)
        try:
            board.close()
        except Exception:
            log.exception("closing serial board %s failed", name)
        with self._lock:
            del self._boards[name]
            self._retired["bad_lines"] += getattr(board, "bad_lines", 0)
            self._retired["serial_reconnects"] += getattr(board, "reconnects", 0)

    def _open_driver(self, spec: DriverSettings) -> None:
        fields = {"TOPIC": spec.topic, "DRIVER": spec.kind}
        try:
            driver = DRIVERS[spec.kind](spec.topic, spec.options, self.hardware)
        except Exception as exc:
            self._not_started(spec, exc)
            return
        self.drivers[spec.topic] = driver
        try:
            if isinstance(driver, Sensor):
                self._watch(driver)
            elif isinstance(driver, EventSource):
                driver.start(self._event_emitter(spec.topic))
            elif isinstance(driver, Actuator):
                self._slots[spec.topic] = _Slot(spec.topic, driver)
        except Exception as exc:
            self._close_driver(spec.topic)
            self._not_started(spec, exc)
            return
        board = driver.board
        if board is None:
            self._set_state(spec.topic, RUNNING)
        elif board in self._board_up:  # a board already open: it will not say so again
            self._board_said(board, driver, self._board_up[board], board.why_down)
        log.info("%s: %s driver ready", spec.topic, spec.kind, extra=fields)

    def _event_emitter(self, topic: str) -> Callable[[dict[str, Any]], None]:
        """What an event source calls (on gpiozero's thread) with each event."""
        def emit(payload: dict[str, Any]) -> None:
            self._inbox.put(("event", (topic, payload)))
        return emit

    def _not_started(self, spec: DriverSettings, exc: Exception) -> None:
        reason = f"{spec.kind} driver did not start: {exc}"
        self.failed[spec.topic] = reason
        log.error("%s: %s", spec.topic, reason, extra={"TOPIC": spec.topic,
                                                         "DRIVER": spec.kind})
        self._set_state(spec.topic, FAILED, reason)

    def _close_driver(self, topic: str, keep_state: bool = False) -> None:
        driver = self.drivers.pop(topic, None)
        self.failed.pop(topic, None)
        watch = self._watches.pop(topic, None)
        if watch is not None:
            for job in [*watch.jobs, watch.stale_timer, watch.change_timer]:
                self._scheduler.cancel(job)
        slot = self._slots.pop(topic, None)
        if slot is not None:
            slot.retired = True
            if slot.pending is not None and slot.pending.command is not None:
                self.outbox.outcome(slot.pending.command, slot.pending.replies, None,
                                    f"not applied: the {topic} driver was closed")
            slot.pending = None
        if not keep_state:
            with self._lock:
                self._states.pop(topic, None)
        if driver is not None:
            try:
                driver.close()
            except Exception:
                log.exception("closing %r failed", driver)

    def _close_all(self) -> None:
        for topic in [*self.drivers, *self.failed]:
            self._close_driver(topic, keep_state=True)
        for name in list(self._boards):
            self._close_board(name)
        self._scheduler.clear()

    # -- health ------------------------------------------------------------------------------

    def _set_state(self, topic: str, state: str, reason: str | None = None) -> None:
        """Record a topic's state and tell the outbox, once per change (the first reason wins)."""
        reason = None if state == RUNNING else reason
        # Only this thread writes states: an unchanged one (every reading, every
        # command) needs no lock.
        old = self._states.get(topic)
        if old is not None and old[0] == state:
            return
        with self._lock:
            old = self._states.get(topic)
            if old is not None and old[0] == state:
                return
            self._states[topic] = (state, reason)
        fields = {"TOPIC": topic}
        if state == FAILED:
            log.error("%s: failed: %s", topic, reason, extra=fields)
        elif state == STALE:
            log.warning("%s: stale: %s", topic, reason, extra=fields)
        elif old is not None:
            log.info("%s: running again", topic, extra=fields)
        self.outbox.driver_state(topic, state, reason)

    def _board_event(self, board: Board, connected: bool, why: str | None) -> None:
        if board not in self._boards.values():
            return  # a board closed since
        self._board_up[board] = connected
        for driver in list(self.drivers.values()):
            if driver.board is board:
                self._board_said(board, driver, connected, why)

    def _board_said(self, board: Board, driver: Driver, connected: bool,
                    why: str | None) -> None:
        topic = driver.topic
        reason = f"serial board {board.name}: {why}"
        if isinstance(driver, Sensor):
            if not connected:
                self._set_state(topic, STALE, reason)
            elif topic not in self._states:
                self._set_state(topic, RUNNING)  # back again: running once readings are
        else:
            self._set_state(topic, RUNNING if connected else FAILED, reason)
            slot = self._slots.get(topic)
            if (connected and slot is not None and slot.value is None and slot.busy is None
                    and slot.pending is None and slot.driver.safe_value is not None):
                # A motor board that was absent at start-up, or never took a value: a
                # defined state when it appears, as at boot, not whatever it powered up in.
                self._request(slot, _Write(slot.driver.safe_value, "board appeared"))

    # -- sensors --------------------------------------------------------------------------------

    def _watch(self, driver: Sensor) -> None:
        interval = driver.settings["interval"]
        watch = _Watch(driver, every_line=interval == 0)
        self._watches[driver.topic] = watch
        self._schedule(watch)
        if driver.PUSHES:
            driver.start(self._emitter(watch))
        listener = self.on_revolutions
        if listener is not None:
            topic = driver.topic
            driver.watch_revolutions(lambda count, at: listener(topic, count, at))
        if driver.stale_after is not None:
            watch.fresh_at = self.clock()  # a reading is due within stale_after of opening
            self._arm_stale(watch)

    def _schedule(self, watch: _Watch) -> None:
        interval = watch.driver.settings["interval"]
        if interval > 0:
            watch.jobs.append(self._scheduler.every(
                interval, lambda: self._heartbeat(watch), watch.driver.topic))

    def _emitter(self, watch: _Watch) -> Callable[[float], None]:
        """What a sensor calls (on its board's thread) with each reading."""
        def emit(value: float) -> None:
            if watch.every_line:
                self._inbox.put(("reading", (watch, value)))
                return
            # Only the newest matters between heartbeats: one inbox item at a time.
            with watch.lock:
                watch.latest = value
                if watch.queued:
                    return
                watch.queued = True
            self._inbox.put(("latest", watch))
        return emit

    def _current(self, watch: _Watch) -> bool:
        return self._watches.get(watch.driver.topic) is watch

    def _reading(self, watch: _Watch, value: float) -> None:
        """A pushed reading: fresh; reported now (every line) or if past the dead band."""
        if not self._current(watch):
            return  # from a driver closed since
        watch.fresh_at = self.clock()
        if watch.stale_timer is None and watch.driver.stale_after is not None:
            self._arm_stale(watch)
        self._set_state(watch.driver.topic, RUNNING)
        if watch.every_line:
            self._report(watch, value)
        elif watch.driver.settings["deadband"] > 0:
            self._change(watch, value)

    def _heartbeat(self, watch: _Watch) -> None:
        value = watch.driver.read()
        if value is None:
            stale_after = watch.driver.stale_after
            # Quiet since it opened, but not yet for stale_after: nothing to say yet.
            if stale_after is None or self.clock() - watch.fresh_at >= stale_after:
                self._set_state(watch.driver.topic, STALE, watch.driver.stale_reason())
            return
        self._set_state(watch.driver.topic, RUNNING)
        self._report(watch, value)

    def _change(self, watch: _Watch, value: float) -> None:
        """Report at once when past the dead band, no more often than max_rate."""
        settings = watch.driver.settings
        last = watch.last_report
        if last is not None:
            if abs(value - last[1]) <= settings["deadband"]:
                return
            ready = last[0] + 1.0 / settings["max_rate"]
            if self.clock() < ready:
                if watch.change_timer is None:
                    watch.change_timer = self._scheduler.at(
                        ready, lambda: self._change_due(watch), f"{watch.driver.topic} change")
                return
        self._report(watch, value)

    def _change_due(self, watch: _Watch) -> None:
        watch.change_timer = None
        if self._current(watch):
            value = watch.driver.read()
            if value is not None:
                self._change(watch, value)

    def _report(self, watch: _Watch, value: float) -> None:
        watch.last_report = (self.clock(), value)
        self._count("sensor_reports")
        self.outbox.report(watch.driver.topic, value, sensor=True)

    def _arm_stale(self, watch: _Watch) -> None:
        assert watch.driver.stale_after is not None
        watch.stale_timer = self._scheduler.at(watch.fresh_at + watch.driver.stale_after,
                                               lambda: self._stale_check(watch),
                                               f"{watch.driver.topic} stale")

    def _stale_check(self, watch: _Watch) -> None:
        watch.stale_timer = None
        stale_after = watch.driver.stale_after
        if not self._current(watch) or stale_after is None:
            return
        if self.clock() - watch.fresh_at >= stale_after:
            self._set_state(watch.driver.topic, STALE, watch.driver.stale_reason())
        else:
            self._arm_stale(watch)  # a reading came meanwhile

    # -- actuators ------------------------------------------------------------------------------

    def _command(self, command: Command, reply: Any) -> None:
        replies = [] if reply is None else [reply]
        slot = self._slots.get(command.topic)
        if slot is None:
            why = self.failed.get(command.topic, f"no {command.topic} driver is running")
            self.outbox.outcome(command, replies, None, why)
            return
        self._request(slot, _Write(command.value, "command", command, replies))

    def _request(self, slot: _Slot, write: _Write) -> None:
        """Write now if the actuator is free; else wait, replacing what waited (latest wins)."""
        old = slot.pending
        if old is not None and old.command is not None:
            if write.command is not None:
                write.replies = old.replies + write.replies  # every requester hears back
                self._count("commands_coalesced")
            else:
                self.outbox.outcome(old.command, old.replies, None,
                                    f"not applied: {slot.topic} was moved to {write.value:g} "
                                    f"({write.why})")
        slot.pending = write
        self._start(slot)

    def _start(self, slot: _Slot) -> None:
        """Hand the waiting write to the driver, unless one is in flight or min_interval holds."""
        write = slot.pending
        if slot.busy is not None or write is None:
            return
        if write.why in ("command", "reload") and self._made_safe():
            slot.pending = None
            if write.command is not None:
                self._count("commands_failed")
                self.outbox.outcome(write.command, write.replies, None,
                                    "not applied: the broker is unreachable and the "
                                    "actuators were made safe")
            return
        if write.command is not None:
            # Protects the motor; a newer command may still replace this one meanwhile.
            if self.clock() < slot.last_write + slot.driver.settings["min_interval"]:
                return
            # Checked again here: a reload may have narrowed the range since it was parsed.
            problem = slot.driver.limits.problem(write.value)
            if problem:
                slot.pending = None
                self._count("commands_failed")
                self.outbox.outcome(write.command, write.replies, None,
                                    f"{write.value:g} is {problem}")
                return
        slot.pending = None
        slot.busy = write

        def done(value: float | None, error: str | None) -> None:
            if threading.get_ident() == self._ident:
                self._written(slot, write, value, error)  # a GPIO output: done already
            else:
                self._inbox.put(("written", (slot, write, value, error)))

        slot.driver.apply_async(write.value, done)

    def _written(self, slot: _Slot, write: _Write, value: float | None,
                 error: str | None) -> None:
        """A write ended: report it, answer its requesters, start the next one."""
        if slot.busy is write:
            slot.busy = None
            slot.last_write = self.clock()
        topic = slot.topic
        fields = {"TOPIC": topic, "DRIVER": slot.driver.KIND}
        if error is None and value is not None:
            slot.value = value
            if write.command is not None:
                self._count("commands_written")
                if log.isEnabledFor(logging.DEBUG):  # every command: skip the call
                    log.debug("%s: set to %g", topic, value, extra=fields)
            else:
                self._count("bike_writes")
                log.info("%s: set to %g (%s)", topic, value, write.why, extra=fields)
            self.outbox.report(topic, value, sensor=False)
            if write.command is not None:
                self.outbox.outcome(write.command, write.replies, value, None)
            if not slot.retired:
                self._set_state(topic, RUNNING)
        elif write.command is not None:
            self._count("commands_failed")
            log.warning("%s: could not apply %g: %s", topic, write.value, error, extra=fields)
            self.outbox.outcome(write.command, write.replies, None, f"hardware error: {error}")
        else:
            # Nobody asked: no refusal to publish. The health state and the journal say it.
            self._count("bike_writes_failed")
            log.error("%s: %g not applied (%s): %s", topic, write.value, write.why, error,
                      extra=fields)
            if not slot.retired:
                self._set_state(topic, FAILED, f"{write.value:g} not applied ({write.why}): "
                                f"{error}")
        if not slot.retired:
            self._start(slot)

    def _go_safe(self, why: str) -> None:
        for slot in list(self._slots.values()):
            if slot.driver.safe_value is not None:  # None: "hold", never move it unasked
                self._request(slot, _Write(slot.driver.safe_value, why))

    def _check_offline(self) -> None:
        """Make actuators safe once per outage that lasts offline_safe_after seconds."""
        since = self._offline_since
        if since is None or self._safe_for == self._outage:
            return
        if self.clock() - since >= self.config.offline_safe_after:
            log.warning("broker unreachable for %.0f s: actuators to safe values",
                        self.clock() - since)
            self._safe_for = self._outage
            self._go_safe("broker lost")

    def _made_safe(self) -> bool:
        return self._offline_since is not None and self._safe_for == self._outage

    def _idle(self, slots: list[_Slot]) -> Callable[[], bool]:
        return lambda: not any(s.busy is not None or s.pending is not None for s in slots)

    # -- stop and reload --------------------------------------------------------------------------

    def _stop(self) -> None:
        log.info("stopping: actuators to safe values")
        for slot in self._slots.values():
            pending = slot.pending
            if pending is not None and pending.command is not None:
                slot.pending = None
                self.outbox.outcome(pending.command, pending.replies, None,
                                    "not applied: the bike is stopping")
        while self._deferred:
            self._refuse_held(*self._deferred.popleft())
        self._go_safe("shutdown")
        if not self._serve(self._idle(list(self._slots.values())),
                           time.monotonic() + self.stop_time(), hold="refuse"):
            log.error("safe values not confirmed within %g s", self.stop_time())
        self._close_all()
        self._finished = True

    def _reload(self, request: _ReloadRequest) -> None:
        try:
            self._apply_config(request.config)
            request.ok = True
        finally:
            request.done.set()

    def _apply_config(self, new: Config) -> None:
        """Change only what changed; see :meth:`reload`."""
        old = self.config
        changed_boards = [n for n, s in old.serial.items() if new.serial.get(n) != s]
        new_boards = [n for n in new.serial if n not in old.serial or n in changed_boards]
        old_specs = {d.topic: d for d in old.drivers}
        new_specs = {d.topic: d for d in new.drivers}
        removed = [t for t in old_specs if t not in new_specs]
        reopened, retuned = [], []
        for topic, spec in new_specs.items():
            before = old_specs.get(topic)
            if before is None:
                continue
            if (topic not in self.drivers or before.kind != spec.kind
                    or spec.options.get("port") in changed_boards
                    or _hardware_keys(before) != _hardware_keys(spec)):
                reopened.append(topic)  # a driver that failed to start is tried again
            elif before.options != spec.options:
                retuned.append(topic)
        added = [t for t in new_specs if t not in old_specs]
        if not (removed or reopened or retuned or added or changed_boards or new_boards):
            self.config = new
            log.info("configuration reloaded: nothing changed for the hardware")
            return

        deadline = time.monotonic() + self.stop_time(old) + self.stop_time(new)
        leaving = [self._slots[t] for t in [*removed, *reopened] if t in self._slots]
        staying = [self._slots[t] for t in retuned if t in self._slots]
        # Writes on their way finish first: their requesters are waiting for them, and
        # the value they reach is the one the new range is checked against.
        self._serve(lambda: not any(s.busy for s in [*leaving, *staying]), deadline, "defer")
        values = {s.topic: s.value for s in leaving}
        carried: dict[str, _Write | None] = {}
        for slot in leaving:
            carried[slot.topic], slot.pending = slot.pending, None
            if slot.topic in removed:
                self._drop(carried.pop(slot.topic), f"{slot.topic} was removed")
                if slot.driver.safe_value is not None:  # a motor nobody can command
                    self._request(slot, _Write(slot.driver.safe_value, "removed"))
        self._serve(self._idle(leaving), deadline, "defer")

        for topic in [*removed, *reopened]:
            self._close_driver(topic, keep_state=topic in reopened)
        for name in changed_boards:
            self._close_board(name)
        self.config = new
        for name in new_boards:
            self._open_board(name, new.serial[name])
        for topic in retuned:
            self._retune(topic, new_specs[topic])
        for topic in [*reopened, *added]:
            self._open_driver(new_specs[topic])
        for name in new_boards:
            self._boards[name].start()

        moving = []
        for topic in [*retuned, *reopened]:
            now_slot = self._slots.get(topic)
            if now_slot is None:
                self._drop(carried.get(topic), f"the {topic} driver did not start")
                continue
            pending = now_slot.pending if topic in retuned else carried.get(topic)
            value = now_slot.value if topic in retuned else values.get(topic)
            if self._settle(now_slot, pending, value, restore=topic in reopened):
                moving.append(now_slot)
        self._serve(self._idle(moving), deadline, "defer")
        log.info("configuration reloaded: %d opened, %d closed, %d reopened, %d retuned",
                 len(added), len(removed), len(reopened), len(retuned))

    def _drop(self, write: _Write | None, why: str) -> None:
        if write is not None and write.command is not None:
            self.outbox.outcome(write.command, write.replies, None, f"not applied: {why}")

    def _settle(self, slot: _Slot, pending: _Write | None, value: float | None,
                restore: bool) -> bool:
        """After a reload: keep the actuator where it is if allowed, else the nearest value.

        ``restore``: its driver was reopened, so it is told its value again. A waiting
        command that fits the new range moves it anyway. True if a write was requested.
        """
        slot.pending = None
        if pending is not None and pending.command is not None:
            problem = slot.driver.limits.problem(pending.value)
            if problem is None:
                self._request(slot, pending)
                return True
            self._count("commands_failed")
            self.outbox.outcome(pending.command, pending.replies, None,
                                f"{pending.value:g} is {problem}")
        if value is None:
            return False  # never moved: nothing to keep
        target = slot.driver.nearest(value)
        if target != value:
            log.warning("%s: %g is outside the new range (%g..%g, step %g): moving to %g",
                        slot.topic, value, slot.driver.limits.low, slot.driver.limits.high,
                        slot.driver.limits.step, target, extra={"TOPIC": slot.topic})
        elif not restore:
            return False  # still allowed: it stays exactly where it is
        self._request(slot, _Write(target, "reload"))
        return True

    def _retune(self, topic: str, spec: DriverSettings) -> None:
        """New bike-side settings for a running driver: its hardware is not touched."""
        driver = self.drivers[topic]
        driver.retune(spec.options)
        watch = self._watches.get(topic)
        if watch is not None:
            for job in [*watch.jobs, watch.change_timer]:
                self._scheduler.cancel(job)
            watch.jobs.clear()
            watch.change_timer = None
            watch.every_line = spec.options["interval"] == 0
            self._schedule(watch)

    def _count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1


def _hardware_keys(spec: DriverSettings) -> dict[str, Any]:
    """The settings that reach the hardware (all but the bike's own keys)."""
    return {k: v for k, v in spec.options.items() if k not in _BIKE_KEYS}
