"""smartbiked, mqtt-io and a bare paho bridge on the same serial board and broker (issue 9).

Three serial <-> MQTT bridges, run one after the other and interleaved (round 1:
smartbiked, mqtt-io, floor; round 2: the same again...), each time fresh: a new
private mosquitto on a free loopback port, a new pseudo-terminal standing in for
the serial board (the daemon opens a symlink to it, like /dev/serial/by-id), a new
daemon process:

- smartbiked: ``python -m smartbiked --config`` (real hardware mode) with one
  keyvalue board: ``CAD=<n>`` lines are the cadence, resistance commands are written
  as ``RES <n>%``. If the daemon accepts ``interval = 0`` (report every line) the
  sensor uses it; otherwise today's on-change settings.
- mqtt-io 2.7.0, installed from PyPI into a throwaway venv under /tmp, with its
  serial stream module (``read_interval`` 0.01 s, its minimum).
- the floor: bench/floor_bridge.py, a paho ``loop_forever`` bridge of ~40 lines
  speaking the same lines and topics as the smartbiked config.

Every line written and every command published carries a sequence number that the
bridge passes through (a sensor value, a serial command argument), so each is matched
to what it caused. Per run: idle CPU, then serial -> MQTT (line written -> report
received) at 13 lines/s, MQTT -> serial (command published -> bytes on the pty) at
100/s, serial -> MQTT at 100, 500 and 1000 lines/s (how many are never reported), the
board unplugged and plugged back (time until commands are written again), and the
broker stopped for 8 s and restarted (time until traffic flows both ways). These
runs use mosquitto as Debian ships it; a second run per bridge uses a broker with
``set_tcp_nodelay true`` for the CPU cost per 1000 commands. Then the fleet figure:
N = 1, 10, 50 simulated bikes (``smartbiked --simulate``, distinct ids) on one broker:
RSS and idle CPU per bike, and command p99 across the fleet.

Medians over the rounds are printed as the table of issue 9 (with its goals beside).
Latencies include the bench's own paho client; figures compare only within one run on
one machine. A full run takes about 15 minutes on 2 cores; ``--quick`` about a minute
(plus installing mqtt-io the first time).

    .venv/bin/python bench/side_by_side.py
    .venv/bin/python bench/side_by_side.py --quick
    .venv/bin/python bench/side_by_side.py --rounds 3 --only smartbiked,floor --no-fleet
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import termios
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import (
    ROOT,
    App,
    Fleet,
    Mosquitto,
    daemon_env,
    dump_toml,
    fmt,
    load_average,
    median,
    pct,
    status_kib,
    tree_cpu_seconds,
)

BIKE = "000007"
MQTT_IO = "mqtt-io==2.7.0"
MQTT_IO_VENV = Path(tempfile.gettempdir()) / "smartbiked-bench-mqtt-io"
FLOOR = Path(__file__).resolve().parent / "floor_bridge.py"
#: The goals of issue 9, printed beside the figures.
GOALS = {
    "line": "<= 1.3 / 2.5 ms", "lost": "0 / 0 / 0 %", "cmd": "<= 1.2 / 2.5 ms",
    "never": "0", "stalls": "0", "cpu": "<= 0.5 s", "outage": "<= 1.2 s",
    "unplug": "<= 0.1 s", "idle": "<= 0.2 %",
}


# ------------------------------------------------------------------------- bridges


def smartbiked_config(pty: str, port: int, every_line: bool) -> str:
    """One keyvalue board: CAD=<n> lines in, RES <n>% commands out."""
    cadence: dict[str, Any] = {"driver": "serial_sensor", "port": "board", "field": "cad"}
    if every_line:
        cadence["interval"] = 0  # report every line (once the daemon has it)
    else:
        # Today: on change (each line differs by >= 1), a cap far above the poll rate.
        cadence.update(interval=1.0, deadband=0.5, max_rate=1000.0)
    return dump_toml({
        "bike": {"id": BIKE, "device_name": "bench"},
        "broker": {"host": "127.0.0.1", "port": port},
        "serial": {"board": {"url": pty, "baudrate": 115200, "format": "keyvalue"}},
        "cadence": cadence,
        # {"value": <seq>e-2} is <seq>/100 percent; ".0%" multiplies by 100 again, so
        # the line carries the whole sequence number.
        "resistance": {"driver": "serial_actuator", "port": "board",
                       "template": "RES {value:.0%}\n", "ack": "", "min_interval": 0.0},
    })


MQTT_IO_CONFIG = """\
mqtt:
  host: 127.0.0.1
  port: {port}
  topic_prefix: bench
  client_id: mqtt-io-bench
