"""The "floor" of bench/side_by_side.py: about the least a Python serial <-> MQTT bridge does.

It speaks the same board and topics as the smartbiked config the benchmark uses:

    serial line   "CAD=<n>"                       -> bike/{id}/cadence/report, a report body
    bike/{id}/resistance/control {"value": x}     -> serial "RES <x as percent>%\\n"

One paho connection on ``loop_forever`` (main thread), one thread blocked in
``readline`` on the port, Nagle off on the socket, a retained ``online`` and a Last
Will. No checks, no reconnection of the port, no safety: it only shows what the
transport costs. Needs paho-mqtt and pyserial.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import serial


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--serial", required=True, help="the board's device path")
    p.add_argument("--bike", default="000007")
    a = p.parse_args()

    port = serial.serial_for_url(a.serial, 115200, timeout=None)
    base = f"bike/{a.bike}"
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"floor-{a.bike}")
    client.will_set(f"{base}/status", "lost", qos=1, retain=True)
    client.reconnect_delay_set(0.1, 1.0)
    client.on_socket_open = lambda c, u, sock: sock.setsockopt(
        socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        c.subscribe(f"{base}/resistance/control", qos=1)
        c.publish(f"{base}/status", "online", qos=1, retain=True)

    def on_message(c: Any, userdata: Any, msg: Any) -> None:
        try:
            value = float(json.loads(msg.payload)["value"])
        except (ValueError, KeyError, TypeError):
            return
        port.write(f"RES {value:.0%}\n".encode())

    def read_board() -> None:
        while True:
            line = port.readline()
            key, _, text = line.strip().partition(b"=")
            if key != b"CAD":
                continue
            try:
                value = float(text)
            except ValueError:
                continue
            body = {"value": value, "unitName": "RPM", "timestamp": time.time(),
                    "metadata": {"deviceName": "floor"}}
            client.publish(f"{base}/cadence/report", json.dumps(body), qos=0)

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(a.host, a.port, keepalive=30)
    threading.Thread(target=read_board, daemon=True).start()
    client.loop_forever(retry_first_connection=True)


if __name__ == "__main__":
    main()
