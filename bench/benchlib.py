"""Shared parts of the benchmarks: a private mosquitto, the daemon as a process, an app.

Everything here drives the daemon from outside, as an operator or an app would: its
command line (``python -m smartbiked [--simulate] --config FILE``), its config file
and its MQTT topics. Figures come from ``/proc`` (CPU, memory) and from the times at
which messages arrive. Nothing here is a test: the scripts print what they measure.

Brokers listen on a free loopback port (never 1883); the scripts only signal
processes they started, by their own handles.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = ROOT / "config" / "smartbike.toml"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- small tools


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: Iterable[float], p: float) -> float | None:
    """Nearest-rank percentile (``p`` in 0..100); None for no values."""
    s = sorted(values)
    if not s:
        return None
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are numbers; None if there are none."""
    v = sorted(x for x in values if isinstance(x, int | float) and not isinstance(x, bool))
    if not v:
        return None
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def fmt(value: float | None, digits: int = 2, unit: str = "") -> str:
    """A number for a table cell; "-" when it was not measured."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}{unit}"


def wait_for(predicate: Callable[[], Any], timeout: float, step: float = 0.02) -> Any:
    """Poll ``predicate`` until truthy or ``timeout``; its last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(step)


def load_average() -> str:
    """The machine's 1-minute load and core count, to read the figures against."""
    return f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"


# ---------------------------------------------------------------------------- /proc


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, own CPU ticks, reaped children's CPU ticks) of ``pid``, or None."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes().decode("ascii", "replace")
    except OSError:
        return None
    rest = data[data.rfind(")") + 2:].split()
    return int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[13]) + int(rest[14])


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) ``pid`` has used so far, all its threads."""
    st = _stat(pid)
    return None if st is None else (st[1] + st[2]) / CLK_TCK


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU seconds of ``pid`` plus its live descendants (a daemon that forks helpers)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children.setdefault(st[0], []).append(int(name))
    total, todo, seen_root = 0.0, [pid], False
    while todo:
        p = todo.pop()
        own = cpu_seconds(p)
        if own is not None:
            total += own
            seen_root = seen_root or p == pid
        todo.extend(children.get(p, []))
    return total if seen_root else None


def status_kib(pid: int, key: str) -> int | None:
    """A ``/proc/PID/status`` figure in KiB: ``VmRSS`` now, ``VmHWM`` the peak."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------- broker


