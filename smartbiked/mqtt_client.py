"""MQTTClient: the Smartbike's documented client class (shared/reference/MQTT-Client.md).

The documented API is kept exactly::

    client = MQTTClient(broker_address, username, password, port)
    client.setup_mqtt_client()
    client.subscribe("example/1")
    client.publish("example/2", payload)
    client.loop_start()          # or client.start_loop(), or client.loop_forever()

and subclasses extend ``on_message(client, userdata, msg)``, calling ``super()``.
Underneath it is paho-mqtt 2.x speaking MQTT v5 at QoS 1 with username/password,
TLS when asked, automatic reconnects, and subscriptions renewed on every connect
(paho never resubscribes by itself). An exception raised by a handler is logged and
never reaches paho, where it would silently stop all message handling.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

try:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
except ImportError as exc:  # Debian's python3-paho-mqtt is 1.6, without CallbackAPIVersion
    raise ImportError(
        "smartbiked needs paho-mqtt 2.x (pip install 'paho-mqtt>=2,<3'); "
        "the installed paho-mqtt is older"
    ) from exc
from paho.mqtt import __version__ as paho_version
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger("smartbiked.mqtt")

#: Messages kept for sending while the broker is away; past this paho drops new ones.
MAX_QUEUED = 1000
#: MQTT v5 reason code "Session taken over": another client connected with our client id.
SESSION_TAKEN_OVER = 0x8E
#: Waits before reconnecting after successive takeovers, seconds (then jittered): a
#: duplicate daemon must not be knocked off once a second forever, and neither must we.
TAKEOVER_BACKOFF = (5.0, 10.0, 20.0, 40.0, 60.0)
#: A connection that lasted this long ends a run of takeovers.
TAKEOVER_RESET_AFTER = 120.0
#: Brokers before MQTT v5's reason 0x8E (mosquitto 2.0.11 among them) just close the
#: socket of the client whose session was taken: this many connections in a row that
#: the broker closed within SHORT_CONNECTION seconds are treated as a takeover too.
SHORT_RUN = 3
SHORT_CONNECTION = 30.0
#: A refused subscription is asked for this many times before the broker is given up.
SUBSCRIBE_TRIES = 2


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Turn off Nagle: a command's small report must not wait for a delayed ACK (40 ms)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not a TCP socket (websockets, unix): nothing to tune


#: Linux's TCP_QUICKACK (12): not in every Python's socket module.
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 12 if sys.platform.startswith("linux") else None)


def _quick_ack(sock: Any) -> None:
    """Acknowledge what was just read at once instead of up to 40 ms later.

    A stock mosquitto leaves Nagle's algorithm on: it holds the next command for us while
    its last small packet (the PUBACK of our report) waits for our delayed ACK. Linux
    leaves quick-ACK mode on its own, so it is asked for again after every read.
    """
    if _TCP_QUICKACK is None or sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
    except (OSError, AttributeError, TypeError):
        pass  # not a TCP socket (TLS wrappers pass it through; websockets, unix do not)


def loop_timeout(keepalive: float) -> float:
    """Seconds the network loop may wait for traffic, for a connection's ``keepalive``.

    Every pass also checks the keep-alive: a quarter of it keeps pings well inside the
    broker's 1.5 keep-alives. No more than 5 s (the watchdog's view of the loop), no
    less than paho's 1 s: an idle bike wakes for nothing in between (each wake costs
    CPU on a Pi that idles for hours).
    """
    return max(1.0, min(5.0, keepalive / 4))


def _set_reconnect_delay(client: mqtt.Client, delay: float) -> None:
    """Make paho wait ``delay`` seconds before each reconnect attempt (no back-off)."""
    # paho annotates the delays as int, but only adds them to monotonic() and compares
    # them: a float works, and the fractional part is the jitter we want.
    client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]


#: The three shortcuts below (_packet_queue, _handle_publish, _handle_pubackcomp) replace
#: private paho methods as paho 2.2 has them; with any other paho, paho's own run.
FAST_PATHS = paho_version.startswith("2.2.")

#: A PUBACK's reason codes (shared, read-only), by value; and its empty properties.
_PUBACK_REASONS: dict[int, ReasonCode] = {}
_NO_PUBACK_PROPERTIES = Properties(PacketTypes.PUBACK)
#: A received PUBLISH's properties when it carries none (shared, read-only).
_NO_PUBLISH_PROPERTIES = Properties(PacketTypes.PUBLISH)


def _puback_reason(value: int) -> ReasonCode | None:
    """The shared ReasonCode of a PUBACK reason value; None if it names none."""
    reason = _PUBACK_REASONS.get(value)
    if reason is None:
        try:
            reason = ReasonCode(PacketTypes.PUBACK, identifier=value)
        except (KeyError, ValueError):
            return None  # not a PUBACK reason: paho decides what that means
        _PUBACK_REASONS[value] = reason
    return reason


class _LivenessClient(mqtt.Client):
    """paho's client, safe to publish from several threads, watched, and telling why it failed.

    With ``loop_forever`` paho writes to the socket from whichever thread publishes,
    unlocked, while the loop thread writes too: two packets could interleave on a
    partial write. Every write goes through :meth:`loop_write`, so one lock there
    serialises them. ``last_pass`` is the time of the loop's latest pass (watchdog);
    ``last_error`` why the latest connect attempt failed.
    """

    last_pass: float = 0.0
    last_error: OSError | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._write_lock = threading.RLock()
        self._loop_thread: int | None = None  # the thread in loop_forever()

    def loop_forever(self, *args: Any, **kwargs: Any) -> MQTTErrorCode:
        self._loop_thread = threading.get_ident()
        try:
            return super().loop_forever(*args, **kwargs)
        finally:
            self._loop_thread = None

    def loop_write(self) -> MQTTErrorCode:
        with self._write_lock:
            if self._loop_thread in (None, threading.get_ident()) or self._sock is None:
                return super().loop_write()
            # Another thread publishing (the outbox hands a message over from whichever
            # thread queued it, which may hold locks of its own): it writes, but a failed
            # write is left to the loop thread. paho would handle it here, calling
            # on_disconnect under its callback lock, which the loop thread holds while a
            # callback waits for the very lock this thread may hold.
            rc = self._packet_write()
            if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
                if self._sockpairW is not None:
                    try:
                        self._sockpairW.send(b"0")  # the loop meets the error itself
                    except BlockingIOError:
                        pass
            return MQTTErrorCode.MQTT_ERR_SUCCESS  # queued: paho resends it if need be

    def _packet_queue(self, command: int, packet: bytes | bytearray, mid: int, qos: int,
                      info: mqtt.MQTTMessageInfo | None = None) -> MQTTErrorCode:
        # paho's own version wakes the loop thread (a byte on its socket pair) for every
        # packet, then writes it at once from the caller's thread anyway: a wasted wake and
        # context switch per message (a PUBACK, each report). Here the loop is woken only
        # when the packet is still waiting after that write, or could not be written (the
        # loop thread is in a callback, or the socket is full): the loop looks at what is
        # waiting before each select(), so nothing else can be left behind.
        if not FAST_PATHS:
            return super()._packet_queue(command, packet, mid, qos, info)
        self._out_packet.append({"command": command, "mid": mid, "qos": qos, "pos": 0,
                                 "to_process": len(packet), "packet": packet, "info": info})
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        if (self._thread is None and self._on_socket_register_write is None
                and self._in_callback_mutex.acquire(False)):
            self._in_callback_mutex.release()
            rc = self.loop_write()
            if not self.want_write():
                return rc
        if self._sockpairW is not None:
            try:
                self._sockpairW.send(b"0")
            except BlockingIOError:
                pass  # a wake is pending already
        self._call_socket_register_write()
        return rc

    def _handle_publish(self) -> MQTTErrorCode:
        # Likewise paho builds a new Properties for every PUBLISH received. One at QoS 0
        # or 1 without properties (a command with no reply address) is decoded here,
        # with shared empty properties (handlers only read them); everything else
        # (properties, QoS 2, manual acks, paho's own logging) is paho's.
        header, packet = self._in_packet["command"], self._in_packet["packet"]
        qos = (header & 0x06) >> 1
        if (not FAST_PATHS or self._protocol != mqtt.MQTTv5 or qos == 2 or self._manual_ack
                or self._logger is not None or self.on_log is not None or len(packet) < 2):
            return super()._handle_publish()
        start = 2 + int.from_bytes(packet[:2], "big")  # past the topic
        props = start + (2 if qos else 0)  # past the packet id: the properties' length
        if len(packet) <= props or packet[props] != 0:
            return super()._handle_publish()  # properties (or a malformed packet)
        message = mqtt.MQTTMessage(mid=int.from_bytes(packet[start:props], "big") if qos else 0,
                                   topic=bytes(packet[2:start]))
        message.dup = bool(header & 0x08)
        message.qos = qos
        message.retain = bool(header & 0x01)
        message.properties = _NO_PUBLISH_PROPERTIES
        message.payload = bytes(packet[props + 1:])
        message.timestamp = mqtt.time_func()
        self._handle_on_message(message)
        if qos == 1:
            return self._send_puback(message.mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        # paho decodes every PUBACK into a new ReasonCode and Properties, and building a
        # Properties costs more than all the rest of an acknowledgement. One without
        # properties (nearly all: two bytes for success, three with a reason code such
        # as "no matching subscribers") gets a shared ReasonCode instead: on_publish only
        # reads it. Anything else is paho's to decode.
        packet = self._in_packet["packet"]
        size = len(packet)
        if (not FAST_PATHS or cmd != "PUBACK" or self._protocol != mqtt.MQTTv5
                or not 2 <= size <= 4
                or (size == 4 and packet[3] != 0)
                or self._logger is not None or self.on_log is not None):
            return super()._handle_pubackcomp(cmd)
        reason = _puback_reason(packet[2] if size > 2 else 0)
        if reason is None:
            return super()._handle_pubackcomp(cmd)
        mid = int.from_bytes(packet[:2], "big")
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, reason, _NO_PUBACK_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    #: Called on the loop thread after each read (see MQTTClient.after_read).
    after_read: Callable[[], None] | None = None

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        try:
            result = super().loop_read(max_packets)
            _quick_ack(self.socket())
        finally:
            if self.after_read is not None:
                self.after_read()
        return result

    def loop_misc(self) -> MQTTErrorCode:
        self.last_pass = time.monotonic()
        return super().loop_misc()

    #: Forget unacknowledged non-retained messages before reconnecting (the daemon:
    #: a reading or a button press from before an outage must not arrive after it).
    drop_transient_on_reconnect = False

    def reconnect(self) -> MQTTErrorCode:
        if self.drop_transient_on_reconnect:
            # paho re-sends every unacknowledged QoS 1 message after the next CONNACK.
            with self._out_message_mutex:
                for mid in [m.mid for m in self._out_messages.values() if not m.retain]:
                    del self._out_messages[mid]
        # paho swallows why a connect failed; keep it so the log can say (TLS, DNS, ...).
        try:
            return super().reconnect()
        except OSError as exc:
            self.last_error = exc
            raise


class MQTTClient:
    """One connection to an MQTT broker, with the small API every Smartbike program uses.

    The keyword-only arguments are extensions beyond the documented four; their
    defaults give the documented behaviour.
    """

    def __init__(
        self,
        broker_address: str,
        username: str,
        password: str,
        port: int = 1883,
        *,
        client_id: str = "",
        keepalive: int = 30,
        tls: bool = False,
        ca_file: str | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        reconnect_max: float = 2.0,
        will: tuple[str, str] | None = None,
        max_packet_size: int | None = None,
        addresses: list[tuple[str, int]] | None = None,
    ) -> None:
        self.broker_address = broker_address
        self.username = username
        self._password = password  # kept private: never in a repr, log or exception
        self.port = port
        self.client_id = client_id
        self.keepalive = keepalive
        self.tls = tls
        self.ca_file = ca_file or None
        self.certfile = certfile or None
        self.keyfile = keyfile or None
        self.reconnect_max = reconnect_max
        self.will = will
        #: The largest packet we accept (MQTT v5 Maximum Packet Size, sent in CONNECT):
        #: the broker drops bigger messages instead of delivering them. None: no limit.
        self.max_packet_size = max_packet_size
        #: What the broker accepts from us (its CONNACK), None when it states no limit.
        self.broker_max_packet: int | None = None
        #: How many unacknowledged QoS 1 messages the broker takes at once (CONNACK).
        self.broker_receive_max = 20
        #: Seconds of reconnect back-off imposed after a session takeover (0: none).
        self.backoff = 0.0
        #: Every broker to use, tried in this order; the first is (broker_address, port).
        #: ``broker_address`` and ``port`` always name the one in use now.
        self.addresses = list(addresses or [(broker_address, port)])
        self.broker_address, self.port = self.addresses[0]
        self.client: _LivenessClient | None = None
        self.connected = threading.Event()
        #: The broker's reason for refusing the latest connect (bad login...), or None.
        self.refused: str | None = None
        self._topics: dict[str, int] = {}
        self._connect_fails = 0
        self._takeovers = 0
        self._short_run = 0
        self._closing = False
        self._switching = False
        self._connect_props: Properties | None = None
        self._suback_pending: dict[int, str] = {}  # SUBSCRIBE mid -> topic, this connection
        self._suback_failures = 0
        self._connected_at = 0.0
        #: Passed to paho's client: see _LivenessClient.drop_transient_on_reconnect.
        self.drop_transient_on_reconnect = False

    def __repr__(self) -> str:
        return f"<MQTTClient {self.username or 'anonymous'}@{self.broker_address}:{self.port}>"

    # -- the documented API ------------------------------------------------------------

    def setup_mqtt_client(self) -> None:
        """Create the paho client and start connecting (the loop completes the connection)."""
        client = _LivenessClient(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5
        )
        if self.username:
            client.username_pw_set(self.username, self._password)
        if self.tls:
            client.tls_set(ca_certs=self.ca_file, certfile=self.certfile, keyfile=self.keyfile)
        if self.will:
            topic, payload = self.will
            client.will_set(topic, payload, qos=1, retain=True)
        self._retry_soon(client)
        client.max_queued_messages_set(MAX_QUEUED)
        client.suppress_exceptions = True  # second belt: our handlers catch everything
        client.on_connect = self._handle_connect
        client.on_connect_fail = self._handle_connect_fail
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.after_read = self._after_read
        client.on_subscribe = self._handle_subscribe
        client.on_publish = self._handle_publish
        client.on_socket_open = _no_delay
        if self.max_packet_size:
            self._connect_props = Properties(PacketTypes.CONNECT)
            self._connect_props.MaximumPacketSize = self.max_packet_size
        client.drop_transient_on_reconnect = self.drop_transient_on_reconnect
        client.connect_async(self.broker_address, self.port, self.keepalive,
                             properties=self._connect_props)
        self.client = client

    def subscribe(self, topic_name: str, qos: int = 1) -> None:
        """Receive messages on ``topic_name``, now and after every reconnect."""
        self._topics[topic_name] = qos
        if self.connected.is_set():
            self._paho().subscribe(topic_name, qos)

    def publish(
        self,
        topic_name: str,
        payload: Any,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> mqtt.MQTTMessageInfo:
        """Send ``payload`` to ``topic_name``; safe from any thread.

        Text and bytes go as they are; anything else (dicts, lists, numbers,
        booleans) is sent as JSON.
        """
        if not isinstance(payload, (str, bytes, bytearray)):
            payload = json.dumps(payload)
        return self._paho().publish(topic_name, payload, qos, retain, properties)

    def on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """Called for each message received; subclasses extend it and call ``super()``."""
        if log.isEnabledFor(logging.DEBUG):  # msg.topic decodes the topic on every access
            log.debug("message on %s (%d bytes)", msg.topic, len(msg.payload))

    def on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                   properties: Any) -> None:
        """Called after each successful connect, once subscriptions are renewed."""

    def on_disconnect(self, reason_code: Any) -> None:
        """Called when an established connection is lost or closed."""

    def on_ready(self) -> None:
        """Called once the broker granted every subscription of a new connection."""

    def on_publish(self, mid: int, reason_code: Any) -> None:
        """Called when the broker acknowledged the QoS 1 message ``mid`` (from the loop)."""

    def after_read(self) -> None:
        """Called on the loop thread after each read from the socket, once the messages it
        carried were handled and acknowledged, just before the loop waits again.

        Work that other threads do for those messages is best handed over here: a thread
        woken earlier would wait for the loop to release the GIL (paho still writes its
        acknowledgements), a context switch more per message.
        """

    def loop_forever(self) -> None:
        """Run the network loop in this thread until :meth:`disconnect`; reconnects as needed."""
        self._paho().loop_forever(timeout=loop_timeout(self.keepalive),
                                  retry_first_connection=True)

    def loop_start(self) -> None:
        """Run the network loop in a background thread."""
        self._paho().loop_start()

    start_loop = loop_start  # the other spelling MQTT-Client.md uses

    def loop_stop(self) -> None:
        """Stop the background network loop."""
        self._paho().loop_stop()

    def disconnect(self) -> None:
        """Close the connection cleanly; makes :meth:`loop_forever` return."""
        self._closing = True
        self._paho().disconnect()

    # -- extensions ----------------------------------------------------------------------

    def is_connected(self) -> bool:
        """True while connected to the broker."""
        return self.connected.is_set()

    def loop_age(self) -> float:
        """Seconds since the network loop last showed it is alive."""
        return time.monotonic() - self._paho().last_pass

    def _paho(self) -> _LivenessClient:
        if self.client is None:
            raise RuntimeError("call setup_mqtt_client() first")
        return self.client

    def _handle_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                        reason_code: Any, properties: Any) -> None:
        self._paho().last_pass = time.monotonic()
        try:
            self._read_connack(properties)
            if reason_code.is_failure:
                # A refused login or certificate shows up as endless reconnects: say why.
                self.refused = str(reason_code)
                log.error("broker %s:%s refused the connection: %s",
                          self.broker_address, self.port, reason_code)
                return
            self._connect_fails = 0
            self._connected_at = time.monotonic()
            if self.backoff:
                self.backoff = 0.0
            self._suback_pending.clear()
            self._suback_failures = 0
            self._switching = False
            for topic, qos in self._topics.items():
                self._subscribe(client, topic, qos)
            self.connected.set()
            log.info("connected to %s:%s", self.broker_address, self.port)
            self.on_connect(client, userdata, flags, reason_code, properties)
            if not self._suback_pending:
                self.on_ready()
        except Exception:
            log.exception("error in on_connect")

    def _subscribe(self, client: mqtt.Client, topic: str, qos: int) -> None:
        result, mid = client.subscribe(topic, qos)
        if mid is not None:
            self._suback_pending[mid] = topic

    def _move_on(self, client: mqtt.Client, why: str, force: bool = False) -> None:
        """Use the next broker: the one in use failed or cannot be reached.

        With a single broker nothing changes, unless ``force``: then the connection is
        dropped and made again (paho's loop reconnects after the usual delay).
        """
        if self._closing or (len(self.addresses) < 2 and not force):
            return
        now = self.addresses.index((self.broker_address, self.port)) if (
            (self.broker_address, self.port) in self.addresses) else -1
        self.broker_address, self.port = self.addresses[(now + 1) % len(self.addresses)]
        log.warning("%s; trying broker %s:%s next", why, self.broker_address, self.port)
        self._switching = True  # the disconnect this causes is not another failure
        # connect_async() from a callback is paho's public way to change the address:
        # it closes the socket, and loop_forever() reconnects to the new one.
        client.connect_async(self.broker_address, self.port, self.keepalive,
                             properties=self._connect_props)

    def _handle_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._paho().last_pass = time.monotonic()
        self._retry_soon(client)
        self._connect_fails += 1
        failed_at = f"{self.broker_address}:{self.port}"
        # Log the first failure and then every tenth, so a long outage does not flood.
        if self._connect_fails == 1 or self._connect_fails % 10 == 0:
            log.warning("cannot reach broker %s:%s (attempt %d): %s; retrying",
                        self.broker_address, self.port, self._connect_fails,
                        self._paho().last_error or "connection failed")
        self._move_on(client, f"cannot reach broker {failed_at}")

    def _handle_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                           reason_code: Any, properties: Any) -> None:
        self._paho().last_pass = time.monotonic()
        was_connected = self.connected.is_set()
        self.connected.clear()
        self._retry_soon(client)
        try:
            if was_connected:
                lasted = time.monotonic() - self._connected_at
                if reason_code == 0 or lasted >= SHORT_CONNECTION:
                    self._short_run = 0
                else:
                    self._short_run += 1
                if getattr(reason_code, "value", reason_code) == SESSION_TAKEN_OVER:
                    self._taken_over(client, "session taken over by another client")
                elif self._short_run >= SHORT_RUN:
                    self._taken_over(client, f"session taken over? the broker closed the "
                                     f"last {self._short_run} connections within "
                                     f"{SHORT_CONNECTION:.0f} s ({reason_code})")
                elif self._switching:
                    self._switching = False
                    log.info("disconnected: moving to broker %s:%s", self.broker_address,
                             self.port)
                else:
                    # Our own disconnect() is routine; anything else is worth a warning.
                    level = logging.INFO if reason_code == 0 else logging.WARNING
                    log.log(level, "disconnected from broker: %s", reason_code)
                    self._move_on(client, f"lost broker {self.broker_address}:{self.port}")
                self.on_disconnect(reason_code)
            elif self.refused:
                self._move_on(client, f"broker {self.broker_address}:{self.port} refused us")
        except Exception:
            log.exception("error in on_disconnect")

    def _taken_over(self, client: mqtt.Client, what: str) -> None:
        """Another client took our session: back off instead of taking it back at once."""
        if time.monotonic() - self._connected_at > TAKEOVER_RESET_AFTER:
            self._takeovers = 0
        delay = TAKEOVER_BACKOFF[min(self._takeovers, len(TAKEOVER_BACKOFF) - 1)]
        self._takeovers += 1
        delay *= random.uniform(1.0, 1.5)  # two fighting daemons fall out of step
        self.backoff = delay
        _set_reconnect_delay(client, delay)
        log.error("broker %s:%s: %s; another client is using the client id %r (a second "
                  "daemon, or another bike configured with the same bike id?); reconnecting "
                  "in %.0f s", self.broker_address, self.port, what, self.client_id, delay)

    def _retry_soon(self, client: mqtt.Client) -> None:
        """The next reconnect attempt after a jittered 50-100 % of ``reconnect_max``.

        No exponential back-off: a bike's broker is on its LAN, and traffic should flow
        within about a second of it coming back however long it was away. The jitter
        keeps a fleet of bikes from reconnecting in lockstep.
        """
        if not self.backoff:
            delay = self.reconnect_max * random.uniform(0.5, 1.0)
            _set_reconnect_delay(client, delay)

    def _read_connack(self, properties: Any) -> None:
        self.broker_max_packet = getattr(properties, "MaximumPacketSize", None)
        self.broker_receive_max = getattr(properties, "ReceiveMaximum", 20) or 20

    def _handle_publish(self, client: mqtt.Client, userdata: Any, mid: int,
                        reason_code: Any, properties: Any) -> None:
        try:
            self.on_publish(mid, reason_code)
        except Exception:
            log.exception("error in on_publish")

    def _handle_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                          reason_codes: Any, properties: Any) -> None:
        try:
            topic = self._suback_pending.pop(mid, None)
            failed = [code for code in reason_codes if code.is_failure]
            if topic is None:
                return
            if not failed:
                if not self._suback_pending:
                    self.on_ready()
                return
            # Connected but deaf would be the worst state: an "online" bike that ignores
            # every command. Ask once more, then give up on this broker.
            self._suback_failures += 1
            log.error("broker %s:%s refused the subscription to %s: %s",
                      self.broker_address, self.port, topic, failed[0])
            if self._suback_failures < SUBSCRIBE_TRIES:
                self._subscribe(client, topic, self._topics.get(topic, 1))
            else:
                self._move_on(client, f"cannot subscribe at {self.broker_address}:{self.port}",
                              force=True)
        except Exception:
            log.exception("error in on_subscribe")

    def _after_read(self) -> None:
        try:
            self.after_read()
        except Exception:
            log.exception("error in after_read")

    def _handle_message(self, client: mqtt.Client, userdata: Any,
                        msg: mqtt.MQTTMessage) -> None:
        try:
            self.on_message(client, userdata, msg)
        except Exception:
            log.exception("error handling a message on %s", msg.topic)