stream_modules:
  - name: bike
    module: serial
    device: {pty}
    baud: 115200
    read_interval: 0.01   # its minimum; the default is 60 s
options:
  install_requirements: no
"""


@dataclass(frozen=True)
class Bridge:
    """How to start one bridge and speak to it through the board and the broker."""

    name: str
    argv: Callable[[Path], list[str]]          # config path -> command line
    config: Callable[[str, int], str]          # (pty link, broker port) -> config text
    report_topic: str
    control_topic: str
    status_topic: str
    line: str                                  # board line, with {seq}
    report_re: bytes                           # group 1: a seq in a report payload
    command: str                               # control payload, with {seq}
    command_re: bytes                          # group 1: a seq in the serial bytes
    seq_mod: int = 10_000                      # resistance 0..100 % in 1/100 steps
    python: str = sys.executable
    replug: bool = True                        # reopens an unplugged board


def bridges(every_line: bool, mqtt_io_python: str | None) -> dict[str, Bridge]:
    py = sys.executable
    out = {
        "smartbiked": Bridge(
            "smartbiked", lambda cfg: [py, "-m", "smartbiked", "--config", str(cfg)],
            lambda pty, port: smartbiked_config(pty, port, every_line),
            f"bike/{BIKE}/cadence/report", f"bike/{BIKE}/resistance/control",
            f"bike/{BIKE}/status", "CAD={seq}\n", rb'"value": (\d+)',
            '{{"value": {seq}e-2}}', rb"RES (\d+)%"),
        "floor": Bridge(
            # The floor takes its settings as arguments: its "config" is its argument list.
            "floor", lambda cfg: [py, str(FLOOR), *cfg.read_text().split()],
            lambda pty, port: f"--port {port} --serial {pty} --bike {BIKE}",
            f"bike/{BIKE}/cadence/report", f"bike/{BIKE}/resistance/control",
            f"bike/{BIKE}/status", "CAD={seq}\n", rb'"value": (\d+)',
            '{{"value": {seq}e-2}}', rb"RES (\d+)%", replug=False),
    }
    if mqtt_io_python:
        out["mqtt-io"] = Bridge(
            "mqtt-io", lambda cfg: [mqtt_io_python, "-m", "mqtt_io", str(cfg)],
            lambda pty, port: MQTT_IO_CONFIG.format(port=port, pty=pty),
            "bench/stream/bike", "bench/stream/bike/send", "bench/status",
            "SEQ={seq};\n", rb"SEQ=(\d+);", "CMD SEQ={seq};\n", rb"SEQ=(\d+);",
            seq_mod=0, python=mqtt_io_python)
    return {name: out[name] for name in ("smartbiked", "mqtt-io", "floor") if name in out}


def smartbiked_every_line(workdir: Path) -> bool:
    """Does the daemon accept ``interval = 0`` (report every line)? Asks --check-config."""
    cfg = workdir / "probe.toml"
    cfg.write_text(smartbiked_config("/dev/null", 1, every_line=True))
    done = subprocess.run([sys.executable, "-m", "smartbiked", "--check-config", "--config",
                           str(cfg)], cwd=ROOT, env=daemon_env(workdir / "run"),
                          capture_output=True, text=True)
    return done.returncode == 0


def mqtt_io_python(venv: Path) -> str | None:
    """The throwaway venv's python with mqtt-io installed (made on first use)."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import mqtt_io"],
                                          capture_output=True).returncode == 0:
        return str(python)
    print(f"installing {MQTT_IO} into {venv} (once) ...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", MQTT_IO, "pyserial"], check=True)
    except (subprocess.CalledProcessError, OSError) as exc:
        print(f"mqtt-io could not be installed ({exc}): its column stays empty")
        return None
    return str(python)


