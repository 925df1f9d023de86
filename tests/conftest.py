"""Shared fixtures: a real mosquitto per test, an MQTT probe, and the daemon as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from smartbiked.mqtt_client import MQTTClient

ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
#: How often wait_until re-checks; a polling step with a deadline, not a synchronising sleep.
POLL_STEP = 0.01


def free_port() -> int:
    """A loopback port nobody listens on right now (never the broker's usual one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(POLL_STEP)


@dataclass
class Broker:
    """A mosquitto running for one test on its own loopback port."""

    port: int
    conf: Path
    proc: subprocess.Popen | None = None
    host: str = "127.0.0.1"

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def accepting() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited: {self.proc.stderr.read().decode()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return True
            except OSError:
                return False

        wait_until(accepting, 10, "mosquitto to listen")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Start brokers: ``make_broker(users={"name": "password"}, acl="...", extra=[lines])``."""
    started: list[Broker] = []

    def make(users: dict[str, str] | None = None, acl: str | None = None,
             port: int | None = None, extra: list[str] | None = None) -> Broker:
        port = port or free_port()
        lines = [f"listener {port} 127.0.0.1", "persistence false", "log_dest stderr",
                 "set_tcp_nodelay true"]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to "mosquitto", who cannot read tmp_path
        if users:
            pwfile = tmp_path / f"passwd-{port}"
            for i, (user, password) in enumerate(users.items()):
                subprocess.run(["mosquitto_passwd", "-b"] + (["-c"] if i == 0 else [])
                               + [str(pwfile), user, password], check=True)
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        if acl:
            aclfile = tmp_path / f"acl-{port}"
            aclfile.write_text(acl)
            lines.append(f"acl_file {aclfile}")
        lines += extra or []
        conf = tmp_path / f"mosquitto-{port}.conf"
        conf.write_text("\n".join(lines) + "\n")
        broker = Broker(port, conf)
        broker.start()
        started.append(broker)
        return broker

    yield make
    for broker in started:
        broker.stop()


@pytest.fixture
def broker(make_broker: Callable[..., Broker]) -> Broker:
    """An anonymous broker on a free loopback port."""
    return make_broker()


class Probe(MQTTClient):
    """A test-side app: records every message it sees, built on the documented client."""

    def __init__(self, broker: Broker) -> None:
        super().__init__(broker.host, "", "", broker.port, client_id="")
        self.messages: list[Any] = []
        self._cond = threading.Condition()

    def on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        super().on_message(client, userdata, msg)
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def wait_for(self, topic: str, predicate: Callable[[Any], bool] = lambda m: True,
                 timeout: float = 10.0, after: int = 0) -> Any:
        """The first message on ``topic`` (from index ``after``) that satisfies predicate."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self.messages[after:]:
                    if msg.topic == topic and predicate(msg):
                        return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = sorted({m.topic for m in self.messages})
                    raise AssertionError(f"no matching message on {topic}; seen: {seen}")
                self._cond.wait(left)

    def json(self, topic: str, predicate: Callable[[dict], bool] = lambda d: True,
             timeout: float = 10.0, after: int = 0) -> dict:
        """Like wait_for, on the decoded JSON object."""
        msg = self.wait_for(topic, lambda m: _is_json_and(m, predicate), timeout, after)
        return json.loads(msg.payload)


def _is_json_and(msg: Any, predicate: Callable[[dict], bool]) -> bool:
    try:
        return predicate(json.loads(msg.payload))
    except (ValueError, TypeError, KeyError):
        return False


@pytest.fixture
def probe(broker: Broker) -> Iterator[Probe]:
    """An app subscribed to every bike topic on ``broker``."""
    p = Probe(broker)
    p.setup_mqtt_client()
    p.subscribe("bike/#")
    p.loop_start()
    assert p.connected.wait(10), "probe could not connect"
    yield p
    p.disconnect()
    p.loop_stop()


class NotifySocket:
    """A fake systemd notify socket: collects what the daemon tells systemd."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="sbn", dir="/tmp")  # AF_UNIX paths are short
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            with self._cond:
                self.lines.extend(data.decode().splitlines())
                self._cond.notify_all()

    def wait_for(self, line: str, timeout: float = 10.0, after: int = 0) -> int:
        """Index of the first ``line`` (exact, or prefix ending in '=') from ``after``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, seen in enumerate(self.lines[after:], after):
                    if seen == line or (line.endswith("=") and seen.startswith(line)) or (
                            line.endswith("*") and seen.startswith(line[:-1])):
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"systemd never got {line!r}; got {self.lines}")
                self._cond.wait(left)

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Daemon:
    """smartbiked running as a real subprocess, with a fake notify socket."""

    config: Path
    notify: NotifySocket
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    log: Path = field(default=Path("/dev/null"))

    def start(self, *extra: str) -> Daemon:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smartbiked", "--config", str(self.config), *extra],
            env=self.env, stdout=subprocess.PIPE, stderr=open(self.log, "w"), cwd=ROOT)
        return self

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)