@dataclass
class Mosquitto:
    """A private mosquitto on a free loopback port.

    ``nodelay``: add ``set_tcp_nodelay true`` (the README's advice); without it this
    is mosquitto as Debian ships it. ``queue``: ``max_queued_messages`` per client
    (mosquitto's default is 1000; a flood needs more so the broker, not the daemon,
    is not what drops commands).
    """

    workdir: Path
    nodelay: bool = True
    queue: int | None = None
    port: int = 0
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        lines = [f"listener {self.port} {self.host}", "allow_anonymous true",
                 "persistence false", "log_dest stderr", "log_type error", "log_type warning"]
        if os.geteuid() == 0:
            lines.append("user root")  # it would drop to "mosquitto", who cannot read workdir
        if self.nodelay:
            lines.append("set_tcp_nodelay true")
        if self.queue:
            lines.append(f"max_queued_messages {self.queue}")
        self.conf = self.workdir / f"mosquitto-{self.port}.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def kind(self) -> str:
        return "nodelay" if self.nodelay else "stock"

    def start(self) -> Mosquitto:
        """Start (or restart on the same port) and wait until it accepts connections."""
        self.starts += 1
        log = open(self.workdir / f"mosquitto-{self.port}.{self.starts}.log", "w")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()

        def accepting() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise SystemExit(f"mosquitto on port {self.port} exited; see {self.workdir}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return True
            except OSError:
                return False

        if not wait_for(accepting, 10):
            self.stop()
            raise SystemExit(f"mosquitto did not listen on {self.host}:{self.port}")
        return self

    def cpu(self) -> float | None:
        """CPU seconds the running broker has used."""
        return cpu_seconds(self.proc.pid) if self.proc else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# ------------------------------------------------------------------------- configs


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def dump_toml(data: Mapping[str, Any]) -> str:
    """A config dict as TOML: one table per key, ``[serial.NAME]`` for nested boards."""
    out: list[str] = []

    def table(name: str, body: Mapping[str, Any]) -> None:
        plain = {k: v for k, v in body.items() if not isinstance(v, dict)}
        nested = {k: v for k, v in body.items() if isinstance(v, dict)}
        if name == "serial":  # [serial.NAME] tables hold only tables
            for sub, inner in nested.items():
                table(f"serial.{sub}", inner)
            return
        out.append(f"[{name}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in plain.items())
        out.extend(f"{k} = {_toml_value(v)}" for k, v in nested.items())  # inline (pins)
        out.append("")

    for name, body in data.items():
        table(name, body)
    return "\n".join(out)


def example_config(bike_id: str, port: int, **tables: Mapping[str, Any]) -> str:
    """The example bike (config/smartbike.toml) on our broker, as bike ``bike_id``.

    Every driver of the example stays, so ``--simulate`` gives the full virtual bike
    (buttons, pulse sensors, a PWM fan, a sensor board, a motor board). ``tables``
    replace or add keys table by table: ``service={"offline_safe_after": 5}``.
    """
    data = tomllib.loads(EXAMPLE_CONFIG.read_text())
    data["bike"] = {**data.get("bike", {}), "id": bike_id, "device_name": f"bench{bike_id}"}
    broker = {k: v for k, v in data.get("broker", {}).items()
              if k not in ("username", "password_file", "tls", "ca_file", "certfile",
                           "keyfile")}
    data["broker"] = {**broker, "host": "127.0.0.1", "port": port}
    for name, overrides in tables.items():
        data[name] = {**data.get(name, {}), **overrides}
    return dump_toml(data)


# --------------------------------------------------------------------------- daemon


def daemon_env(runtime_dir: Path, **extra: str) -> dict[str, str]:
    """The daemon's environment: this tree's code, no journal, no systemd, a private lock dir.

    A private runtime directory keeps the per-bike lock away from other daemons
    running on this machine with the same bike id.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MQTT_", "JOURNAL_", "NOTIFY_", "WATCHDOG_", "CREDENTIALS_",
                                "RUNTIME_DIRECTORY", "LISTEN_"))
           and k != "DEVICE_ID"}
    runtime_dir.mkdir(parents=True, exist_ok=True)
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", RUNTIME_DIRECTORY=str(runtime_dir))
    env.update(extra)
    return env


@dataclass
class Daemon:
    """``python -m smartbiked`` as a process; stderr (its log) goes to ``log``."""

    config: Path
    log: Path
    simulate: bool = True
    seed: int | None = 1
    python: str = sys.executable
    proc: subprocess.Popen | None = None

    def start(self) -> Daemon:
        argv = [self.python, "-m", "smartbiked", "--config", str(self.config)]
        if self.simulate:
            argv.append("--simulate")
            if self.seed is not None:
                argv += ["--seed", str(self.seed)]
        env = daemon_env(self.config.parent / "run")
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                         stderr=err, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_lines(self) -> int:
        """Lines the daemon has written to stderr (its log) so far."""
        try:
            with open(self.log, "rb") as f:
                return sum(1 for _ in f)
        except OSError:
            return 0

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> float | None:
        """SIGTERM, wait; SIGKILL if it will not go. Seconds it took to exit (None: killed)."""
        if not self.alive():
            return None
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
            return time.monotonic() - t0
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return None


def check_config(path: Path) -> None:
    """Exit with the daemon's own words if it refuses the generated config."""
    done = subprocess.run([sys.executable, "-m", "smartbiked", "--check-config", "--config",
                           str(path)], cwd=ROOT, env=daemon_env(path.parent / "run"),
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"smartbiked refuses the benchmark's config {path}:\n"
                         f"{done.stderr or done.stdout}")


# ------------------------------------------------------------------------------ app


@dataclass
class Received:
    """One message as the app saw it: receive times (monotonic, wall), topic, payload."""

    t: float
    wall: float
    topic: str
    payload: bytes
    retain: bool


@dataclass
class App:
    """An app on the broker: MQTT v5, Nagle off, records what it receives with times.

    ``on_receive``: called with every message, on paho's thread (counters).
    ``keep``: which topics are also kept in :attr:`messages` (a flood's refusals need not).
    """

    host: str
    port: int
    subscriptions: list[str] = field(default_factory=list)
    keep: Callable[[str], bool] = lambda topic: True
    on_receive: Callable[[Received], None] | None = None
    messages: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                  client_id=f"bench-{os.getpid()}-{id(self) % 100000}")
        self.client.max_queued_messages_set(0)  # a flood must never be dropped by paho
        self.client.on_socket_open = _no_delay
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.2)  # back soon after a broker outage

    def start(self, timeout: float = 10.0) -> App:
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            raise SystemExit(f"bench app could not subscribe on {self.host}:{self.port}")
        return self

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                    props: Any) -> None:
        if self.subscriptions:
            client.subscribe([(s, 1) for s in self.subscriptions])
        else:
            self._subscribed.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        rec = Received(time.monotonic(), time.time(), msg.topic, bytes(msg.payload),
                       bool(msg.retain))
        if self.on_receive is not None:
            self.on_receive(rec)
        if not self.keep(msg.topic):
            return
        with self._cond:
            self.messages.append(rec)
            self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.messages)

    def since(self, index: int) -> list[Received]:
        with self._cond:
            return self.messages[index:]

    def wait(self, predicate: Callable[[Received], bool], timeout: float,
             after: int = 0) -> Received | None:
        """The first message (from index ``after``) satisfying ``predicate``, or None."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for rec in self.messages[after:]:
                    if predicate(rec):
                        return rec
                after = len(self.messages)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1,
                properties: Properties | None = None) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos, properties=properties)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _no_delay(client: Any, userdata: Any, sock: Any) -> None:
    """Apps should turn Nagle off on their sockets (README); the bench's app does."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


