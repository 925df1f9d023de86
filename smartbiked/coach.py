"""The trainer modes in the running daemon: a :class:`~smartbiked.trainer.Trainer` fed
with the bike's readings, moving its resistance through the ordinary command path.

The Trainer itself is pure (no threads, no MQTT). The coach gives it a lock, a ``coach``
thread that ticks it four times a second, and two outlets: its resistance and incline
goals become ordinary :class:`~smartbiked.topics.Command` objects for the hardware
thread (so limits, ``min_interval`` and safe values apply as to any app's command), and
its mode report goes to the outbox as retained state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from smartbiked.config import Config
from smartbiked.topics import Command, mode_payload, topic_path
from smartbiked.trainer import RESISTANCE, Trainer

log = logging.getLogger("smartbiked.coach")

#: Seconds between two trainer ticks.
TICK = 0.25

#: Topics a trainer handles itself; they never reach the hardware thread.
TRAINER_TOPICS = frozenset({"targetpower", "grade"})


class Coach:
    """One bike's trainer, safe to call from any thread."""

    def __init__(self, config: Config, submit: Callable[[Command], None],
                 publish_state: Callable[[str, dict[str, Any]], None],
                 controller: str = "mqtt") -> None:
        limits = config.actuator_limits()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._config = config
        self._publish_state = publish_state
        #: Who controls the bike, shown in the mode report: "mqtt" (any MQTT app; also
        #: nobody) or "bluetooth" (a Bluetooth app holds FTMS control).
        self.controller = controller
        #: Who set the ERG or simulation running ("mqtt" or "bluetooth"): only a mode a
        #: Bluetooth app set is left when that app lets go of control.
        self.owner = "mqtt"
        self.trainer = Trainer(
            config.trainer, limits["resistance"],
            submit=lambda percent: submit(Command("resistance", percent)),
            announce=self._announce, clock=time.monotonic,
            incline_limits=limits.get("incline"),
            submit_incline=lambda degrees: submit(Command("incline", degrees)))

    @classmethod
    def create(cls, config: Config, submit: Callable[[Command], None],
               publish_state: Callable[[str, dict[str, Any]], None],
               controller: str = "mqtt") -> Coach | None:
        """A coach when ``[trainer] enabled`` and the bike has a resistance actuator."""
        if not config.trainer.enabled or "resistance" not in config.actuator_limits():
            return None
        return cls(config, submit, publish_state, controller)

    def _announce(self, body: dict[str, Any]) -> None:
        if self._stop.is_set():
            return  # a stopped coach's mode is history: the new one announces its own
        cfg = self._config
        body = {**body, "controller": self.controller}
        self._publish_state(topic_path(cfg.bike_id, "mode", "report"),
                            mode_payload(body, time.time(), cfg.device_name))

    def command(self, command: Command, source: str = "mqtt", *,
                tilt: bool = True) -> str | None:
        """A ``targetpower`` or ``grade`` command from ``source`` ("mqtt" or "bluetooth"):
        None when taken, else the refusal reason. ``tilt=False``: a grade never tilts."""
        with self._lock:
            if self._stop.is_set():  # replaced by a reload, or stopping
                return "the trainer is restarting: send the command again"
            why = self.trainer.command(command, tilt=tilt)
            if why is None and self.trainer.mode != RESISTANCE:
                self.owner = source
            return why

    def mode_owner(self) -> str | None:
        """Who set the running ERG or simulation; None in the resistance mode."""
        with self._lock:
            return None if self.trainer.mode == RESISTANCE else self.owner

    def app_command(self, command: Command) -> None:
        """An app moved resistance or incline itself: resistance leaves ERG/simulation."""
        with self._lock:
            if command.topic == "resistance":
                self.trainer.resistance_commanded(command.value)
            elif command.topic == "incline":
                self.trainer.incline_commanded()

    def reading(self, topic: str, value: float) -> None:
        """Every reading and actuator report the bike publishes."""
        with self._lock:
            self.trainer.reading(topic, value)

    def set_controller(self, controller: str, release: str | None = None) -> None:
        """Control changed hands ("mqtt" or "bluetooth"): the mode report says so.

        ``release``: also leave an ERG or simulation a Bluetooth app set (resistance
        holds), for this reason; an MQTT app's mode runs on.
        One report says both: retained state is coalesced, so a second one sent right
        after would hide the first one's reason.
        """
        with self._lock:
            changed = controller != self.controller
            self.controller = controller
            if (release is not None and self.trainer.mode != RESISTANCE
                    and self.owner == "bluetooth"):
                self.trainer.release(release)  # announces, with the new controller
            elif changed:
                self._announce(self.trainer.report())

    def release(self, reason: str) -> None:
        """Leave ERG or simulation, moving nothing (stop, reload, the bike made safe)."""
        with self._lock:
            self.trainer.release(reason)

    def start(self, offline_too_long: Callable[[], bool]) -> None:
        """Start the ``coach`` thread; ``offline_too_long()`` True means the bike is being
        made safe (no broker for offline_safe_after): the trainer lets go then."""
        threading.Thread(target=self._run, args=(offline_too_long,), name="coach",
                         daemon=True).start()

    def stop(self) -> None:
        """End the thread (stop, reload); call release() first to announce why."""
        self._stop.set()

    def _run(self, offline_too_long: Callable[[], bool]) -> None:
        while not self._stop.wait(TICK):
            try:
                with self._lock:
                    if offline_too_long():
                        self.trainer.release("broker unreachable: actuators made safe")
                    else:
                        self.trainer.tick()
            except Exception:
                log.exception("trainer tick failed")
