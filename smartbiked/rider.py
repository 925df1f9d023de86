"""The virtual rider: physics and physiology of someone riding the simulated bike.

Pure and deterministic: no threads, no pins, no clock. :class:`Rider` advances by
``step(dt)`` and draws all its randomness from one ``random.Random(seed)``, so the
same seed and the same steps give the same trace. :mod:`smartbiked.simulator` turns
its state into pulses and serial lines.

The model:

- **Effort.** The rider cruises at a power that depends on the load: climbing
  (positive incline) and brake resistance make them push harder, descents make
  them ease off. The power follows that target with a few seconds' lag, with
  slow random wander of a few per cent (an Ornstein-Uhlenbeck process).
- **Speed** comes from the standard cycling power balance::

      eta * P = v * (m g (Crr cos(theta) + sin(theta)) + 0.5 rho CdA v^2 + F_brake)

  with theta the incline in degrees and F_brake the resistance brake's force.
  It is integrated as ``m dv/dt = eta P / v - F(v)``, so speed changes with the
  inertia of rider and bike rather than jumping; :func:`steady_speed` solves the
  balance itself.
- **Cadence** prefers the rider's own rate, falls a little on climbs and under
  resistance, and wanders by a couple of RPM.
- **Heart rate** follows a target set by the effort (power against threshold
  power) with a first-order lag of about half a minute.
- The **fan** changes nothing in the physics.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

G = 9.81
#: Below this speed the drive force is computed as if riding this fast (P / v has no
#: limit at a standstill; real riders start with a finite pedal force).
_START_SPEED = 0.5
#: Steepest incline, either way, the model accepts (the daemon's limits are narrower).
_INCLINE_LIMIT = 30.0


@dataclass(frozen=True)
class RiderProfile:
    """Who rides: body and bike, fitness and habits. :meth:`draw` makes one from a seed."""

    mass: float = 85.0            # rider and bike, kg
    cda: float = 0.32             # drag area, m^2 (on the hoods)
    crr: float = 0.005            # rolling resistance coefficient
    rho: float = 1.225            # air density, kg/m^3
    efficiency: float = 0.975     # drivetrain: share of crank power reaching the wheel
    brake_force: float = 40.0     # N at 100 % resistance (about a 2.7 degree climb's pull)
    cruise_power: float = 150.0   # W on the flat without resistance
    ftp: float = 240.0            # functional threshold power, W
    cadence: float = 86.0         # preferred cadence, RPM
    hr_rest: float = 60.0         # BPM
    hr_max: float = 185.0         # BPM
    hr_tau: float = 30.0          # seconds for heart rate to close 63 % of a gap
    power_tau: float = 3.0        # seconds for the rider's power to follow the load

    @classmethod
    def draw(cls, rng: random.Random) -> RiderProfile:
        """A plausible recreational rider, different for each seed."""
        cruise = rng.uniform(135.0, 175.0)
        return cls(
            mass=rng.uniform(72.0, 95.0) + 9.0,
            cda=rng.uniform(0.29, 0.36),
            cruise_power=cruise,
            ftp=cruise / rng.uniform(0.58, 0.68),
            cadence=rng.uniform(80.0, 92.0),
            hr_rest=rng.uniform(54.0, 68.0),
            hr_max=rng.uniform(176.0, 192.0),
            hr_tau=rng.uniform(25.0, 35.0),
        )


@dataclass(frozen=True)
class RiderState:
    """What the rider and bike do at one instant; the simulator's sensors read this."""

    time: float          # simulated seconds since the start
    power: float         # W at the cranks
    cadence: float       # RPM
    speed: float         # m/s
    heartrate: float     # BPM
    incline: float       # degrees, where the incline motor is now
    resistance: float    # percent, where the brake is now
    fan: float           # percent (no effect on the physics)


def resisting_force(speed: float, incline: float, resistance: float,
                    profile: RiderProfile) -> float:
    """Force in N opposing the bike at ``speed`` m/s: rolling, gravity, air and brake."""
    theta = math.radians(incline)
    p = profile
    return (p.mass * G * (p.crr * math.cos(theta) + math.sin(theta))
            + 0.5 * p.rho * p.cda * speed * speed
            + p.brake_force * resistance / 100.0)


