"""The trainer modes on the virtual rider: ERG and grade simulation in simulated time.

A :class:`Ride` couples :class:`smartbiked.trainer.Trainer` to the rider model
(:class:`smartbiked.rider.BrakeRider`) the way the daemon couples it to a bike: the
trainer's resistance moves the model's brake, and the model's power (averaged over
each second, as a power meter reports), cadence and speed come back as readings once
a second. A fake clock advances with the model: no wall time anywhere.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace

import pytest

from smartbiked.rider import Brake, BrakeRider, RiderProfile, steady_speed
from smartbiked.topics import Command, Limits
from smartbiked.trainer import (
    ERG,
    RESISTANCE,
    SIM,
    Calibration,
    Trainer,
    TrainerSettings,
    calibrate,
    road_power,
)

SAMPLE = 0.05      # s between power samples inside a second
TICK = 0.25        # s between trainer ticks
GEARS = (2.2, 2.6, 3.0, 3.5, 4.0, 4.6, 5.2, 6.0, 6.8)   # m per crank turn
ROAD = {"mass": 85.0, "crr": 0.004, "cda": 0.32}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Ride:
    """A trainer and a rider on one fake clock; see the module docstring."""

    rider: BrakeRider
    settings: TrainerSettings
    limits: Limits = field(default_factory=lambda: Limits(0.0, 100.0))
    power_sensor: bool = True
    clock: FakeClock = field(default_factory=FakeClock)
    submitted: list[tuple[float, float]] = field(default_factory=list)
    announced: list[dict] = field(default_factory=list)
    inclines: list[tuple[float, float]] = field(default_factory=list)
    readings: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    tilt: bool = False

    def __post_init__(self) -> None:
        self.trainer = Trainer(
            self.settings, self.limits, self._submit, self.announced.append, self.clock,
            incline_limits=Limits(-10, 19, 0.5) if self.tilt else None,
            submit_incline=self._incline if self.tilt else None)
        self.trainer.reading("resistance", self.rider.resistance)
        self._samples: list[float] = []
        self._ticks = 0

    def _submit(self, value: float) -> None:
        self.submitted.append((self.clock.now, value))
        self.rider.set_resistance(value)

    def _incline(self, value: float) -> None:
        self.inclines.append((self.clock.now, value))

    def run(self, seconds: float) -> None:
        """Ride on: model in SAMPLE steps, trainer ticks, readings every second."""
        for _ in range(round(seconds / SAMPLE)):
            self.rider.step(SAMPLE)
            self.clock.now = round(self.clock.now + SAMPLE, 9)
            self._samples.append(self.rider.power)
            self._ticks += 1
            if self._ticks % round(1.0 / SAMPLE) == 0:
                power = statistics.fmean(self._samples)
                self._samples.clear()
                if self.power_sensor:
                    self.trainer.reading("power", power)
                self.trainer.reading("cadence", self.rider.cadence)
                self.trainer.reading("speed", self.rider.speed)
                self.readings.append((self.clock.now, power, self.rider.cadence,
                                      self.rider.speed, self.rider.resistance))
            if self._ticks % round(TICK / SAMPLE) == 0:
                self.trainer.tick()

    def command(self, topic: str, value: float, **params: float) -> str | None:
        return self.trainer.command(Command(topic, value, tuple(sorted(params.items()))))

    def powers(self, start: float, end: float = math.inf) -> list[float]:
        return [p for t, p, *_ in self.readings if start < t <= end]


def ride_calibration(rider: BrakeRider, sensor: str, at: float) -> tuple[tuple, float]:
    """The documented manual procedure, on the model: hold a cadence, step the
    resistance by 10 %, let it settle 8 s, average 30 s; three levels again at 70 RPM."""
    samples = []
    for cadence, levels in ((90, range(0, 101, 10)), (70, (30, 50, 70))):
        rider.pedal_at(cadence)
        for level in levels:
            rider.set_resistance(level)
            rider.step(8.0)
            powers, readings = [], []
            for _ in range(600):
                rider.step(SAMPLE)
                powers.append(rider.power)
                readings.append(rider.cadence if sensor == "cadence" else rider.speed)
            samples.append((level, statistics.fmean(readings), statistics.fmean(powers)))
    return calibrate(samples, at)


def spin_bike() -> TrainerSettings:
    """A spin bike (one gear, brake turned by the cranks) calibrated by the procedure."""
    table, exponent = ride_calibration(BrakeRider(100), "cadence", 90.0)
    return TrainerSettings(enabled=True, calibration=table, calibration_exponent=exponent,
                           calibration_sensor="cadence", calibration_at=90.0)


def geared_bike() -> TrainerSettings:
    """A geared bike with the brake on the wheel, calibrated in top gear at 9 m/s."""
    rider = BrakeRider(101, gears=GEARS)
    rider.gear = GEARS.index(6.0)
    table, exponent = ride_calibration(rider, "speed", 9.0)
    return TrainerSettings(enabled=True, calibration=table, calibration_exponent=exponent,
                           calibration_sensor="speed", calibration_at=9.0, **ROAD)


@pytest.fixture(scope="module")
def erg_settings() -> TrainerSettings:
    return spin_bike()


@pytest.fixture(scope="module")
def sim_settings() -> TrainerSettings:
    return geared_bike()


def windows(values: list[float], size: int) -> list[float]:
    return [statistics.fmean(values[i:i + size]) for i in range(len(values) - size + 1)]


# -- the calibration procedure and the road ----------------------------------------------

def test_the_calibration_procedure_recovers_the_brake(erg_settings):
    brake = Brake()
    table = Calibration(erg_settings.calibration)
    for percent in (5, 20, 35, 50, 65, 80, 95):
        truth = brake.power(percent, brake.reference_speed)
        assert table.power(percent) == pytest.approx(truth, rel=0.04, abs=3), percent
    assert erg_settings.calibration_exponent == pytest.approx(brake.exponent, abs=0.05)


def test_calibrate_refuses_samples_that_cannot_make_a_table():
    with pytest.raises(ValueError, match="two cadences"):
        calibrate([(0, 90, 20), (50, 90, 200)], 90)
    with pytest.raises(ValueError, match="does not rise"):
        calibrate([(0, 90, 200), (50, 90, 100)], 90, exponent=1.5)
    with pytest.raises(ValueError, match="two resistance levels"):
        calibrate([(50, 90, 100), (50, 70, 80)], 90)


def test_calibration_reads_both_ways_and_stays_between_its_points():
    cal = Calibration([(0, 20), (40, 100), (100, 900)])
    for percent in range(0, 101, 5):
        assert cal.percent(cal.power(percent)) == pytest.approx(percent, abs=1e-6)
    powers = [cal.power(p / 2) for p in range(201)]
    assert powers == sorted(powers)                    # monotone: readable both ways
    assert all(20 <= w <= 900 for w in powers)
    assert cal.percent(5) == 0 and cal.percent(5000) == 100  # clamped at the ends


def test_road_power_is_the_rider_models_balance():
    profile = RiderProfile(brake_force=0.0, **ROAD)
    for power, grade in ((150, 0), (200, 8), (300, 15), (120, -2)):
        v = steady_speed(power, math.degrees(math.atan(grade / 100)), 0, profile)
        assert road_power(v, grade, **ROAD) == pytest.approx(power, rel=1e-6)
    # A head wind costs power, a tail wind saves it; a steep descent pulls.
    assert road_power(8, 0, wind=5, **ROAD) > road_power(8, 0, **ROAD) > road_power(
        8, 0, wind=-5, **ROAD)
    assert road_power(10, -8, **ROAD) < 0


# -- ERG on the virtual rider -------------------------------------------------------------

@pytest.mark.parametrize("cadence", [60, 70, 80, 90, 100])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_erg_holds_200_w_within_5_percent_after_10_s_at_60_to_100_rpm(erg_settings, cadence,
                                                                      seed):
    ride = Ride(BrakeRider(seed, cadence=cadence), erg_settings)
    ride.run(2)
    assert ride.command("targetpower", 200) is None
    start = ride.clock.now
    ride.run(70)
    # Every 10-s average (a head unit's smoothed power) from 10 s after the command on.
    held = windows(ride.powers(start + 10), 10)
    worst = max(abs(p - 200) for p in held)
    assert worst <= 10, f"10-s power strayed {worst:.1f} W from 200 W"
    assert ride.trainer.mode == ERG
    # The cadence is the rider's: ERG held the power by moving the brake, not the legs.
    assert statistics.fmean(c for t, _, c, *_ in ride.readings if t > start + 10) == \
        pytest.approx(cadence, abs=2)


def test_erg_holds_whatever_the_cadence_by_moving_the_brake(erg_settings):
    slow, fast = (Ride(BrakeRider(4, cadence=c), erg_settings) for c in (60, 100))
    for ride in (slow, fast):
        ride.run(2)
        ride.command("targetpower", 200)
        ride.run(40)
    # Same power, very different brake: the cadence compensation at work.
    assert statistics.fmean(slow.powers(20)) == pytest.approx(200, rel=0.03)
    assert statistics.fmean(fast.powers(20)) == pytest.approx(200, rel=0.03)
    assert slow.rider.resistance > fast.rider.resistance + 10


def step_response(settings: TrainerSettings, seeds: range) -> list[float]:
    """Mean power of several riders, second by second, after a 150 -> 250 W step at t=30 s."""
    traces = []
    for seed in seeds:
        ride = Ride(BrakeRider(seed, cadence=85), settings)
        ride.run(1)
        ride.command("targetpower", 150)
        ride.run(29)
        assert ride.command("targetpower", 250) is None
        ride.run(20)
        traces.append(ride.powers(30))
    return [statistics.fmean(column) for column in zip(*traces, strict=True)]


def test_erg_step_150_to_250_w_settles_within_8_s_with_at_most_15_percent_overshoot(
        erg_settings):
    # Averaged over 12 riders the rider's own wobble fades and the loop's response shows.
    mean = step_response(erg_settings, range(12))
    outside = [i + 1 for i, p in enumerate(mean) if abs(p - 250) > 0.05 * 250]
    settling = max(outside, default=0)
    overshoot = (max(mean) - 250) / (250 - 150)
    assert settling <= 8, f"settled after {settling} s: {[round(p) for p in mean]}"
    assert overshoot <= 0.15, f"overshoot {overshoot:.0%}: {[round(p) for p in mean]}"


def test_erg_learns_a_calibration_that_is_20_percent_wrong(erg_settings):
    wrong = replace(erg_settings, calibration_exponent=1.0,
                    calibration=tuple((p, w * 0.8) for p, w in erg_settings.calibration))
    for cadence in (65, 95):
        ride = Ride(BrakeRider(6, cadence=cadence), wrong)
        ride.run(2)
        ride.command("targetpower", 200)
        ride.run(60)
        assert statistics.fmean(ride.powers(32)) == pytest.approx(200, rel=0.03)


def test_erg_never_chases_noise(erg_settings):
    ride = Ride(BrakeRider(7, cadence=85), erg_settings)
    ride.run(2)
    ride.command("targetpower", 200)
    ride.run(90)
    steady = [v for t, v in ride.submitted if t > 30]
    # The rider's power wobbles by several per cent each second; the brake barely moves.
    assert len(steady) <= 20, f"{len(steady)} moves in 60 s"
    assert max(steady) - min(steady) <= 4
    assert all(abs(b - a) >= erg_settings.min_change
               for a, b in zip(steady, steady[1:], strict=False))


def test_erg_moves_the_resistance_at_a_bounded_rate(erg_settings):
    ride = Ride(BrakeRider(8, cadence=85), replace(erg_settings, resistance_rate=5.0))
    ride.run(2)
    ride.command("targetpower", 350)
    ride.run(20)
    moves = [(0.0, 0.0)] + ride.submitted
    for (t0, v0), (t1, v1) in zip(moves, moves[1:], strict=False):
        # At most rate x elapsed, plus one tick's worth and the rounding.
        assert abs(v1 - v0) <= 5.0 * (t1 - t0 + TICK) + 0.01
    assert ride.rider.resistance > 40  # and it did get there


def test_stopping_does_not_wind_the_brake_up_and_restarting_is_smooth(erg_settings):
    ride = Ride(BrakeRider(3, cadence=85), erg_settings)
    ride.run(2)
    ride.command("targetpower", 200)
    ride.run(30)
    held = ride.rider.resistance
    ride.rider.stop_pedalling()
    ride.run(15)
    stopped = [r for t, *_, r in ride.readings if 32 < t <= 47]
    # Power 0 for 15 s: a naive loop winds the brake to its end stop.
    assert max(stopped) <= held + 0.01
    assert ride.trainer.mode == ERG
    ride.rider.pedal_at(85)
    ride.run(30)
    after = [r for t, *_, r in ride.readings if t > 47]
    # The first slow turns do not get a heavier brake than the one the rider left.
    assert max(after[:5]) <= held + 0.01
    assert max(after) <= held + 5
    assert statistics.fmean(ride.powers(62)) == pytest.approx(200, rel=0.05)


def test_losing_the_power_sensor_leaves_erg_and_holds_the_resistance(erg_settings):
    ride = Ride(BrakeRider(9, cadence=85), erg_settings)
    ride.run(2)
    ride.command("targetpower", 200)
    ride.run(30)
    held = ride.rider.resistance
    moves = len(ride.submitted)
    ride.power_sensor = False            # the power board is unplugged
    ride.run(erg_settings.sensor_timeout + 1)
    assert ride.trainer.mode == RESISTANCE
    last = ride.announced[-1]
    assert last["mode"] == RESISTANCE and "power sensor lost" in last["reason"]
    assert last["target"] == pytest.approx(held, abs=erg_settings.min_change)
    ride.run(30)
    assert len(ride.submitted) <= moves + 1  # at most the move under way, then nothing
    assert ride.rider.resistance == pytest.approx(held, abs=erg_settings.min_change)


# -- grade simulation -------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_grade_0_to_8_percent_slows_a_constant_effort_to_the_models_speed(sim_settings, seed):
    rider = BrakeRider(seed, gears=GEARS, cadence=85)
    rider.push(200)                                    # constant effort, shifting gears
    ride = Ride(rider, sim_settings)
    ride.run(1)
    assert ride.command("grade", 0) is None
    ride.run(59)
    assert ride.command("grade", 8) is None
    ride.run(90)
    profile = RiderProfile(brake_force=0.0, **ROAD)

    def check(start: float, end: float, grade: float) -> None:
        rows = [r for r in ride.readings if start < r[0] <= end]
        power = statistics.fmean(r[1] for r in rows)
        speed = statistics.fmean(r[3] for r in rows)
        predicted = steady_speed(power, math.degrees(math.atan(grade / 100)), 0, profile)
        assert speed == pytest.approx(predicted, rel=0.10), (grade, speed, predicted)

    check(30, 60, 0)
    check(120, 150, 8)
    assert ride.trainer.mode == SIM


def test_grade_gain_offset_and_road_parameters_change_the_brake(sim_settings):
    def brake_after(settings: TrainerSettings, grade: float, **params: float) -> float:
        rider = BrakeRider(5, gears=GEARS, cadence=85)
        rider.push(200)
        ride = Ride(rider, replace(settings, resistance_rate=100.0))
        ride.run(1)
        ride.command("grade", grade, **params)
        ride.run(1.0)  # at 100 %/s the brake reaches its goal before the speed answers
        return ride.rider.resistance_target

    base = brake_after(sim_settings, 1)
    assert brake_after(replace(sim_settings, grade_gain=0.5), 1) < base
    assert brake_after(replace(sim_settings, grade_offset=2), 1) > base
    assert brake_after(sim_settings, 1, wind=6.0) > base
    assert brake_after(sim_settings, 1, crr=0.01) > base
    # Cw is 0.5 rho CdA: the same drag said two ways brakes the same.
    cda = 0.5
    assert brake_after(sim_settings, 1, cda=cda) == pytest.approx(
        brake_after(sim_settings, 1, cw=0.5 * sim_settings.air_density * cda))


def test_losing_the_speed_sensor_leaves_grade_simulation(sim_settings):
    rider = BrakeRider(2, gears=GEARS)
    rider.push(180)
    ride = Ride(rider, sim_settings)
    ride.run(1)
    ride.command("grade", 4)
    ride.run(20)
    ride.trainer._readings.pop("speed")  # noqa: SLF001 - as if the sensor never reported
    ride.trainer.tick()
    assert ride.trainer.mode == RESISTANCE
    assert "speed sensor lost" in ride.announced[-1]["reason"]


# -- the mode machine ---------------------------------------------------------------------------

@pytest.fixture
def idle() -> Ride:
    """A trainer with readings flowing but no mode yet."""
    ride = Ride(BrakeRider(1, gears=GEARS), TrainerSettings(enabled=True),
                limits=Limits(0.0, 80.0, 5.0), tilt=True)
    ride.run(2)
    return ride


def test_commands_need_their_sensor():
    ride = Ride(BrakeRider(1), TrainerSettings(enabled=True), power_sensor=False)
    ride.run(2)
    assert "no power reading" in ride.command("targetpower", 200)
    ride.trainer._readings.pop("speed")  # noqa: SLF001
    assert "no speed reading" in ride.command("grade", 3)
    assert ride.trainer.mode == RESISTANCE
    assert ride.announced == [{"mode": RESISTANCE, "target": None}]  # only the first report
    assert ride.trainer.command(Command("fan", 3)) == "fan is not a trainer command"


def test_mode_reports_follow_every_change(idle):
    # Made before any resistance report arrived: the resistance is not known yet.
    assert idle.announced == [{"mode": RESISTANCE, "target": None}]
    idle.command("targetpower", 180)
    assert idle.announced[-1] == {"mode": ERG, "target": 180}
    idle.command("targetpower", 220)
    assert idle.announced[-1] == {"mode": ERG, "target": 220}
    idle.command("grade", 4.5, wind=2.0, cw=0.51)
    assert idle.announced[-1] == {"mode": SIM, "target": 4.5,
                                  "params": {"cw": 0.51, "wind": 2.0}}
    idle.run(3)
    idle.trainer.resistance_commanded(40)
    assert idle.announced[-1] == {"mode": RESISTANCE, "target": 40,
                                  "reason": "resistance commanded"}
    idle.command("targetpower", 150)
    idle.command("targetpower", 0)          # 0 (or null) leaves ERG
    assert idle.announced[-1]["mode"] == RESISTANCE
    assert idle.announced[-1]["reason"] == "target power 0"
    idle.command("grade", 2)
    idle.trainer.release("broker unreachable: actuators made safe")
    assert idle.announced[-1]["reason"] == "broker unreachable: actuators made safe"
    count = len(idle.announced)
    idle.trainer.release("again")           # nothing to leave: nothing said
    idle.command("targetpower", 0)
    assert len(idle.announced) == count


def test_a_manual_resistance_command_stops_the_loop(idle):
    idle.command("targetpower", 250)
    idle.run(5)
    idle.trainer.resistance_commanded(10)
    moves = len(idle.submitted)
    idle.run(20)
    assert len(idle.submitted) == moves     # the app's 10 % stays
    assert idle.trainer.mode == RESISTANCE


def test_moves_stay_within_the_actuators_limits_and_on_its_step(idle):
    idle.command("targetpower", 900)        # more than the brake can give at 80 %
    idle.run(20)
    values = [v for _, v in idle.submitted]
    assert values and max(values) == 80.0
    assert all(0 <= v <= 80 and v % 5 == 0 for v in values)


def test_in_erg_the_actuators_own_reports_do_not_reset_the_loop(idle):
    idle.command("targetpower", 250)
    idle.run(3)
    position = idle.trainer.resistance
    idle.trainer.reading("resistance", 0.0)  # a late report of an old move
    assert idle.trainer.resistance == position
    idle.trainer.resistance_commanded()
    idle.trainer.reading("resistance", 35.0)  # in resistance mode reports are the truth
    assert idle.trainer.resistance == 35.0


def tilting_ride(sim_settings, **settings: object) -> Ride:
    """A rider at 200 W on a frame that may tilt, level, one second in."""
    rider = BrakeRider(3, gears=GEARS)
    rider.push(200)
    ride = Ride(rider, replace(sim_settings, **settings), tilt=True)
    ride.trainer.reading("incline", 0.0)
    ride.run(1)
    return ride


def test_grade_tilts_the_incline_only_when_configured(sim_settings):
    def tilted(**settings: object) -> Ride:
        ride = tilting_ride(sim_settings, **settings)
        ride.command("grade", 8)
        ride.run(30)
        return ride

    assert tilted().inclines == []          # off by default: a frame with a rider on it
    ride = tilted(incline_follows_grade=True, incline_rate=0.5, incline_max=4.0)
    values = [v for _, v in ride.inclines]
    # atan(8 %) is 4.57 degrees, capped at incline_max 4, on the 0.5 degree step, slowly:
    # never ahead of 0.5 degree/s from the command at t = 1 s (half a step of rounding).
    assert values == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    assert all(v <= 0.5 * (t - 1.0) + 0.25 + 1e-9 for t, v in ride.inclines)
    ride.command("grade", -3)
    ride.trainer.incline_commanded()        # an app moved the incline: grade lets go
    ride.run(10)
    assert [v for _, v in ride.inclines] == values


def test_a_grade_that_may_not_tilt_never_tilts(sim_settings):
    """A Bluetooth app's grade without [ble] incline: the road, never the frame."""
    ride = tilting_ride(sim_settings, incline_follows_grade=True)
    assert ride.trainer.command(Command("grade", 8.0), tilt=False) is None
    ride.run(20)
    assert ride.trainer.mode == "sim" and ride.submitted  # simulating: the brake moves
    assert ride.inclines == []
    ride.command("grade", 8)  # the same grade from an app that may tilt
    ride.run(3)
    assert ride.inclines


