"""What the bike shows over Bluetooth, built from the readings it publishes on MQTT.

Pure: a backend feeds :meth:`BikeState.reading` (and the revolution events) and asks
for the encoded values to notify. A reading older than ``stale_after`` seconds is left
out of the values, so an app shows nothing rather than a number stuck from before a
sensor dropout.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from smartbiked import ftms

MPS_TO_KMH = 3.6


class _Revolutions:
    """A cumulative revolution count and the time of its last event, as CPS wants them."""

    def __init__(self, ticks_per_second: int) -> None:
        self.ticks_per_second = ticks_per_second
        self.count: int | None = None
        self.ticks = 0

    def add(self, revolutions: int, at: float) -> None:
        self.count = (self.count or 0) + revolutions
        self.ticks = int(at * self.ticks_per_second)


class BikeState:
    """The latest readings and revolution counters; safe to call from any thread.

    ``level_of(percent)`` turns the resistance actuator's percent into the FTMS
    resistance level shown in Indoor Bike Data (see ControlPoint.level_of).
    """

    def __init__(self, level_of: Callable[[float], float], *, stale_after: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._level_of = level_of
        self.stale_after = stale_after
        self._clock = clock
        self._lock = threading.Lock()
        self._readings: dict[str, tuple[float, float]] = {}
        self._crank = _Revolutions(1024)
        self._wheel = _Revolutions(2048)

    def reading(self, topic: str, value: float) -> None:
        """A reading or actuator report (speed m/s, cadence, power, heartrate, resistance)."""
        if math.isfinite(value):
            with self._lock:
                self._readings[topic] = (value, self._clock())

    def crank_event(self, revolutions: int = 1, at: float | None = None) -> None:
        """Crank revolutions counted by the pedal sensor (``at`` on the state's clock)."""
        with self._lock:
            self._crank.add(revolutions, self._clock() if at is None else at)

    def wheel_event(self, revolutions: int = 1, at: float | None = None) -> None:
        """Wheel (or brake) revolutions counted by the speed sensor."""
        with self._lock:
            self._wheel.add(revolutions, self._clock() if at is None else at)

    def _fresh(self, topic: str, now: float) -> float | None:
        entry = self._readings.get(topic)
        if entry is None or now - entry[1] > self.stale_after:
            return None
        return entry[0]

    def indoor_bike_data(self) -> bytes:
        """The Indoor Bike Data value now."""
        with self._lock:
            now = self._clock()
            speed = self._fresh("speed", now)
            resistance = self._readings.get("resistance")  # an actuator's state never ages
            return ftms.encode_indoor_bike_data(ftms.IndoorBikeData(
                speed=None if speed is None else speed * MPS_TO_KMH,
                cadence=self._fresh("cadence", now),
                resistance=None if resistance is None else round(self._level_of(resistance[0])),
                power=self._fresh("power", now),
                heart_rate=self._fresh("heartrate", now)))

    def cycling_power(self) -> bytes | None:
        """The Cycling Power Measurement now; None without a fresh power reading."""
        with self._lock:
            power = self._fresh("power", self._clock())
            if power is None:
                return None
            crank, wheel = self._crank, self._wheel
            return ftms.encode_cycling_power(ftms.CyclingPower(
                power, crank.count, crank.ticks if crank.count is not None else None,
                wheel.count, wheel.ticks if wheel.count is not None else None))

    def heart_rate(self) -> bytes | None:
        """The Heart Rate Measurement now; None without a fresh heart-rate reading."""
        with self._lock:
            bpm = self._fresh("heartrate", self._clock())
        return None if bpm is None else ftms.encode_heart_rate(ftms.HeartRate(round(bpm)))