def steady_speed(power: float, incline: float, resistance: float,
                 profile: RiderProfile | None = None) -> float:
    """The speed in m/s at which ``power`` W exactly balances the resisting forces.

    Solved by bisection: ``v * F(v)`` is convex and zero at 0, so it meets the
    wheel power exactly once for v > 0 (0 when the rider cannot move the bike).
    """
    p = profile or RiderProfile()
    wheel = max(power, 0.0) * p.efficiency
    lo, hi = 1e-9, 60.0
    if hi * resisting_force(hi, incline, resistance, p) < wheel:
        return hi
    if wheel == 0.0 and resisting_force(lo, incline, resistance, p) >= 0:
        return 0.0  # not pedalling and not rolling downhill
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if mid * resisting_force(mid, incline, resistance, p) < wheel:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


class _Wander:
    """Ornstein-Uhlenbeck noise: mean 0, standard deviation ``sigma``, memory ``tau`` s.

    Discretised exactly, so a trace does not depend on how finely it is stepped
    (only on the random draws, which the caller's step sequence fixes).
    """

    def __init__(self, sigma: float, tau: float, rng: random.Random) -> None:
        self.sigma, self.tau, self.rng = sigma, tau, rng
        self.value = rng.gauss(0.0, sigma)

    def step(self, dt: float) -> float:
        keep = math.exp(-dt / self.tau)
        self.value = (self.value * keep
                      + self.sigma * math.sqrt(1.0 - keep * keep) * self.rng.gauss(0.0, 1.0))
        return self.value


class Rider:
    """A rider on the bike, advanced by :meth:`step`; see the module docstring."""

    #: Longest internal integration step, seconds.
    STEP = 0.05
    #: How fast the incline motor and the resistance brake move (degrees or percent per s).
    INCLINE_RATE = 2.0
    RESISTANCE_RATE = 50.0

    def __init__(self, seed: int | None = None, profile: RiderProfile | None = None) -> None:
        self.rng = random.Random(seed)
        self.profile = profile or RiderProfile.draw(self.rng)
        self.time = 0.0
        self.incline = self.incline_target = 0.0
        self.resistance = self.resistance_target = 0.0
        self.fan = 0.0
        self._power_wander = _Wander(0.05, 4.0, self.rng)    # share of the power
        self._cadence_wander = _Wander(2.0, 3.0, self.rng)   # RPM
        self._heart_wander = _Wander(1.0, 8.0, self.rng)     # BPM
        # The rider is already rolling at cruising pace, warming up: the heart rate
        # starts halfway to its target so a newcomer sees it climb.
        self._intent = self.target_power()
        self._cadence = self.target_cadence()
        self.speed = steady_speed(self._intent, self.incline, self.resistance, self.profile)
        p = self.profile
        self._heart = p.hr_rest + 0.5 * (self.target_heartrate() - p.hr_rest)

    # -- commands ---------------------------------------------------------------------

    def set_incline(self, degrees: float) -> None:
        """Where the incline motor should go; it moves there at :attr:`INCLINE_RATE`."""
        self.incline_target = max(-_INCLINE_LIMIT, min(_INCLINE_LIMIT, float(degrees)))

    def set_resistance(self, percent: float) -> None:
        """Where the resistance brake should go; it moves there at :attr:`RESISTANCE_RATE`."""
        self.resistance_target = max(0.0, min(100.0, float(percent)))

    def set_fan(self, percent: float) -> None:
        """The fan's speed: recorded, no effect on the ride."""
        self.fan = float(percent)

    # -- the rider's choices ---------------------------------------------------------

    def effort(self) -> float:
        """How much harder than cruising on the flat the current load makes the rider push."""
        climb = (1.0 + 0.04 * self.incline if self.incline >= 0
                 else max(0.3, 1.0 + 0.06 * self.incline))  # ease off on descents
        brake = 1.0 + 0.6 * self.resistance / 100.0
        return climb * brake

    def target_power(self) -> float:
        """The power in W the rider settles at under the current load."""
        return min(self.profile.cruise_power * self.effort(), 1.4 * self.profile.ftp)

    def target_cadence(self) -> float:
        """The cadence in RPM the rider settles at under the current load."""
        c = self.profile.cadence - 1.0 * max(self.incline, 0.0) - 0.1 * self.resistance
        return max(50.0, min(120.0, c))

    def target_heartrate(self) -> float:
        """The heart rate in BPM the current effort leads to after a minute or two."""
        p = self.profile
        load = max(0.0, min(1.0, 0.3 + 0.6 * self._intent / p.ftp))
        return p.hr_rest + (p.hr_max - p.hr_rest) * load

    # -- time -------------------------------------------------------------------------

    def step(self, dt: float) -> None:
        """Advance ``dt`` simulated seconds (in internal steps of at most :attr:`STEP`)."""
        if dt <= 0:
            return
        count = max(1, math.ceil(dt / self.STEP - 1e-9))
        h = dt / count
        for _ in range(count):
            self._step(h)

    def _step(self, h: float) -> None:
        p = self.profile
        self.time += h
        self.incline = _towards(self.incline, self.incline_target, self.INCLINE_RATE * h)
        self.resistance = _towards(self.resistance, self.resistance_target,
                                   self.RESISTANCE_RATE * h)
        self._intent += (self.target_power() - self._intent) * (1 - math.exp(-h / p.power_tau))
        self._power_wander.step(h)
        self._cadence += (self.target_cadence() - self._cadence) * (1 - math.exp(-h / 3.0))
        self._cadence_wander.step(h)
        self._heart += (self.target_heartrate() - self._heart) * (1 - math.exp(-h / p.hr_tau))
        self._heart_wander.step(h)
        # Semi-explicit Euler on m dv/dt = eta P / v - F(v): stable at this step size
        # (the stiffest term, P / v^2 at the start speed, gives well under 1 per step).
        drive = p.efficiency * self.power / max(self.speed, _START_SPEED)
        drag = resisting_force(self.speed, self.incline, self.resistance, p)
        self.speed = max(0.0, self.speed + (drive - drag) / p.mass * h)

    # -- what the sensors see ------------------------------------------------------------

    @property
    def power(self) -> float:
        """Crank power in W, with the rider's natural variation."""
        return max(0.0, self._intent * (1.0 + self._power_wander.value))

    @property
    def cadence(self) -> float:
        """Cadence in RPM, with natural variation."""
        return max(0.0, self._cadence + self._cadence_wander.value)

    @property
    def heartrate(self) -> float:
        """Heart rate in BPM."""
        return max(30.0, self._heart + self._heart_wander.value)

    def state(self) -> RiderState:
        """A snapshot of everything the sensors could measure."""
        return RiderState(self.time, self.power, self.cadence, self.speed, self.heartrate,
                          self.incline, self.resistance, self.fan)


