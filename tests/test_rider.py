"""The rider model alone: physics, physiology and determinism, in simulated time (no sleeps)."""

from __future__ import annotations

import math
import statistics

from hypothesis import given
from hypothesis import strategies as st

from smartbiked.rider import G, Rider, RiderProfile, resisting_force, steady_speed


def ride(rider: Rider, seconds: float, dt: float = 0.1) -> list:
    """Step ``rider`` for ``seconds``; the state after every step."""
    states = []
    for _ in range(round(seconds / dt)):
        rider.step(dt)
        states.append(rider.state())
    return states


def mean(states: list, attr: str) -> float:
    return statistics.fmean(getattr(s, attr) for s in states)


def test_same_seed_same_trace_other_seed_other_rider():
    a, b, c = Rider(7), Rider(7), Rider(8)
    trace_a, trace_b, trace_c = ride(a, 60), ride(b, 60), ride(c, 60)
    assert trace_a == trace_b
    assert a.profile == b.profile
    assert trace_a != trace_c and a.profile != c.profile


def test_steady_speed_solves_the_power_balance():
    p = RiderProfile()
    for power, incline, resistance in ((150, 0, 0), (200, 8, 0), (150, 0, 60), (0, -10, 0),
                                       (300, 19, 100)):
        v = steady_speed(power, incline, resistance, p)
        assert v > 0
        assert math.isclose(v * resisting_force(v, incline, resistance, p),
                            power * p.efficiency, rel_tol=1e-6, abs_tol=1e-6)
    # Hand-checked anchor: 150 W on the flat, 85 kg, CdA 0.32, Crr 0.005 -> about 30 km/h.
    assert 8.0 < steady_speed(150, 0, 0, p) < 8.6
    # Standing still on the flat without pedalling: nothing moves.
    assert steady_speed(0, 0, 0, p) == 0.0


@given(power=st.floats(20, 600), incline=st.floats(-10, 18.5), resistance=st.floats(0, 99))
def test_at_constant_power_steeper_or_harder_is_slower(power, incline, resistance):
    p = RiderProfile()
    v = steady_speed(power, incline, resistance, p)
    assert steady_speed(power, incline + 0.5, resistance, p) < v
    assert steady_speed(power, incline, resistance + 1, p) < v
    assert steady_speed(power * 1.1, incline, resistance, p) > v


def test_gravity_term_is_the_standard_one():
    p = RiderProfile(crr=0.0, cda=0.0, brake_force=0.0)
    assert math.isclose(resisting_force(5.0, 8.0, 0, p), p.mass * G * math.sin(math.radians(8)))


def test_incline_plus_8_slows_the_rider_and_raises_heart_rate_with_a_lag():
    rider = Rider(3)
    flat = ride(rider, 300)[-300:]  # settled: the last 30 s on the flat
    rider.set_incline(8)
    climb = ride(rider, 90)
    early, late = climb[50:100], climb[-300:]  # 5-10 s and the last 30 s after the command
    assert late[-1].incline == 8
    assert mean(late, "speed") < 0.35 * mean(flat, "speed")
    # The rider pushes harder uphill, yet is much slower: the slope, not less effort.
    assert mean(late, "power") > 1.15 * mean(flat, "power")
    assert mean(late, "cadence") < mean(flat, "cadence")
    # The heart follows over tens of seconds, not at once.
    assert mean(late, "heartrate") > mean(flat, "heartrate") + 8
    assert mean(early, "heartrate") < mean(late, "heartrate") - 4
    # Speed falls with inertia too: still well above the climb's pace 2 s after the command.
    assert climb[20].speed > 2 * mean(late, "speed")


def test_resistance_raises_effort_and_lowers_speed():
    rider = Rider(5)
    before = ride(rider, 200)[-200:]
    rider.set_resistance(80)
    after = ride(rider, 200)[-200:]
    assert mean(after, "power") > 1.3 * mean(before, "power")
    assert mean(after, "speed") < mean(before, "speed")
    assert mean(after, "heartrate") > mean(before, "heartrate")


def test_the_fan_changes_nothing_in_the_physics():
    still, fanned = Rider(11), Rider(11)
    fanned.set_fan(100)
    a, b = ride(still, 120), ride(fanned, 120)
    assert [(s.power, s.speed, s.heartrate, s.cadence) for s in a] == \
           [(s.power, s.speed, s.heartrate, s.cadence) for s in b]
    assert b[-1].fan == 100 and a[-1].fan == 0


def test_values_are_plausible_and_vary_naturally():
    for seed in range(5):
        rider = Rider(seed)
        states = ride(rider, 600)
        p = rider.profile
        assert all(60 < s.power < 350 for s in states)
        assert all(60 < s.cadence < 110 for s in states)
        assert all(3 < s.speed < 15 for s in states)
        assert all(p.hr_rest - 5 < s.heartrate < p.hr_max for s in states)
        # Natural variation: neither flat lines nor wild swings.
        assert 2 < statistics.pstdev(s.power for s in states[-3000:]) < 25
        assert 0.5 < statistics.pstdev(s.cadence for s in states[-3000:]) < 6
        # On average the speed is the power balance's, inertia and noise aside.
        last = states[-3000:]
        expected = steady_speed(mean(last, "power"), 0, 0, p)
        assert math.isclose(mean(last, "speed"), expected, rel_tol=0.03)


def test_heart_rate_climbs_during_the_warm_up():
    rider = Rider(1)
    start = rider.state().heartrate
    assert ride(rider, 60)[-1].heartrate > start + 10


def test_step_size_does_not_change_the_physics():
    fine, coarse = Rider(9), Rider(9)
    a = ride(fine, 120, dt=0.05)[-1]
    b = ride(coarse, 120, dt=0.5)[-1]
    # The noise differs (drawn per step) but the ride is the same ride.
    assert math.isclose(a.speed, b.speed, rel_tol=0.1)
    assert math.isclose(a.heartrate, b.heartrate, rel_tol=0.05)


def test_actuators_move_at_motor_speed():
    rider = Rider(2)
    rider.set_incline(10)
    rider.step(1.0)
    assert math.isclose(rider.incline, Rider.INCLINE_RATE * 1.0)
    rider.step(10.0)
    assert rider.incline == 10
    rider.set_incline(99)   # beyond any bike: clamped, never a runaway model
    rider.step(60)
    assert rider.incline == 30
