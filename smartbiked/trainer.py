"""Smart-trainer modes as pure logic: ERG (hold a target power) and grade simulation.

Like a Bluetooth FTMS trainer, the bike can be driven three ways: a resistance level
(``resistance/control``, the default), a target power (``targetpower/control``: ERG)
or a road (``grade/control``: simulation). :class:`Trainer` holds the mode and turns
sensor readings into resistance moves. It has no MQTT, no thread and no clock of its
own: the service feeds it commands and readings, calls :meth:`Trainer.tick` a few
times a second, and the trainer answers through callbacks (``submit`` moves the
resistance, ``submit_incline`` the incline, ``announce`` publishes the mode).
Every method must be called from one thread at a time.

How resistance relates to power comes from a calibration table (resistance % ->
braking W at ``calibration_at`` cadence or speed) scaled by
``(reading / calibration_at) ** calibration_exponent``: that is the feed-forward. In
ERG a slow integral correction (a factor on the table, so it carries over from one
target to the next) removes what the table gets wrong, only once the resistance has
caught up and the power filter has settled, so it never chases noise or its own lag.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from smartbiked.rider import RiderProfile, resisting_force
from smartbiked.topics import Command, Limits

ERG, SIM, RESISTANCE = "erg", "sim", "resistance"
#: The feed-forward never assumes the brake turns slower than this share of
#: ``calibration_at``: a rider starting at 20 RPM would otherwise get full brake.
SLOWEST_SHARE = 0.6
#: Power (W) below which a bike without a cadence sensor counts as not pedalled.
IDLE_POWER = 20.0
#: The integral correction stays within these factors of the calibration table.
TRIM_LIMITS = (0.5, 2.0)
#: Drivetrain efficiency in the road model (as in the virtual rider).
EFFICIENCY = RiderProfile().efficiency

DEFAULT_CALIBRATION: tuple[tuple[float, float], ...] = (
    (0.0, 25.0), (25.0, 100.0), (50.0, 250.0), (75.0, 430.0), (100.0, 650.0))


@dataclass(frozen=True)
class TrainerSettings:
    """The ``[trainer]`` table; see the README's configuration reference for each key."""

    enabled: bool = False
    calibration: tuple[tuple[float, float], ...] = DEFAULT_CALIBRATION
    calibration_sensor: str = "cadence"
    calibration_at: float = 90.0
    calibration_exponent: float = 1.6
    max_power: float = 1500.0
    erg_gain: float = 0.15
    power_filter: float = 1.5
    resistance_rate: float = 10.0
    min_change: float = 0.5
    min_cadence: float = 30.0
    settle: float = 2.0
    sensor_timeout: float = 5.0
    mass: float = 85.0
    crr: float = 0.004
    cda: float = 0.32
    air_density: float = 1.225
    grade_gain: float = 1.0
    grade_offset: float = 0.0
    incline_follows_grade: bool = False
    incline_min: float = -5.0
    incline_max: float = 10.0
    incline_rate: float = 0.5

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> TrainerSettings:
        """Settings from a validated ``[trainer]`` table (unknown keys ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in options.items() if k in known}
        if "calibration" in values:
            values["calibration"] = tuple((float(p), float(w)) for p, w in values["calibration"])
        return cls(**values)


class Calibration:
    """Resistance % <-> braking power (W) at the calibration reference.

    A monotone cubic through the table's points (Fritsch-Carlson): a brake's curve
    bends upwards, and straight lines between points would overstate it by a few per
    cent, which ERG then has to learn away after every target change. The powers
    must rise with the resistance (the config loader checks it), so the curve rises
    too and can be read both ways.
    """

    def __init__(self, points: Sequence[tuple[float, float]]) -> None:
        pts = sorted((float(p), float(w)) for p, w in points)
        self.percents = [p for p, _ in pts]
        self.powers = [w for _, w in pts]
        self._slopes = _monotone_slopes(self.percents, self.powers)

    def power(self, percent: float) -> float:
        """Braking W at ``percent`` (clamped to the table's ends)."""
        xs, ys, ms = self.percents, self.powers, self._slopes
        if percent <= xs[0]:
            return ys[0]
        if percent >= xs[-1]:
            return ys[-1]
        i = bisect.bisect_right(xs, percent) - 1
        h = xs[i + 1] - xs[i]
        t = (percent - xs[i]) / h
        return (ys[i] * (2 * t**3 - 3 * t**2 + 1) + h * ms[i] * (t**3 - 2 * t**2 + t)
                + ys[i + 1] * (-2 * t**3 + 3 * t**2) + h * ms[i + 1] * (t**3 - t**2))

    def percent(self, power: float) -> float:
        """The resistance % that brakes ``power`` W (clamped to the table's ends)."""
        if power <= self.powers[0]:
            return self.percents[0]
        if power >= self.powers[-1]:
            return self.percents[-1]
        i = bisect.bisect_right(self.powers, power) - 1
        lo, hi = self.percents[i], self.percents[i + 1]
        for _ in range(40):  # bisection: the curve rises, 40 halvings is far below 0.001 %
            mid = 0.5 * (lo + hi)
            if self.power(mid) < power:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)