def _towards(value: float, target: float, most: float) -> float:
    """``value`` moved towards ``target`` by at most ``most``."""
    if abs(target - value) <= most:
        return target
    return value + math.copysign(most, target - value)


# --------------------------------------------------------------------------- on a brake

@dataclass(frozen=True)
class Brake:
    """The resistance brake as physics sees it: the power it absorbs, by resistance and speed.

    ``power(resistance, speed)`` is ``idle + (full - idle) * (resistance / 100) ** shape``
    at ``reference_speed``, scaled by ``(speed / reference_speed) ** exponent``: an eddy
    current brake absorbs more the faster its disc turns (exponent between 1 and 2), a
    friction pad about linearly (exponent 1). The daemon never sees these numbers; it
    has a calibration table measured from the power sensor.
    """

    idle: float = 25.0            # W at 0 % (bearings, belt, the magnets' least pull)
    full: float = 1000.0          # W at 100 %
    shape: float = 1.6            # the magnets pull harder the closer they come
    reference_speed: float = 9.0  # m/s of the braked wheel where idle and full hold
    exponent: float = 1.2

    def power(self, resistance: float, speed: float) -> float:
        """Braking power in W at ``resistance`` percent with the wheel at ``speed`` m/s."""
        share = max(0.0, min(100.0, resistance)) / 100.0
        at_reference = self.idle + (self.full - self.idle) * share ** self.shape
        return at_reference * (max(speed, 0.0) / self.reference_speed) ** self.exponent


