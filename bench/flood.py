"""Flood a running daemon with commands, hostile and not, and print what it cost (issue 7).

For each broker variant (mosquitto with ``set_tcp_nodelay true``, then as Debian ships
it) the script starts a private mosquitto on a free loopback port and the real daemon,
``python -m smartbiked --simulate --config <the example bike on that broker>``, then:

1. floods it from one app: 10,000 commands on the fan, resistance and incline control
   topics as fast as paho sends them at QoS 1, a third of them invalid (out of range,
   off the step, not JSON, strings, booleans, NaN, 400-digit numbers, duplicate keys,
   unknown and sensor topics...). Mixed in: oversize payloads (600 B to 16 MiB) and
   otherwise valid commands whose MQTT v5 ResponseTopic is hostile (another bike's
   control topic, this bike's incline control, status and report topics, 300 levels,
   wildcards). Hostile commands carry marker values no valid command uses, so an
   applied one shows up in the reports.
2. waits until the daemon has read the whole flood (a refused command whose answer
   comes back on the reply namespace is the barrier: the daemon handles messages in
   order), then until the virtual bike stops moving.

It prints, per broker: connection drops (``lost``/``offline``/extra ``online`` on the
retained ``bike/{id}/status``; must be 0), whether the retained fan, resistance and
incline reports equal what the virtual bike's pins and motors show (the
``smartbike-sim/{id}/state`` topic: the fan's PWM duty, the motors' positions; must
be yes), hostile commands applied and answers sent to hostile topics (must be 0),
peak RSS (``VmHWM``), log lines written (the daemon's stderr), the daemon's CPU for
the flood, how late sensor reports came during it, and the latency of good commands
after it (the first one, and the median of ten). Log lines are counted from the
flood's start to the daemon's exit, at least 11 s later (so the log flood guard's
summaries are in), and include the ten good commands and the shutdown.

    .venv/bin/python bench/flood.py            # both brokers, 10,000 commands (~45 s)
    .venv/bin/python bench/flood.py --quick    # 2,000 commands (~30 s)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import (
    App,
    Daemon,
    Mosquitto,
    Received,
    check_config,
    cpu_seconds,
    example_config,
    fmt,
    load_average,
    median,
    report_value,
    retained,
    status_kib,
    v5_reply,
)

BIKE = "000042"
OTHER_BIKE = "000043"
ACTUATORS = ("fan", "resistance", "incline")
SENSORS = ("speed", "cadence", "power", "heartrate")
#: Values only hostile commands carry: seeing one reported means one was applied.
MARKERS = {"fan": 66.6, "resistance": 66.6, "incline": -9.5}
#: Oversize payloads: over the daemon's 512-byte limit, over its MQTT v5 Maximum Packet
#: Size (4 KiB by default: the broker must not even deliver them), and far over.
#: Seconds from the flood's start to the daemon's stop, at least (the daemon's log flood
#: guard writes what it held back as a summary about every 10 s).
LOG_SUMMARY_AFTER = 11.0
OVERSIZE = (600, 5 * 1024, 64 * 1024, 1024 * 1024, 16 * 1024 * 1024)


def hostile_reply_topics(bike: str) -> list[str]:
    """ResponseTopics no answer may go to."""
    return [
        f"bike/{OTHER_BIKE}/fan/control",       # another bike's motor
        f"bike/{bike}/incline/control",         # a motor this app may not touch
        f"bike/{bike}/status",                  # forged availability
        f"bike/{bike}/heartrate/report",        # a forged reading
        f"bike/{bike}/reply/" + "/".join(["l"] * 300),  # mosquitto would reject it
        "bike/+/fan/control",                   # wildcards
        f"bike/{bike}/reply/#",
        "$SYS/broker/forged",
    ]


# ---------------------------------------------------------------------- the flood


@dataclass
class Message:
    topic: str
    payload: bytes
    valid: bool                      # a command the daemon should apply
    reply: str | None = None         # a ResponseTopic
    value: float | None = None       # what a valid command sets


def _good(rng: random.Random, topic: str) -> tuple[bytes, float]:
    """A valid command in one of the shapes apps send, and the value it sets."""
    if topic == "incline":
        value = rng.randint(-18, 38) / 2  # -9 .. 19 in steps of 0.5 (-9.5 is a marker)
    else:
        value = float(rng.randint(0, 100))
    shape = rng.randrange(5)
    if shape == 0:
        return json.dumps({"value": value}).encode(), value
    if shape == 1:
        return json.dumps({topic: value, "timestamp": time.time()}).encode(), value
    if shape == 2 and topic == "fan" and value % 20 == 0:
        return json.dumps({"level": int(value // 20)}).encode(), value
    return f"{value:g}".encode(), value


BAD_PAYLOADS = [
    b"150", b"-11", b'{"value": 101}', b"100.5",  # out of range
    b"abc", b"", b"true", b"null", b'"40"', b'{"value": "40"}', b'{"value": true}',
    b"NaN", b"Infinity", b"1e999", b"1" + b"0" * 400, b'{"value": -' + b"9" * 350 + b"}",
    b'{"value": 5, "value": 6}', b"\xff\xfe\xfd",
    b"[" * 400, b'{"value": {"value": 5}}', b"[40]", b"{}", b" " * 500 + b"x",
]


def flood_messages(count: int, bike: str, seed: int) -> list[Message]:
    """``count`` commands, a third invalid, with the hostile extras mixed in."""
    rng = random.Random(seed)
    out: list[Message] = []
    for i in range(count):
        topic = rng.choice(ACTUATORS)
        if i % 3 == 1:  # a third invalid, spread over topics and kinds of wrong
            kind = rng.randrange(10)
            if kind == 0:
                out.append(Message(f"bike/{bike}/warp/control", b"5", False))
            elif kind == 1:
                out.append(Message(f"bike/{bike}/heartrate/control", b"60", False))
            elif kind == 2:  # off the step (incline only has one)
                out.append(Message(f"bike/{bike}/incline/control", b"5.3", False))
            elif kind == 3:  # ambiguous: two keys that both name the value
                out.append(Message(f"bike/{bike}/{topic}/control",
                                   f'{{"value": 1, "{topic}": 2}}'.encode(), False))
            else:
                out.append(Message(f"bike/{bike}/{topic}/control",
                                   rng.choice(BAD_PAYLOADS), False))
            continue
        payload, value = _good(rng, topic)
        out.append(Message(f"bike/{bike}/{topic}/control", payload, True, value=value))
    extras: list[Message] = []
    for size in OVERSIZE:
        extras.append(Message(f"bike/{bike}/fan/control", b" " * (size - 2) + b"90", False))
    for reply in hostile_reply_topics(bike):
        for topic in ACTUATORS:
            marker = MARKERS[topic]
            extras.append(Message(f"bike/{bike}/{topic}/control", f"{marker:g}".encode(),
                                  False, reply=reply))
    for extra in extras:  # spread them through the flood, never last
        out.insert(rng.randrange(len(out) - 1), extra)
    return out


# ------------------------------------------------------------------------ one run


@dataclass
class Watch:
    """What the monitoring app counts while the flood runs."""

    bike: str
    hostile: set[str]
    status: list[tuple[float, bytes, bool]] = field(default_factory=list)
    counts: collections.Counter = field(default_factory=collections.Counter)
    reported: dict[str, set[float]] = field(default_factory=lambda: collections.defaultdict(set))
    sensor_stamps: list[tuple[float, float]] = field(default_factory=list)  # (stamp, recv)
    hostile_answers: int = 0
    world: dict[str, Any] | None = None
    world_seen: int = 0

    def on(self, rec: Received) -> None:
        parts = rec.topic.split("/")
        if rec.topic == f"bike/{self.bike}/status":
            self.status.append((rec.t, rec.payload, rec.retain))
        elif rec.topic == f"smartbike-sim/{self.bike}/state":
            try:
                self.world = json.loads(rec.payload)
                self.world_seen += 1
            except ValueError:
                pass
        elif len(parts) == 4 and parts[:2] == ["bike", self.bike] and parts[3] == "report":
            self.counts[f"report:{parts[2]}"] += 1
            value = report_value(rec.payload)
            if parts[2] in MARKERS and value is not None:
                self.reported[parts[2]].add(value)
            if parts[2] in SENSORS and not rec.retain:
                try:
                    stamp = float(json.loads(rec.payload)["timestamp"])
                    self.sensor_stamps.append((stamp, rec.wall))
                except (ValueError, KeyError, TypeError):
                    pass
        elif len(parts) == 4 and parts[3] == "status":
            self.counts["refusals"] += 1
        elif rec.topic.startswith(f"bike/{self.bike}/reply/"):
            self.counts["answers"] += 1
        if rec.topic in self.hostile and b'"ok"' in rec.payload:
            self.hostile_answers += 1  # the daemon's answer (its body says "ok")

    def drops(self, after: float) -> int:
        """Availability flaps after ``after``: every lost/offline, and every new online."""
        return sum(1 for t, payload, retain in self.status if t >= after and not retain)


def world_values(world: dict[str, Any]) -> dict[str, float | None]:
    """What the virtual bike's hardware shows for each actuator."""
    pin = world.get("outputs", {}).get("fan", {})
    duty = pin.get("state") if pin.get("function") == "output" else None
    return {"fan": None if duty is None else 100.0 * duty,
            "resistance": world.get("resistance"), "incline": world.get("incline")}