def _monotone_slopes(xs: list[float], ys: list[float]) -> list[float]:
    """Fritsch-Carlson tangents: a cubic through the points that never overshoots them."""
    n = len(xs)
    deltas = [(ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) for i in range(n - 1)]
    slopes = [deltas[0]] + [0.5 * (deltas[i - 1] + deltas[i]) for i in range(1, n - 1)]
    slopes.append(deltas[-1])
    for i, d in enumerate(deltas):
        a, b = slopes[i] / d, slopes[i + 1] / d
        if a * a + b * b > 9.0:
            k = 3.0 / math.sqrt(a * a + b * b)
            slopes[i], slopes[i + 1] = k * a * d, k * b * d
    return slopes


def road_power(speed: float, grade: float, *, mass: float, crr: float, cda: float,
               air_density: float = 1.225, wind: float = 0.0) -> float:
    """Crank power in W that riding at ``speed`` m/s up ``grade`` percent takes.

    The rider model's balance (:func:`smartbiked.rider.resisting_force`: gravity on
    the slope, rolling resistance) plus air drag on the air speed, ``wind`` being a
    head wind in m/s (FTMS convention: positive against the rider). Negative on a
    descent steep enough to pull the rider along.
    """
    incline = math.degrees(math.atan(grade / 100.0))
    ground = RiderProfile(mass=mass, crr=crr, cda=0.0, rho=air_density, brake_force=0.0)
    air = speed + wind
    force = (resisting_force(speed, incline, 0.0, ground)
             + 0.5 * air_density * cda * air * abs(air))
    return speed * force / EFFICIENCY


