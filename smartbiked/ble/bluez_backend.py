"""The smart trainer on BlueZ: the services exported over D-Bus, bluetoothd does the radio.

The route that coexists with everything else on a Raspberry Pi: BlueZ keeps the adapter,
and this module registers a GATT application (``org.bluez.GattManager1``) and an
advertisement (``org.bluez.LEAdvertisingManager1``) on it. Needs the ``ble`` extra
(dbus-fast) and D-Bus policy allowing the daemon's user to talk to ``org.bluez``; no
capability. Services, characteristics and the Control Point rules mirror
:mod:`smartbiked.ble.bumble_backend`; what BlueZ does differently is said where it
matters (the CCCD check, who receives an indication, where the name is advertised).

Everything runs in one asyncio loop: call the coroutines from that loop;
:meth:`BluezTrainer.control_lost` may be called from any thread once
:meth:`BluezTrainer.start` has run.

A trainer does not recover by itself: when bluetoothd leaves the bus, the adapter goes
away, BlueZ releases the advertisement or the D-Bus connection drops, :meth:`run`
returns and the daemon's Bluetooth loop (:mod:`smartbiked.ble.radio`) closes it and
starts a new one, which waits for bluetoothd and the adapter like the first one did.
"""

# No ``from __future__ import annotations`` here: dbus-fast reads the D-Bus signatures
# from the annotations at class creation, and takes a postponed ``-> None`` for a value.

import asyncio
import logging
from collections.abc import Callable
from typing import Annotated, Any

from dbus_fast import BusType, DBusError, Message, MessageType, PropertyAccess, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import (
    DBusBool,
    DBusBytes,
    DBusDict,
    DBusObjectPath,
    DBusSignature,
    DBusStr,
)
from dbus_fast.errors import DBusFastError
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property

from smartbiked import ftms
from smartbiked.ble.control import ControlPoint
from smartbiked.ble.peripheral import BikeState
from smartbiked.errors import BluetoothUnavailable

log = logging.getLogger("smartbiked.ble")

BLUEZ = "org.bluez"
ADAPTER = "org.bluez.Adapter1"
DEVICE = "org.bluez.Device1"
GATT_MANAGER = "org.bluez.GattManager1"
ADVERTISING_MANAGER = "org.bluez.LEAdvertisingManager1"
GATT_SERVICE = "org.bluez.GattService1"
GATT_CHARACTERISTIC = "org.bluez.GattCharacteristic1"
ADVERTISEMENT = "org.bluez.LEAdvertisement1"
PROPERTIES = "org.freedesktop.DBus.Properties"
BUS_DRIVER = "org.freedesktop.DBus"
BUS_DRIVER_PATH = "/org/freedesktop/DBus"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"

#: Error names bluetoothd turns into ATT error codes (src/gatt-database.c):
#: NotPermitted -> 0x03 Write Not Permitted on a write, InvalidValueLength -> 0x0D,
#: NotSupported -> 0x06; any other name becomes 0x0E Unlikely Error.
NOT_PERMITTED = "org.bluez.Error.NotPermitted"
INVALID_LENGTH = "org.bluez.Error.InvalidValueLength"
NOT_SUPPORTED = "org.bluez.Error.NotSupported"

#: Where the objects live on our connection: the application root (BlueZ reads the tree
#: below it with GetManagedObjects) and the advertisement, outside that tree.
APP_ROOT = "/org/smartbiked/app"
ADVERT_PATH = "/org/smartbiked/advertisement0"

#: Seconds BlueZ may take to answer one call before start() gives up.
CALL_TIMEOUT = 10.0
#: Seconds close() waits for one answer: a bluetoothd going down may never answer, and
#: the daemon's shutdown and Bluetooth retries must not hang on it.
CLOSE_TIMEOUT = 2.0

DBusStrings = Annotated[list[str], DBusSignature("as")]


def uuid128(n: int) -> str:
    """The 128-bit string BlueZ wants for a 16-bit SIG UUID."""
    return f"0000{n:04x}-0000-1000-8000-00805f9b34fb"


