"""How many simulated bikes one mosquitto carries before command p99 exceeds 50 ms (issue 14).

Starts one private mosquitto on a free loopback port and grows a fleet of simulated
bikes on it, step by step (1, 5, 10, 20, 30, 40, 50, 60, 80, 100 by default). Each
bike is the real daemon, ``python -m smartbiked --simulate`` with the example config
(config/smartbike.toml) and its own bike id: four sensors reporting once a second
(cadence, speed, power, heart rate), the virtual world's state once a second, and
two MQTT connections (the daemon's and the virtual rider's hand).

At each step a steady stream of fan commands goes round the fleet (1 per bike per
second, at least 20 a second in all, for 10 s) and each is timed from publish to the
bike's fan report. The step's figures: command p50/p99, commands never reported,
the broker's and the fleet's CPU, sensor reports per bike per second (1 per sensor
means 4), RSS per bike and the machine's load. A step over the limit is measured
once more (one noisy window on a shared machine is not the broker's limit); two in a
row end the climb. The run also ends at the bike cap or the time cap.

On this machine the bikes share the cores with the broker, so the figure is what
the machine carries; the broker's own CPU share says how much of it is mosquitto.

    .venv/bin/python bench/fleet_capacity.py              # up to 100 bikes, ~5 min cap
    .venv/bin/python bench/fleet_capacity.py --quick      # 1, 5, 10 bikes (under a minute)
    .venv/bin/python bench/fleet_capacity.py --broker stock --steps 1,10,20
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import Fleet, Mosquitto, fmt, load_average


def measure(fleet: Fleet, p: argparse.Namespace) -> dict[str, Any]:
    """One window of the command stream at the current fleet size."""
    rate = max(p.min_rate, p.per_bike_rate * fleet.size)
    res = fleet.command_stream(rate, p.window)
    rss = fleet.rss_kib()
    res.update(n=fleet.size, rss_mib_per_bike=sum(rss) / len(rss) / 1024 if rss else None,
               load=os.getloadavg()[0], target_rate=rate)
    return res


def print_row(r: dict[str, Any], note: str = "") -> None:
    cells = (str(r["n"]), f"{r['rate']:.0f}/s", fmt(r["p50_ms"], unit=" ms"),
             fmt(r["p99_ms"], unit=" ms"), str(r["lost"]), f"{r['broker_cpu_pct']:.1f} %",
             f"{r['fleet_cpu_pct']:.0f} %", f"{r['sensor_reports_per_bike_s']:.2f}",
             fmt(r["rss_mib_per_bike"], 1, " MiB"), f"{r['load']:.1f}")
    print("".join(f"{c:>15}" for c in cells) + (f"  {note}" if note else ""), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="1, 5, 10 bikes, 5 s windows")
    ap.add_argument("--steps", default=None, help="fleet sizes, comma-separated")
    ap.add_argument("--limit-ms", type=float, default=50.0, help="command p99 limit (50)")
    ap.add_argument("--per-bike-rate", type=float, default=1.0,
                    help="commands per bike per second (1)")
    ap.add_argument("--min-rate", type=float, default=20.0,
                    help="commands per second in all, at least (20: enough for a p99)")
    ap.add_argument("--window", type=float, default=None, help="seconds per step (10)")
    ap.add_argument("--broker", choices=("nodelay", "stock"), default="nodelay",
                    help="mosquitto with set_tcp_nodelay (the README's advice) or as shipped")
    ap.add_argument("--time-cap", type=float, default=None,
                    help="no new step after this many seconds (300)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    p = ap.parse_args(argv)
    steps = [int(x) for x in (p.steps or ("1,5,10" if p.quick else
                                          "1,5,10,20,30,40,50,60,80,100")).split(",")]
    p.window = p.window or (5.0 if p.quick else 10.0)
    cap = p.time_cap or (50.0 if p.quick else 300.0)
    if not all(0 <= a < b for a, b in zip([0, *steps], steps, strict=False)) or steps[-1] > 200:
        ap.error("--steps must rise, up to 200 bikes")
    if not 0 < p.window <= 120 or not 0 < p.per_bike_rate <= 20:
        ap.error("--window 0..120 s, --per-bike-rate 0..20")

    workdir = Path(tempfile.mkdtemp(prefix="sbfleet-"))
    print(f"fleet capacity: {p.broker} mosquitto, steps {steps}, {p.per_bike_rate:g} command"
          f"/bike/s (>= {p.min_rate:g}/s), {p.window:g} s per step, limit p99 {p.limit_ms:g} ms"
          f"; {load_average()}; work folder {workdir}", flush=True)
    head = ("bikes", "commands", "p50", "p99", "never", "broker CPU", "bikes' CPU",
            "sensor/bike/s", "RSS/bike", "load")
    print("".join(f"{h:>15}" for h in head))
    t_start = time.monotonic()
    broker = Mosquitto(workdir, nodelay=p.broker == "nodelay", queue=100_000)
    fleet: Fleet | None = None
    carried, over = 0, None
    try:
        broker.start()
        fleet = Fleet(broker, workdir)
        for n in steps:
            if time.monotonic() - t_start > cap:
                print(f"time cap ({cap:g} s) reached before {n} bikes")
                break
            fleet.grow(n)
            time.sleep(3.0)  # start-up reports and health messages pass
            r = measure(fleet, p)
            if r["p99_ms"] is not None and r["p99_ms"] <= p.limit_ms:
                print_row(r)
                carried = n
                continue
            print_row(r, "over the limit: measuring again")
            again = measure(fleet, p)
            print_row(again, "")
            if again["p99_ms"] is not None and again["p99_ms"] <= p.limit_ms:
                carried = n
                continue
            over = again
            break
    finally:
        if fleet is not None:
            fleet.stop()
        broker.stop()
        if p.keep:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if over is None:
        print(f"\ncarried {carried} bikes with command p99 <= {p.limit_ms:g} ms "
              f"(the limit was not reached)")
    else:
        print(f"\ncarried {carried} bikes with command p99 <= {p.limit_ms:g} ms; at "
              f"{over['n']} p99 was {fmt(over['p99_ms'], unit=' ms')} (broker "
              f"{over['broker_cpu_pct']:.0f} % CPU, bikes {over['fleet_cpu_pct']:.0f} %, "
              f"load {over['load']:.1f} on {os.cpu_count()} cores)")
    print(f"({load_average()} at the end; {time.monotonic() - t_start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
