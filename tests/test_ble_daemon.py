"""The Bluetooth smart trainer in the running daemon, seen from the air.

The daemon (a subprocess, ``--simulate``: the virtual rider turns the crank's pins)
runs its bumble backend with ``transport = "tcp-client:..."``: its host stack speaks
HCI over TCP to an emulated controller in this test, attached to a bumble
``LocalLink`` on which a second device plays the training app. Everything from the
daemon's host stack up is the real thing; only the radio is emulated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace
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

    def unplug(self) -> None:
        """The bike's controller goes away: its HCI connection and the listener close."""
        async def unplug() -> None:
            self.transport.sink.transport.close()
            self.transport.server.close()  # the listener too: the port must be free again
            await self.transport.close()
        self.call(unplug())

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
mqtt_hold = 5
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

    # An MQTT app takes over in the middle of the app's ERG: the app hears Control
    # Permission Lost, its ERG is left, the MQTT command runs.
    assert air.call(app.command("05fa00")) == (0x05, ftms.SUCCESS)
    mode(probe, mark, lambda d: d["mode"] == "erg")
    mark = len(probe.messages)
    send(broker, "bike/000001/resistance/control", b"40")
    assert air.call(app.next(ftms.MACHINE_STATUS, lambda v: v == ftms.CONTROL_LOST))
    taken = mode(probe, mark, lambda d: d["controller"] == "mqtt")
    assert taken["mode"] == "resistance" and "MQTT" in taken["reason"]
    probe.json("bike/000001/resistance/report", lambda d: d["value"] == 40.0, after=mark)
    assert air.call(app.command("0414")) == (0x04, ftms.CONTROL_NOT_PERMITTED)
    # The MQTT app holds the bike for mqtt_hold seconds after its command, then the
    # Bluetooth app may ask again.
    assert air.call(app.command("00")) == (0x00, ftms.CONTROL_NOT_PERMITTED)
    wait_until(lambda: air.call(app.command("00")) == (0x00, ftms.SUCCESS), timeout=20,
               what="control after mqtt_hold")

    # A request out of the bike's range moves nothing.
    mark = len(probe.messages)
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

    # The dongle is pulled out and plugged in again: the bike finds it by itself.
    mark = len(probe.messages)
    air.unplug()
    probe.json("bike/000001/health", lambda d: d.get("bluetooth", {}).get("state")
               == "unavailable", timeout=20, after=mark)
    app = air.open()
    mark = len(probe.messages)
    probe.json("bike/000001/health", lambda d: d.get("bluetooth", {}).get("state")
               == "advertising", timeout=40, after=mark)
    assert air.call(app.find(NAME))
    assert daemon.output().count(f"transport tcp-client:127.0.0.1:{air.port} lost") == 1


@contextlib.contextmanager
def bluez_bike(broker: Any, probe: Any, run_daemon: Any, ble: str) -> Iterator[Any]:
    """The daemon with backend = "bluez" on a private bus standing in for the system
    bus, where a fake bluetoothd reads its services and plays a connected app."""
    from tests.fake_bluez import FakeBluez, private_bus

    with private_bus() as address:
        space = Air()
        try:
            bluez = space.call(FakeBluez(address, powered=True).start())
            daemon = run_daemon(bike_config(broker, FULL + ble), "--simulate",
                                DBUS_SYSTEM_BUS_ADDRESS=address)
            probe.json("bike/000001/health", lambda d: d.get("bluetooth", {}).get("state")
                       == "advertising", timeout=20)
            probe.json("bike/000001/power/report")  # ERG needs a fresh power reading
            probe.json("bike/000001/speed/report")  # and simulation a speed
            device = bluez.connect("AA:BB:CC:DD:EE:01")
            for uuid16 in (ftms.CONTROL_POINT, ftms.MACHINE_STATUS, ftms.INDOOR_BIKE_DATA):
                space.call(bluez.start_notify(uuid16))

            def request(hex_bytes: str) -> int:
                space.call(bluez.write(ftms.CONTROL_POINT, bytes.fromhex(hex_bytes), device))
                return ftms.decode_response(space.call(bluez.next(ftms.CONTROL_POINT)))[1]

            yield SimpleNamespace(space=space, bluez=bluez, daemon=daemon, device=device,
                                  request=request)
        finally:
            space.close()