class Characteristic(ServiceInterface):
    """One ``org.bluez.GattCharacteristic1`` object.

    ``flags`` are BlueZ's (read, write, notify, indicate). A notification is a
    PropertiesChanged of ``Value``, sent only between BlueZ's StartNotify and
    StopNotify: BlueZ calls them when the first central enables the CCCD and when the
    last one disables it.
    """

    def __init__(self, path: str, uuid16: int, service: str, flags: list[str],
                 value: bytes = b"",
                 on_write: Callable[[bytes, dict[str, Variant]], None] | None = None) -> None:
        super().__init__(GATT_CHARACTERISTIC)
        self.path = path
        self.uuid16 = uuid16
        self.service = service
        self.flags = list(flags)
        self.value = value
        self.notifying = False
        self._on_write = on_write

    @dbus_property(access=PropertyAccess.READ)
    def UUID(self) -> DBusStr:
        return uuid128(self.uuid16)

    @dbus_property(access=PropertyAccess.READ)
    def Service(self) -> DBusObjectPath:
        return self.service

    @dbus_property(access=PropertyAccess.READ)
    def Flags(self) -> DBusStrings:
        return self.flags

    @dbus_property(access=PropertyAccess.READ)
    def Value(self) -> DBusBytes:
        return self.value

    @dbus_property(access=PropertyAccess.READ)
    def Notifying(self) -> DBusBool:
        return self.notifying

    @dbus_method()
    def ReadValue(self, options: DBusDict) -> DBusBytes:
        if "read" not in self.flags:
            raise DBusError(NOT_PERMITTED, "not readable")
        offset = options.get("offset")
        start = int(offset.value) if offset is not None else 0
        return self.value[start:]

    @dbus_method()
    def WriteValue(self, value: DBusBytes, options: DBusDict) -> None:
        if self._on_write is None:
            raise DBusError(NOT_PERMITTED, "not writable")
        self._on_write(bytes(value), options)

    @dbus_method()
    def StartNotify(self) -> None:
        if "notify" not in self.flags and "indicate" not in self.flags:
            raise DBusError(NOT_SUPPORTED, "neither notifies nor indicates")
        self.notifying = True

    @dbus_method()
    def StopNotify(self) -> None:
        self.notifying = False

    def send(self, value: bytes) -> bool:
        """Take ``value``; notify (or indicate) it when someone subscribed. True if sent."""
        self.value = value
        if not self.notifying:
            return False
        self.emit_properties_changed({"Value": value})
        return True


class Service(ServiceInterface):
    """One primary ``org.bluez.GattService1`` object."""

    def __init__(self, path: str, uuid16: int) -> None:
        super().__init__(GATT_SERVICE)
        self.path = path
        self.uuid16 = uuid16

    @dbus_property(access=PropertyAccess.READ)
    def UUID(self) -> DBusStr:
        return uuid128(self.uuid16)

    @dbus_property(access=PropertyAccess.READ)
    def Primary(self) -> DBusBool:
        return True


class Advertisement(ServiceInterface):
    """The ``org.bluez.LEAdvertisement1`` object: connectable, the three services, name.

    BlueZ builds the advertising data itself: it adds the flags (Discoverable: LE
    general discoverable) and puts LocalName in the scan response.
    """

    def __init__(self, name: str, on_release: Callable[[], None]) -> None:
        super().__init__(ADVERTISEMENT)
        self.local_name = name  # not ``name``: ServiceInterface's is the interface's
        self._on_release = on_release

    @dbus_property(access=PropertyAccess.READ)
    def Type(self) -> DBusStr:
        return "peripheral"

    @dbus_property(access=PropertyAccess.READ)
    def ServiceUUIDs(self) -> DBusStrings:
        return [uuid128(n) for n in (ftms.FTMS_SERVICE, ftms.CPS_SERVICE, ftms.HRS_SERVICE)]

    @dbus_property(access=PropertyAccess.READ)
    def ServiceData(self) -> DBusDict:
        return {uuid128(ftms.FTMS_SERVICE): Variant("ay", ftms.ftms_service_data())}

    @dbus_property(access=PropertyAccess.READ)
    def LocalName(self) -> DBusStr:
        return self.local_name

    @dbus_property(access=PropertyAccess.READ)
    def Discoverable(self) -> DBusBool:
        return True

    @dbus_method()
    def Release(self) -> None:
        # BlueZ dropped the advertisement (adapter gone, bluetoothd stopping).
        self._on_release()