class BrakeRider:
    """A rider on a bike whose resistance is a real brake: what ERG and grade simulation act on.

    Unlike :class:`Rider` (whose effort is a habit and whose speed is a virtual road's),
    here the crank power is what the brake and the wheel's inertia absorb: the wheel
    (speed sensor) carries the brake, the cranks drive it through ``gears`` (metres of
    wheel per crank turn; one gear is a fixed-gear spin bike). The rider either holds a
    cadence (:meth:`pedal_at`: power follows the load, up to ``max_power``) or pushes a
    constant power (:meth:`push`: speed and cadence follow the load, and with several
    gears the rider shifts to stay near ``cadence`` RPM). The legs answer a load change
    with a short lag, so a sudden brake costs a little cadence first. Pure and seeded
    like :class:`Rider`: the same seed and steps give the same trace.
    """

    STEP = 0.02
    RESISTANCE_RATE = Rider.RESISTANCE_RATE

    def __init__(self, seed: int | None = None, *, brake: Brake | None = None,
                 gears: tuple[float, ...] = (6.0,), inertia: float = 30.0,
                 cadence: float = 85.0, max_power: float = 500.0) -> None:
        self.rng = random.Random(seed)
        self.brake = brake or Brake()
        self.gears = tuple(sorted(gears))
        self.gear = len(self.gears) - 1
        self.inertia = inertia            # kg: the wheel and flywheel as a moving mass
        self.max_power = max_power
        self.time = 0.0
        self.resistance = self.resistance_target = 0.0
        self.pedalling = True
        self.cadence_target = cadence
        self.power_target: float | None = None   # None: holding a cadence
        self._cadence_wander = _Wander(0.8, 6.0, self.rng)   # RPM
        self._torque_wander = _Wander(0.015, 0.5, self.rng)  # share of the power
        self.speed = cadence * self.gears[self.gear] / 60.0
        self._drive = self.brake.power(self.resistance, self.speed)
        self._shifted_at = -math.inf

    # -- the rider's intentions ---------------------------------------------------------

    def set_resistance(self, percent: float) -> None:
        """Where the brake should go; it moves there at :attr:`RESISTANCE_RATE`."""
        self.resistance_target = max(0.0, min(100.0, float(percent)))

    def pedal_at(self, cadence: float) -> None:
        """Hold ``cadence`` RPM whatever the load (as in ERG mode)."""
        self.pedalling, self.cadence_target, self.power_target = True, float(cadence), None

    def push(self, power: float) -> None:
        """Push a constant ``power`` W (constant effort); speed follows the load."""
        self.pedalling, self.power_target = True, float(power)

    def stop_pedalling(self) -> None:
        """Feet still: no power, cadence 0, the wheel runs down against the brake."""
        self.pedalling = False

    # -- time -----------------------------------------------------------------------------

    @property
    def development(self) -> float:
        """Metres of wheel per crank turn in the current gear."""
        return self.gears[self.gear]

    def step(self, dt: float) -> None:
        """Advance ``dt`` simulated seconds (in internal steps of at most :attr:`STEP`)."""
        if dt <= 0:
            return
        count = max(1, math.ceil(dt / self.STEP - 1e-9))
        for _ in range(count):
            self._step(dt / count)

    def _step(self, h: float) -> None:
        self.time += h
        self.resistance = _towards(self.resistance, self.resistance_target,
                                   self.RESISTANCE_RATE * h)
        wander = self._cadence_wander.step(h)
        torque = self._torque_wander.step(h)
        load = self.brake.power(self.resistance, self.speed)
        moving = max(self.speed, _START_SPEED)
        if not self.pedalling:
            want = 0.0
        elif self.power_target is None:
            # Hold the cadence: feed the load, plus what closes the gap in about 2 s.
            goal = (self.cadence_target + wander) * self.development / 60.0
            want = load + self.inertia * moving * (goal - self.speed) / 2.0
        else:
            want = self.power_target
        want = max(0.0, min(self.max_power, want * (1.0 + torque)))
        # The legs follow what the rider wants with a short lag.
        self._drive += (want - self._drive) * (1.0 - math.exp(-h / 0.4))
        if not self.pedalling:
            self._drive = 0.0
        self.speed = max(0.0, self.speed + (self._drive - load) / (self.inertia * moving) * h)
        if self.power_target is not None and self.pedalling:
            self._shift()

    def _shift(self) -> None:
        """Shift one gear at a time (at most every 1.5 s) to stay near the cadence wanted."""
        if self.time - self._shifted_at < 1.5:
            return
        if self.cadence < self.cadence_target - 10 and self.gear > 0:
            self.gear -= 1
        elif self.cadence > self.cadence_target + 10 and self.gear < len(self.gears) - 1:
            self.gear += 1
        else:
            return
        self._shifted_at = self.time

    # -- what the sensors see -----------------------------------------------------------------

    @property
    def power(self) -> float:
        """Crank power in W."""
        return self._drive

    @property
    def cadence(self) -> float:
        """Cadence in RPM: the wheel through the gear, 0 with the feet still (freewheel)."""
        return self.speed * 60.0 / self.development if self.pedalling else 0.0
