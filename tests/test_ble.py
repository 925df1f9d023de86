"""The Bluetooth smart trainer: the Control Point state machine (pure) and, on bumble's
virtual link, the whole peripheral seen by a central as a training app sees it."""

from __future__ import annotations

import asyncio
import math

import pytest
from bumble import att
from bumble.controller import Controller
from bumble.core import UUID, AdvertisingData
from bumble.device import Device, Peer
from bumble.hci import Address
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport.common import AsyncPipeSink

from smartbiked import ftms
from smartbiked.ble.bumble_backend import BumbleTrainer, advertising_data
from smartbiked.ble.control import ControlPoint
from smartbiked.ble.peripheral import BikeState
from smartbiked.topics import Command, Limits, Refusal, parse_command, topic_path

LIMITS = {
    "resistance": Limits(0, 100),
    "incline": Limits(-10, 19, 0.5),
    "targetpower": Limits(0, 2000),
    "grade": Limits(-40, 40),
}


class MqttPath:
    """``submit`` through the real MQTT parser, as the service will wire it."""

    def __init__(self, limits=LIMITS, refuse: str | None = None):
        self.limits = limits
        self.refuse = refuse
        self.commands: list[Command] = []

    def __call__(self, topic: str, payload: bytes) -> str | None:
        result = parse_command(topic_path("b1", topic, "control"), payload, "b1", self.limits)
        if isinstance(result, Refusal):
            return result.reason
        if self.refuse:
            return self.refuse
        self.commands.append(result)
        return None


async def expect_the_rides_notifications(next_value) -> None:
    """The three notifications of the ride these tests set up (28.8 km/h, 90 RPM,
    resistance 10, 210 W, 131 BPM, 3 crank revolutions), via ``await next_value(uuid)``."""
    data = ftms.decode_indoor_bike_data(await next_value(ftms.INDOOR_BIKE_DATA))
    assert data == ftms.IndoorBikeData(speed=28.8, cadence=90.0, resistance=10.0,
                                       power=210.0, heart_rate=131.0)
    power = ftms.decode_cycling_power(await next_value(ftms.CP_MEASUREMENT))
    assert (power.power, power.crank_revs, power.crank_time) == (210.0, 3, 2048)
    assert ftms.decode_heart_rate(await next_value(ftms.HR_MEASUREMENT)).bpm == 131


def answer(cp, peer, hex_bytes):
    return cp.write(peer, bytes.fromhex(hex_bytes))


def result(cp, peer, hex_bytes):
    return ftms.decode_response(answer(cp, peer, hex_bytes).response)[1]


def test_commands_need_control_first():
    path = MqttPath()
    cp = ControlPoint(path, LIMITS)
    for hex_bytes in ("05fa00", "041e", "110000f4012833", "07", "0801", "01", "033200"):
        assert answer(cp, "A", hex_bytes).response == bytes.fromhex("80" + hex_bytes[:2] + "05")
    assert path.commands == []
    assert cp.controller is None


def test_one_controller_at_a_time():
    changes = []
    path = MqttPath()
    cp = ControlPoint(path, LIMITS, on_control=lambda who, why: changes.append((who, why)))
    assert answer(cp, "A", "00") == ftms_answer("800001")
    assert cp.controller == "A"
    assert result(cp, "A", "00") == ftms.SUCCESS  # asking again is fine
    assert result(cp, "B", "00") == ftms.CONTROL_NOT_PERMITTED
    assert result(cp, "B", "05fa00") == ftms.CONTROL_NOT_PERMITTED
    assert path.commands == []
    assert [who for who, _ in changes] == ["A"]
    # A's link drops: Control Permission Lost, and B may take over.
    assert cp.disconnected("B") is None
    assert cp.disconnected("A") == b"\xff"
    assert cp.controller is None
    assert result(cp, "B", "00") == ftms.SUCCESS
    assert [who for who, _ in changes] == ["A", None, "B"]


def ftms_answer(response_hex, status_hex=None):
    from smartbiked.ble.control import Answer
    return Answer(bytes.fromhex(response_hex),
                  bytes.fromhex(status_hex) if status_hex is not None else None)


def test_requests_become_mqtt_commands():
    path = MqttPath()
    cp = ControlPoint(path, LIMITS)
    answer(cp, "A", "00")
    # Target power 250 W: success, Machine Status "target power changed" 250.
    assert answer(cp, "A", "05fa00") == ftms_answer("800501", "08fa00")
    # Resistance 3.0 of 20 levels (1-byte form) and 10.5 (2-byte form): 15 % and 52.5 %.
    assert answer(cp, "A", "041e") == ftms_answer("800401", "071e")
    assert result(cp, "A", "046900") == ftms.SUCCESS
    # Simulation: wind -1.5 m/s, grade 5 %, Crr 0.004, Cw 0.51.
    assert answer(cp, "A", "1124faf4012833") == ftms_answer("801101", "1224faf4012833")
    # Inclination 5 % = 2.86 degrees, on the incline's 0.5 degree grid: 3.0.
    assert result(cp, "A", "033200") == ftms.SUCCESS
    assert path.commands == [
        Command("targetpower", 250.0),
        Command("resistance", 15.0),
        Command("resistance", 52.5),
        Command("grade", 5.0, (("crr", 0.004), ("cw", 0.51), ("wind", -1.5))),
        Command("incline", 3.0),
    ]


