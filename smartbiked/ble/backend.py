"""What a Bluetooth backend must offer the daemon: one small interface, two stacks.

A backend puts a :class:`~smartbiked.ble.control.ControlPoint` and a
:class:`~smartbiked.ble.peripheral.BikeState` on a radio as the FTMS, Cycling Power and
Heart Rate services. It is built with both (and the advertised name) and used from one
asyncio loop, the ``ble`` thread's:

* :meth:`start` (must): register the services and start advertising; raise
  :class:`~smartbiked.errors.BluetoothUnavailable` with a one-line reason when the stack
  or adapter is not there (the daemon logs it and tries again later);
* :meth:`run` (must): notify the current readings every ``period`` seconds until
  ``stop`` is set; a failed notification is logged, never raised;
* :meth:`control_lost` (must): called from any thread when an MQTT app took over;
  revoke Bluetooth control and notify Machine Status "Control Permission Lost";
* :meth:`close` (must): unregister and release the stack; safe to call twice.

A backend **may** set ``ended`` (a short reason, already logged) when :meth:`run`
returns because the stack went away; the daemon shows it in the health message.

Connections, Control Point writes and CCCD checks are the backend's own business; it
hands every write to ``control.write(peer, bytes)`` and sends back what it answers.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class TrainerBackend(Protocol):
    """The interface every Bluetooth backend implements (see the module docstring)."""

    async def start(self) -> None:
        """Register the services and advertise."""

    async def run(self, period: float, stop: asyncio.Event) -> None:
        """Notify the readings every ``period`` seconds until ``stop`` is set."""

    def control_lost(self, reason: str) -> None:
        """An MQTT app took control; callable from any thread."""

    async def close(self) -> None:
        """Unregister and release the stack."""
