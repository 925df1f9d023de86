"""bluetoothd's D-Bus side, faked for the BlueZ backend's tests: no radio, no root.

A private ``dbus-daemon`` (started by :func:`private_bus`) stands in for the system bus;
:class:`FakeBluez` owns ``org.bluez`` on it, as bluetoothd does: it exports an adapter
with GattManager1 and LEAdvertisingManager1, reads a registered application's tree
(GetManagedObjects) and advertisement (GetAll) as bluetoothd does, and then plays the
centrals: StartNotify/StopNotify, WriteValue with the writer's ``device`` in the
options, ``org.bluez.Device1`` objects that connect and go away. Every PropertiesChanged
of a characteristic's Value is collected, in arrival order with the method replies, so a
test can tell whether an indication came before or after the write's answer. It also
plays bluetoothd's bad days: an adapter that appears only after the name is taken (as
when bluetoothd starts), an adapter unplugged, an advertisement released, a daemon that
stops answering.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

from dbus_fast import BusType, Message, MessageType, PropertyAccess, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusBool, DBusStr
from dbus_fast.service import ServiceInterface, dbus_property

BLUEZ = "org.bluez"
PROPERTIES = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
CHARACTERISTIC = "org.bluez.GattCharacteristic1"
ADVERTISEMENT = "org.bluez.LEAdvertisement1"
STEP = 5.0  # seconds one exchange on the private bus may take, at most


@contextmanager
def private_bus() -> Iterator[str]:
    """A dbus-daemon of our own (session configuration, a socket in a temp dir)."""
    daemon = shutil.which("dbus-daemon") or "/usr/bin/dbus-daemon"
    where = tempfile.mkdtemp(prefix="sbdbus")  # short: unix socket paths are limited
    proc = subprocess.Popen(
        [daemon, "--session", "--nofork", "--print-address=1",
         f"--address=unix:path={where}/bus"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()  # printed once it listens
        assert address, "dbus-daemon did not start"
        yield address
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(where, ignore_errors=True)


def short_uuid(uuid: str) -> int:
    return int(uuid[4:8], 16)


def unpack(value: Any) -> Any:
    """Variants (at any depth) to plain Python values."""
    if isinstance(value, Variant):
        return unpack(value.value)
    if isinstance(value, dict):
        return {k: unpack(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unpack(v) for v in value]
    return value


class Adapter(ServiceInterface):
    def __init__(self, powered: bool) -> None:
        super().__init__("org.bluez.Adapter1")
        self._powered = powered

    @dbus_property(access=PropertyAccess.READ)
    def Address(self) -> DBusStr:
        return "00:11:22:33:44:55"

    @dbus_property()
    def Powered(self) -> DBusBool:
        return self._powered

    @Powered.setter
    def Powered(self, value: DBusBool) -> None:
        self._powered = value


class Device(ServiceInterface):
    def __init__(self) -> None:
        super().__init__("org.bluez.Device1")
        self.connected = True

    @dbus_property(access=PropertyAccess.READ)
    def Connected(self) -> DBusBool:
        return self.connected


class LoopThread:
    """An asyncio loop on a thread of its own, for a fake bluetoothd beside a threaded
    daemon part (the ``ble`` thread runs its own loop)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = STEP) -> Any:
        """Run ``coro`` on the loop; its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(STEP)
        self.loop.close()


class FakeBluez:
    """``org.bluez`` with one adapter, and the centrals talking to the application.

    ``adapter_late``: the name is taken with no adapter yet, until :meth:`add_adapter`
    (bluetoothd starting: the adapter appears once the kernel answered).
    """

    def __init__(self, address: str, adapter: str = "hci0", *, powered: bool = False,
                 refuse_advertisement: bool = False, adapter_late: bool = False) -> None:
        self.address = address
        self.adapter_path = f"/org/bluez/{adapter}"
        self.adapter = Adapter(powered)
        self.refuse_advertisement = refuse_advertisement
        self.adapter_late = adapter_late
        #: Set: the registration calls are recorded, never answered (a hung bluetoothd).
        self.hung = False
        #: (member, sender, path) of every registration call, in order.
        self.calls: list[tuple[str, str, str]] = []
        #: (sender, path) -> the tree GetManagedObjects gave / the advert's properties.
        self.apps: dict[tuple[str, str], dict[str, Any]] = {}
        self.adverts: dict[tuple[str, str], dict[str, Any]] = {}
        #: ("reply", serial) and ("value", uuid16, bytes), in arrival order.
        self.log: list[tuple[Any, ...]] = []
        self.advertised = asyncio.Event()  # set when an advertisement is registered
        self._values: dict[int, asyncio.Queue[bytes]] = {}
        self._devices: dict[str, Device] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.bus: MessageBus

    async def start(self) -> FakeBluez:
        self.bus = await MessageBus(bus_address=self.address, bus_type=BusType.SESSION).connect()
        self.bus.add_message_handler(self._on_message)
        if not self.adapter_late:
            self.bus.export(self.adapter_path, self.adapter)
        await self.bus.request_name(BLUEZ)
        return self

    def stop(self) -> None:
        """bluetoothd killed: the connection, hence the name, goes at once."""
        self.bus.disconnect()

    async def stopped(self) -> None:
        """:meth:`stop`, returning once the connection is closed."""
        self.bus.disconnect()
        await asyncio.wait_for(self.bus.wait_for_disconnect(), STEP)

    def add_adapter(self) -> None:
        """The adapter appears (InterfacesAdded), as it does after the name is taken."""
        self.bus.export(self.adapter_path, self.adapter)

    async def release(self) -> None:
        """Release every advertisement and forget it, as bluetoothd does when it drops
        them; returns once each owner answered."""
        adverts, self.adverts = list(self.adverts), {}
        for owner, path in adverts:
            reply = await asyncio.wait_for(self.bus.call(Message(
                destination=owner, path=path, interface=ADVERTISEMENT, member="Release")),
                STEP)
            assert reply.message_type == MessageType.METHOD_RETURN, reply.body

    async def remove_adapter(self) -> None:
        """The adapter unplugged, in bluetoothd's order: the adapter object goes
        (InterfacesRemoved), then the advertisements are released; the applications
        registered on it are forgotten."""
        self.bus.unexport(self.adapter_path)
        self.apps.clear()
        await self.release()

    # -- bluetoothd's managers ---------------------------------------------------------------

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type in (MessageType.METHOD_RETURN, MessageType.ERROR):
            self.log.append(("reply", msg.reply_serial))
            return False
        if msg.message_type == MessageType.SIGNAL:
            if (msg.member == "PropertiesChanged" and msg.body[0] == CHARACTERISTIC
                    and "Value" in msg.body[1]):
                uuid16 = self._uuid_of(msg.sender, msg.path)
                value = bytes(msg.body[1]["Value"].value)
                self.log.append(("value", uuid16, value))
                self._values.setdefault(uuid16, asyncio.Queue()).put_nowait(value)
            return False
        if msg.message_type != MessageType.METHOD_CALL or msg.path != self.adapter_path:
            return False
        handler = {
            ("org.bluez.GattManager1", "RegisterApplication"): self._register_app,
            ("org.bluez.GattManager1", "UnregisterApplication"): self._unregister_app,
            ("org.bluez.LEAdvertisingManager1", "RegisterAdvertisement"): self._register_adv,
            ("org.bluez.LEAdvertisingManager1", "UnregisterAdvertisement"):
                self._unregister_adv,
        }.get((msg.interface, msg.member))
        if handler is None:
            return False
        if self.hung:
            self.calls.append((msg.member, msg.sender, msg.body[0]))
            return True  # never answered: the caller's timeout is all it has
        task = asyncio.ensure_future(handler(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _reply(self, msg: Message, error: str | None = None, text: str = "") -> None:
        self.bus.send(Message.new_error(msg, error, text) if error
                      else Message.new_method_return(msg))

    async def _register_app(self, msg: Message) -> None:
        sender, path = msg.sender, msg.body[0]
        self.calls.append((msg.member, sender, path))
        if (sender, path) in self.apps:
            return self._reply(msg, "org.bluez.Error.AlreadyExists", "Already Exists")
        # As bluetoothd: read the whole tree before answering.
        reply = await self.bus.call(Message(destination=sender, path=path,
                                            interface=OBJECT_MANAGER,
                                            member="GetManagedObjects"))
        if reply.message_type == MessageType.ERROR:
            return self._reply(msg, "org.bluez.Error.Failed", "Failed to read the tree")
        self.apps[(sender, path)] = unpack(reply.body[0])
        await self.bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="AddMatch", signature="s",
            body=[f"type='signal',sender='{sender}',interface='{PROPERTIES}',"
                  "member='PropertiesChanged'"]))
        self._reply(msg)

    async def _unregister_app(self, msg: Message) -> None:
        self.calls.append((msg.member, msg.sender, msg.body[0]))
        if self.apps.pop((msg.sender, msg.body[0]), None) is None:
            return self._reply(msg, "org.bluez.Error.DoesNotExist", "Does Not Exist")
        self._reply(msg)

    async def _register_adv(self, msg: Message) -> None:
        sender, path = msg.sender, msg.body[0]
        self.calls.append((msg.member, sender, path))
        if self.refuse_advertisement:
            return self._reply(msg, "org.bluez.Error.NotPermitted",
                               "Maximum advertisements reached")
        reply = await self.bus.call(Message(
            destination=sender, path=path, interface=PROPERTIES, member="GetAll",
            signature="s", body=["org.bluez.LEAdvertisement1"]))
        if reply.message_type == MessageType.ERROR:
            return self._reply(msg, "org.bluez.Error.Failed", "Failed to parse advertisement")
        self.adverts[(sender, path)] = unpack(reply.body[0])
        self._reply(msg)
        self.advertised.set()

    async def _unregister_adv(self, msg: Message) -> None:
        self.calls.append((msg.member, msg.sender, msg.body[0]))
        if self.adverts.pop((msg.sender, msg.body[0]), None) is None:
            return self._reply(msg, "org.bluez.Error.DoesNotExist", "Does Not Exist")
        self._reply(msg)

    # -- the application as bluetoothd sees it ---------------------------------------------------

    @property
    def app(self) -> tuple[str, dict[str, Any]]:
        """(owner, tree) of the one registered application."""
        ((owner, _), tree), = self.apps.items()
        return owner, tree

    @property
    def advert(self) -> dict[str, Any]:
        (props,) = self.adverts.values()
        return props

    def _uuid_of(self, sender: str | None, path: str | None) -> int:
        for (owner, _), tree in self.apps.items():
            if owner == sender and path in tree:
                return short_uuid(tree[path][CHARACTERISTIC]["UUID"])
        return -1

    def char_path(self, uuid16: int) -> str:
        _, tree = self.app
        (path,) = [p for p, ifaces in tree.items() if CHARACTERISTIC in ifaces
                   and short_uuid(ifaces[CHARACTERISTIC]["UUID"]) == uuid16]
        return path

    async def call_char(self, uuid16: int, member: str, signature: str = "",
                        body: list[Any] | None = None) -> tuple[Message, int]:
        """A GattCharacteristic1 method call; (reply, serial)."""
        owner, _ = self.app
        msg = Message(destination=owner, path=self.char_path(uuid16), interface=CHARACTERISTIC,
                      member=member, signature=signature, body=body or [])
        msg.serial = self.bus.next_serial()
        reply = await asyncio.wait_for(self.bus.call(msg), STEP)
        return reply, msg.serial

    async def start_notify(self, uuid16: int) -> None:
        reply, _ = await self.call_char(uuid16, "StartNotify")
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body

    async def stop_notify(self, uuid16: int) -> None:
        reply, _ = await self.call_char(uuid16, "StopNotify")
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body

    async def read(self, uuid16: int) -> bytes:
        reply, _ = await self.call_char(uuid16, "ReadValue", "a{sv}", [{}])
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        return bytes(reply.body[0])

    async def write(self, uuid16: int, value: bytes, device: str) -> tuple[Message, int]:
        """WriteValue as bluetoothd sends it for an ATT Write Request from ``device``."""
        options = {"device": Variant("o", device), "link": Variant("s", "LE"),
                   "type": Variant("s", "request"), "mtu": Variant("q", 247)}
        return await self.call_char(uuid16, "WriteValue", "aya{sv}", [value, options])

    async def next(self, uuid16: int) -> bytes:
        """The next Value notified or indicated on ``uuid16``."""
        return await asyncio.wait_for(self._values.setdefault(uuid16, asyncio.Queue()).get(),
                                      STEP)

    def pending(self, uuid16: int) -> int:
        return self._values.setdefault(uuid16, asyncio.Queue()).qsize()

    # -- centrals --------------------------------------------------------------------------------

    def device_path(self, mac: str) -> str:
        return f"{self.adapter_path}/dev_{mac.replace(':', '_')}"

    def connect(self, mac: str) -> str:
        """A central connects: its Device1 appears (InterfacesAdded), Connected true."""
        path = self.device_path(mac)
        device = self._devices[path] = Device()
        self.bus.export(path, device)
        return path

    def disconnect(self, path: str) -> None:
        """The link drops: Connected goes false (PropertiesChanged), the object stays."""
        device = self._devices[path]
        device.connected = False
        device.emit_properties_changed({"Connected": False})

    def forget(self, path: str) -> None:
        """The device object goes away (InterfacesRemoved), as when a bond is removed."""
        del self._devices[path]
        self.bus.unexport(path)
