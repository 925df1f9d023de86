"""Command-to-report latency through a real broker and the daemon, and its memory.

Starts a private mosquitto on a free loopback port and smartbiked as a subprocess
(mock pins), sends N fan commands one after another, each waiting for its report,
and prints latency percentiles and the daemon's resident memory before and after.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import Broker, Daemon, NotifySocket, bike_config, daemon_env, free_port  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main(count: int = 500) -> None:
    work = Path(tempfile.mkdtemp(prefix="sbbench"))
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n"
                    "set_tcp_nodelay true\n")
    broker = Broker(port, conf)
    broker.start()
    cfg = work / "bike.toml"
    cfg.write_text(bike_config(broker, '[fan]\ndriver = "gpio_pwm"\npin = 12\n'))
    notify = NotifySocket()
    daemon = Daemon(cfg, notify, daemon_env(notify), log=work / "daemon.log").start()
    got = threading.Event()
    want: list[float] = []

    def on_message(client, userdata, msg) -> None:
        if want and json.loads(msg.payload)["value"] == want[0]:
            got.set()

    app = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    app.on_message = on_message
    app.on_socket_open = lambda c, u, sock: sock.setsockopt(6, 1, 1)  # TCP_NODELAY, as apps should
    app.connect(broker.host, broker.port)
    app.subscribe("bike/000001/fan/report", qos=1)
    app.loop_start()
    try:
        notify.wait_for("STATUS=connected to*", timeout=20)
        rss_start = rss_kib(daemon.proc.pid)
        latencies = []
        for i in range(count):
            value = float(i % 100 + 1) if i % 100 + 1 != (want or [0])[0] else 50.0
            want[:] = [value]
            got.clear()
            start = time.perf_counter()
            app.publish("bike/000001/fan/control", str(value), qos=1)
            if not got.wait(5):
                raise SystemExit(f"no report for command {i}")
            latencies.append((time.perf_counter() - start) * 1000)
        rss_end = rss_kib(daemon.proc.pid)
        q = statistics.quantiles(latencies, n=100)
        print(f"{count} commands: median {statistics.median(latencies):.2f} ms, "
              f"p95 {q[94]:.2f} ms, p99 {q[98]:.2f} ms, max {max(latencies):.2f} ms")
        print(f"daemon RSS: {rss_start} KiB after start, {rss_end} KiB after {count} commands")
    finally:
        app.disconnect()
        app.loop_stop()
        daemon.stop()
        notify.close()
        broker.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