def test_settings_come_from_a_config_table():
    s = TrainerSettings.from_options({"enabled": True, "calibration": [[0, 10], [100, 500]],
                                      "erg_gain": 0.3, "unknown": 1})
    assert s.enabled and s.calibration == ((0.0, 10.0), (100.0, 500.0)) and s.erg_gain == 0.3
    assert hash(s) == hash(TrainerSettings.from_options(
        {"enabled": True, "calibration": [[0, 10], [100, 500]], "erg_gain": 0.3}))


def test_a_brake_at_its_end_stop_does_not_wind_the_correction_up(erg_settings):
    ride = Ride(BrakeRider(2, cadence=85), erg_settings, limits=Limits(0.0, 60.0))
    ride.run(2)
    ride.command("targetpower", 700)         # beyond what 60 % can brake at 85 RPM
    ride.run(40)
    assert ride.rider.resistance == 60.0
    ride.command("targetpower", 180)
    ride.run(12)
    # Straight back to 180 W: no correction learnt while the brake could do no more.
    assert statistics.fmean(ride.powers(ride.clock.now - 4)) == pytest.approx(180, rel=0.06)


def test_target_power_stops_the_grade_tilting_the_frame(sim_settings):
    ride = tilting_ride(sim_settings, incline_follows_grade=True)
    ride.command("grade", 8)
    ride.run(3)
    tilted = list(ride.inclines)
    assert tilted
    ride.command("targetpower", 200)
    ride.run(10)
    assert ride.inclines == tilted