# ------------------------------------------------------------------------ the board


class Board:
    """A pseudo-terminal: the bridge opens ``link``; the bench owns the master end.

    Everything the bridge writes is recorded as (time, bytes) chunks by a reader thread.
    """

    def __init__(self, link: Path) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        attrs = termios.tcgetattr(self.slave)
        attrs[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON)
        termios.tcsetattr(self.slave, termios.TCSANOW, attrs)
        self.link = link
        tmp = link.with_name(link.name + ".new")
        tmp.unlink(missing_ok=True)
        os.symlink(os.ttyname(self.slave), tmp)
        os.replace(tmp, link)
        self.lock = threading.Lock()
        self.chunks: list[tuple[int, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        import select

        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if not ready:
                continue
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            t = time.monotonic_ns()
            with self.lock:
                self.chunks.append((t, data))

    def write(self, data: bytes) -> int:
        """Write a line as the board; the time just before the write (ns)."""
        t = time.monotonic_ns()
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view):]
        return t

    def mark(self) -> int:
        with self.lock:
            return len(self.chunks)

    def since(self, index: int) -> list[tuple[int, bytes]]:
        with self.lock:
            return self.chunks[index:]

    def unplug(self) -> None:
        """Close both ends and remove the link: the bridge's port fails."""
        self._stop.set()
        self._thread.join(1)
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass
        self.link.unlink(missing_ok=True)


class Matcher:
    """Matches sequence values seen to those sent (oldest outstanding first)."""

    def __init__(self) -> None:
        self.sent: dict[int, int] = {}
        self.outstanding: dict[int, collections.deque[int]] = collections.defaultdict(
            collections.deque)
        self.received: dict[int, int] = {}
        self.measured: set[int] = set()
        self.strays = 0

    def sent_one(self, seq: int, value: int, t: int, measured: bool) -> None:
        self.sent[seq] = t
        self.outstanding[value].append(seq)
        if measured:
            self.measured.add(seq)

    def got(self, value: int, t: int) -> None:
        queue = self.outstanding.get(value)
        if not queue:
            self.strays += 1  # a heartbeat repeating a value, or a duplicate
            return
        self.received[queue.popleft()] = t

    def done(self) -> int:
        return sum(1 for s in self.measured if s in self.received)

    def stats(self) -> dict[str, Any]:
        lat = [(self.received[s] - self.sent[s]) / 1e6 for s in self.measured
               if s in self.received]
        n = len(self.measured)
        return {"sent": n, "received": len(lat), "lost": n - len(lat),
                "lost_pct": 100.0 * (n - len(lat)) / n if n else None,
                "strays": self.strays, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                "max_ms": max(lat, default=None),
                "over_20ms": sum(1 for x in lat if x > 20.0),
                "over_20ms_per_1000": (1000.0 * sum(1 for x in lat if x > 20.0) / len(lat)
                                       if lat else None)}


def values(regex: re.Pattern[bytes], data: bytes) -> list[int]:
    return [int(m.group(1)) for m in regex.finditer(data)]


# ----------------------------------------------------------------------- one run