class BluezTrainer:
    """FTMS, Cycling Power and Heart Rate services registered with BlueZ over D-Bus.

    ``bus_address`` None is the system bus (``DBUS_SYSTEM_BUS_ADDRESS`` if set);
    ``adapter`` is BlueZ's name for it (``hci0``).
    """

    def __init__(self, control: ControlPoint, state: BikeState, *, name: str,
                 adapter: str = "hci0", bus_address: str | None = None) -> None:
        if not adapter or not all(c.isascii() and (c.isalnum() or c == "_") for c in adapter):
            # It becomes part of an object path: refuse here what D-Bus would refuse later.
            raise ValueError(f"not a BlueZ adapter name: {adapter!r} (hci0, hci1, ...)")
        self.control = control
        self.state = state
        self.name = name
        self.adapter = adapter
        self.adapter_path = f"/org/bluez/{adapter}"
        self.bus_address = bus_address
        self._bus: MessageBus | None = None
        self._bluez: str | None = None  # the unique name owning org.bluez
        self._app_registered = False
        self._advert_registered = False
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Why the registration ended under us (None while it stands); run() returns then.
        self.ended: str | None = None
        self._ended = asyncio.Event()
        self.advertisement = Advertisement(name, self._released)
        self.services: list[Service] = []
        self.characteristics: list[Characteristic] = []

        machine, target = control.features()
        ftms_service = self._service(ftms.FTMS_SERVICE)
        self._char(ftms_service, ftms.FITNESS_MACHINE_FEATURE, ["read"],
                   ftms.encode_feature(machine, target))
        self.bike_data = self._char(ftms_service, ftms.INDOOR_BIKE_DATA, ["notify"])
        self.training_status = self._char(
            ftms_service, ftms.TRAINING_STATUS, ["read", "notify"],
            ftms.encode_training_status(ftms.TRAINING_MANUAL))
        self._char(ftms_service, ftms.SUPPORTED_RESISTANCE_RANGE, ["read"],
                   control.resistance_range())
        self._char(ftms_service, ftms.SUPPORTED_POWER_RANGE, ["read"], control.power_range())
        self.control_point = self._char(ftms_service, ftms.CONTROL_POINT,
                                        ["write", "indicate"], on_write=self._on_write)
        self.machine_status = self._char(ftms_service, ftms.MACHINE_STATUS, ["notify"])
        if target & ftms.TARGET_INCLINATION:
            self._char(ftms_service, ftms.SUPPORTED_INCLINATION_RANGE, ["read"],
                       control.inclination_range())
        cps = self._service(ftms.CPS_SERVICE)
        self.power = self._char(cps, ftms.CP_MEASUREMENT, ["notify"])
        self._char(cps, ftms.CP_FEATURE, ["read"], ftms.encode_cp_feature(wheel=True, crank=True))
        self._char(cps, ftms.SENSOR_LOCATION, ["read"], bytes([ftms.LOCATION_REAR_HUB]))
        hrs = self._service(ftms.HRS_SERVICE)
        self.heart = self._char(hrs, ftms.HR_MEASUREMENT, ["notify"])

    def _service(self, uuid16: int) -> Service:
        service = Service(f"{APP_ROOT}/service{len(self.services)}", uuid16)
        self.services.append(service)
        return service

    def _char(self, service: Service, uuid16: int, flags: list[str], value: bytes = b"",
              on_write: Callable[[bytes, dict[str, Variant]], None] | None = None
              ) -> Characteristic:
        n = sum(c.service == service.path for c in self.characteristics)
        char = Characteristic(f"{service.path}/char{n}", uuid16, service.path, flags, value,
                              on_write)
        self.characteristics.append(char)
        return char

    # -- the TrainerBackend interface -------------------------------------------------------

    async def start(self) -> None:
        """Register the application and the advertisement with BlueZ.

        Raises BluetoothUnavailable (one line) when there is no bus, no BlueZ on it or
        no such adapter, or BlueZ refuses, or either goes away meanwhile; nothing stays
        registered then.
        """
        if self._bus is not None:
            return
        self._loop = asyncio.get_running_loop()
        self.ended = None
        self._ended = asyncio.Event()
        bus = await self._connect()
        self._bus = bus
        try:
            # Watch before asking who owns org.bluez and registering, so that bluetoothd
            # leaving, the adapter going or a central disconnecting is never missed.
            bus.add_message_handler(self._on_signal)
            for rule in (
                # bluetoothd stopping (an upgrade, a crash) forgets every registration.
                f"type='signal',sender='{BUS_DRIVER}',interface='{BUS_DRIVER}',"
                f"member='NameOwnerChanged',arg0='{BLUEZ}'",
                f"type='signal',sender='{BLUEZ}',interface='{PROPERTIES}',"
                f"member='PropertiesChanged',arg0='{DEVICE}',"
                f"path_namespace='{self.adapter_path}'",
                f"type='signal',sender='{BLUEZ}',interface='{OBJECT_MANAGER}',"
                "member='InterfacesRemoved'",
            ):
                await self._call(bus, BUS_DRIVER, BUS_DRIVER_PATH, BUS_DRIVER, "AddMatch", "s",
                                 [rule])
            self._bluez = await self._owner_of_bluez(bus)
            await self._check_adapter(bus)
            for service in self.services:
                bus.export(service.path, service)
            for char in self.characteristics:
                bus.export(char.path, char)
            bus.export(ADVERT_PATH, self.advertisement)
            await self._register(bus)
            if self.ended is not None:
                raise BluetoothUnavailable(f"Bluetooth: {self.ended}")
        except BaseException:
            await self.close()
            raise

    async def run(self, period: float, stop: asyncio.Event) -> None:
        """Notify every ``period`` seconds until ``stop`` is set, or until the services
        are gone: bluetoothd left the bus, the adapter was removed, BlueZ released the
        advertisement or the D-Bus connection was lost. Then it logs why (:attr:`ended`)
        and returns; the daemon closes this trainer and starts a new one."""
        bus = self._bus
        if bus is None:
            return
        # The bus's own future: waited on, never cancelled (close() waits on it too).
        lost = asyncio.ensure_future(bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
        ended = asyncio.ensure_future(self._ended.wait())
        try:
            while not stop.is_set() and not lost.done() and self.ended is None:
                try:
                    self.notify()
                except Exception:
                    log.exception("Bluetooth notification failed")
                stopped = asyncio.ensure_future(stop.wait())
                await asyncio.wait({stopped, lost, ended}, timeout=period,
                                   return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
        finally:
            ended.cancel()
        if stop.is_set():
            return
        if self.ended is None:
            self._bus_lost()
        log.warning("Bluetooth: %s", self.ended)

    def notify(self) -> None:
        """Notify the current readings to the subscribers (call once a second or so)."""
        if self._bus is None:
            return
        self.bike_data.send(self.state.indoor_bike_data())
        power = self.state.cycling_power()
        if power is not None:
            self.power.send(power)
        heart = self.state.heart_rate()
        if heart is not None:
            self.heart.send(heart)

    def control_lost(self, reason: str) -> None:
        """An MQTT app took over: revoke Bluetooth control and tell the subscribers."""
        status = self.control.revoke(reason)
        if status is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._status, status)

    async def close(self) -> None:
        """Unregister what BlueZ still holds, leave the bus. Idempotent, and quick: each
        call waits :data:`CLOSE_TIMEOUT` seconds at most, and none goes to a bluetoothd
        that left, an adapter that is gone or an advertisement BlueZ released."""
        bus, self._bus = self._bus, None
        if bus is None:
            return
        # From here on a signal changes nothing: this trainer is done.
        bus.remove_message_handler(self._on_signal)
        advert, app = self._advert_registered, self._app_registered
        self._advert_registered = self._app_registered = False
        if bus.connected and self._bluez is not None:
            if advert:
                await self._quiet_call(bus, ADVERTISING_MANAGER, "UnregisterAdvertisement",
                                       [ADVERT_PATH])
            if app:
                await self._quiet_call(bus, GATT_MANAGER, "UnregisterApplication", [APP_ROOT])
        for path in [s.path for s in self.services] + [c.path for c in self.characteristics]:
            bus.unexport(path)
        bus.unexport(ADVERT_PATH)
        bus.disconnect()
        try:
            # dbus-fast leaves this one coroutine unannotated.
            await asyncio.wait_for(bus.wait_for_disconnect(),  # type: ignore[no-untyped-call]
                                   CLOSE_TIMEOUT)
        except Exception as e:  # already gone, or torn down uncleanly: either way, done
            log.debug("D-Bus disconnection: %s", e)

    # -- D-Bus plumbing ------------------------------------------------------------------------

    async def _connect(self) -> MessageBus:
        where = self.bus_address or "the system bus"
        try:
            bus = MessageBus(bus_address=self.bus_address, bus_type=BusType.SYSTEM,
                             auth_timeout=CALL_TIMEOUT)
            return await asyncio.wait_for(bus.connect(), CALL_TIMEOUT)
        except (OSError, ValueError, DBusFastError, TimeoutError) as e:
            raise BluetoothUnavailable(
                f"Bluetooth: cannot connect to D-Bus ({where}): {e or type(e).__name__}"
            ) from e

    async def _call(self, bus: MessageBus, destination: str, path: str, interface: str,
                    member: str, signature: str, body: list[Any],
                    timeout: float = CALL_TIMEOUT) -> Message:
        """One method call; a D-Bus error reply is raised as DBusError."""
        reply = await asyncio.wait_for(bus.call(Message(
            destination=destination, path=path, interface=interface, member=member,
            signature=signature, body=body)), timeout)
        if reply.message_type == MessageType.ERROR:
            raise DBusError(reply.error_name or "unknown",
                            str(reply.body[0]) if reply.body else "")
        return reply

    async def _owner_of_bluez(self, bus: MessageBus) -> str:
        try:
            reply = await self._call(bus, BUS_DRIVER, BUS_DRIVER_PATH, BUS_DRIVER,
                                     "GetNameOwner", "s", [BLUEZ])
        except (DBusError, TimeoutError) as e:
            raise BluetoothUnavailable(
                "Bluetooth: BlueZ is not on D-Bus (is bluetoothd running?)") from e
        return str(reply.body[0])

    async def _check_adapter(self, bus: MessageBus) -> None:
        try:
            reply = await self._call(bus, BLUEZ, self.adapter_path, PROPERTIES, "GetAll", "s",
                                     [ADAPTER])
        except (DBusError, TimeoutError) as e:
            raise BluetoothUnavailable(
                f"Bluetooth: no adapter {self.adapter} in BlueZ "
                "(see `bluetoothctl list`; is it plugged in and not rfkill-blocked?)") from e
        powered = reply.body[0].get("Powered")
        if powered is not None and not powered.value:
            # bluetoothd's AutoEnable normally powers it; switch it on as bumble would.
            try:
                await self._call(bus, BLUEZ, self.adapter_path, PROPERTIES, "Set", "ssv",
                                 [ADAPTER, "Powered", Variant("b", True)])
            except (DBusError, TimeoutError) as e:
                raise BluetoothUnavailable(
                    f"Bluetooth: adapter {self.adapter} is off and could not be switched on "
                    f"({_why(e)}; rfkill?)") from e

    async def _register(self, bus: MessageBus) -> None:
        # dbus-fast answers org.freedesktop.DBus.ObjectManager.GetManagedObjects on any
        # exported path itself: on APP_ROOT it lists the services and their
        # characteristics, which is what BlueZ reads during RegisterApplication.
        await self._bluez_call(bus, GATT_MANAGER, "RegisterApplication", "oa{sv}",
                               [APP_ROOT, {}], "the GATT application")
        self._app_registered = True
        await self._bluez_call(bus, ADVERTISING_MANAGER, "RegisterAdvertisement",
                               "oa{sv}", [ADVERT_PATH, {}], "the advertisement")
        self._advert_registered = True
        log.info("Bluetooth: %s advertised as %r through BlueZ", self.adapter, self.name)

    def _end(self, reason: str, *, links_gone: bool) -> None:
        """The registration ended under us: release control and wake run(). The first
        reason is kept. ``links_gone``: every central's link went with it."""
        if self._bus is None:
            return  # closed, or closing: nobody to tell
        if links_gone:
            for char in self.characteristics:
                char.notifying = False  # nobody subscribed is left to notify
        if self.ended is None:
            self.ended = reason
            self._ended.set()
        # Machine Status must not go on claiming control for an app that cannot reach
        # the bike any more (with links still up, it is told: Control Permission Lost).
        status = self.control.revoke(f"Bluetooth: {reason}")
        if status is not None:
            self._status(status)

    def _bluez_left(self) -> None:
        """bluetoothd left the bus: its registrations, subscriptions and links are gone."""
        self._bluez = None
        self._app_registered = self._advert_registered = False
        self._end("bluetoothd left D-Bus", links_gone=True)

    def _adapter_removed(self) -> None:
        """The adapter went (unplugged, powered down for good): with it, what was on it."""
        self._app_registered = self._advert_registered = False
        self._end(f"adapter {self.adapter} was removed from BlueZ", links_gone=True)

    def _released(self) -> None:
        """BlueZ dropped the advertisement (not to be unregistered); the app may stay."""
        self._advert_registered = False
        self._end("BlueZ released the advertisement", links_gone=False)

    def _bus_lost(self) -> None:
        self._end("the D-Bus connection was lost", links_gone=True)

    async def _bluez_call(self, bus: MessageBus, interface: str, member: str,
                          signature: str, body: list[Any], what: str) -> None:
        try:
            await self._call(bus, BLUEZ, self.adapter_path, interface, member, signature, body)
        except (DBusError, TimeoutError) as e:
            raise BluetoothUnavailable(
                f"Bluetooth: BlueZ refused {what} on {self.adapter}: {_why(e)}") from e

    async def _quiet_call(self, bus: MessageBus, interface: str, member: str,
                          body: list[Any]) -> None:
        try:
            await self._call(bus, BLUEZ, self.adapter_path, interface, member, "o", body,
                             CLOSE_TIMEOUT)
        except Exception as e:  # bluetoothd gone or restarted: nothing left to undo
            log.info("Bluetooth: %s: %s", member, _why(e))

    def _on_signal(self, msg: Message) -> bool:
        """bluetoothd and the adapter going, and Device1 changes: centrals connecting or
        leaving."""
        if msg.message_type != MessageType.SIGNAL:
            return False
        if (msg.sender == BUS_DRIVER and msg.member == "NameOwnerChanged"
                and msg.signature == "sss" and msg.body[0] == BLUEZ):
            # Gone, or handed to another process: either way ours forgot us.
            if self._bluez is not None and msg.body[1] == self._bluez:
                self._bluez_left()
            return False
        if msg.sender != self._bluez or msg.sender is None:
            return False
        if (msg.member == "PropertiesChanged" and msg.interface == PROPERTIES
                and msg.signature == "sa{sv}as" and msg.body[0] == DEVICE
                and msg.path is not None):
            connected = msg.body[1].get("Connected")
            if connected is not None:
                if connected.value:
                    log.info("Bluetooth central %s connected", msg.path)
                else:
                    self._gone(msg.path)
        elif (msg.member == "InterfacesRemoved" and msg.interface == OBJECT_MANAGER
              and msg.signature == "oas"):
            if DEVICE in msg.body[1]:
                self._gone(str(msg.body[0]))
            elif ADAPTER in msg.body[1] and msg.body[0] == self.adapter_path:
                self._adapter_removed()
        return False  # let dbus-fast route it on as usual

    def _gone(self, device: str) -> None:
        if not device.startswith(self.adapter_path + "/"):
            return
        log.info("Bluetooth central %s disconnected", device)
        status = self.control.disconnected(device)
        if status is not None:
            self._status(status)

    def _status(self, status: bytes) -> None:
        if self._bus is not None:
            self.machine_status.send(status)

    def _on_write(self, value: bytes, options: dict[str, Variant]) -> None:
        """WriteValue on the Control Point, from bluetoothd."""
        if not self.control_point.notifying:
            # FTMS 4.16.2: a write before indications are enabled is refused. bumble checks
            # the writer's own CCCD and answers 0xFD (CCCD improperly configured). BlueZ
            # keeps the CCCDs itself and only tells us whether *any* central enabled
            # indications (StartNotify/StopNotify), so a second central is let through
            # when another one subscribed. And bluetoothd maps this error to 0x03 (Write
            # Not Permitted): BlueZ 5.66 (Debian 12, Pi OS bookworm) has no D-Bus error
            # that becomes 0xFD; a 2024 change (bluez/bluez#827) maps
            # org.bluez.Error.ImproperlyConfigured to it, but older ones send 0x0E for it.
            raise DBusError(NOT_PERMITTED, "indications on the control point are not enabled")
        device = options.get("device")
        if device is None:
            # bluetoothd always names the device; without it control cannot be tracked.
            raise DBusError(NOT_PERMITTED, "no device in the write options")
        answer = self.control.write(str(device.value), value)
        if answer.response is None:
            raise DBusError(INVALID_LENGTH, "empty control point request")
        # This runs before dbus-fast sends the method reply, which bluetoothd turns into
        # the ATT Write Response; the indication must follow it (FTMS), so it goes out
        # from the loop's next turn, after the reply is queued.
        assert self._loop is not None
        self._loop.call_soon(self._answer, answer.response, answer.status)

    def _answer(self, response: bytes, status: bytes | None) -> None:
        if self._bus is None:
            return
        # BlueZ indicates a Value change to every central that enabled indications, not
        # only the writer (bumble indicates the writer alone): an FTMS app that sees a
        # response to a request it did not make ignores it.
        self.control_point.send(response)
        if status is not None:
            self.machine_status.send(status)


def _why(e: BaseException) -> str:
    if isinstance(e, DBusError):
        return f"{e.type}: {e.text}" if e.text else e.type
    return str(e) or type(e).__name__