def calibrate(samples: Sequence[tuple[float, float, float]], at: float,
              exponent: float | None = None) -> tuple[tuple[tuple[float, float], ...], float]:
    """A calibration table and exponent from ``(resistance, reading, power)`` samples.

    ``reading`` is the cadence (or speed) while ``power`` was measured. Samples at two
    or more readings for one resistance give the exponent (the median of the slopes
    of log power against log reading); ``exponent`` overrides it. Each resistance's
    powers are then brought to ``at`` and averaged. Raises ValueError when the samples
    cannot make a table (fewer than two resistances, powers not rising).
    """
    groups: dict[float, list[tuple[float, float]]] = {}
    for resistance, reading, power in samples:
        if reading > 0 and power > 0:
            groups.setdefault(float(resistance), []).append((reading, power))
    if exponent is None:
        slopes = []
        for points in groups.values():
            xs = [math.log(r) for r, _ in points]
            ys = [math.log(p) for _, p in points]
            mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
            spread = sum((x - mean_x) ** 2 for x in xs)
            if spread > 1e-4:
                slopes.append(sum((x - mean_x) * (y - mean_y)
                                  for x, y in zip(xs, ys, strict=True)) / spread)
        if not slopes:
            raise ValueError("the exponent needs samples at two cadences for one resistance")
        exponent = sorted(slopes)[len(slopes) // 2]
    table = tuple(sorted(
        (resistance, round(sum(p * (at / r) ** exponent for r, p in pts) / len(pts), 1))
        for resistance, pts in groups.items()))
    if len(table) < 2:
        raise ValueError("a calibration needs at least two resistance levels")
    if any(b[1] <= a[1] for a, b in zip(table, table[1:], strict=False)):
        raise ValueError("braking power does not rise with resistance: "
                         + ", ".join(f"{p:g} %: {w:g} W" for p, w in table))
    return table, round(exponent, 3)


@dataclass
class _Reading:
    value: float
    at: float


class Trainer:
    """The bike's trainer modes; see the module docstring.

    ``submit(percent)`` moves the resistance actuator; ``announce(body)`` publishes the
    mode report body (``{"mode", "target", ...}``; the caller adds timestamp and
    metadata); ``submit_incline(degrees)`` tilts the incline when the settings say
    grade does so. ``clock`` is a monotonic clock in seconds.
    """

    def __init__(self, settings: TrainerSettings, resistance_limits: Limits,
                 submit: Callable[[float], None], announce: Callable[[dict[str, Any]], None],
                 clock: Callable[[], float] = time.monotonic, *,
                 incline_limits: Limits | None = None,
                 submit_incline: Callable[[float], None] | None = None) -> None:
        self.settings = settings
        self.limits = resistance_limits
        self.incline_limits = incline_limits
        self.calibration = Calibration(settings.calibration)
        self._submit = submit
        self._submit_incline = submit_incline
        self._announce = announce
        self._clock = clock
        self.mode = RESISTANCE
        self.target: float | None = None
        self.params: dict[str, float] = {}
        self._readings: dict[str, _Reading] = {}
        #: Where the resistance is: what we last sent, else what the actuator reported.
        self.resistance: float | None = None
        self._sent: float | None = None
        self._power: float | None = None        # filtered power, W
        self._speed: float | None = None        # filtered speed, m/s
        self._trim = 1.0                        # brake strength / calibration's
        self._last_tick: float | None = None
        self._pedalling = True
        self._resume_cap: float | None = None  # no more brake than this until up to speed
        self._resume_since = 0.0
        self._quiet_since = clock()             # since when nothing disturbed the power
        self._incline: float | None = None
        self._incline_goal: float | None = None
        self._tilting = False
        self._announce_mode()

    # -- commands -------------------------------------------------------------------------

    def command(self, cmd: Command, *, tilt: bool = True) -> str | None:
        """Apply a ``targetpower`` or ``grade`` command; None when accepted, else why not.

        ``tilt=False``: a grade never tilts the frame, whatever ``incline_follows_grade``
        says (a Bluetooth app without ``[ble] incline``).
        """
        now = self._clock()
        if cmd.topic == "targetpower":
            if cmd.value == 0:
                if self.mode == ERG:
                    self._leave("target power 0")
                return None
            if not self._fresh("power", now):
                return (f"no power reading in the last {self.settings.sensor_timeout:g} s: "
                        "ERG needs the power sensor")
            entering = self.mode != ERG
            self.mode, self.target, self.params = ERG, cmd.value, {}
            self._quiet_since = now
            self._tilting = False  # the frame stays where the last grade left it
            if entering:
                self._start(now)
            self._announce_mode()
            return None
        if cmd.topic == "grade":
            if not self._fresh("speed", now):
                return (f"no speed reading in the last {self.settings.sensor_timeout:g} s: "
                        "grade simulation needs the speed sensor")
            entering = self.mode != SIM
            self.mode, self.target, self.params = SIM, cmd.value, dict(cmd.params)
            if entering:
                self._start(now)
            self._tilting = (tilt and self.settings.incline_follows_grade
                             and self._submit_incline is not None)
            self._announce_mode()
            return None
        return f"{cmd.topic} is not a trainer command"

    def resistance_commanded(self, percent: float | None = None) -> None:
        """A resistance command came from an app: leave ERG or simulation, as FTMS does."""
        if percent is not None:
            self.resistance = self._sent = percent
        if self.mode != RESISTANCE:
            self._leave("resistance commanded")

    def incline_commanded(self) -> None:
        """An incline command came from an app: grade stops tilting until the next grade."""
        self._tilting = False

    def release(self, reason: str) -> None:
        """Leave ERG or simulation without moving anything (the bike goes safe, a reload)."""
        if self.mode != RESISTANCE:
            self._leave(reason)

    # -- readings ---------------------------------------------------------------------------

    def reading(self, topic: str, value: float) -> None:
        """Every sensor reading (power, cadence, speed) and actuator report (resistance...)."""
        now = self._clock()
        if not math.isfinite(value):
            return
        previous = self._readings.get(topic)
        self._readings[topic] = _Reading(value, now)
        if topic == "power":
            self._power = _smooth(self._power, value, previous, now, self.settings.power_filter)
        elif topic == "speed":
            self._speed = _smooth(self._speed, value, previous, now, 1.0)
        elif topic == "resistance":
            # In ERG and simulation the reports are our own moves coming back, possibly
            # late: only the resistance mode (or an unknown position) takes them.
            if self.mode == RESISTANCE or self.resistance is None:
                self.resistance = self._sent = value
        elif topic == "incline":
            self._incline = value

    # -- the loop ---------------------------------------------------------------------------

    def tick(self) -> None:
        """Advance the loop: call every 0.25 to 1 s."""
        now = self._clock()
        dt = 0.0 if self._last_tick is None else max(0.0, min(now - self._last_tick, 1.0))
        self._last_tick = now
        if self.mode == RESISTANCE:
            return
        needed = "power" if self.mode == ERG else "speed"
        if not self._fresh(needed, now):
            self._leave(f"{needed} sensor lost: no reading for "
                        f"{self.settings.sensor_timeout:g} s")
            return
        pedalling = self._is_pedalling(now)
        if pedalling and not self._pedalling:
            # Starting again: the power filter still remembers the stop, and the slow
            # first turns would ask for more brake just when the rider needs less.
            self._power = None
            self._quiet_since = now
            self._resume_cap = self.resistance
            self._resume_since = now
        self._pedalling = pedalling
        if self._tilting:
            self._tilt(dt)
        if not pedalling:
            return  # hold: winding the brake up on a rider who stopped is the classic ERG trap
        goal = self._erg_goal(now, dt) if self.mode == ERG else self._sim_goal(now)
        if self._resume_cap is not None:
            # Timed from reaching speed, not from the last quiet moment: a capped goal far
            # from the resistance would keep the loop "busy" and the cap on for ever.
            if not self._up_to_speed(now):
                self._resume_since = now
            if now - self._resume_since >= self.settings.settle + self.settings.power_filter:
                self._resume_cap = None
            else:
                goal = min(goal, self._resume_cap)
        self._move(goal, dt, now)

    # -- internals ----------------------------------------------------------------------------

    def _fresh(self, topic: str, now: float) -> bool:
        r = self._readings.get(topic)
        return r is not None and now - r.at <= self.settings.sensor_timeout

    def _is_pedalling(self, now: float) -> bool:
        if self._fresh("cadence", now):
            return self._readings["cadence"].value >= self.settings.min_cadence
        return self._power is not None and self._power >= IDLE_POWER

    def _up_to_speed(self, now: float) -> bool:
        """Whether the brake turns at least SLOWEST_SHARE of its calibration speed."""
        s = self.settings
        r = self._readings.get(s.calibration_sensor)
        if r is None or now - r.at > s.sensor_timeout:
            return True  # nothing to tell: do not hold the loop back
        return r.value >= SLOWEST_SHARE * s.calibration_at

    def _brake_scale(self, now: float, floor: float = 0.0) -> float:
        """How much more than at the calibration reference the brake absorbs now.

        ``floor`` is the least share of the calibration speed assumed (ERG's guard
        against a slow start asking for full brake).
        """
        s = self.settings
        r = self._readings.get(s.calibration_sensor)
        if r is None or now - r.at > s.sensor_timeout:
            return 1.0
        value = self._speed if s.calibration_sensor == "speed" and self._speed else r.value
        share = max(value / s.calibration_at, floor, 0.05)
        return float(share ** s.calibration_exponent)

    def _erg_goal(self, now: float, dt: float) -> float:
        s = self.settings
        assert self.target is not None
        goal = self._erg_percent(now)
        if self.resistance is not None and abs(goal - self.resistance) > s.resistance_rate * dt:
            # Still on its way (a new target, a resume): the power shows the way, not the end.
            self._quiet_since = now
        if self._power is not None and now - self._quiet_since >= s.settle + s.power_filter:
            error = (self.target - self._power) / self.target
            # A brake at its end stop cannot do more: do not wind the correction up.
            if not (error > 0 and goal >= self.limits.high) and not (
                    error < 0 and goal <= self.limits.low):
                self._trim *= math.exp(-s.erg_gain * error * dt)
                self._trim = min(max(self._trim, TRIM_LIMITS[0]), TRIM_LIMITS[1])
            goal = self._erg_percent(now)
        return goal

    def _erg_percent(self, now: float) -> float:
        """The feed-forward: the table's resistance for the target at this cadence."""
        assert self.target is not None
        return self._percent(self.target / (self._brake_scale(now, SLOWEST_SHARE) * self._trim))

    def _sim_goal(self, now: float) -> float:
        s = self.settings
        grade = (self.target or 0.0) * s.grade_gain + s.grade_offset
        cda = self.params.get("cda")
        if cda is None and "cw" in self.params:
            cda = 2.0 * self.params["cw"] / s.air_density  # Cw = 0.5 rho CdA (kg/m)
        need = road_power(self._speed or 0.0, grade, mass=s.mass,
                          crr=self.params.get("crr", s.crr),
                          cda=s.cda if cda is None else cda, air_density=s.air_density,
                          wind=self.params.get("wind", 0.0))
        if need <= 0:
            return self.limits.low
        return self._percent(need / self._brake_scale(now))

    def _percent(self, reference_power: float) -> float:
        percent = self.calibration.percent(reference_power)
        return min(max(percent, self.limits.low), self.limits.high)

    def _move(self, goal: float, dt: float, now: float) -> None:
        """Move towards ``goal`` at the bounded rate; send only changes worth a motor move."""
        lim = self.limits
        current = self.resistance if self.resistance is not None else lim.low
        # The unrounded position keeps moving between sends, so slow drifts add up.
        self.resistance = _approach(current, goal, self.settings.resistance_rate * dt)
        value = _on_grid(self.resistance, lim)
        if value == self._sent:
            return
        small = self._sent is not None and abs(value - self._sent) < self.settings.min_change
        if small and value not in (lim.low, lim.high):  # the end stops are always reached
            return
        self._sent = value
        self._submit(value)

    def _tilt(self, dt: float) -> None:
        s = self.settings
        lim = self.incline_limits
        assert self._submit_incline is not None
        degrees = math.degrees(math.atan((self.target or 0.0) / 100.0))
        low, high = s.incline_min, s.incline_max
        if lim is not None:
            low, high = max(low, lim.low), min(high, lim.high)
        goal = min(max(degrees, low), high)
        current = self._incline_goal if self._incline_goal is not None else (
            self._incline if self._incline is not None else 0.0)
        self._incline_goal = _approach(current, goal, s.incline_rate * dt)
        value = _on_grid(self._incline_goal, lim) if lim else round(self._incline_goal, 3)
        if self._incline is None or value != self._incline:
            self._incline = value
            self._submit_incline(value)

    def _start(self, now: float) -> None:
        """Entering ERG or simulation from the resistance mode."""
        self._quiet_since = now
        self._incline_goal = None
        if self.resistance is None:
            self.resistance = self.limits.low

    def _leave(self, reason: str) -> None:
        self.mode, self.target, self.params = RESISTANCE, None, {}
        self._tilting = False
        self._announce_mode(reason)

    def _announce_mode(self, reason: str | None = None) -> None:
        self._announce(self.report(reason))

    def report(self, reason: str | None = None) -> dict[str, Any]:
        """The mode report body: ``{"mode", "target"}``, plus ``params`` and ``reason``."""
        target = self.target if self.mode != RESISTANCE else self._sent
        body: dict[str, Any] = {"mode": self.mode, "target": target}
        if self.params:
            body["params"] = dict(sorted(self.params.items()))
        if reason:
            body["reason"] = reason
        return body


def _approach(value: float, goal: float, most: float) -> float:
    """``value`` moved towards ``goal`` by at most ``most``."""
    if abs(goal - value) <= most:
        return goal
    return value + math.copysign(most, goal - value)


def _on_grid(value: float, limits: Limits) -> float:
    """``value`` clamped to ``limits`` and rounded to their step (what a command may say)."""
    if limits.step:  # half up, not Python's half to even: steady steps on a slow ramp
        value = limits.low + math.floor((value - limits.low) / limits.step + 0.5) * limits.step
    return round(min(max(value, limits.low), limits.high), 3)


def _smooth(old: float | None, value: float, previous: _Reading | None, now: float,
            tau: float) -> float:
    """First-order filter of irregularly spaced readings (time constant ``tau`` s)."""
    if old is None or previous is None or tau <= 0:
        return value
    keep = math.exp(-max(now - previous.at, 0.0) / tau)
    return old * keep + value * (1.0 - keep)