def test_out_of_range_is_invalid_parameter_and_nothing_is_sent():
    path = MqttPath()
    cp = ControlPoint(path, LIMITS)
    answer(cp, "A", "00")
    for hex_bytes in (
        "05d107",          # 2001 W: above the target power limit
        "0518fc",          # -1000 W
        "04d300",          # level 21.1 of 20 (2-byte form)
        "04f6ff",          # level -1.0
        "1100009411" "2833",  # grade 45 %: beyond the grade limits
        "110000f401" "28ff",  # Cw 2.55 kg/m: beyond GRADE_PARAMS
        "111879f401" "2833",  # wind 31 m/s
        "03c409",          # inclination 250 %: far beyond the incline
    ):
        assert result(cp, "A", hex_bytes) == ftms.INVALID_PARAMETER, hex_bytes
    assert path.commands == []
    assert result(cp, "A", "1100009808" "2833") == ftms.SUCCESS  # 22 % is a road
    assert path.commands[-1].value == 22.0


def test_refusal_by_the_command_path_is_operation_failed():
    path = MqttPath(refuse="no power reading in the last 5 s: ERG needs the power sensor")
    cp = ControlPoint(path, LIMITS)
    answer(cp, "A", "00")
    assert answer(cp, "A", "05fa00") == ftms_answer("800504")
    assert cp.last_refusal.startswith("no power reading")


def test_unsupported_requests():
    limits = {"resistance": Limits(0, 100)}
    path = MqttPath(limits)
    cp = ControlPoint(path, limits)
    answer(cp, "A", "00")
    for hex_bytes in ("05fa00", "110000f4012833", "033200", "021027", "13"):
        assert result(cp, "A", hex_bytes) == ftms.OP_NOT_SUPPORTED
    # Unsupported wins over "not in control": an app learns what the bike can do.
    assert result(cp, "B", "05fa00") == ftms.OP_NOT_SUPPORTED
    machine, target = cp.features()
    assert target == ftms.TARGET_RESISTANCE
    assert machine & ftms.FEATURE_RESISTANCE_LEVEL
    assert path.commands == []


def test_malformed_parameters():
    path = MqttPath()
    cp = ControlPoint(path, LIMITS)
    answer(cp, "A", "00")
    assert result(cp, "A", "05fa") == ftms.INVALID_PARAMETER
    assert result(cp, "A", "0803") == ftms.INVALID_PARAMETER
    assert cp.write("A", b"").response is None
    assert path.commands == []


def test_reset_start_stop_and_revoke():
    changes = []
    cp = ControlPoint(MqttPath(), LIMITS, on_control=lambda who, why: changes.append(who))
    answer(cp, "A", "00")
    assert answer(cp, "A", "07") == ftms_answer("800701", "04")
    assert answer(cp, "A", "0802") == ftms_answer("800801", "0202")
    assert answer(cp, "A", "01") == ftms_answer("800101", "01")
    assert cp.controller is None  # a reset releases control
    assert result(cp, "A", "05fa00") == ftms.CONTROL_NOT_PERMITTED
    answer(cp, "A", "00")
    # An MQTT app took over: the Bluetooth app loses control, and is told.
    assert cp.revoke("resistance commanded over MQTT") == b"\xff"
    assert cp.revoke("again") is None
    assert changes == ["A", None, "A", None]


def test_ranges_follow_the_limits():
    cp = ControlPoint(MqttPath(), LIMITS)
    assert ftms.decode_range(cp.resistance_range(), 0.1) == (0.0, 20.0, 0.1)
    assert ftms.decode_range(cp.power_range(), 1) == (0, 2000, 1)
    low, high, _ = ftms.decode_range(cp.inclination_range(), 0.1)
    assert low == pytest.approx(math.tan(math.radians(-10)) * 100, abs=0.1)
    assert high == pytest.approx(math.tan(math.radians(19)) * 100, abs=0.1)
    assert cp.level_of(50.0) == 10.0


# -- the peripheral on bumble's virtual link ------------------------------------------------
#
# Two bumble devices, each on an emulated controller attached to one LocalLink: a real
# host stack on both sides (advertising, scanning, GATT, CCCDs, indications), no adapter.

STEP = 5.0  # seconds any one exchange on the virtual link may take, at most


