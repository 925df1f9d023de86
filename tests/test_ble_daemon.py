"""The Bluetooth smart trainer in the running daemon, seen from the air.

The daemon (a subprocess, ``--simulate``: the virtual rider turns the crank's pins)
runs its bumble backend with ``transport = "tcp-client:..."``: its host stack speaks
HCI over TCP to an emulated controller in this test, attached to a bumble
``LocalLink`` on which a second device plays the training app. Everything from the
daemon's host stack up is the real thing; only the radio is emulated.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from bumble.controller import Controller
from bumble.link import LocalLink
from bumble.transport.tcp_server import open_tcp_server_transport_with_socket

from smartbiked import ftms
from tests.conftest import bike_config, free_port, wait_until
from tests.test_ble import Central, _device
from tests.test_daemon import send
from tests.test_simulator import FULL

NAME = "Smartbike 000001"


class Air:
    """A virtual link in a thread of its own, the bike's controller served on TCP."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = free_port()
        self.transport: Any = None

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def open(self) -> Central:
        """Start the bike's controller (the daemon may connect now) and the app."""
        return self.call(self._open())

    async def _open(self) -> Central:
        link = LocalLink()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen()
        self.transport = await open_tcp_server_transport_with_socket(sock)
        Controller("bike", host_source=self.transport.source,
                   host_sink=self.transport.sink, link=link)
        app = Central(_device(link, "F1:F1:F1:F1:F1:F1"))
        await app.device.power_on()
        return app

    def close(self) -> None:
        if self.transport is not None:
            self.call(self.transport.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def air() -> Iterator[Air]:
    space = Air()
    yield space
    space.close()


def ble_config(broker: Any, air: Air) -> str:
    return bike_config(broker, FULL + f"""
[trainer]
enabled = true

[ble]
enabled = true
backend = "bumble"
transport = "tcp-client:127.0.0.1:{air.port}"
notify_period = 0.25
""")


def mode(probe: Any, mark: int, where: Callable[[dict], bool]) -> dict:
    return probe.json("bike/000001/mode/report", where, after=mark, timeout=15)


def test_a_training_app_finds_rides_and_controls_the_running_bike(
        broker, probe, run_daemon, air):
    app = air.open()
    run_daemon(ble_config(broker, air), "--simulate", "--seed", "3")
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
    probe.json("bike/000001/health", lambda d: d.get("bluetooth", {}).get("state")
               == "advertising", timeout=20)

    address, service_data = air.call(app.find(NAME))
    assert service_data == ftms.ftms_service_data()
    air.call(app.connect(address))
    for uuid16 in (ftms.INDOOR_BIKE_DATA, ftms.CP_MEASUREMENT, ftms.HR_MEASUREMENT,
                   ftms.MACHINE_STATUS):
        air.call(app.subscribe(uuid16))
    air.call(app.subscribe(ftms.CONTROL_POINT, indicate=True))

    # The virtual rider's readings, as the bike publishes them on MQTT.
    data = ftms.decode_indoor_bike_data(air.call(app.next(
        ftms.INDOOR_BIKE_DATA, lambda v: ftms.decode_indoor_bike_data(v).power is not None)))
    powers = {json.loads(m.payload)["value"] for m in probe.messages
              if m.topic == "bike/000001/power/report"}
    assert data.power in powers
    assert data.cadence is not None and data.cadence > 0
    assert data.heart_rate is not None and data.heart_rate > 0
    # Crank revolutions counted from the pins the rider turns, not made up from cadence.
    first = ftms.decode_cycling_power(air.call(app.next(ftms.CP_MEASUREMENT)))
    later = ftms.decode_cycling_power(air.call(app.next(
        ftms.CP_MEASUREMENT,
        lambda v: (ftms.decode_cycling_power(v).crank_revs or 0) > (first.crank_revs or 0))))
    assert later.crank_time != first.crank_time and later.wheel_revs is not None

    # Take control, then ERG: the same trainer as targetpower/control.
    mark = len(probe.messages)
    assert air.call(app.command("00")) == (0x00, ftms.SUCCESS)
    mode(probe, mark, lambda d: d["controller"] == "bluetooth")
    # The incline is not a Bluetooth app's to tilt unless [ble] incline = true.
    assert air.call(app.command("030a00")) == (0x03, ftms.OP_NOT_SUPPORTED)
    assert air.call(app.command("05fa00")) == (0x05, ftms.SUCCESS)
    erg = mode(probe, mark, lambda d: d["mode"] == "erg")
    assert (erg["target"], erg["controller"]) == (250.0, "bluetooth")
    probe.json("bike/000001/resistance/report", after=mark, timeout=15)

    # A grade (5 %, Crr 0.004, Cw 0.51): simulation, as grade/control.
    mark = len(probe.messages)
    assert air.call(app.command("110000f4012833")) == (0x11, ftms.SUCCESS)
    sim = mode(probe, mark, lambda d: d["mode"] == "sim")
    assert sim["target"] == 5.0 and sim["params"]["crr"] == 0.004

    # Resistance level 3.0 of 20 in the 1-byte form: the actuator moves to 15 %, as a
    # resistance/control of 15 does, and the simulation is left.
    mark = len(probe.messages)
    assert air.call(app.command("041e")) == (0x04, ftms.SUCCESS)
    probe.json("bike/000001/resistance/report", lambda d: d["value"] == 15.0, after=mark)
    mode(probe, mark, lambda d: d["mode"] == "resistance")

    # An MQTT app takes over: the Bluetooth app hears Control Permission Lost.
    mark = len(probe.messages)
    send(broker, "bike/000001/resistance/control", b"40")
    assert air.call(app.next(ftms.MACHINE_STATUS, lambda v: v == ftms.CONTROL_LOST))
    mode(probe, mark, lambda d: d["controller"] == "mqtt")
    probe.json("bike/000001/resistance/report", lambda d: d["value"] == 40.0, after=mark)
    assert air.call(app.command("0414")) == (0x04, ftms.CONTROL_NOT_PERMITTED)

    # A request out of the bike's range moves nothing.
    mark = len(probe.messages)
    assert air.call(app.command("00")) == (0x00, ftms.SUCCESS)
    assert air.call(app.command("04ff")) == (0x04, ftms.INVALID_PARAMETER)
    assert air.call(app.command("05c800")) == (0x05, ftms.SUCCESS)
    mode(probe, mark, lambda d: d["mode"] == "erg" and d["target"] == 200.0)

    # The app's link drops: ERG is left with the resistance held, control returns to MQTT.
    mark = len(probe.messages)
    air.call(app.peer.connection.disconnect())
    left = mode(probe, mark, lambda d: d["mode"] == "resistance")
    assert "disconnected" in left["reason"] and left["controller"] == "mqtt"
    mode(probe, mark, lambda d: d["controller"] == "mqtt")


def test_without_its_radio_the_bike_rides_on_mqtt_and_finds_the_radio_when_it_comes(
        broker, probe, run_daemon, air):
    daemon = run_daemon(ble_config(broker, air), "--simulate")
    probe.wait_for("bike/000001/status", lambda m: m.payload == b"online")
    down = probe.json("bike/000001/health", lambda d: d.get("bluetooth", {}).get("state")
                      == "unavailable", timeout=20)
    assert str(air.port) in down["bluetooth"]["reason"]
    mark = len(probe.messages)
    send(broker, "bike/000001/fan/control", b"30")
    probe.json("bike/000001/fan/report", lambda d: d["value"] == 30.0, after=mark)

    app = air.open()
    probe.json("bike/000001/health", lambda d: d.get("bluetooth", {}).get("state")
               == "advertising", timeout=40)
    address, _ = air.call(app.find(NAME))
    assert address is not None
    # The missing radio was logged once, not once per try.
    wait_until(lambda: "advertising as" in daemon.output(), what="the recovery logged")
    assert daemon.output().count("cannot open bumble transport") == 1


def test_the_default_backend_registers_with_bluez_and_runs_the_same_commands(
        broker, probe, run_daemon):
    """backend = "bluez" (the default): the daemon on a private bus standing in for the
    system bus, where a fake bluetoothd reads its services and plays the app."""
    from tests.fake_bluez import FakeBluez, private_bus

    with private_bus() as address:
        space = Air()
        try:
            bluez = space.call(FakeBluez(address, powered=True).start())
            run_daemon(bike_config(broker, FULL + "[trainer]\nenabled = true\n"
                                   "[ble]\nenabled = true\n"),
                       "--simulate", DBUS_SYSTEM_BUS_ADDRESS=address)
            probe.json("bike/000001/health", lambda d: d.get("bluetooth", {}).get("state")
                       == "advertising", timeout=20)
            assert bluez.advert["LocalName"] == NAME
            device = bluez.connect("AA:BB:CC:DD:EE:01")
            space.call(bluez.start_notify(ftms.CONTROL_POINT))
            space.call(bluez.start_notify(ftms.INDOOR_BIKE_DATA))
            data = ftms.decode_indoor_bike_data(space.call(bluez.next(ftms.INDOOR_BIKE_DATA)))
            assert data.cadence is not None

            mark = len(probe.messages)
            for request in ("00", "05fa00"):
                space.call(bluez.write(ftms.CONTROL_POINT, bytes.fromhex(request), device))
                assert ftms.decode_response(space.call(bluez.next(ftms.CONTROL_POINT)))[1] \
                    == ftms.SUCCESS
            erg = mode(probe, mark, lambda d: d["mode"] == "erg")
            assert (erg["target"], erg["controller"]) == (250.0, "bluetooth")

            mark = len(probe.messages)
            bluez.disconnect(device)
            left = mode(probe, mark, lambda d: d["mode"] == "resistance")
            assert left["controller"] == "mqtt"
        finally:
            space.close()
