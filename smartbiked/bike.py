"""The hardware side of the daemon: one thread that owns every pin and port.

:class:`Bike` opens the configured drivers, reads sensors on the scheduler's clock,
forwards button events, and applies commands that the MQTT side has already parsed
and range-checked. It never talks MQTT: what it has to say goes to a
:class:`Outbox`, which the service turns into messages.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from smartbiked.config import Config
from smartbiked.hardware import (
    DRIVERS,
    Actuator,
    Driver,
    EventSource,
    Hardware,
    Sensor,
    SerialBoard,
)
from smartbiked.scheduler import Scheduler
from smartbiked.topics import Command

log = logging.getLogger("smartbiked.bike")

#: How often drivers get their poll() (serial boards drain their input then).
POLL_INTERVAL = 0.05
#: The thread wakes at least this often, so its heartbeat proves it is alive.
MAX_SLEEP = 1.0


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


@dataclass
class _Pending:
    command: Command
    replies: list[Any] = field(default_factory=list)


class Bike:
    """Owns the drivers and the hardware thread; every public method is safe from any thread."""

    def __init__(self, config: Config, hardware: Hardware, outbox: Outbox,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.hardware = hardware
        self.outbox = outbox
        self.clock = clock
        self.heartbeat = clock()
        #: Monotonic time the broker went away, or None while connected (set by the service).
        self.offline_since: float | None = None
        self.drivers: dict[str, Driver] = {}
        self.failed: dict[str, str] = {}  # topic -> why its driver is not running
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._scheduler = Scheduler(clock)
        self._pending: dict[str, _Pending] = {}
        self._last_write: dict[str, float] = {}
        self._last_report: dict[str, tuple[float, float]] = {}  # topic -> (time, value)
        self._safe_for: float | None = None  # the outage (its offline_since) already made safe
        self._opened = threading.Event()
        self._thread: threading.Thread | None = None

    # -- called from other threads --------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start the hardware thread; return once every driver has been opened (or failed)."""
        self._thread = threading.Thread(target=self._run, name="hardware", daemon=True)
        self._thread.start()
        self._opened.wait(timeout)

    def submit(self, command: Command, reply: Any = None) -> None:
        """Queue a parsed command; ``reply`` is handed back with its outcome."""
        self._inbox.put(("command", (command, reply)))

    def reload(self, config: Config) -> None:
        """Replace every driver with those of ``config``."""
        self._inbox.put(("reload", config))

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

    def stop_time(self) -> float:
        """Seconds a stop may take: one command in flight plus every safe value, acknowledged."""
        waits = [d.options.get("ack_timeout", 0.0) * (d.options.get("retries", 0) + 1)
                 for d in self.config.drivers]
        return 2.0 + 2 * sum(waits)

    def alive(self, within: float) -> bool:
        """True if the hardware thread has shown life in the last ``within`` seconds."""
        return (self._thread is not None and self._thread.is_alive()
                and self.clock() - self.heartbeat < within)

    # -- the hardware thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._open()
        except Exception:
            log.exception("opening the hardware failed")
        self._opened.set()
        while True:
            self.heartbeat = self.clock()
            try:
                if self._step():
                    return
            except Exception:
                # Nothing may end this thread early: it is the only one that can make
                # the bike safe at shutdown.
                log.exception("hardware thread error")

    def _step(self) -> bool:
        """One pass: run due jobs, take queued work, apply commands; True after a stop."""
        wait = min(self._scheduler.run_due(), self._next_deferred(), MAX_SLEEP)
        batch: list[tuple[str, Any]] = []
        try:
            batch.append(self._inbox.get(timeout=max(wait, 0.0)))
            # Take everything queued so far, so a burst of commands coalesces: latest wins.
            while True:
                batch.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        for kind, item in batch:
            if kind == "stop":
                self._close(safe=True)
                return True
            self._handle(kind, item)
        self._check_offline()
        self._apply_pending()
        return False

    def _handle(self, kind: str, item: Any) -> None:
        if kind == "command":
            command, reply = item
            pending = self._pending.setdefault(command.topic, _Pending(command))
            pending.command = command
            if reply is not None:
                pending.replies.append(reply)
        elif kind == "event":
            topic, payload = item
            self.outbox.event(topic, payload)
        elif kind == "reload":
            self._close(safe=False)
            self.config = item
            self._open()
            log.info("configuration reloaded: %d drivers", len(self.drivers))

    def _open(self) -> None:
        """Open boards and drivers; one that fails is logged and the rest carry on."""
        self.failed.clear()
        for name, settings in self.config.serial.items():
            self.hardware.ports[name] = SerialBoard(name, settings, self.hardware)
        for spec in self.config.drivers:
            cls = DRIVERS[spec.kind]
            fields = {"TOPIC": spec.topic, "DRIVER": spec.kind}
            try:
                driver = cls(spec.topic, spec.options, self.hardware)
            except Exception as exc:
                self.failed[spec.topic] = f"{spec.kind} driver did not start: {exc}"
                log.error("%s: %s", spec.topic, self.failed[spec.topic], extra=fields)
                continue
            self.drivers[spec.topic] = driver
            if isinstance(driver, Sensor):
                self._scheduler.every(spec.options["interval"],
                                      lambda d=driver: self._read(d), spec.topic)
            elif isinstance(driver, EventSource):
                driver.start(lambda payload, t=spec.topic: self._inbox.put(("event", (t, payload))))
            log.info("%s: %s driver ready", spec.topic, spec.kind, extra=fields)
        self._scheduler.every(POLL_INTERVAL, self._poll_all, "poll")
        self._go_safe("start-up")  # a defined state at boot, not the last commanded one

    def _close(self, safe: bool) -> None:
        for pending in self._pending.values():  # every requester hears back
            self.outbox.outcome(pending.command, pending.replies, None,
                                "not applied: the hardware was closed (stop or reload)")
        self._pending.clear()
        if safe:
            self._go_safe("shutdown")
        self._scheduler.clear()
        self._last_report.clear()
        for driver in list(self.drivers.values()) + list(self.hardware.ports.values()):
            try:
                driver.close()
            except Exception:
                log.exception("closing %r failed", driver)
        self.drivers.clear()
        self.hardware.ports.clear()

    def _poll_all(self) -> None:
        for driver in self.drivers.values():
            try:
                driver.poll()
                if isinstance(driver, Sensor) and driver.settings["deadband"] > 0:
                    self._read(driver, on_change=True)
            except Exception:
                log.exception("%s: poll failed", driver.topic, extra={"TOPIC": driver.topic})

    def _read(self, driver: Sensor, on_change: bool = False) -> None:
        """Report a sensor: always on its interval; on a poll only past its dead band."""
        value = driver.read()
        if value is None:
            return
        now = self.clock()
        last = self._last_report.get(driver.topic)
        if on_change and last is not None and (
                abs(value - last[1]) <= driver.settings["deadband"]
                or now - last[0] < 1.0 / driver.settings["max_rate"]):
            return
        self._last_report[driver.topic] = (now, value)
        self.outbox.report(driver.topic, value, sensor=True)

    def _actuators(self) -> dict[str, Actuator]:
        return {t: d for t, d in self.drivers.items() if isinstance(d, Actuator)}

    def _go_safe(self, why: str) -> None:
        for topic, actuator in self._actuators().items():
            if actuator.safe_value is None:
                continue  # "hold": never move it unasked (an incline under a rider)
            self._pending.pop(topic, None)
            self._write(actuator, Command(topic, actuator.safe_value), [], why)

    def _check_offline(self) -> None:
        """Make actuators safe once per outage that lasts offline_safe_after seconds."""
        since = self.offline_since
        if since is None or since == self._safe_for:
            return
        if self.clock() - since >= self.config.offline_safe_after:
            log.warning("broker unreachable for %.0f s: actuators to safe values",
                        self.clock() - since)
            self._safe_for = since
            self._go_safe("broker lost")

    def _next_deferred(self) -> float:
        """Seconds until a command held back by min_interval may be written."""
        waits = [self._last_write.get(t, -1e9) + d.settings["min_interval"] - self.clock()
                 for t, d in self._actuators().items() if t in self._pending]
        return max(0.0, min(waits)) if waits else MAX_SLEEP

    def _apply_pending(self) -> None:
        for topic in list(self._pending):
            actuator = self.drivers.get(topic)
            pending = self._pending[topic]
            if not isinstance(actuator, Actuator):
                del self._pending[topic]
                why = self.failed.get(topic, f"no {topic} driver is running")
                self.outbox.outcome(pending.command, pending.replies, None, why)
                continue
            ready_at = self._last_write.get(topic, -1e9) + actuator.settings["min_interval"]
            if self.clock() < ready_at:
                continue  # protects the motor; a newer command may still replace this one
            del self._pending[topic]
            # Checked again here: a reload may have narrowed the range since it was parsed.
            problem = actuator.limits.problem(pending.command.value)
            if problem:
                self.outbox.outcome(pending.command, pending.replies, None,
                                    f"{pending.command.value:g} is {problem}")
                continue
            self._write(actuator, pending.command, pending.replies, "command")

    def _write(self, actuator: Actuator, command: Command, replies: list[Any],
               why: str) -> None:
        fields = {"TOPIC": command.topic, "DRIVER": actuator.KIND}
        try:
            value = actuator.apply(command.value)
        except Exception as exc:
            log.error("%s: could not apply %g (%s): %s", command.topic, command.value, why, exc,
                      extra=fields)
            self.outbox.outcome(command, replies, None, f"hardware error: {exc}")
            return
        finally:
            self._last_write[command.topic] = self.clock()
        log.info("%s: set to %g (%s)", command.topic, value, why, extra=fields)
        self.outbox.report(command.topic, value, sensor=False)
        self.outbox.outcome(command, replies, value, None)