class Run:
    """One bridge, fresh: its own broker, board and process; the phases measure it."""

    def __init__(self, bridge: Bridge, workdir: Path, nodelay: bool) -> None:
        self.b = bridge
        self.workdir = workdir
        workdir.mkdir(parents=True)
        self.report_re = re.compile(bridge.report_re)
        self.command_re = re.compile(bridge.command_re)
        self.seq = 0
        self.idle_cpu_per_s: float | None = None
        # What has started is stopped again if a later part fails to start.
        with contextlib.ExitStack() as undo:
            self.broker = Mosquitto(workdir, nodelay=nodelay, queue=100_000)
            undo.callback(self.broker.stop)
            self.broker.start()
            self.board = Board(workdir / "ttyBIKE")
            undo.callback(self.board.unplug)
            self.app = App(self.broker.host, self.broker.port,
                           [bridge.report_topic, bridge.status_topic],
                           keep=lambda topic: topic == bridge.report_topic)
            undo.callback(self.app.close)
            self.app.start()
            cfg = workdir / "bridge.conf"
            cfg.write_text(bridge.config(str(self.board.link), self.broker.port))
            self.log = open(workdir / "bridge.log", "w")
            undo.callback(self.log.close)
            self.proc = subprocess.Popen(bridge.argv(cfg), cwd=ROOT, stdout=self.log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env=daemon_env(workdir / "run"))
            undo.pop_all()  # all started: stop() undoes it from now on

    # -- helpers

    def next(self) -> tuple[int, int]:
        """The next sequence number and the value that carries it."""
        self.seq += 1
        return self.seq, (self.seq % self.b.seq_mod if self.b.seq_mod else self.seq)

    def line(self, value: int) -> bytes:
        return self.b.line.format(seq=value).encode()

    def command(self, value: int) -> bytes:
        return self.b.command.format(seq=value).encode()

    def cpu(self) -> float | None:
        return tree_cpu_seconds(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _pace(self, t0: float, i: int, rate: float) -> None:
        wait = t0 + i / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)

    # -- phases

    def warm_up(self, timeout: float = 30.0) -> float | None:
        """Probe both directions until each works once; seconds from start, or None."""
        t0 = time.monotonic()
        ok = self._probe(t0 + timeout)
        return time.monotonic() - t0 if ok["a"] is not None and ok["b"] is not None else None

    def _probe(self, deadline: float, since: float | None = None) -> dict[str, float | None]:
        """Send a line and a command every 0.1 s until each gets through.

        Returns, per direction, seconds from ``since`` until the first probe sent
        after ``since`` arrived (None: not within the deadline).
        """
        since = time.monotonic() if since is None else since
        got: dict[str, float | None] = {"a": None, "b": None}
        sent_a: set[int] = set()
        sent_b: set[int] = set()
        idx, cidx = self.app.mark(), self.board.mark()
        next_probe = 0.0
        while time.monotonic() < deadline and self.alive():
            if time.monotonic() >= next_probe:
                next_probe = time.monotonic() + 0.1
                if got["a"] is None:
                    _, v = self.next()
                    sent_a.add(v)
                    try:
                        self.board.write(self.line(v))
                    except OSError:
                        pass
                if got["b"] is None:
                    _, v = self.next()
                    sent_b.add(v)
                    self.app.publish(self.b.control_topic, self.command(v))
            if got["a"] is None:
                for rec in self.app.since(idx):
                    if sent_a & set(values(self.report_re, rec.payload)):
                        got["a"] = rec.t - since
                        break
            if got["b"] is None:
                chunks = self.board.since(cidx)
                if sent_b & set(values(self.command_re, b"".join(c for _, c in chunks))):
                    got["b"] = chunks[-1][0] / 1e9 - since
            if got["a"] is not None and got["b"] is not None:
                break
            time.sleep(0.005)
        return got

    def idle(self, seconds: float) -> float | None:
        """CPU % while nothing happens."""
        c0, t0 = self.cpu(), time.monotonic()
        time.sleep(seconds)
        c1, wall = self.cpu(), time.monotonic() - t0
        if c0 is None or c1 is None:
            return None
        self.idle_cpu_per_s = (c1 - c0) / wall
        return 100 * self.idle_cpu_per_s

    def lines(self, rate: float, n: int, warmup: int = 20, drain: float = 3.0
              ) -> dict[str, Any]:
        """Serial -> MQTT: ``n`` lines at ``rate``/s, each matched to its report."""
        m = Matcher()
        idx = self.app.mark()

        def collect() -> None:
            nonlocal idx
            new = self.app.since(idx)
            idx += len(new)
            for rec in new:
                for v in values(self.report_re, rec.payload):
                    m.got(v, int(rec.t * 1e9))

        t0 = w0 = time.monotonic()
        c0 = self.cpu()
        for i in range(warmup + n):
            self._pace(t0, i, rate)
            if i == warmup:
                c0, w0 = self.cpu(), time.monotonic()
            seq, v = self.next()
            m.sent_one(seq, v, self.board.write(self.line(v)), measured=i >= warmup)
            if i % 50 == 49:
                collect()
        end = time.monotonic() + drain
        while True:
            collect()
            if m.done() >= n or time.monotonic() >= end:
                break
            time.sleep(0.02)
        out = m.stats()
        out.update(self._cost(c0, w0, n))
        return out

    def commands(self, rate: float, n: int, warmup: int = 20, drain: float = 3.0
                 ) -> dict[str, Any]:
        """MQTT -> serial: ``n`` commands at ``rate``/s, each matched to its bytes."""
        m = Matcher()
        cidx = self.board.mark()
        buf = bytearray()
        ends: list[int] = []
        times: list[int] = []
        consumed = 0

        def collect() -> None:
            nonlocal cidx, consumed
            new = self.board.since(cidx)
            cidx += len(new)
            for t, data in new:
                buf.extend(data)
                ends.append(len(buf))
                times.append(t)
            for match in self.command_re.finditer(buf, consumed):
                # the time of the chunk that completed this command
                k = bisect.bisect_left(ends, match.end())
                m.got(int(match.group(1)), times[min(k, len(times) - 1)])
                consumed = match.end()

        t0 = w0 = time.monotonic()
        c0 = self.cpu()
        for i in range(warmup + n):
            self._pace(t0, i, rate)
            if i == warmup:
                c0, w0 = self.cpu(), time.monotonic()
            seq, v = self.next()
            m.sent_one(seq, v, time.monotonic_ns(), measured=i >= warmup)
            self.app.publish(self.b.control_topic, self.command(v))
            if i % 50 == 49:
                collect()
        end = time.monotonic() + drain
        while True:
            collect()
            if m.done() >= n or time.monotonic() >= end:
                break
            time.sleep(0.02)
        out = m.stats()
        out.update(self._cost(c0, w0, n))
        return out

    def _cost(self, c0: float | None, w0: float, n: int) -> dict[str, Any]:
        c1, wall = self.cpu(), time.monotonic() - w0
        if c0 is None or c1 is None:
            return {}
        out = {"cpu_s_per_1000": (c1 - c0) / n * 1000}
        if self.idle_cpu_per_s is not None:
            out["cpu_s_per_1000_net"] = (c1 - c0 - self.idle_cpu_per_s * wall) / n * 1000
        return out

    def unplug(self, seconds: float, timeout: float = 20.0) -> dict[str, Any]:
        """Pull the board for ``seconds``, plug a new one in behind the same link."""
        self.board.unplug()
        time.sleep(seconds)
        self.board = Board(self.board.link)
        t_replug = time.monotonic()
        got = self._probe(t_replug + timeout, since=t_replug)
        return {"lines_s": got["a"], "commands_s": got["b"]}

    def outage(self, seconds: float, timeout: float = 30.0) -> dict[str, Any]:
        """Stop the broker for ``seconds`` (the board keeps talking), start it again."""
        self.broker.stop()
        t_down = time.monotonic()
        i = 0
        while time.monotonic() < t_down + seconds:
            self._pace(t_down, i, 10.0)
            _, v = self.next()
            self.board.write(self.line(v))
            i += 1
        self.broker.start()
        t_up = time.monotonic()
        got = self._probe(t_up + timeout, since=t_up)
        both = None if None in got.values() else max(got.values())  # type: ignore[type-var]
        return {"lines_s": got["a"], "commands_s": got["b"], "traffic_s": both}

    def stop(self) -> dict[str, Any]:
        out: dict[str, Any] = {"vmhwm_kib": status_kib(self.proc.pid, "VmHWM")}
        if self.alive():
            t0 = time.monotonic()
            self.proc.terminate()
            try:
                self.proc.wait(10)
                out["stop_s"] = time.monotonic() - t0
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        self.app.close()
        self.board.unplug()
        self.broker.stop()
        return out