def v5_reply(topic: str, correlation: bytes | None = None) -> Properties:
    """PUBLISH properties asking for an MQTT v5 answer on ``topic``."""
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = topic
    if correlation is not None:
        props.CorrelationData = correlation
    return props


def retained(host: str, port: int, topic_filter: str, timeout: float = 3.0
             ) -> dict[str, bytes]:
    """What a newly connecting app gets at once: the retained message of each topic."""
    got: dict[str, bytes] = {}
    done = threading.Event()
    barrier = f"bench/barrier/{os.getpid()}-{time.monotonic_ns()}"
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(c: Any, u: Any, msg: Any) -> None:
        if msg.topic == barrier:
            done.set()
        elif msg.retain:
            got[msg.topic] = bytes(msg.payload)

    # The broker queues the retained messages when it takes the subscription; a message
    # of our own sent after the SUBACK comes back after them: that is the barrier.
    client.on_message = on_message
    client.on_subscribe = lambda c, *args: c.publish(barrier, b"", qos=1)
    client.connect(host, port)
    client.subscribe([(topic_filter, 1), (barrier, 1)])
    client.loop_start()
    try:
        done.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    return got


def report_value(payload: bytes) -> float | None:
    """The ``value`` of a report payload, or None."""
    try:
        value = json.loads(payload).get("value")
    except (ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, int | float) else None


# ---------------------------------------------------------------------------- fleet