def test_the_default_backend_registers_with_bluez_and_runs_the_same_commands(
        broker, probe, run_daemon):
    """backend = "bluez" (the default); also who may hold the bike, and reloads while a
    Bluetooth app does."""
    from tests.test_reload import reload

    with bluez_bike(broker, probe, run_daemon,
                    "[trainer]\nenabled = true\n[ble]\nenabled = true\nmqtt_hold = 0\n") as bike:
        space, bluez, daemon, request = bike.space, bike.bluez, bike.daemon, bike.request
        assert bluez.advert["LocalName"] == NAME
        data = ftms.decode_indoor_bike_data(space.call(bluez.next(ftms.INDOOR_BIKE_DATA)))
        assert data.cadence is not None

        # The game's ERG holds the bike: a Bluetooth app may neither take control
        # nor, by letting go, end the game's workout.
        mark = len(probe.messages)
        send(broker, "bike/000001/targetpower/control", b"180")
        mode(probe, mark, lambda d: d["mode"] == "erg")
        assert request("00") == ftms.CONTROL_NOT_PERMITTED
        assert request("04c8") == ftms.CONTROL_NOT_PERMITTED
        mark = len(probe.messages)
        send(broker, "bike/000001/targetpower/control", b"0")
        mode(probe, mark, lambda d: d["mode"] == "resistance")

        # The game is done: the app takes control and runs ERG.
        mark = len(probe.messages)
        for hex_bytes in ("00", "05fa00"):
            assert request(hex_bytes) == ftms.SUCCESS
        erg = mode(probe, mark, lambda d: d["mode"] == "erg")
        assert (erg["target"], erg["controller"]) == (250.0, "bluetooth")

        # A reload while the app holds control: its ERG is left, and it hears so.
        config = daemon.config.read_text().replace(
            "[resistance]\ndriver = \"gpio_pwm\"\npin = 12\n",
            "[resistance]\ndriver = \"gpio_pwm\"\npin = 12\nmax = 50\n")
        assert "max = 50" in config
        daemon.config.write_text(config)
        mark = len(probe.messages)
        assert reload(daemon).returncode == 0
        while space.call(bluez.next(ftms.MACHINE_STATUS)) != ftms.CONTROL_LOST:
            pass  # the target power set before (08 fa 00) comes first
        mode(probe, mark, lambda d: d["mode"] == "resistance" and d["controller"] == "mqtt")

        # Asked again: the new range is the Bluetooth app's range too (level 20.0 of
        # 20 is the new top, 50 %), and the mode report names it after the reload.
        mark = len(probe.messages)
        assert request("00") == ftms.SUCCESS
        mode(probe, mark, lambda d: d["controller"] == "bluetooth")
        assert request("04c8") == ftms.SUCCESS
        probe.json("bike/000001/resistance/report", lambda d: d["value"] == 50.0,
                   after=mark)
        # A reload with the app in control and no mode of its own: it keeps control,
        # and the new trainer's mode report says so.
        daemon.config.write_text(daemon.config.read_text().replace(
            "[trainer]\nenabled = true\n", "[trainer]\nenabled = true\nmax_power = 900\n"))
        mark = len(probe.messages)
        assert reload(daemon).returncode == 0
        after = mode(probe, mark, lambda d: True)
        assert after["controller"] == "bluetooth"
        assert request("0428") == ftms.SUCCESS  # level 4.0 -> 10 %
        probe.json("bike/000001/resistance/report", lambda d: d["value"] == 10.0,
                   after=mark)
        assert all(json.loads(m.payload)["controller"] == "bluetooth"
                   for m in probe.messages[mark:] if m.topic == "bike/000001/mode/report")

        mark = len(probe.messages)
        bluez.disconnect(bike.device)
        mode(probe, mark, lambda d: d["controller"] == "mqtt")


def test_a_bluetooth_grade_rides_the_road_but_never_tilts_the_frame(
        broker, probe, run_daemon):
    """[trainer] incline_follows_grade = true is for the MQTT game; without [ble] incline
    a Bluetooth app's grade never moves the frame."""
    with bluez_bike(broker, probe, run_daemon,
                    "[trainer]\nenabled = true\nincline_follows_grade = true\n"
                    "[ble]\nenabled = true\nmqtt_hold = 0\n") as bike:
        mark = len(probe.messages)
        assert bike.request("00") == ftms.SUCCESS
        assert bike.request("110000dc052833") == ftms.SUCCESS  # grade 15 %
        mode(probe, mark, lambda d: d["mode"] == "sim")
        # Simulating: the brake follows the road, twice over...
        probe.json("bike/000001/resistance/report", after=mark, timeout=15)
        again = len(probe.messages)
        probe.json("bike/000001/resistance/report", after=again, timeout=15)
        # ...and the frame has not moved.
        assert not [m for m in probe.messages[mark:] if m.topic == "bike/000001/incline/report"]
        # The same grade from the MQTT game tilts it, as configured.
        mark = len(probe.messages)
        send(broker, "bike/000001/grade/control", b"15")
        probe.json("bike/000001/incline/report", after=mark, timeout=15)