# ------------------------------------------------------------------- the programme


def stock_run(bridge: Bridge, workdir: Path, p: argparse.Namespace) -> dict[str, Any]:
    """Everything but the CPU per command, on a stock broker."""
    run = Run(bridge, workdir, nodelay=False)
    res: dict[str, Any] = {}
    try:
        res["ready_s"] = run.warm_up()
        if res["ready_s"] is None:
            res["error"] = "never ready:\n" + (workdir / "bridge.log").read_text()[-1500:]
            return res
        time.sleep(1.0)
        res["idle_cpu_pct"] = run.idle(p.idle)
        res["line13"] = run.lines(13, p.lines13, p.warmup, p.drain)
        res["cmd_stock"] = run.commands(100, p.n, p.warmup, p.drain)
        for rate, n in zip(p.rates, p.rate_lines, strict=True):
            res[f"lines{rate}"] = run.lines(rate, n, p.warmup, p.drain)
        if bridge.replug and p.unplug > 0:
            res["unplug"] = run.unplug(p.unplug)
        if p.outage > 0:
            res["outage"] = run.outage(p.outage)
        res["alive_at_end"] = run.alive()
    finally:
        res.update(run.stop())
    return res


def nodelay_run(bridge: Bridge, workdir: Path, p: argparse.Namespace) -> dict[str, Any]:
    """Commands on a broker with set_tcp_nodelay: the CPU cost per command."""
    run = Run(bridge, workdir, nodelay=True)
    res: dict[str, Any] = {}
    try:
        res["ready_s"] = run.warm_up()
        if res["ready_s"] is None:
            res["error"] = "never ready"
            return res
        time.sleep(1.0)
        res["idle_cpu_pct"] = run.idle(min(p.idle, 3.0))
        res["cmd_nodelay"] = run.commands(100, p.n, p.warmup, p.drain)
    finally:
        res.update(run.stop())
    return res


