"""The Bluetooth smart trainer on BlueZ's D-Bus API, against a fake ``org.bluez``.

A private dbus-daemon stands in for the system bus and tests/fake_bluez.py for
bluetoothd: registration, the service tree and advert as bluetoothd reads them, and the
centrals' side (StartNotify, WriteValue with the writer's device, Device1 objects that
disconnect or vanish). A real BlueZ needs an adapter or /dev/vhci, which CI has not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading

import pytest
from dbus_fast import MessageType

from smartbiked import ftms
from smartbiked.ble import bluez_backend
from smartbiked.ble import radio as radio_module
from smartbiked.ble.bluez_backend import BluezTrainer, uuid128
from smartbiked.ble.control import ControlPoint
from smartbiked.ble.peripheral import BikeState
from smartbiked.ble.radio import Radio
from smartbiked.ble.settings import BleSettings
from smartbiked.errors import BluetoothUnavailable
from smartbiked.topics import Command
from tests.conftest import wait_until
from tests.fake_bluez import (
    CHARACTERISTIC,
    STEP,
    FakeBluez,
    LoopThread,
    private_bus,
    short_uuid,
)
from tests.test_ble import LIMITS, MqttPath, expect_the_rides_notifications

NAME = "Smartbike b1"
A = "AA:BB:CC:DD:EE:01"
B = "AA:BB:CC:DD:EE:02"
C = "AA:BB:CC:DD:EE:03"


class RecordingPath(MqttPath):
    """The MQTT command path, also keeping what ``submit`` was handed."""

    def __init__(self) -> None:
        super().__init__()
        self.submitted: list[tuple[str, dict]] = []

    def __call__(self, topic: str, payload: bytes) -> str | None:
        self.submitted.append((topic, json.loads(payload)))
        return super().__call__(topic, payload)


@pytest.fixture
def bus_address():
    with private_bus() as address:
        yield address


def run(coro):
    asyncio.run(asyncio.wait_for(coro, 60))


async def _bike(address, path=None, **kwargs):
    """(fake bluetoothd, trainer registered with it)."""
    bluez = await FakeBluez(address, **kwargs).start()
    control = ControlPoint(path or RecordingPath(), LIMITS)
    trainer = BluezTrainer(control, BikeState(control.level_of), name=NAME,
                           bus_address=address)
    await trainer.start()
    return bluez, trainer


async def command(bluez, device, hex_bytes):
    """Write a request as ``device``; the indication (op, result), checked to follow the reply."""
    mark = len(bluez.log)
    reply, serial = await bluez.write(ftms.CONTROL_POINT, bytes.fromhex(hex_bytes), device)
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    value = await bluez.next(ftms.CONTROL_POINT)
    # FTMS: the indication comes after the Write Response, which bluetoothd sends when it
    # gets the method reply.
    since = bluez.log[mark:]
    assert since.index(("reply", serial)) < since.index(
        ("value", ftms.CONTROL_POINT, value)), since
    return ftms.decode_response(value)


def test_bluez_reads_the_advert_and_the_services_it_registers(bus_address):
    async def scenario():
        bluez, trainer = await _bike(bus_address)
        owner, tree = bluez.app
        assert bluez.calls == [("RegisterApplication", owner, "/org/smartbiked/app"),
                               ("RegisterAdvertisement", owner,
                                "/org/smartbiked/advertisement0")]
        assert bluez.adapter._powered  # it was off: switched on, as bumble powers on

        advert = bluez.advert
        assert advert["Type"] == "peripheral"
        assert advert["LocalName"] == NAME
        assert advert["ServiceUUIDs"] == [uuid128(0x1826), uuid128(0x1818), uuid128(0x180D)]
        assert advert["ServiceData"] == {uuid128(0x1826): ftms.ftms_service_data()}

        services = {path: short_uuid(ifaces["org.bluez.GattService1"]["UUID"])
                    for path, ifaces in tree.items() if "org.bluez.GattService1" in ifaces}
        assert sorted(services.values()) == [0x180D, 0x1818, 0x1826]
        assert all(tree[p]["org.bluez.GattService1"]["Primary"] for p in services)
        chars = {}
        for ifaces in tree.values():
            if CHARACTERISTIC in ifaces:
                char = ifaces[CHARACTERISTIC]
                chars[short_uuid(char["UUID"])] = (services[char["Service"]], char["Flags"])
        assert chars == {
            ftms.FITNESS_MACHINE_FEATURE: (0x1826, ["read"]),
            ftms.INDOOR_BIKE_DATA: (0x1826, ["notify"]),
            ftms.TRAINING_STATUS: (0x1826, ["read", "notify"]),
            ftms.SUPPORTED_RESISTANCE_RANGE: (0x1826, ["read"]),
            ftms.SUPPORTED_POWER_RANGE: (0x1826, ["read"]),
            ftms.SUPPORTED_INCLINATION_RANGE: (0x1826, ["read"]),  # LIMITS has "incline"
            ftms.CONTROL_POINT: (0x1826, ["write", "indicate"]),
            ftms.MACHINE_STATUS: (0x1826, ["notify"]),
            ftms.CP_MEASUREMENT: (0x1818, ["notify"]),
            ftms.CP_FEATURE: (0x1818, ["read"]),
            ftms.SENSOR_LOCATION: (0x1818, ["read"]),
            ftms.HR_MEASUREMENT: (0x180D, ["notify"]),
        }
        features = ftms.decode_feature(await bluez.read(ftms.FITNESS_MACHINE_FEATURE))
        assert features == trainer.control.features()
        assert ftms.decode_range(await bluez.read(ftms.SUPPORTED_POWER_RANGE), 1) == (0, 2000, 1)
        assert await bluez.read(ftms.SENSOR_LOCATION) == bytes([ftms.LOCATION_REAR_HUB])
        reply, _ = await bluez.call_char(ftms.INDOOR_BIKE_DATA, "ReadValue", "a{sv}", [{}])
        assert reply.error_name == "org.bluez.Error.NotPermitted"  # notify only, as flagged
        await trainer.close()
        bluez.stop()

    run(scenario())


def test_an_app_takes_control_and_sets_the_power_through_bluez(bus_address):
    async def scenario():
        path = RecordingPath()
        bluez, trainer = await _bike(bus_address, path)
        a = bluez.connect(A)

        # Before StartNotify on the control point: refused, and nothing changes.
        reply, _ = await bluez.write(ftms.CONTROL_POINT, b"\x00", a)
        assert reply.message_type == MessageType.ERROR
        assert reply.error_name == "org.bluez.Error.NotPermitted"
        assert trainer.control.controller is None
        assert path.submitted == [] and bluez.pending(ftms.CONTROL_POINT) == 0

        await bluez.start_notify(ftms.CONTROL_POINT)
        await bluez.start_notify(ftms.MACHINE_STATUS)
        assert await command(bluez, a, "05fa00") == (0x05, ftms.CONTROL_NOT_PERMITTED)
        assert await command(bluez, a, "00") == (0x00, ftms.SUCCESS)
        assert trainer.control.controller == a  # the peer is the Device1 object path
        reply, _ = await bluez.write(ftms.CONTROL_POINT, bytes.fromhex("05fa00"), a)
        assert reply.message_type == MessageType.METHOD_RETURN
        assert await bluez.next(ftms.CONTROL_POINT) == bytes.fromhex("800501")
        assert await bluez.next(ftms.MACHINE_STATUS) == bytes.fromhex("08fa00")
        # Machine Status goes after the indication.
        values = [e for e in bluez.log if e[0] == "value"]
        assert values[-2:] == [("value", ftms.CONTROL_POINT, bytes.fromhex("800501")),
                               ("value", ftms.MACHINE_STATUS, bytes.fromhex("08fa00"))]
        assert path.submitted == [("targetpower", {"value": 250})]
        assert path.commands == [Command("targetpower", 250.0)]

        assert await command(bluez, a, "13") == (0x13, ftms.OP_NOT_SUPPORTED)
        assert await command(bluez, a, "05fa") == (0x05, ftms.INVALID_PARAMETER)
        reply, _ = await bluez.write(ftms.CONTROL_POINT, b"", a)  # empty: ATT length error
        assert reply.error_name == "org.bluez.Error.InvalidValueLength"
        assert len(path.commands) == 1

        # Indications stopped (the app unsubscribed): refused again.
        await bluez.stop_notify(ftms.CONTROL_POINT)
        reply, _ = await bluez.write(ftms.CONTROL_POINT, bytes.fromhex("05c800"), a)
        assert reply.error_name == "org.bluez.Error.NotPermitted"
        assert len(path.commands) == 1
        await trainer.close()
        bluez.stop()

    run(scenario())


def test_a_second_app_waits_until_the_controller_goes_away(bus_address):
    async def scenario():
        path = RecordingPath()
        bluez, trainer = await _bike(bus_address, path)
        a, b = bluez.connect(A), bluez.connect(B)
        await bluez.start_notify(ftms.CONTROL_POINT)
        await bluez.start_notify(ftms.MACHINE_STATUS)
        assert await command(bluez, a, "00") == (0x00, ftms.SUCCESS)
        assert await command(bluez, b, "00") == (0x00, ftms.CONTROL_NOT_PERMITTED)
        assert await command(bluez, b, "05c800") == (0x05, ftms.CONTROL_NOT_PERMITTED)

        bluez.disconnect(b)  # not the controller: nothing to tell
        bluez.disconnect(a)  # the controller's link drops: Control Permission Lost
        assert await bluez.next(ftms.MACHINE_STATUS) == ftms.CONTROL_LOST
        assert trainer.control.controller is None
        c = bluez.connect(C)
        assert await command(bluez, c, "00") == (0x00, ftms.SUCCESS)
        assert await command(bluez, c, "05c800") == (0x05, ftms.SUCCESS)
        assert await bluez.next(ftms.MACHINE_STATUS) == bytes.fromhex("08c800")

        # The controller's Device1 object vanishing (InterfacesRemoved) counts too.
        bluez.forget(c)
        assert await bluez.next(ftms.MACHINE_STATUS) == ftms.CONTROL_LOST
        assert trainer.control.controller is None
        assert bluez.pending(ftms.MACHINE_STATUS) == 0  # B's drop sent nothing
        assert path.commands == [Command("targetpower", 200.0)]
        await trainer.close()
        bluez.stop()

    run(scenario())


def test_control_lost_from_another_thread_is_notified(bus_address):
    async def scenario():
        bluez, trainer = await _bike(bus_address)
        a = bluez.connect(A)
        await bluez.start_notify(ftms.CONTROL_POINT)
        await bluez.start_notify(ftms.MACHINE_STATUS)
        assert await command(bluez, a, "00") == (0x00, ftms.SUCCESS)

        # An MQTT app took over: called from the MQTT thread, not the loop's.
        mqtt = threading.Thread(target=trainer.control_lost,
                                args=("resistance commanded over MQTT",))
        mqtt.start()
        assert await bluez.next(ftms.MACHINE_STATUS) == ftms.CONTROL_LOST
        mqtt.join(5)
        assert trainer.control.controller is None
        assert await command(bluez, a, "05fa00") == (0x05, ftms.CONTROL_NOT_PERMITTED)
        trainer.control_lost("again")  # nobody holds control: nothing is sent
        assert await command(bluez, a, "00") == (0x00, ftms.SUCCESS)
        assert bluez.pending(ftms.MACHINE_STATUS) == 0
        await trainer.close()
        bluez.stop()

    run(scenario())


def test_readings_are_notified_only_while_subscribed(bus_address):
    async def scenario():
        bluez, trainer = await _bike(bus_address)
        state = trainer.state
        for topic, value in (("speed", 8.0), ("cadence", 90.0), ("power", 210.0),
                             ("heartrate", 131.0), ("resistance", 50.0)):
            state.reading(topic, value)
        state.crank_event(3, at=2.0)
        stop = asyncio.Event()
        runner = asyncio.ensure_future(trainer.run(0.02, stop))
        for uuid16 in (ftms.CP_MEASUREMENT, ftms.HR_MEASUREMENT, ftms.INDOOR_BIKE_DATA):
            await bluez.start_notify(uuid16)
        await expect_the_rides_notifications(bluez.next)

        await bluez.stop_notify(ftms.INDOOR_BIKE_DATA)
        mark = len(bluez.log)
        # Each round sends Indoor Bike Data before Cycling Power: two Cycling Power
        # values after the mark mean a whole round ran with bike data unsubscribed.
        while sum(e[:2] == ("value", ftms.CP_MEASUREMENT) for e in bluez.log[mark:]) < 2:
            await bluez.next(ftms.CP_MEASUREMENT)
        assert ("value", ftms.INDOOR_BIKE_DATA) not in [e[:2] for e in bluez.log[mark:]]
        stop.set()
        await asyncio.wait_for(runner, 5)
        assert not any(e[0] == "value" and e[1] in (ftms.MACHINE_STATUS, ftms.CONTROL_POINT)
                       for e in bluez.log)  # never subscribed: never sent
        await trainer.close()
        bluez.stop()

    run(scenario())


def test_start_without_bluez_on_the_system_bus(bus_address, monkeypatch):
    # bus_address None is the system bus; DBUS_SYSTEM_BUS_ADDRESS points it at ours.
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus_address)

    async def scenario():
        control = ControlPoint(MqttPath(), LIMITS)
        trainer = BluezTrainer(control, BikeState(control.level_of), name=NAME)
        with pytest.raises(BluetoothUnavailable) as e:
            await trainer.start()
        assert str(e.value) == "Bluetooth: BlueZ is not on D-Bus (is bluetoothd running?)"
        await trainer.close()  # nothing to undo: fine

    run(scenario())


def test_start_without_the_adapter_or_the_bus(bus_address, tmp_path):
    async def scenario():
        bluez = await FakeBluez(bus_address).start()
        control = ControlPoint(MqttPath(), LIMITS)
        state = BikeState(control.level_of)
        trainer = BluezTrainer(control, state, name=NAME, adapter="hci1",
                               bus_address=bus_address)
        with pytest.raises(BluetoothUnavailable, match=r"^Bluetooth: no adapter hci1 in BlueZ"):
            await trainer.start()
        assert bluez.calls == []
        gone = BluezTrainer(control, state, name=NAME,
                            bus_address=f"unix:path={tmp_path}/no-bus")
        with pytest.raises(BluetoothUnavailable) as e:
            await gone.start()
        assert str(e.value).startswith(
            f"Bluetooth: cannot connect to D-Bus (unix:path={tmp_path}/no-bus): ")
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError, match="not a BlueZ adapter name"):
            BluezTrainer(control, state, name=NAME, adapter="hci0/../x")
        bluez.stop()

    run(scenario())


def test_a_refused_advertisement_leaves_nothing_registered(bus_address):
    async def scenario():
        bluez = await FakeBluez(bus_address, refuse_advertisement=True).start()
        control = ControlPoint(MqttPath(), LIMITS)
        trainer = BluezTrainer(control, BikeState(control.level_of), name=NAME,
                               bus_address=bus_address)
        with pytest.raises(BluetoothUnavailable) as e:
            await trainer.start()
        assert str(e.value) == ("Bluetooth: BlueZ refused the advertisement on hci0: "
                                "org.bluez.Error.NotPermitted: Maximum advertisements reached")
        assert [call[0] for call in bluez.calls] == [
            "RegisterApplication", "RegisterAdvertisement", "UnregisterApplication"]
        assert bluez.apps == {} and bluez.adverts == {}
        bluez.stop()

    run(scenario())


def test_close_unregisters_and_twice_is_fine(bus_address):
    async def scenario():
        bluez, trainer = await _bike(bus_address)
        a = bluez.connect(A)
        await bluez.start_notify(ftms.CONTROL_POINT)
        assert await command(bluez, a, "00") == (0x00, ftms.SUCCESS)
        await trainer.close()
        assert [call[0] for call in bluez.calls] == [
            "RegisterApplication", "RegisterAdvertisement",
            "UnregisterAdvertisement", "UnregisterApplication"]
        assert bluez.apps == {} and bluez.adverts == {}
        await trainer.close()
        assert len(bluez.calls) == 4
        trainer.control_lost("after close")  # no bus any more: revoked, nothing sent
        trainer.notify()
        assert trainer.control.controller is None
        # And it can register again, as the daemon does when it retries.
        await trainer.start()
        assert len(bluez.apps) == 1 and len(bluez.adverts) == 1
        await trainer.close()
        bluez.stop()

    run(scenario())


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == "smartbiked.ble" and r.levelno >= logging.WARNING]


async def _controlled(bluez, trainer):
    """A connects, subscribes and takes control; run() going. (A's path, the run task)."""
    a = bluez.connect(A)
    await bluez.start_notify(ftms.CONTROL_POINT)
    await bluez.start_notify(ftms.MACHINE_STATUS)
    assert await command(bluez, a, "00") == (0x00, ftms.SUCCESS)
    assert trainer.control.controller == a
    stop = asyncio.Event()
    return a, asyncio.ensure_future(trainer.run(0.05, stop)), stop


def test_bluetoothd_leaving_ends_run_and_a_new_trainer_waits_for_its_adapter(bus_address,
                                                                               caplog):
    async def scenario():
        bluez, trainer = await _bike(bus_address)
        _, running, stop = await _controlled(bluez, trainer)

        await bluez.stopped()  # bluetoothd stops: links, subscriptions, registrations go
        await asyncio.wait_for(running, STEP)
        assert not stop.is_set()
        assert trainer.ended == "bluetoothd left D-Bus"
        assert _warnings(caplog) == ["Bluetooth: bluetoothd left D-Bus"]
        assert trainer.control.controller is None  # A's link went with bluetoothd

        # bluetoothd comes back as it starts: the name first, the adapter a moment later.
        again = await FakeBluez(bus_address, adapter_late=True).start()
        await asyncio.wait_for(trainer.close(), STEP)
        assert again.calls == []  # nothing to undo on a bluetoothd that never knew us

        # The daemon's retry: a new trainer on the same control and state.
        fresh = BluezTrainer(trainer.control, trainer.state, name=NAME,
                             bus_address=bus_address)
        with pytest.raises(BluetoothUnavailable, match=r"^Bluetooth: no adapter hci0 in BlueZ"):
            await fresh.start()
        assert again.calls == []
        again.add_adapter()
        await fresh.start()
        assert again.advertised.is_set()
        owner, _ = again.app
        assert [call[:2] for call in again.calls] == [("RegisterApplication", owner),
                                                      ("RegisterAdvertisement", owner)]
        assert again.advert["LocalName"] == NAME
        b = again.connect(B)
        reply, _ = await again.write(ftms.CONTROL_POINT, b"\x00", b)
        assert reply.error_name == "org.bluez.Error.NotPermitted"  # no CCCD carried over
        await again.start_notify(ftms.CONTROL_POINT)
        assert await command(again, b, "00") == (0x00, ftms.SUCCESS)
        await fresh.close()
        assert again.apps == {} and again.adverts == {}
        again.stop()

    run(scenario())


def test_the_adapter_removed_ends_run_and_close_leaves_bluez_alone(bus_address, caplog):
    async def scenario():
        bluez, trainer = await _bike(bus_address)
        _, running, stop = await _controlled(bluez, trainer)

        await bluez.remove_adapter()  # InterfacesRemoved of hci0, then Release
        await asyncio.wait_for(running, STEP)
        assert not stop.is_set()
        assert trainer.ended == "adapter hci0 was removed from BlueZ"
        assert _warnings(caplog) == ["Bluetooth: adapter hci0 was removed from BlueZ"]
        assert trainer.control.controller is None
        assert bluez.pending(ftms.MACHINE_STATUS) == 0  # the links went with the adapter
        mark = len(bluez.calls)
        await asyncio.wait_for(trainer.close(), STEP)
        assert bluez.calls[mark:] == []  # BlueZ dropped it all with the adapter
        bluez.stop()

    run(scenario())


def test_an_advertisement_bluez_released_ends_run_and_is_not_unregistered(bus_address,
                                                                            caplog):
    async def scenario():
        bluez, trainer = await _bike(bus_address)
        _, running, stop = await _controlled(bluez, trainer)

        await bluez.release()
        await asyncio.wait_for(running, STEP)
        assert not stop.is_set()
        assert trainer.ended == "BlueZ released the advertisement"
        assert _warnings(caplog) == ["Bluetooth: BlueZ released the advertisement"]
        # A is still linked: it hears that it lost control.
        assert trainer.control.controller is None
        assert await bluez.next(ftms.MACHINE_STATUS) == ftms.CONTROL_LOST
        await asyncio.wait_for(trainer.close(), STEP)
        assert [call[0] for call in bluez.calls] == [
            "RegisterApplication", "RegisterAdvertisement", "UnregisterApplication"]
        assert bluez.apps == {}
        bluez.stop()

    run(scenario())


def test_close_does_not_hang_on_a_bluetoothd_that_stopped_answering(bus_address,
                                                                     monkeypatch):
    # Each call close() makes waits CLOSE_TIMEOUT at most: shortened here so that two
    # unanswered calls fit well inside STEP, which CALL_TIMEOUT alone would not.
    monkeypatch.setattr(bluez_backend, "CLOSE_TIMEOUT", 0.2)

    async def scenario():
        bluez, trainer = await _bike(bus_address)
        bluez.hung = True
        await asyncio.wait_for(trainer.close(), STEP)
        assert [call[0] for call in bluez.calls] == [
            "RegisterApplication", "RegisterAdvertisement",
            "UnregisterAdvertisement", "UnregisterApplication"]  # asked, never answered
        bluez.stop()

    run(scenario())


def test_the_radio_is_unavailable_while_bluetoothd_is_gone_and_advertises_again(
        bus_address, monkeypatch):
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus_address)
    monkeypatch.setattr(radio_module, "RETRY", (0.05, 0.1, 0.2, 0.5))
    fakes = LoopThread()  # bluetoothd's loop; the radio runs its own on the ble thread
    radio = Radio(BleSettings(enabled=True), LIMITS, MqttPath(), lambda c, r: None,
                  name=NAME, seed="b1")
    bluez = again = None
    try:
        bluez = fakes.call(FakeBluez(bus_address, powered=True).start())
        radio.start()
        wait_until(lambda: radio.status == "advertising", STEP, "the radio to advertise")
        assert len(bluez.apps) == 1 and len(bluez.adverts) == 1

        fakes.call(bluez.stopped())  # systemctl stop bluetooth
        wait_until(lambda: radio.status == "unavailable", STEP, "the radio to give up")
        # It retries (RETRY shortened) and says why it cannot advertise.
        wait_until(lambda: radio.health().get("reason")
                   == "Bluetooth: BlueZ is not on D-Bus (is bluetoothd running?)",
                   STEP, "a retry to find bluetoothd missing")
        assert radio.health()["state"] == "unavailable"

        again = fakes.call(FakeBluez(bus_address, powered=True).start())
        wait_until(lambda: radio.status == "advertising", STEP, "the radio to advertise again")
        assert "reason" not in radio.health()
        assert fakes.call(_registered(again)) == NAME
    finally:
        radio.stop()
        for fake in (bluez, again):
            if fake is not None:
                fakes.call(fake.stopped())
        fakes.close()
    assert again.apps == {} and again.adverts == {}  # radio.stop() unregistered


async def _registered(bluez):
    """The advertised name, read on the fake's own loop."""
    await asyncio.wait_for(bluez.advertised.wait(), STEP)
    return bluez.advert["LocalName"]


def test_run_returns_when_the_bus_connection_is_lost(bus_address):
    """The daemon's retry loop starts again from start(): run() must not notify into a
    dead connection forever (a dbus-daemon restart, an OOM kill)."""
    async def scenario():
        bluez, trainer = await _bike(bus_address)
        stop = asyncio.Event()
        running = asyncio.ensure_future(trainer.run(0.05, stop))
        await bluez.start_notify(ftms.INDOOR_BIKE_DATA)
        await bluez.next(ftms.INDOOR_BIKE_DATA)
        trainer._bus.disconnect()  # the connection drops under the backend
        await asyncio.wait_for(running, 5)
        assert not stop.is_set()
        assert trainer.ended == "the D-Bus connection was lost"
        await asyncio.wait_for(trainer.close(), STEP)
        bluez.stop()

    run(scenario())