def _device(link, address):
    controller = Controller(address, link=link, public_address=address)
    return Device(address=Address(address), host=Host(controller, AsyncPipeSink(controller)))


class Central:
    """A training app's side: scan, connect, subscribe, write the control point."""

    def __init__(self, device):
        self.device = device
        self.received: dict[int, asyncio.Queue] = {}

    async def find(self, name):
        found = asyncio.get_running_loop().create_future()

        def on_advertisement(adv):
            data = adv.data
            services = data.get(AdvertisingData.SERVICE_DATA_16_BIT_UUID)
            names = [n for n in (data.get(AdvertisingData.COMPLETE_LOCAL_NAME),
                                 data.get(AdvertisingData.SHORTENED_LOCAL_NAME)) if n]
            if (services and services[0] == UUID.from_16_bits(ftms.FTMS_SERVICE)
                    and name.startswith(names[0] if names else "\0") and not found.done()):
                found.set_result((adv.address, services[1]))

        self.device.on("advertisement", on_advertisement)
        await self.device.start_scanning()
        try:
            return await asyncio.wait_for(found, STEP)
        finally:
            await self.device.stop_scanning()

    async def connect(self, address):
        connection = await asyncio.wait_for(self.device.connect(address), STEP)
        self.peer = Peer(connection)
        await asyncio.wait_for(self.peer.discover_services(), STEP)
        await asyncio.wait_for(self.peer.discover_characteristics(), STEP)
        return connection

    def char(self, uuid16):
        (proxy,) = self.peer.get_characteristics_by_uuid(UUID.from_16_bits(uuid16))
        return proxy

    async def subscribe(self, uuid16, indicate=False):
        queue = self.received.setdefault(uuid16, asyncio.Queue())
        await asyncio.wait_for(self.char(uuid16).subscribe(
            lambda value: queue.put_nowait(bytes(value)), prefer_notify=not indicate), STEP)

    async def next(self, uuid16, where=lambda value: True):
        while True:
            value = await asyncio.wait_for(self.received[uuid16].get(), STEP)
            if where(value):
                return value

    async def command(self, hex_bytes):
        """Write a request; return the control point's indication (op, result)."""
        await asyncio.wait_for(
            self.char(ftms.CONTROL_POINT).write_value(bytes.fromhex(hex_bytes),
                                                      with_response=True), STEP)
        return ftms.decode_response(await self.next(ftms.CONTROL_POINT))


async def _bike(link, path, name="Smartbike b1"):
    control = ControlPoint(path, LIMITS)
    state = BikeState(control.level_of)
    trainer = BumbleTrainer(_device(link, "F0:F0:F0:F0:F0:F0"), control, state, name=name,
                            advertising_interval=20.0)
    await trainer.start()
    return trainer


def run(coro):
    asyncio.run(asyncio.wait_for(coro, 60))


def test_advertising_data_fits_and_names_the_bike():
    advert, response = advertising_data("A rather long bike name for a tiny advert")
    assert len(advert) <= 31 and len(response) <= 31
    data = AdvertisingData.from_bytes(advert)
    assert data.get(AdvertisingData.SERVICE_DATA_16_BIT_UUID)[1] == ftms.ftms_service_data()
    assert data.get(AdvertisingData.COMPLETE_LOCAL_NAME) is None
    assert "A rather long bike name".startswith(
        data.get(AdvertisingData.SHORTENED_LOCAL_NAME)[:10])