def get(runs: list[dict[str, Any]], *path: str) -> float | None:
    """The median over runs of a nested figure."""
    found = []
    for r in runs:
        v: Any = r
        for key in path:
            v = v.get(key) if isinstance(v, dict) else None
        found.append(v)
    return median(found)


def print_table(results: dict[str, dict[str, list[dict[str, Any]]]],
                p: argparse.Namespace) -> None:
    names = list(results)

    def cell(name: str, f: Callable[[list[dict[str, Any]], list[dict[str, Any]]], str]) -> str:
        try:
            return f(results[name]["stock"], results[name]["nodelay"])
        except (KeyError, TypeError, ZeroDivisionError):
            return "-"

    rows: list[tuple[str, Callable[..., str], str]] = [
        (f"serial line -> report, p50 / p99 ({p.lines13} lines at 13/s)",
         lambda s, d: f"{fmt(get(s, 'line13', 'p50_ms'))} / {fmt(get(s, 'line13', 'p99_ms'))}"
         " ms", GOALS["line"]),
        ("  of them never reported", lambda s, d: fmt(get(s, "line13", "lost"), 0), "0"),
        ("lines never reported at " + " / ".join(str(r) for r in p.rates) + " per s",
         lambda s, d: " / ".join(fmt(get(s, f"lines{r}", "lost_pct"), 0) for r in p.rates)
         + " %", GOALS["lost"]),
        ("command -> serial bytes, stock broker, p50 / p99",
         lambda s, d: f"{fmt(get(s, 'cmd_stock', 'p50_ms'))} / "
         + fmt(get(s, 'cmd_stock', 'p99_ms'), unit=" ms"), GOALS["cmd"]),
        (f"of {p.n} commands at 100/s, never written",
         lambda s, d: fmt(get(s, "cmd_stock", "lost"), 0), GOALS["never"]),
        ("stalls over 20 ms per 1000 commands, stock broker",
         lambda s, d: fmt(get(s, "cmd_stock", "over_20ms_per_1000"), 0), GOALS["stalls"]),
        ("command -> serial bytes, nodelay broker, p50 / p99",
         lambda s, d: f"{fmt(get(d, 'cmd_nodelay', 'p50_ms'))} / "
         + fmt(get(d, 'cmd_nodelay', 'p99_ms'), unit=" ms"), ""),
        ("CPU per 1000 commands written, nodelay broker",
         lambda s, d: fmt(get(d, 'cmd_nodelay', 'cpu_s_per_1000'), unit=" s"), GOALS["cpu"]),
        (f"broker back after a {p.outage:g} s outage, traffic flowing",
         lambda s, d: fmt(get(s, 'outage', 'traffic_s'), unit=" s"), GOALS["outage"]),
        ("  lines / commands flowing again after",
         lambda s, d: f"{fmt(get(s, 'outage', 'lines_s'))} / "
         + fmt(get(s, 'outage', 'commands_s'), unit=" s"), ""),
        (f"serial board back after a {p.unplug:g} s unplug, commands accepted",
         lambda s, d: fmt(get(s, 'unplug', 'commands_s'), 3, unit=" s"), GOALS["unplug"]),
        ("  lines reported again after",
         lambda s, d: fmt(get(s, 'unplug', 'lines_s'), 3, unit=" s"), ""),
        ("idle CPU", lambda s, d: fmt(get(s, 'idle_cpu_pct'), 2, unit=" %"), GOALS["idle"]),
        ("peak RSS (VmHWM)", lambda s, d: fmt(get(s, 'vmhwm_kib') / 1024, 1, unit=" MiB"), ""),
        ("start -> both directions working",
         lambda s, d: fmt(get(s, 'ready_s'), 2, unit=" s"), ""),
        ("SIGTERM -> exit", lambda s, d: fmt(get(s, 'stop_s'), 2, unit=" s"), ""),
    ]
    width = max(len(r[0]) for r in rows) + 2
    col = 20
    print(f"\nmedians of {p.rounds} round(s); fresh broker, board and process per run\n")
    print(f"{'':<{width}}" + "".join(f"{n:>{col}}" for n in names) + f"{'goal (issue 9)':>{col}}")
    for label, f, goal in rows:
        print(f"{label:<{width}}" + "".join(f"{cell(n, f):>{col}}" for n in names)
              + f"{goal:>{col}}")


