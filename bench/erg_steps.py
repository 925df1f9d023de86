"""ERG and grade step responses on the virtual rider: settling, overshoot, error, and a plot.

Run from the repository root (needs the ``bench`` extra for the plot)::

    .venv/bin/pip install -e ".[bench]"
    .venv/bin/python bench/erg_steps.py --out erg_steps.png

It calibrates the model's brake with the documented procedure, then rides in
simulated time (seeded, so every run prints the same figures):

- ERG: 150 W, then a step to 250 W at t = 30 s, at 85 RPM; the mean of 12 riders
  (their own wobble averages out, the loop's response stays), and one rider alone;
- ERG at 60..100 RPM: how far the 10-s power strays from 200 W after 10 s;
- grade: a rider pushing 200 W, 0 % then 8 % at t = 60 s, against the speed the
  power balance predicts.

Settling: the time after the step until the value stays within 5 % of its goal
(ERG) or 10 % of the predicted speed (grade). Overshoot: the highest excursion
beyond the new target, in per cent of the step.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smartbiked.rider import BrakeRider, RiderProfile, steady_speed  # noqa: E402
from tests.test_trainer import (  # noqa: E402
    GEARS,
    ROAD,
    Ride,
    geared_bike,
    spin_bike,
    windows,
)

SEEDS = range(12)


def settling(times: list[float], values: list[float], goal: float, band: float,
             start: float) -> float:
    """Seconds after ``start`` until ``values`` stay within ``band`` (a share) of ``goal``."""
    last = start
    for t, v in zip(times, values, strict=True):
        if t > start and abs(v - goal) > band * abs(goal):
            last = t
    return last - start


def erg_step(settings) -> dict:
    rides = []
    for seed in SEEDS:
        ride = Ride(BrakeRider(seed, cadence=85), settings)
        ride.run(1)
        ride.command("targetpower", 150)
        ride.run(29)
        ride.command("targetpower", 250)
        ride.run(30)
        rides.append(ride)
    times = [r[0] for r in rides[0].readings]
    mean = [statistics.fmean(r.readings[i][1] for r in rides) for i in range(len(times))]
    resistance = [statistics.fmean(r.readings[i][4] for r in rides) for i in range(len(times))]
    after = [p for t, p in zip(times, mean, strict=True) if t > 30]
    return {
        "times": times, "mean": mean, "one": [r[1] for r in rides[0].readings],
        "resistance": resistance,
        "settling": settling(times, mean, 250, 0.05, 30),
        "overshoot": (max(after) - 250) / 100,
        "error": statistics.fmean(after[-10:]) / 250 - 1,
        "one_overshoot": (max(statistics.fmean(w) for w in zip(
            *(rides[0].powers(30)[i:] for i in range(3)), strict=False)) - 250) / 100,
    }


def erg_cadences(settings) -> list[tuple[int, float, float]]:
    rows = []
    for cadence in (60, 70, 80, 90, 100):
        worst, errors = 0.0, []
        for seed in range(3):
            ride = Ride(BrakeRider(seed, cadence=cadence), settings)
            ride.run(2)
            ride.command("targetpower", 200)
            ride.run(70)
            powers = ride.powers(12)
            worst = max(worst, max(abs(p - 200) for p in windows(powers, 10)) / 200)
            errors.append(statistics.fmean(powers) / 200 - 1)
        rows.append((cadence, statistics.fmean(errors), worst))
    return rows


def grade_step(settings) -> dict:
    rider = BrakeRider(0, gears=GEARS, cadence=85)
    rider.push(200)
    ride = Ride(rider, settings)
    ride.run(1)
    ride.command("grade", 0)
    ride.run(59)
    ride.command("grade", 8)
    ride.run(90)
    profile = RiderProfile(brake_force=0.0, **ROAD)
    times = [r[0] for r in ride.readings]
    speeds = [r[3] for r in ride.readings]
    power = statistics.fmean(r[1] for r in ride.readings if r[0] > 60)
    predicted = steady_speed(power, math.degrees(math.atan(0.08)), 0, profile)
    flat = steady_speed(statistics.fmean(r[1] for r in ride.readings if r[0] <= 60), 0, 0,
                        profile)
    last = statistics.fmean(s for t, s in zip(times, speeds, strict=True) if t > 120)
    return {"times": times, "speeds": speeds, "predicted": predicted, "flat": flat,
            "resistance": [r[4] for r in ride.readings],
            "settling": settling(times, speeds, predicted, 0.10, 60),
            "error": last / predicted - 1}


def plot(out: Path, erg: dict, grade: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 7), constrained_layout=True)
    a.plot(erg["times"], erg["one"], color="0.75", lw=1, label="one rider (1 s readings)")
    a.plot(erg["times"], erg["mean"], color="C0", lw=2, label=f"mean of {len(SEEDS)} riders")
    a.step([0, 1, 30, 60], [0, 150, 250, 250], where="post", color="k", ls="--", lw=1,
           label="target")
    a.set(xlabel="s", ylabel="W", title=(
        f"ERG 150 -> 250 W at 85 RPM: settles in {erg['settling']:.0f} s, "
        f"overshoot {erg['overshoot']:.0%} of the step"), ylim=(0, 320))
    r = a.twinx()
    r.plot(erg["times"], erg["resistance"], color="C1", lw=1, label="resistance (mean)")
    r.set(ylabel="resistance %", ylim=(0, 100))
    a.legend(loc="lower right")
    b.plot(grade["times"], grade["speeds"], color="C2", lw=2, label="speed")
    b.hlines([grade["flat"]], 0, 60, color="k", ls="--", lw=1, label="power balance")
    b.hlines([grade["predicted"]], 60, grade["times"][-1], color="k", ls="--", lw=1)
    b.set(xlabel="s", ylabel="m/s", title=(
        f"Grade 0 -> 8 % at 200 W: within 10 % in {grade['settling']:.0f} s, "
        f"{grade['error']:+.1%} from the model"))
    r = b.twinx()
    r.plot(grade["times"], grade["resistance"], color="C1", lw=1)
    r.set(ylabel="resistance %", ylim=(0, 100))
    b.legend(loc="upper right")
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("erg_steps.png"),
                        help="where the PNG goes (default: %(default)s)")
    parser.add_argument("--no-plot", action="store_true", help="print the figures only")
    args = parser.parse_args()
    erg_cfg, sim_cfg = spin_bike(), geared_bike()
    erg = erg_step(erg_cfg)
    print(f"ERG 150 -> 250 W at 85 RPM, mean of {len(SEEDS)} riders: settling "
          f"{erg['settling']:.0f} s, overshoot {erg['overshoot']:.1%} of the step, "
          f"steady-state error {erg['error']:+.1%}; one rider's 3-s power peaks "
          f"{erg['one_overshoot']:.0%} of the step above 250 W")
    print("ERG 200 W by cadence: RPM, mean error after 10 s, worst 10-s average")
    for cadence, error, worst in erg_cadences(erg_cfg):
        print(f"  {cadence:3d}  {error:+6.1%}  {worst:5.1%}")
    grade = grade_step(sim_cfg)
    print(f"Grade 0 -> 8 % at 200 W: speed {grade['flat']:.2f} -> model "
          f"{grade['predicted']:.2f} m/s; within 10 % after {grade['settling']:.0f} s, "
          f"steady-state error {grade['error']:+.1%}")
    if not args.no_plot:
        plot(args.out, erg, grade)
        print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