class Fleet:
    """N simulated bikes (``smartbiked --simulate``, distinct ids) on one broker.

    One monitoring app follows every bike's availability, fan reports and sensor
    reports; :meth:`command_stream` sends fan commands round the fleet at a steady rate
    and times each from publish to its report.
    """

    SENSORS = ("speed", "cadence", "power", "heartrate")

    def __init__(self, broker: Mosquitto, workdir: Path, first_id: int = 100) -> None:
        self.broker = broker
        self.workdir = workdir
        self.first_id = first_id
        self.daemons: dict[str, Daemon] = {}
        self.online: set[str] = set()
        self.sensor_reports = 0
        self.pending: dict[tuple[str, float], list[float]] = {}
        self.latencies: list[float] = []
        self._lock = threading.Lock()
        self.app = App(broker.host, broker.port,
                       ["bike/+/status", "bike/+/+/report"], on_receive=self._on,
                       keep=lambda topic: False).start()

    def _on(self, rec: Received) -> None:
        parts = rec.topic.split("/")
        if len(parts) == 3 and parts[2] == "status":
            with self._lock:
                if rec.payload == b"online":
                    self.online.add(parts[1])
                else:
                    self.online.discard(parts[1])
        elif len(parts) == 4 and parts[3] == "report":
            if parts[2] in self.SENSORS:
                self.sensor_reports += 1  # one thread (paho's) counts: no lock needed
            elif parts[2] == "fan":
                value = report_value(rec.payload)
                with self._lock:
                    sent = self.pending.get((parts[1], value)) if value is not None else None
                    if sent:
                        self.latencies.append((rec.t - sent.pop(0)) * 1000)

    @property
    def size(self) -> int:
        return len(self.daemons)

    def grow(self, n: int, batch: int = 8, timeout: float = 120.0) -> float:
        """Start bikes until there are ``n``, ``batch`` at a time; seconds it took."""
        t0 = time.monotonic()
        while self.size < n:
            started = []
            for _ in range(min(batch, n - self.size)):
                bike = f"{self.first_id + self.size:06d}"
                cfg = self.workdir / f"bike-{bike}.toml"
                cfg.write_text(example_config(bike, self.broker.port))
                self.daemons[bike] = Daemon(cfg, self.workdir / f"bike-{bike}.log",
                                            seed=int(bike)).start()
                started.append(bike)

            def up(started: list[str] = started) -> bool:
                for bike in started:
                    if not self.daemons[bike].alive():
                        raise SystemExit(f"bike {bike} exited:\n{self.daemons[bike].tail()}")
                with self._lock:
                    return all(b in self.online for b in started)

            if not wait_for(up, timeout, 0.05):
                raise SystemExit(f"bikes {started} not online within {timeout:g} s")
        return time.monotonic() - t0

    def rss_kib(self) -> list[int]:
        return [v for d in self.daemons.values() if (v := status_kib(d.pid, "VmRSS"))]

    def cpu(self) -> float:
        """CPU seconds all the fleet's daemons have used so far."""
        return sum(cpu_seconds(d.pid) or 0.0 for d in self.daemons.values())

    def idle_cpu(self, seconds: float) -> tuple[float, float]:
        """(fleet CPU %, broker CPU %) over ``seconds`` with no commands."""
        c0, b0, t0 = self.cpu(), self.broker.cpu() or 0.0, time.monotonic()
        time.sleep(seconds)
        wall = time.monotonic() - t0
        return (100 * (self.cpu() - c0) / wall,
                100 * ((self.broker.cpu() or 0.0) - b0) / wall)

    def command_stream(self, rate: float, seconds: float, drain: float = 3.0
                       ) -> dict[str, Any]:
        """Fan commands round the fleet at ``rate``/s for ``seconds``; latencies and cost."""
        bikes = sorted(self.daemons)
        last: dict[str, float] = {}
        with self._lock:
            self.latencies = []
            self.pending = {}
        reports0 = self.sensor_reports
        c0, b0 = self.cpu(), self.broker.cpu() or 0.0
        count = max(1, int(rate * seconds))
        t0 = time.monotonic()
        for i in range(count):
            wait = t0 + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            bike = bikes[i % len(bikes)]
            value = float(1 + (i // len(bikes)) % 100)
            if value == last.get(bike):
                value = 0.0  # never the value it has: an unchanged fan may not report
            last[bike] = value
            with self._lock:
                self.pending.setdefault((bike, value), []).append(time.monotonic())
            self.app.publish(f"bike/{bike}/fan/control", f"{value:g}", qos=1)
        sent_s = time.monotonic() - t0
        wait_for(lambda: len(self.latencies) >= count, drain, 0.05)
        wall = time.monotonic() - t0
        with self._lock:
            lat = list(self.latencies)
        return {
            "commands": count, "rate": count / sent_s if sent_s else None,
            "reported": len(lat), "lost": count - len(lat),
            "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "max_ms": max(lat, default=None),
            "fleet_cpu_pct": 100 * (self.cpu() - c0) / wall,
            "broker_cpu_pct": 100 * ((self.broker.cpu() or 0.0) - b0) / wall,
            "sensor_reports_per_bike_s": (self.sensor_reports - reports0) / wall / len(bikes),
        }

    def stop(self) -> None:
        """Stop every bike (SIGTERM all first, then wait: a big fleet stops in parallel)."""
        for d in self.daemons.values():
            if d.alive() and d.proc is not None:
                d.proc.send_signal(signal.SIGTERM)
        for d in self.daemons.values():
            d.stop()
        self.app.close()