def fleet(sizes: list[int], p: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """N simulated bikes on one broker: RSS, idle CPU, command latency across the fleet."""
    workdir.mkdir(parents=True, exist_ok=True)
    broker = Mosquitto(workdir, nodelay=p.fleet_broker == "nodelay", queue=100_000)
    f: Fleet | None = None
    out = []
    try:
        broker.start()
        f = Fleet(broker, workdir)
        for n in sizes:
            started = f.grow(n)
            time.sleep(2.0)  # start-up reports and health messages pass
            rss = f.rss_kib()
            idle, broker_idle = f.idle_cpu(p.fleet_idle)
            stream = f.command_stream(p.fleet_rate, p.fleet_seconds)
            row = {"n": n, "start_s": started, "rss_mib_per_bike": sum(rss) / len(rss) / 1024,
                   "idle_cpu_pct_per_bike": idle / n, "broker_idle_cpu_pct": broker_idle,
                   **stream, "load": os.getloadavg()[0]}
            out.append(row)
            print(f"   fleet of {n}: p99 {fmt(row['p99_ms'])} ms ({load_average()})", flush=True)
    finally:
        if f is not None:
            f.stop()
        broker.stop()
    return out


def print_fleet(rows: list[dict[str, Any]], p: argparse.Namespace) -> None:
    print(f"\nfleet: simulated bikes on one {p.fleet_broker} mosquitto; fan commands round "
          f"the fleet at {p.fleet_rate:g}/s for {p.fleet_seconds:g} s")
    head = ("bikes", "RSS/bike", "idle CPU/bike", "broker idle", "cmd p50", "cmd p99",
            "never", "sensor rep/bike/s")
    print("".join(f"{h:>18}" for h in head))
    for r in rows:
        cells = (str(r["n"]), f"{r['rss_mib_per_bike']:.1f} MiB",
                 f"{r['idle_cpu_pct_per_bike']:.2f} %", f"{r['broker_idle_cpu_pct']:.2f} %",
                 fmt(r['p50_ms'], unit=" ms"), fmt(r['p99_ms'], unit=" ms"), str(r["lost"]),
                 f"{r['sensor_reports_per_bike_s']:.2f}")
        print("".join(f"{c:>18}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="small counts, one round")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (2)")
    ap.add_argument("-n", type=int, default=None, help="commands per run at 100/s (1000)")
    ap.add_argument("--only", default="smartbiked,mqtt-io,floor",
                    help="comma-separated bridges to run ('' for the fleet figure alone)")
    ap.add_argument("--mqtt-io-venv", type=Path, default=MQTT_IO_VENV)
    ap.add_argument("--outage", type=float, default=None, help="broker outage, s (8)")
    ap.add_argument("--unplug", type=float, default=None, help="board unplugged, s (4.5)")
    ap.add_argument("--fleet", default=None, help="fleet sizes (1,10,50); 0: none")
    ap.add_argument("--no-fleet", action="store_true")
    ap.add_argument("--fleet-broker", choices=("nodelay", "stock"), default="nodelay")
    ap.add_argument("--fleet-rate", type=float, default=20.0, help="commands/s (20)")
    ap.add_argument("--json-out", type=Path, help="write every run's figures as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    p = ap.parse_args(argv)
    q = p.quick
    p.rounds = p.rounds or (1 if q else 2)
    p.n = p.n or (100 if q else 1000)
    p.lines13 = 26 if q else 130
    p.rates = [100, 500, 1000]
    p.rate_lines = [100, 250, 500] if q else [1000, 2000, 3000]
    p.idle = 2.0 if q else 10.0
    p.warmup = 5 if q else 20  # unmeasured messages before each phase, at its rate
    p.drain = 1.0 if q else 3.0  # longest wait for stragglers after a phase
    p.outage = p.outage if p.outage is not None else (1.0 if q else 8.0)
    p.unplug = p.unplug if p.unplug is not None else (0.5 if q else 4.5)
    sizes = [] if p.no_fleet else [int(x) for x in (p.fleet or ("1,3" if q else "1,10,50"))
                                   .split(",") if int(x) > 0]
    p.fleet_idle = 2.0 if q else 10.0
    p.fleet_seconds = 3.0 if q else 15.0
    if not 1 <= p.rounds <= 10 or not 10 <= p.n <= 10_000 or any(n > 200 for n in sizes):
        ap.error("rounds 1..10, -n 10..10000, fleet sizes up to 200")

    workdir = Path(tempfile.mkdtemp(prefix="sbside-"))
    wanted = [x.strip() for x in p.only.split(",") if x.strip()]
    every_line = smartbiked_every_line(workdir)
    mio = mqtt_io_python(p.mqtt_io_venv) if "mqtt-io" in wanted else None
    chosen = {k: v for k, v in bridges(every_line, mio).items() if k in wanted}
    cadence = ("reports every line (interval = 0)" if every_line
               else "reports on change (interval = 0 refused)")
    print(f"side by side: {', '.join(chosen) or 'no bridges'}; {p.rounds} round(s); "
          f"smartbiked's cadence "
          f"{cadence}; {load_average()}; work folder {workdir}", flush=True)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        k: {"stock": [], "nodelay": []} for k in chosen}
    try:
        for r in range(1, p.rounds + 1):
            for kind, fn in (("stock", stock_run), ("nodelay", nodelay_run)):
                for name, bridge in chosen.items():
                    t0 = time.monotonic()
                    res = fn(bridge, workdir / f"r{r}-{kind}-{name}", p)
                    results[name][kind].append(res)
                    print(f"   round {r} {kind:<7} {name:<10} {time.monotonic() - t0:5.1f} s"
                          f"{'  ERROR ' + res['error'] if 'error' in res else ''}", flush=True)
        if chosen:
            print_table(results, p)
        fleet_rows = fleet(sizes, p, workdir / "fleet") if sizes else []
        if fleet_rows:
            print_fleet(fleet_rows, p)
        print(f"\n({load_average()} at the end; figures compare only within one run)")
        if p.json_out:
            p.json_out.write_text(json.dumps({"bridges": results, "fleet": fleet_rows},
                                             indent=1, default=str))
    finally:
        if p.keep:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