def same(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, abs_tol=0.01)


def run(broker_nodelay: bool, count: int, args: argparse.Namespace,
        workdir: Path) -> dict[str, Any]:
    """One broker variant: start it and the daemon, flood, settle, measure."""
    res: dict[str, Any] = {}
    # Whatever has started is stopped again, however the run ends.
    with contextlib.ExitStack() as stack:
        broker = Mosquitto(workdir, nodelay=broker_nodelay, queue=args.broker_queue)
        broker.start()
        stack.callback(broker.stop)
        cfg = workdir / f"bike-{broker.kind}.toml"
        cfg.write_text(example_config(BIKE, broker.port))
        check_config(cfg)
        daemon = Daemon(cfg, workdir / f"daemon-{broker.kind}.log", seed=args.seed)
        stack.callback(daemon.stop)
        daemon.start()
        hostile = set(hostile_reply_topics(BIKE))
        watch = Watch(BIKE, hostile)
        subs = [f"bike/{BIKE}/status", f"bike/{BIKE}/+/report", f"bike/{BIKE}/+/status",
                f"bike/{BIKE}/reply/#", f"smartbike-sim/{BIKE}/state",
                # Those an answer could reach: mosquitto takes no wildcard, $ or 200+ levels.
                *(t for t in hostile if "+" not in t and "#" not in t and not t.startswith("$")
                  and t.count("/") < 200)]
        monitor = App(broker.host, broker.port, subs, on_receive=watch.on,
                      keep=lambda t: t.endswith(("/fan/report", "/reply/barrier",
                                                 "/reply/latency")))
        stack.callback(monitor.close)
        monitor.start()
        flooder = App(broker.host, broker.port)
        flooder.client.max_inflight_messages_set(100)
        stack.callback(flooder.close)
        flooder.start()
        t0 = time.monotonic()
        while not any(p == b"online" for _, p, _ in watch.status):
            if not daemon.alive() or time.monotonic() - t0 > 30:
                raise SystemExit(f"the daemon never came online:\n{daemon.tail()}")
            time.sleep(0.05)
        while watch.world is None and time.monotonic() - t0 < 30:
            time.sleep(0.05)  # the virtual world's first state: the bike is riding
        time.sleep(1.0)  # let start-up reports and the first health message pass
        res["ready_s"] = time.monotonic() - t0
        res["rss_before_kib"] = status_kib(daemon.pid, "VmRSS")
        lines_before, bytes_before = daemon.log_lines(), daemon.log.stat().st_size
        cpu_before = cpu_seconds(daemon.pid)

        # -- the flood
        messages = flood_messages(count, BIKE, args.seed)
        expected: dict[str, float] = {}
        for m in messages:
            if m.valid and m.value is not None:
                expected[m.topic.split("/")[2]] = m.value
        t_flood, wall_flood = time.monotonic(), time.time()
        infos = []
        for m in messages:
            props = v5_reply(m.reply, b"flood") if m.reply else None
            infos.append(flooder.publish(m.topic, m.payload, qos=1, properties=props))
        for info in infos:
            info.wait_for_publish(120)
        res["flood_sent_s"] = time.monotonic() - t_flood
        res["flood_messages"] = len(messages)

        # -- barrier: a refused command answered on the reply namespace comes back after
        # every message before it has been read. Refusals may be shed under pressure:
        # try again until one is answered.
        barrier_at, wall_barrier = None, time.time()
        for attempt in range(60):
            if not daemon.alive():
                break
            mark = monitor.mark()
            flooder.publish(f"bike/{BIKE}/fan/control", b"999",
                            properties=v5_reply(f"bike/{BIKE}/reply/barrier", b"%d" % attempt))
            if monitor.wait(lambda r: r.topic.endswith("/reply/barrier"), 2.0, after=mark):
                barrier_at, wall_barrier = time.monotonic(), time.time()
                break
        res["flood_read_s"] = None if barrier_at is None else barrier_at - t_flood
        res["cpu_flood_s"] = (cpu_seconds(daemon.pid) or 0.0) - (cpu_before or 0.0)

        # -- settle: the retained reports against the virtual hardware, until they agree
        # (the incline motor moves 2 degrees a second) or time is up.
        agreed = 0
        state: dict[str, Any] = {}
        t_settle = time.monotonic()
        while time.monotonic() - t_settle < args.settle_timeout and daemon.alive():
            seen = watch.world_seen
            while watch.world_seen == seen and time.monotonic() - t_settle < args.settle_timeout:
                time.sleep(0.05)  # the next world state (once a second)
            got = retained(broker.host, broker.port, f"bike/{BIKE}/+/report")
            world = world_values(watch.world or {})
            state = {t: (report_value(got.get(f"bike/{BIKE}/{t}/report", b"")), world[t])
                     for t in ACTUATORS}
            agreed = agreed + 1 if all(same(r, w) for r, w in state.values()) else 0
            if agreed >= 2:  # two world states in a row: the motors have stopped
                break
        res["settled_s"] = time.monotonic() - t_flood
        res["state"] = state
        res["state_equal"] = agreed >= 2
        res["state_is_last_command"] = all(same(state[t][0], expected.get(t))
                                           for t in ACTUATORS)
        res["expected"] = expected
        res["drops"] = watch.drops(t_flood)
        res["hostile_applied"] = sum(1 for t, marker in MARKERS.items()
                                     if marker in watch.reported[t])
        res["hostile_answers"] = watch.hostile_answers
        res["refusals_seen"] = watch.counts["refusals"]
        # Sensor reports the daemon stamped while it read the flood, and how late they came.
        delays = [recv - stamp for stamp, recv in watch.sensor_stamps
                  if wall_flood <= stamp <= wall_barrier]
        res["sensor_reports_in_flood"] = len(delays)
        res["sensor_delay_max_s"] = max(delays) if delays else None
        res["flood_window_s"] = wall_barrier - wall_flood
        gaps = sorted(stamp for stamp, _ in watch.sensor_stamps)
        res["sensor_gap_max_s"] = max((b - a for a, b in zip(gaps, gaps[1:], strict=False)
                                       if b >= wall_flood and a <= wall_barrier), default=None)
        res["vmhwm_kib"] = status_kib(daemon.pid, "VmHWM")
        res["rss_after_kib"] = status_kib(daemon.pid, "VmRSS")

        # -- good commands after the flood: command published -> its report received
        lat = []
        last = (res["state"]["fan"][0] or 0.0)
        for i in range(10):
            value = float(11 + (i * 7) % 80)
            if value == last:
                value += 1
            mark = monitor.mark()
            t = time.monotonic()
            flooder.publish(f"bike/{BIKE}/fan/control", f"{value:g}")
            rec = monitor.wait(lambda r, v=value: r.topic.endswith("/fan/report")
                               and report_value(r.payload) == v, 10, after=mark)
            lat.append(None if rec is None else (rec.t - t) * 1000)
            last = value
        res["latency_first_ms"] = lat[0]
        res["latency_median_ms"] = median(lat)
        res["latency_lost"] = sum(1 for x in lat if x is None)
        health = retained(broker.host, broker.port, f"bike/{BIKE}/health").get(
            f"bike/{BIKE}/health")
        try:
            res["health_counters"] = json.loads(health or b"{}").get("counters")
            res["health_reconnects"] = json.loads(health or b"{}").get("reconnects")
        except ValueError:
            res["health_counters"] = None
        res["alive"] = daemon.alive()
        res["drops"] = watch.drops(t_flood)
        # Log lines held back in a flood are summed up about every 10 s: give it the time.
        time.sleep(max(0.0, t_flood + LOG_SUMMARY_AFTER - time.monotonic()))
        res["stop_s"] = daemon.stop()
        res["log_lines_flood"] = daemon.log_lines() - lines_before
        res["log_bytes_flood"] = daemon.log.stat().st_size - bytes_before
    return res


