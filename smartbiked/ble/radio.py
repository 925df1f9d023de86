"""The ``ble`` thread: one Bluetooth backend on an asyncio loop of its own.

The daemon makes one :class:`Radio` when ``[ble] enabled``. It owns the Control Point
and the bike's Bluetooth state (both pure), picks the backend from the settings,
starts it, notifies the readings, and when the stack or adapter is missing or goes
away (bluetoothd restarted, a dongle unplugged) logs why once and tries again, so a
bike recovers without anyone logging in. MQTT never waits for it: everything the
service calls here is thread-safe and returns at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from smartbiked.ble.backend import TrainerBackend
from smartbiked.ble.control import ControlPoint, Submit
from smartbiked.ble.peripheral import BikeState
from smartbiked.ble.settings import BleSettings
from smartbiked.errors import BluetoothUnavailable
from smartbiked.topics import Limits

log = logging.getLogger("smartbiked.ble")

#: Seconds between tries when the stack or adapter is not there (doubling up to the last).
RETRY = (2.0, 5.0, 10.0, 30.0)


def make_backend(settings: BleSettings, control: ControlPoint, state: BikeState, *,
                 name: str, seed: str) -> TrainerBackend:
    """The backend ``settings`` name; its stack is imported only now."""
    if settings.backend == "bumble":
        from smartbiked.ble.bumble_backend import BumbleBackend
        return BumbleBackend(control, state, name=name, transport=settings.transport,
                             seed=seed)
    from smartbiked.ble.bluez_backend import BluezTrainer
    return BluezTrainer(control, state, name=name, adapter=settings.adapter)


class Radio:
    """The bike as a Bluetooth smart trainer, run on the ``ble`` thread.

    ``submit(topic, payload)`` runs a Control Point request through the MQTT command
    path (None: taken, else the refusal reason); ``on_control(controller, reason)`` is
    told when Bluetooth control changes hands (``controller`` None: nobody);
    ``may_take()`` says why a Bluetooth app may not take control now (None: it may);
    ``on_change()`` is told when :meth:`health` changed (advertising, unavailable).
    """

    def __init__(self, settings: BleSettings, limits: Mapping[str, Limits], submit: Submit,
                 on_control: Callable[[str | None, str], None], *, name: str,
                 seed: str, may_take: Callable[[], str | None] | None = None,
                 on_change: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.name = name
        self.seed = seed
        self.control = ControlPoint(submit, limits, levels=settings.resistance_levels,
                                    on_control=on_control, may_take=may_take)
        self.state = BikeState(self.control.level_of, stale_after=settings.stale_after)
        #: "starting", "advertising" or "unavailable" (with :attr:`reason`), for health.
        self.status = "starting"
        self.reason: str | None = None
        self._on_change = on_change
        self._backend: TrainerBackend | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- called by the service, from any thread ----------------------------------------

    def start(self) -> None:
        """Start the ``ble`` thread."""
        self._thread = threading.Thread(target=self._main, name="ble", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Unregister, close the stack and end the thread, waiting ``timeout`` seconds
        at most for it (0: just ask; call again later to wait)."""
        self._stopping.set()
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass  # the loop has already ended
        if self._thread is not None and timeout > 0:
            self._thread.join(timeout)

    def reading(self, topic: str, value: float) -> None:
        """A reading or actuator report the bike published."""
        self.state.reading(topic, value)

    def revolutions(self, topic: str, count: int, at: float) -> None:
        """Whole crank (cadence) or wheel (speed) revolutions counted at ``at``."""
        if topic == "cadence":
            self.state.crank_event(count, at)
        elif topic == "speed":
            self.state.wheel_event(count, at)

    def control_lost(self, reason: str) -> None:
        """An MQTT app took over: Bluetooth control is revoked (Control Permission Lost)."""
        backend = self._backend
        if backend is not None:
            backend.control_lost(reason)
        else:
            self.control.revoke(reason)

    def health(self) -> dict[str, Any]:
        """The ``bluetooth`` part of the health message."""
        body: dict[str, Any] = {"state": self.status, "backend": self.settings.backend,
                                "name": self.name}
        if self.reason:
            body["reason"] = self.reason
        if self.control.controller is not None:
            body["controller"] = self.control.controller
        return body

    # -- the ble thread --------------------------------------------------------------------

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except Exception:
            log.exception("Bluetooth thread failed; MQTT goes on without it")

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = stop = asyncio.Event()
        if self._stopping.is_set():
            return
        failures = 0
        while not stop.is_set():
            backend: TrainerBackend | None = None
            try:
                backend = make_backend(self.settings, self.control, self.state,
                                       name=self.name, seed=self.seed)
                await backend.start()
                self._backend = backend
                self._up()
                failures = 0
                await backend.run(self.settings.notify_period, stop)
            except BluetoothUnavailable as exc:
                self._down(str(exc))
                failures += 1
            except Exception as exc:
                reason = f"Bluetooth: {type(exc).__name__}: {exc}"
                if reason != self.reason:  # the traceback once, not on every retry
                    log.exception("Bluetooth backend failed")
                self._down(reason)
                failures += 1
            finally:
                self._backend = None
                # A controller held by a link that is gone with the stack is released.
                self.control.revoke("Bluetooth stopped")
                if backend is not None:
                    try:
                        await backend.close()
                    except Exception:
                        log.exception("closing the Bluetooth backend failed")
            if stop.is_set():
                break
            if failures == 0:
                # The backend said why it stopped (its `ended`) in the log already.
                ended = getattr(backend, "ended", None)
                self._down(f"Bluetooth: {ended}" if ended else "Bluetooth: the backend stopped",
                           logged=ended is not None)
                failures = 1
            wait = RETRY[min(failures, len(RETRY)) - 1]
            try:
                await asyncio.wait_for(stop.wait(), wait)
            except TimeoutError:
                pass

    def _up(self) -> None:
        self.status, self.reason = "advertising", None
        log.info("Bluetooth: advertising as %r (%s)", self.name, self.settings.backend)
        self._changed()

    def _down(self, reason: str, logged: bool = False) -> None:
        if reason != self.reason:  # once per distinct reason, not once per retry
            if not logged:
                log.warning("%s; trying again", reason)
            self.status, self.reason = "unavailable", reason
            self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()