def test_an_app_finds_rides_and_controls_the_bike_over_the_virtual_link():
    async def scenario():
        link = LocalLink()
        path = MqttPath()
        trainer = await _bike(link, path)
        app = Central(_device(link, "F1:F1:F1:F1:F1:F1"))
        await app.device.power_on()

        address, service_data = await app.find("Smartbike b1")
        assert service_data == ftms.ftms_service_data()
        await app.connect(address)
        features = ftms.decode_feature(await app.char(ftms.FITNESS_MACHINE_FEATURE).read_value())
        assert features == trainer.control.features()
        assert ftms.decode_range(await app.char(ftms.SUPPORTED_POWER_RANGE).read_value(),
                                 1) == (0, 2000, 1)
        for uuid16 in (ftms.INDOOR_BIKE_DATA, ftms.CP_MEASUREMENT, ftms.HR_MEASUREMENT,
                       ftms.MACHINE_STATUS):
            await app.subscribe(uuid16)

        # Readings in, notifications out.
        state = trainer.state
        for topic, value in (("speed", 8.0), ("cadence", 90.0), ("power", 210.0),
                             ("heartrate", 131.0), ("resistance", 50.0)):
            state.reading(topic, value)
        state.crank_event(3, at=2.0)
        await trainer.notify()
        await expect_the_rides_notifications(app.next)

        # A write before indications are enabled: CCCD improperly configured.
        with pytest.raises(att.ATT_Error) as refused:
            await app.char(ftms.CONTROL_POINT).write_value(b"\x00", with_response=True)
        assert refused.value.error_code == 0xFD
        await app.subscribe(ftms.CONTROL_POINT, indicate=True)

        assert await app.command("05fa00") == (0x05, ftms.CONTROL_NOT_PERMITTED)
        assert await app.command("00") == (0x00, ftms.SUCCESS)
        assert trainer.control.controller is not None
        assert await app.command("05fa00") == (0x05, ftms.SUCCESS)
        assert await app.next(ftms.MACHINE_STATUS) == bytes.fromhex("08fa00")
        assert await app.command("041e") == (0x04, ftms.SUCCESS)  # 1-byte form: level 3.0
        assert await app.command("046900") == (0x04, ftms.SUCCESS)  # 2-byte form: 10.5
        assert await app.command("110000f4012833") == (0x11, ftms.SUCCESS)
        assert await app.command("13") == (0x13, ftms.OP_NOT_SUPPORTED)
        assert await app.command("05fa") == (0x05, ftms.INVALID_PARAMETER)
        assert path.commands == [
            Command("targetpower", 250.0), Command("resistance", 15.0),
            Command("resistance", 52.5),
            Command("grade", 5.0, (("crr", 0.004), ("cw", 0.51), ("wind", 0.0)))]

        # An MQTT app takes over: the Bluetooth app is told it lost control.
        trainer.control_lost("resistance commanded over MQTT")
        assert await app.next(ftms.MACHINE_STATUS, lambda v: v[:1] == b"\xff") == b"\xff"
        assert await app.command("05fa00") == (0x05, ftms.CONTROL_NOT_PERMITTED)

    run(scenario())


def test_a_second_app_waits_until_the_controller_disconnects():
    async def scenario():
        link = LocalLink()
        path = MqttPath()
        trainer = await _bike(link, path)
        first = Central(_device(link, "F1:F1:F1:F1:F1:F1"))
        second = Central(_device(link, "F2:F2:F2:F2:F2:F2"))
        for app in (first, second):
            await app.device.power_on()
        first_link = await first.connect((await first.find("Smartbike b1"))[0])
        await first.subscribe(ftms.CONTROL_POINT, indicate=True)
        assert await first.command("00") == (0x00, ftms.SUCCESS)
        first_id = trainer.control.controller
        # Advertising restarts after a connection, so a second app finds the bike too.
        await second.connect((await second.find("Smartbike b1"))[0])
        await second.subscribe(ftms.CONTROL_POINT, indicate=True)
        await second.subscribe(ftms.MACHINE_STATUS)
        assert await second.command("00") == (0x00, ftms.CONTROL_NOT_PERMITTED)
        assert await second.command("05c800") == (0x05, ftms.CONTROL_NOT_PERMITTED)

        await first_link.disconnect()
        # Control Permission Lost goes out when the controller's link is gone.
        assert await second.next(ftms.MACHINE_STATUS) == b"\xff"
        assert await second.command("00") == (0x00, ftms.SUCCESS)
        assert await second.command("05c800") == (0x05, ftms.SUCCESS)
        assert path.commands == [Command("targetpower", 200.0)]
        assert trainer.control.controller not in (None, first_id)

    run(scenario())


# -- what the bike shows (pure) --------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_stale_readings_are_left_out_not_repeated():
    clock = FakeClock()
    state = BikeState(lambda percent: percent / 5, stale_after=5.0, clock=clock)
    state.reading("power", 180.0)
    state.reading("heartrate", 120.0)
    state.reading("resistance", 40.0)
    state.reading("cadence", float("nan"))
    assert ftms.decode_indoor_bike_data(state.indoor_bike_data()) == ftms.IndoorBikeData(
        resistance=8.0, power=180.0, heart_rate=120.0)
    clock.now += 5.5  # the sensors went quiet: no stuck values
    assert ftms.decode_indoor_bike_data(state.indoor_bike_data()) == ftms.IndoorBikeData(
        resistance=8.0)
    assert state.cycling_power() is None
    assert state.heart_rate() is None


def test_revolution_counters_accumulate_and_wrap():
    clock = FakeClock()
    state = BikeState(lambda percent: percent, clock=clock)
    state.reading("power", 150.0)
    assert ftms.decode_cycling_power(state.cycling_power()) == ftms.CyclingPower(150.0)
    state.crank_event(65535, at=63.0)
    state.crank_event(2, at=64.5)  # counts and times wrap as CPS says they do
    state.wheel_event(10, at=1.0)
    m = ftms.decode_cycling_power(state.cycling_power())
    assert (m.crank_revs, m.crank_time) == (1, int(64.5 * 1024) & 0xFFFF)
    assert (m.wheel_revs, m.wheel_time) == (10, 2048)