# -------------------------------------------------------------------------- output


def yes(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "NO")


def print_table(results: dict[str, dict[str, Any]]) -> None:
    kinds = list(results)
    rows: list[tuple[str, list[str]]] = []

    def row(name: str, f: Any) -> None:
        cells = []
        for k in kinds:
            try:
                cells.append(f(results[k]))
            except (KeyError, TypeError):
                cells.append("-")
        rows.append((name, cells))

    row("messages in the flood", lambda r: f"{r['flood_messages']}")
    row("sent (all PUBACKed) in", lambda r: fmt(r["flood_sent_s"], 1, " s"))
    row("read by the daemon after", lambda r: fmt(r["flood_read_s"], 1, " s"))
    row("connection drops (must be 0)", lambda r: f"{r['drops']}")
    row("retained state = pins (must be yes)", lambda r: yes(r["state_equal"]))
    row("  fan report / pin duty", lambda r: "{} / {}".format(
        *(fmt(v, 1) for v in r["state"]["fan"])))
    row("  resistance report / motor", lambda r: "{} / {}".format(
        *(fmt(v, 1) for v in r["state"]["resistance"])))
    row("  incline report / motor", lambda r: "{} / {}".format(
        *(fmt(v, 1) for v in r["state"]["incline"])))
    row("retained state = last good command", lambda r: yes(r["state_is_last_command"]))
    row("settled after (from flood start)", lambda r: fmt(r["settled_s"], 1, " s"))
    row("hostile commands applied (must be 0)", lambda r: f"{r['hostile_applied']}")
    row("answers on hostile topics (must be 0)", lambda r: f"{r['hostile_answers']}")
    row("peak RSS (VmHWM)", lambda r: f"{r['vmhwm_kib'] / 1024:.1f} MiB")
    row("RSS before / after", lambda r: f"{r['rss_before_kib'] / 1024:.1f} / "
        f"{r['rss_after_kib'] / 1024:.1f} MiB")
    row("log lines, flood start to exit",
        lambda r: f"{r['log_lines_flood']} ({r['log_bytes_flood']} bytes)")
    row("daemon CPU for the flood", lambda r: fmt(r["cpu_flood_s"], 2, " s"))
    row("sensor reports during the flood", lambda r: f"{r['sensor_reports_in_flood']} in "
        f"{r['flood_window_s']:.1f} s")
    row("  most behind its timestamp", lambda r: fmt(r["sensor_delay_max_s"] * 1000, 1,
                                                          " ms"))
    row("  longest gap between sensor reports", lambda r: fmt(r["sensor_gap_max_s"], 2, " s"))
    row("good command after: first", lambda r: fmt(r["latency_first_ms"], 2, " ms"))
    row("good command after: median of 10", lambda r: fmt(r["latency_median_ms"], 2, " ms"))
    row("  never reported", lambda r: f"{r['latency_lost']}")
    row("daemon alive; SIGTERM -> exit", lambda r: f"{yes(r['alive'])}; "
        f"{fmt(r['stop_s'], 2, ' s')}")
    width = max(len(n) for n, _ in rows) + 2
    print(f"\n{'':<{width}}" + "".join(f"{k + ' broker':>26}" for k in kinds))
    for name, cells in rows:
        print(f"{name:<{width}}" + "".join(f"{c:>26}" for c in cells))
    for k in kinds:
        counters = results[k].get("health_counters")
        if counters:
            print(f"health counters ({k} broker): {json.dumps(counters)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="2,000 commands (under a minute)")
    p.add_argument("-n", "--count", type=int, default=None,
                   help="commands in the flood (default 10,000; 2,000 with --quick)")
    p.add_argument("--broker", choices=("both", "nodelay", "stock"), default="both")
    p.add_argument("--broker-queue", type=int, default=100_000,
                   help="mosquitto max_queued_messages (its default 1000 would drop "
                   "commands before the daemon sees them); 0: mosquitto's default")
    p.add_argument("--settle-timeout", type=float, default=40.0,
                   help="longest wait for the virtual bike to agree with the reports")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    a = p.parse_args(argv)
    count = a.count or (2000 if a.quick else 10_000)
    if not 3 <= count <= 200_000:
        p.error("--count must be 3..200000")
    kinds = {"both": (True, False), "nodelay": (True,), "stock": (False,)}[a.broker]
    workdir = Path(tempfile.mkdtemp(prefix="sbflood-"))
    print(f"flood: {count} commands (+{len(OVERSIZE)} oversize, "
          f"{len(hostile_reply_topics(BIKE)) * 3} hostile ResponseTopics) at bike {BIKE}; "
          f"{load_average()}; work folder {workdir}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    try:
        for nodelay in kinds:
            name = "nodelay" if nodelay else "stock"
            print(f"-- {name} broker ...", flush=True)
            results[name] = run(nodelay, count, a, workdir)
    finally:
        if a.keep:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(results)
    print(f"({load_average()} at the end; figures compare only within one run)")
    ok = all(r["drops"] == 0 and r["state_equal"] and r["hostile_applied"] == 0
             and r["hostile_answers"] == 0 for r in results.values())
    print("promises kept: " + ("yes" if ok else "NO (see the rows marked NO / not 0)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
