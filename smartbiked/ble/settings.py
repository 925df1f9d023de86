"""The ``[ble]`` table: the bike as a Bluetooth smart trainer (checked by config.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from smartbiked.topics import Limits

#: The backends, and the Python package each needs (the ``ble`` extra installs both).
BACKENDS = {"bluez": "dbus_fast", "bumble": "bumble"}


@dataclass(frozen=True)
class BleSettings:
    """The ``[ble]`` table."""

    enabled: bool = False
    backend: str = "bluez"
    adapter: str = "hci0"
    transport: str = "usb:0"
    name: str = ""
    notify_period: float = 1.0
    resistance_levels: float = 20.0
    stale_after: float = 5.0
    incline: bool = False
    mqtt_hold: float = 30.0

    def limits(self, control_limits: Mapping[str, Limits]) -> dict[str, Limits]:
        """What Bluetooth apps may command, of what MQTT apps may: the incline only
        with ``incline = true``."""
        return {topic: limits for topic, limits in control_limits.items()
                if topic != "incline" or self.incline}