def daemon_env(notify: NotifySocket | None = None, **extra: str) -> dict[str, str]:
    """The environment of a daemon on a test machine: mock pins, no journal."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MQTT_", "JOURNAL_", "NOTIFY_", "WATCHDOG_", "CREDENTIALS_"))
           and k != "DEVICE_ID"}
    env.update(GPIOZERO_PIN_FACTORY="mock", GPIOZERO_MOCK_PIN_CLASS="mockpwmpin",
               PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    if notify is not None:
        env["NOTIFY_SOCKET"] = notify.path
    env.update(extra)
    return env


#: A motor-controller board for resistance and incline ("R40" -> "OK R40").
MOTORS = """
[serial.motors]
url = "{url}"

[resistance]
driver = "serial_actuator"
port = "motors"
template = "R{{value}}\\n"
ack = 'OK R(?P<value>-?[0-9.]+)'
min_interval = {min_interval}

[incline]
driver = "serial_actuator"
port = "motors"
template = "I{{value}}\\n"
ack = 'OK I(?P<value>-?[0-9.]+)'
"""


def bike_config(broker: Broker | None, body: str = "", bike_id: str = "000001",
                port: int | None = None) -> str:
    """A config file's text: [bike] and [broker] for ``broker``, then ``body``."""
    port = port or (broker.port if broker else free_port())
    return textwrap.dedent(f"""\
        [bike]
        id = "{bike_id}"
        device_name = "testbike"

        [broker]
        host = "127.0.0.1"
        port = {port}
        keepalive = 5
        reconnect_max = 1
        """) + textwrap.dedent(body)


@pytest.fixture
def run_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start smartbiked: ``run_daemon(config_text, env_extra..., args=[...])``."""
    daemons: list[Daemon] = []

    def run(text: str, *args: str, **env: str) -> Daemon:
        cfg = tmp_path / f"bike{len(daemons)}.toml"
        cfg.write_text(text)
        notify = NotifySocket()
        log = tmp_path / f"daemon{len(daemons)}.log"
        # TMPDIR: what the daemon leaves behind when killed goes with the test's folder.
        env = {"TMPDIR": str(tmp_path), **env}
        d = Daemon(cfg, notify, daemon_env(notify, **env), log=log)
        daemons.append(d)
        return d.start(*args)

    yield run
    for d in daemons:
        d.stop()
        d.notify.close()


def retained(broker: Broker, topic: str, timeout: float = 5.0) -> Any:
    """The message a new subscriber gets on ``topic`` at once: the retained one."""
    import paho.mqtt.client as mqtt

    reader = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    got: list[Any] = []
    reader.on_message = lambda client, userdata, msg: got.append(msg)
    reader.connect(broker.host, broker.port)
    reader.subscribe(topic, qos=1)
    reader.loop_start()
    try:
        wait_until(lambda: got, timeout, f"a retained message on {topic}")
    finally:
        reader.disconnect()
        reader.loop_stop()
    assert got[0].retain, f"the message on {topic} is not retained"
    return got[0]


class Relay:
    """A TCP relay between the daemon and the broker: the line, for tests to break.

    ``cut()`` closes the open connections (new ones are relayed); ``down()`` also
    refuses new ones until ``up()``; ``swallow()`` keeps the open connections but drops
    every byte the daemon sends on them, as on a Wi-Fi link that died silently. A probe
    connected straight to the broker stays subscribed throughout and sees everything
    the daemon sends, in order.
    """

    def __init__(self, broker: Broker) -> None:
        self.target = (broker.host, broker.port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._swallowed: set[socket.socket] = set()  # connections whose bytes vanish
        self._refusing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._refusing:
                    near.close()  # the line is down: the connect attempt fails
                    continue
                try:
                    far = socket.create_connection(self.target, timeout=5)
                except OSError:
                    near.close()  # the broker itself is down: so is the line
                    continue
                far.settimeout(None)
                self._open += [near, far]
            threading.Thread(target=self._pump, args=(near, far, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(far, near, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(65536):
                if upstream and src in self._swallowed:
                    continue  # the daemon's bytes vanish: nothing reaches the broker
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        src.close()  # each socket is the source of exactly one pump

    def swallow(self) -> None:
        """From now on, what the daemon sends on its open connections goes nowhere."""
        with self._lock:
            self._swallowed.update(self._open)

    def cut(self) -> None:
        """Close every open connection (both ends see it at once)."""
        with self._lock:
            cut, self._open = self._open, []
        for s in cut:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def down(self) -> None:
        """Cut the line and keep it down: new connections are closed at once."""
        with self._lock:
            self._refusing = True
        self.cut()

    def up(self) -> None:
        """Relay new connections again."""
        with self._lock:
            self._refusing = False

    def close(self) -> None:
        self.down()
        self.listener.close()


@pytest.fixture
def relay(broker: Broker) -> Iterator[Relay]:
    """A line between the daemon and ``broker`` that the test can cut."""
    r = Relay(broker)
    yield r
    r.close()
