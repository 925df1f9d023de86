"""Command-to-report latency through a real broker and the daemon, and its memory.

Starts a private mosquitto on a free loopback port and smartbiked as a subprocess
(mock pins), sends N fan commands one after another, each waiting for its report,
and prints latency percentiles and the daemon's resident memory before and after.
Needs only the project's own dependencies and mosquitto (no pytest)::

    python bench/command_latency.py [N]

Ready means the daemon's retained ``online`` has arrived, not that systemd was told
"connected": the daemon queues its SUBSCRIBE to the control topics from inside paho's
connect callback, so it reaches the broker after that notification, and a first
command sent in between went to a topic nobody had subscribed yet and was lost
("no report for command 0", 2 runs in 8). The ``online`` message is published after
the SUBSCRIBE on the same connection, so the broker has the subscription by then.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

ROOT = Path(__file__).resolve().parent.parent
BIKE = "000001"


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(work: Path, port: int) -> subprocess.Popen:
    """mosquitto on ``port``, this machine only; returns once it accepts connections."""
    conf = work / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false",
             "set_tcp_nodelay true"]
    if os.geteuid() == 0:
        lines.append("user root")  # else it drops to "mosquitto", who cannot read work/
    conf.write_text("\n".join(lines) + "\n")
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=open(work / "mosquitto.log", "w"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mosquitto exited: {(work / 'mosquitto.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise SystemExit("mosquitto did not start listening within 10 s")


def start_daemon(work: Path, port: int) -> subprocess.Popen:
    """smartbiked with one PWM fan on a mock pin, talking to the broker on ``port``."""
    cfg = work / "bike.toml"
    cfg.write_text(f'[bike]\nid = "{BIKE}"\n\n[broker]\nhost = "127.0.0.1"\nport = {port}\n\n'
                   '[fan]\ndriver = "gpio_pwm"\npin = 12\n')
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MQTT_", "JOURNAL_", "NOTIFY_", "WATCHDOG_", "CREDENTIALS_"))
           and k != "DEVICE_ID"}
    env.update(GPIOZERO_PIN_FACTORY="mock", GPIOZERO_MOCK_PIN_CLASS="mockpwmpin",
               PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "smartbiked", "--config", str(cfg)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(work / "daemon.log", "w"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main(count: int = 500) -> None:
    work = Path(tempfile.mkdtemp(prefix="sbbench"))
    port = free_port()
    broker = start_broker(work, port)
    daemon = start_daemon(work, port)
    online = threading.Event()
    got = threading.Event()
    want: list[float] = []

    def on_message(client, userdata, msg) -> None:
        if msg.topic == f"bike/{BIKE}/status":
            if msg.payload == b"online":
                online.set()
            return
        try:
            value = json.loads(msg.payload)["value"]
        except (ValueError, KeyError, TypeError):
            return
        if want and value == want[0]:
            got.set()

    app = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    app.on_message = on_message
    app.on_socket_open = lambda c, u, sock: sock.setsockopt(6, 1, 1)  # TCP_NODELAY, as apps should
    app.connect("127.0.0.1", port)
    app.subscribe(f"bike/{BIKE}/fan/report", qos=1)
    app.subscribe(f"bike/{BIKE}/status", qos=1)
    app.loop_start()
    try:
        if not online.wait(30):
            raise SystemExit(f"the daemon never said online; its log:\n"
                             f"{(work / 'daemon.log').read_text()[-2000:]}")
        rss_start = rss_kib(daemon.pid)
        latencies = []
        for i in range(count):
            value = float(i % 100 + 1) if i % 100 + 1 != (want or [0])[0] else 50.0
            want[:] = [value]
            got.clear()
            start = time.perf_counter()
            app.publish(f"bike/{BIKE}/fan/control", str(value), qos=1)
            if not got.wait(5):
                raise SystemExit(f"no report for command {i}")
            latencies.append((time.perf_counter() - start) * 1000)
        rss_end = rss_kib(daemon.pid)
        q = statistics.quantiles(latencies, n=100) if count > 1 else latencies * 99
        print(f"{count} commands: median {statistics.median(latencies):.2f} ms, "
              f"p95 {q[94]:.2f} ms, p99 {q[98]:.2f} ms, max {max(latencies):.2f} ms")
        print(f"daemon RSS: {rss_start} KiB after start, {rss_end} KiB after {count} commands")
    finally:
        app.disconnect()
        app.loop_stop()
        for proc in (daemon, broker):  # the daemon first: it says offline on the broker
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
