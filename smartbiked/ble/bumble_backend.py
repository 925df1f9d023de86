"""The smart trainer on bumble: a full BLE host stack in Python.

Used by the tests (two bumble devices on a virtual ``LocalLink``, no adapter) and as an
opt-in on a bike with a dedicated dongle (``usb:0``) or an adapter BlueZ has let go of
(``hci-socket:0``). Needs the ``ble`` extra. Everything runs in one asyncio loop: call
the coroutines from that loop; :meth:`BumbleTrainer.control_lost` may be called from
any thread once :meth:`BumbleTrainer.start` has run.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

from bumble import att
from bumble.core import UUID, AdvertisingData
from bumble.device import Connection, Device
from bumble.gatt import Characteristic, CharacteristicValue, Service
from bumble.hci import Address
from bumble.transport import open_transport

from smartbiked import ftms
from smartbiked.ble.control import ControlPoint
from smartbiked.ble.peripheral import BikeState
from smartbiked.errors import BluetoothUnavailable

log = logging.getLogger("smartbiked.ble")

_READ = Characteristic.Properties.READ
_NOTIFY = Characteristic.Properties.NOTIFY
_INDICATE = Characteristic.Properties.INDICATE
_WRITE = Characteristic.Properties.WRITE
#: Bit 1 of a CCCD value: indications enabled.
_CCCD_INDICATE = 0x02


def _uuid(n: int) -> UUID:
    return UUID.from_16_bits(n)


def advertising_data(name: str) -> tuple[bytes, bytes]:
    """(advertising data, scan response): the three services, FTMS service data, name.

    The name goes whole into the scan response; the advert carries it shortened to
    what fits in the 31 bytes beside the services.
    """
    services = b"".join(n.to_bytes(2, "little")
                        for n in (ftms.FTMS_SERVICE, ftms.CPS_SERVICE, ftms.HRS_SERVICE))
    head = [
        (AdvertisingData.FLAGS, bytes([0x06])),  # LE general discoverable, no BR/EDR
        (AdvertisingData.COMPLETE_LIST_OF_16_BIT_SERVICE_CLASS_UUIDS, services),
        (AdvertisingData.SERVICE_DATA_16_BIT_UUID,
         ftms.FTMS_SERVICE.to_bytes(2, "little") + ftms.ftms_service_data()),
    ]
    used = sum(2 + len(v) for _, v in head)
    encoded = name.encode("utf-8")
    room = 31 - used - 2
    short = encoded[:room].decode("utf-8", "ignore").encode("utf-8")
    kind = (AdvertisingData.COMPLETE_LOCAL_NAME if short == encoded
            else AdvertisingData.SHORTENED_LOCAL_NAME)
    advert = AdvertisingData([*head, (kind, short)])
    response = AdvertisingData([(AdvertisingData.COMPLETE_LOCAL_NAME, encoded[:29])])
    return bytes(advert), bytes(response)


class BumbleTrainer:
    """FTMS, Cycling Power and Heart Rate services on a bumble ``Device``."""

    def __init__(self, device: Device, control: ControlPoint, state: BikeState, *,
                 name: str, advertising_interval: float = 100.0,
                 max_connections: int = 2) -> None:
        self.device = device
        self.control = control
        self.state = state
        self.name = name
        self.advertising_interval = advertising_interval
        #: A training app and a second one (a phone showing heart rate, a watch) at once.
        self.max_connections = max_connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        machine, target = control.features()
        self.bike_data = Characteristic(_uuid(ftms.INDOOR_BIKE_DATA), _NOTIFY,
                                        Characteristic.READABLE, b"")
        self.control_point: Characteristic[bytes] = Characteristic(
            _uuid(ftms.CONTROL_POINT), _WRITE | _INDICATE, Characteristic.WRITEABLE,
            CharacteristicValue[bytes](write=self._on_write))
        self.machine_status = Characteristic(_uuid(ftms.MACHINE_STATUS), _NOTIFY,
                                             Characteristic.READABLE, b"")
        self.training_status = Characteristic(
            _uuid(ftms.TRAINING_STATUS), _READ | _NOTIFY, Characteristic.READABLE,
            ftms.encode_training_status(ftms.TRAINING_MANUAL))
        ftms_chars = [
            Characteristic(_uuid(ftms.FITNESS_MACHINE_FEATURE), _READ, Characteristic.READABLE,
                           ftms.encode_feature(machine, target)),
            self.bike_data, self.training_status,
            Characteristic(_uuid(ftms.SUPPORTED_RESISTANCE_RANGE), _READ,
                           Characteristic.READABLE, control.resistance_range()),
            Characteristic(_uuid(ftms.SUPPORTED_POWER_RANGE), _READ, Characteristic.READABLE,
                           control.power_range()),
            self.control_point, self.machine_status,
        ]
        if target & ftms.TARGET_INCLINATION:
            ftms_chars.append(Characteristic(
                _uuid(ftms.SUPPORTED_INCLINATION_RANGE), _READ, Characteristic.READABLE,
                control.inclination_range()))
        self.power = Characteristic(_uuid(ftms.CP_MEASUREMENT), _NOTIFY,
                                    Characteristic.READABLE, b"")
        self.heart = Characteristic(_uuid(ftms.HR_MEASUREMENT), _NOTIFY,
                                    Characteristic.READABLE, b"")
        self.services = [
            Service(_uuid(ftms.FTMS_SERVICE), ftms_chars),
            Service(_uuid(ftms.CPS_SERVICE), [
                self.power,
                Characteristic(_uuid(ftms.CP_FEATURE), _READ, Characteristic.READABLE,
                               ftms.encode_cp_feature(wheel=True, crank=True)),
                Characteristic(_uuid(ftms.SENSOR_LOCATION), _READ, Characteristic.READABLE,
                               bytes([ftms.LOCATION_REAR_HUB])),
            ]),
            Service(_uuid(ftms.HRS_SERVICE), [self.heart]),
        ]

    async def start(self) -> None:
        """Add the services, power on and advertise (again after every disconnection)."""
        self._loop = asyncio.get_running_loop()
        self.device.add_services(self.services)
        self.device.on(self.device.EVENT_CONNECTION, self._on_connection)
        await self.device.power_on()
        await self._advertise()

    async def close(self) -> None:
        """Stop advertising and let the tasks finish (the owner closes the transport)."""
        for task in list(self._tasks):
            task.cancel()
        if self.device.powered_on:
            try:
                await self.device.stop_advertising()
            except Exception as exc:  # a controller already gone: nothing left to stop
                log.debug("stop advertising: %s", exc)
            await self.device.power_off()

    async def _advertise(self) -> None:
        advert, response = advertising_data(self.name)
        await self.device.start_advertising(
            advertising_data=advert, scan_response_data=response, auto_restart=True,
            advertising_interval_min=self.advertising_interval,
            advertising_interval_max=self.advertising_interval)

    async def notify(self) -> None:
        """Notify the current readings to every subscriber (call once a second or so)."""
        await self.device.notify_subscribers(self.bike_data, self.state.indoor_bike_data())
        power = self.state.cycling_power()
        if power is not None:
            await self.device.notify_subscribers(self.power, power)
        heart = self.state.heart_rate()
        if heart is not None:
            await self.device.notify_subscribers(self.heart, heart)

    async def run(self, period: float, stop: asyncio.Event) -> None:
        """Notify every ``period`` seconds until ``stop`` is set."""
        while not stop.is_set():
            try:
                await self.notify()
            except Exception:
                log.exception("Bluetooth notification failed")
            try:
                await asyncio.wait_for(stop.wait(), period)
            except TimeoutError:
                pass

    def control_lost(self, reason: str) -> None:
        """An MQTT app took over: revoke Bluetooth control and tell the subscribers."""
        status = self.control.revoke(reason)
        if status is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._spawn, self._status(status))

    # -- internals --------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A central gone between its write and our indication, mostly: worth a line.
            log.warning("Bluetooth send failed: %s", task.exception())

    async def _status(self, status: bytes) -> None:
        await self.device.notify_subscribers(self.machine_status, status)

    def _on_connection(self, connection: Connection) -> None:
        peer = str(connection.peer_address)
        log.info("Bluetooth central %s connected", peer)

        def on_disconnection(reason: int) -> None:
            log.info("Bluetooth central %s disconnected (reason %#x)", peer, reason)
            status = self.control.disconnected(peer)
            if status is not None:
                self._spawn(self._status(status))

        connection.on(connection.EVENT_DISCONNECTION, on_disconnection)
        # A connection ends legacy advertising; stay findable while there is room.
        if len(self.device.connections) < self.max_connections:
            self._spawn(self._advertise())

    def _on_write(self, connection: Connection, value: bytes) -> None:
        cccd = self.device.gatt_server.read_cccd(connection, self.control_point)
        if not cccd[0] & _CCCD_INDICATE:
            # FTMS 4.16.2: a write before indications are enabled is refused so.
            raise att.ATT_Error(att.ErrorCode.CCCD_IMPROPERLY_CONFIGURED)
        answer = self.control.write(str(connection.peer_address), bytes(value))
        if answer.response is None:
            raise att.ATT_Error(att.ErrorCode.INVALID_ATTRIBUTE_LENGTH)
        # This runs before the ATT Write Response goes out; the indication must follow
        # it, so it is sent from a task.
        self._spawn(self._answer(connection, answer.response, answer.status))

    async def _answer(self, connection: Connection, response: bytes,
                      status: bytes | None) -> None:
        await self.device.indicate_subscriber(connection, self.control_point, response)
        if status is not None:
            await self.device.notify_subscribers(self.machine_status, status)


def static_address(seed: str) -> Address:
    """A random static address derived from ``seed`` (the bike id): the same on every
    start, so a phone or app that remembers the trainer finds it again."""
    raw = bytearray(hashlib.sha256(seed.encode()).digest()[:6])
    raw[5] |= 0xC0  # the two top bits of a random static address are 1 (Core 5.3 Vol 6 B 1.3)
    return Address(bytes(raw), Address.RANDOM_DEVICE_ADDRESS)


class BumbleBackend:
    """A :class:`BumbleTrainer` on its own HCI transport (``usb:0``, ``hci-socket:0``,
    ``tcp-client:host:port``...): the daemon's ``bumble`` backend.

    :meth:`run` returns when the transport goes away (a dongle unplugged), so the
    daemon opens it again.
    """

    def __init__(self, control: ControlPoint, state: BikeState, *, name: str,
                 transport: str, seed: str) -> None:
        self.control = control
        self.state = state
        self.name = name
        self.spec = transport
        self.seed = seed
        self._transport: Any = None
        self._trainer: BumbleTrainer | None = None
        #: Why run() returned on its own (the transport lost), None otherwise.
        self.ended: str | None = None

    async def start(self) -> None:
        """Open the transport, power on and advertise."""
        try:
            self._transport = await open_transport(self.spec)
        except Exception as exc:
            raise BluetoothUnavailable(
                f"Bluetooth: cannot open bumble transport {self.spec}: {exc}") from exc
        device = Device.with_hci(self.name, static_address(self.seed),
                                 self._transport.source, self._transport.sink)
        self._trainer = BumbleTrainer(device, self.control, self.state, name=self.name)
        try:
            await asyncio.wait_for(self._trainer.start(), 10.0)
        except (TimeoutError, OSError) as exc:
            raise BluetoothUnavailable(
                f"Bluetooth: the controller on {self.spec} does not answer ({exc!r})") from exc

    async def run(self, period: float, stop: asyncio.Event) -> None:
        """Notify until ``stop`` is set or the transport is lost."""
        assert self._trainer is not None, "start() first"
        lost = self._transport.source.terminated
        notifying = asyncio.ensure_future(self._trainer.run(period, stop))
        try:
            await asyncio.wait([notifying, lost], return_when=asyncio.FIRST_COMPLETED)
        finally:
            notifying.cancel()
        if lost.done() and not stop.is_set():
            self.ended = f"transport {self.spec} lost"
            log.warning("Bluetooth: %s", self.ended)

    def control_lost(self, reason: str) -> None:
        """An MQTT app took over (any thread)."""
        if self._trainer is not None:
            self._trainer.control_lost(reason)
        else:
            self.control.revoke(reason)

    async def close(self) -> None:
        """Stop advertising, close the transport; safe to call twice."""
        trainer, transport = self._trainer, self._transport
        self._trainer = self._transport = None
        if trainer is not None and not transport.source.terminated.done():
            try:
                await asyncio.wait_for(trainer.close(), 2.0)
            except Exception as exc:
                log.debug("closing the bumble device: %s", exc)
        if transport is not None:
            await transport.close()
