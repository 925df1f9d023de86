"""The outbox: every message the daemon publishes passes here, checked and bounded.

Two kinds of message, one first-in first-out line, so an app sees them in the order
they happened:

- **state** (retained: availability, actuator reports, health): coalesced per topic.
  The latest payload wins and is always delivered, so after any burst the retained
  value is the bike's real state. State is sent again after every reconnect.
- **transient** (sensor reports, button events, refusals, replies): bounded in number
  and age; under pressure the oldest are shed and counted. They are never queued
  through an outage: a reading or a brake press delivered late is wrong.

Nothing unchecked reaches paho: a topic or packet the broker would reject (and paho
would then resend after every reconnect, forever) is refused here and logged. Messages
reach paho one at a time and in order, at most the broker's Receive Maximum
unacknowledged, so paho's own queue never fills. The ``outbox`` thread hands them over;
a message queued while the outbox is idle (nothing waiting, nothing under way) is handed
over at once by the thread that queued it instead, which saves a wake and a context
switch per message: most of what a report costs.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from paho.mqtt.client import MQTT_ERR_NO_CONN, MQTT_ERR_SUCCESS
from paho.mqtt.properties import Properties

log = logging.getLogger("smartbiked.outbox")

#: Transient messages waiting at most; past this the oldest is shed.
MAX_WAITING = 256
#: Refusals and replies waiting at most: a flood of bad commands sheds its own oldest
#: answers, not the readings behind them.
MAX_ANSWERS = 32
_ANSWERS = frozenset({"refusals", "replies"})
#: A transient message older than this (seconds) is shed rather than sent: a reading
#: that arrives seconds late misleads more than a missing one.
MAX_AGE = 1.0
#: Our own ceiling on a published packet, whatever the broker allows.
MAX_PACKET = 65536
#: Unacknowledged messages not confirmed within this many seconds are forgotten (the
#: connection that carried them is gone; paho resends or drops them itself).
ACK_TIMEOUT = 30.0
#: While messages wait, the sending thread looks at the line at least this often even
#: unwoken (offline, or at the broker's Receive Maximum): a safety net, never the way a
#: message is meant to leave.
LOOK_AGAIN = 1.0


class Publisher(Protocol):
    """What the outbox needs of the connection (implemented by MQTTClient)."""

    broker_max_packet: int | None
    broker_receive_max: int

    def is_connected(self) -> bool:
        """True while connected."""

    def publish(self, topic_name: str, payload: Any, qos: int = 1, retain: bool = False,
                properties: Properties | None = None) -> Any:
        """Hand one message to paho; returns its MQTTMessageInfo."""


@dataclass
class _Message:
    topic: str
    payload: bytes
    retain: bool
    properties: Properties | None
    kind: str  # the counter a shed message of this kind goes to
    born: float


@dataclass
class Counters:
    """What the outbox did not send, by reason (shown in the health message)."""

    shed: dict[str, int] = field(default_factory=dict)
    offline: int = 0  # transient messages dropped because the broker was away
    refused: int = 0  # failed our checks: never handed to paho
    rejected: int = 0  # the broker answered with a failure reason code

    def as_dict(self) -> dict[str, int]:
        """The counters as flat ``name: count`` pairs."""
        out = {f"{kind}_shed": n for kind, n in sorted(self.shed.items())}
        out["dropped_offline"] = self.offline
        out["publishes_refused"] = self.refused
        out["publishes_rejected"] = self.rejected
        return out


def packet_problem(topic: str, payload: bytes, properties: Properties | None,
                   limit: int) -> str | None:
    """Why a PUBLISH of this topic and payload must not be sent, or None."""
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        return "not a valid topic name"
    try:
        topic_bytes = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return "topic is not valid UTF-8"
    if topic_bytes > 65535:
        return "topic longer than 65535 bytes"
    props = len(properties.pack()) if properties is not None else 1
    # Fixed header (at most 5) + topic length field + topic + packet id + properties.
    size = 5 + 2 + topic_bytes + 2 + props + len(payload)
    if size > limit:
        return f"packet of {size} bytes exceeds the limit of {limit}"
    return None


def encode(payload: Any) -> bytes:
    """Payload bytes: text as UTF-8, bytes as they are, anything else as JSON."""
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode("utf-8")
    return json.dumps(payload).encode("utf-8")


class Outbox:
    """Queues, checks and sends the daemon's messages; every method is safe from any thread.

    ``warn`` logs one problem (the service passes a rate-limited logger).
    """

    def __init__(self, client: Publisher, clock: Callable[[], float] = time.monotonic,
                 max_waiting: int = MAX_WAITING, max_age: float = MAX_AGE) -> None:
        self.client = client
        self.clock = clock
        self.max_waiting = max_waiting
        self.max_age = max_age
        self.counters = Counters()
        # Producers take the lock itself (a C call); the condition only for waits and wakes.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._sleeping = False  # the sending thread waits on the condition
        self._line: deque[str | _Message] = deque()  # a str is a state topic's place
        self._state: dict[str, _Message] = {}  # latest payload of every state topic
        self._queued_state: set[str] = set()  # state topics with a place in the line
        self._transient = 0
        self._answers = 0  # refusals and replies among the transient messages
        self._unacked: dict[int, tuple[float, _Message]] = {}
        # Acks that overtook publish() returning on the outbox thread.
        self._early_acks: set[int] = set()
        # State topics published since the connection came up.
        self._sent_on_link: set[str] = set()
        self._closed = False
        self._in_hand = 0  # taken from the line, not yet handed to paho
        self._direct = False  # a producer is handing a message to paho itself
        self._draining = 0  # threads waiting in drain()
        self._thread: threading.Thread | None = None

    # -- producers ------------------------------------------------------------------------

    def state(self, topic: str, payload: Any, properties: Properties | None = None) -> None:
        """Publish retained state: latest wins, always delivered (again after reconnects)."""
        msg = self._make(topic, payload, True, properties, "state")
        if msg is None:
            return
        with self._lock:
            self._state[topic] = msg
            if topic not in self._queued_state:
                self._queued_state.add(topic)
                self._line.append(topic)
            now = self._take_direct()
            if now is None:
                self._notify()
        if now is not None:
            self._send(now, direct=True)

    def send(self, topic: str, payload: Any, kind: str,
             properties: Properties | None = None) -> None:
        """Publish a transient message; dropped while offline, shed oldest-first when full.

        ``kind`` names its counter: "reports", "events", "refusals", "replies".
        """
        msg = self._make(topic, payload, False, properties, kind)
        if msg is None:
            return
        with self._lock:
            if not self.client.is_connected():
                self.counters.offline += 1
                return
            if kind in _ANSWERS and self._answers >= MAX_ANSWERS:
                self._shed_oldest(_ANSWERS)
            while self._transient >= self.max_waiting:
                self._shed_oldest()
            self._line.append(msg)
            if kind in _ANSWERS:
                self._answers += 1
            self._transient += 1
            now = self._take_direct()
            if now is None:
                self._notify()
        if now is not None:
            self._send(now, direct=True)

    def _take_direct(self) -> _Message | None:
        """With the lock held: the message just queued, taken for its producer to hand to
        paho, when it is the only one and the sending thread is idle; else None."""
        if (len(self._line) != 1 or not self._sleeping or self._in_hand or self._direct
                or self._closed or self._draining):
            return None
        msg = self._take()
        if msg is not None:
            self._direct = True
        return msg

    def _send(self, msg: _Message, direct: bool) -> None:
        """Hand a taken message to paho (never with the lock held), then account for it."""
        try:
            self._publish(msg)
        except Exception:
            log.exception("publishing on %.60r failed", msg.topic)
        finally:
            with self._lock:
                self._in_hand -= 1
                if not self._in_hand:
                    self._early_acks.clear()  # no publish under way: none can be early
                if direct:
                    self._direct = False
                    if self._line or self._draining:
                        self._notify()  # queued meanwhile: the sending thread's now
                else:
                    self._notify()

    def _make(self, topic: str, payload: Any, retain: bool, properties: Properties | None,
              kind: str) -> _Message | None:
        try:
            data = encode(payload)
        except (TypeError, ValueError) as exc:
            self._refuse(topic, f"payload cannot be encoded: {exc}")
            return None
        problem = packet_problem(topic, data, properties, MAX_PACKET)
        if problem:
            self._refuse(topic, problem)
            return None
        return _Message(topic, data, retain, properties, kind, self.clock())

    def _refuse(self, topic: str, problem: str) -> None:
        with self._lock:
            self.counters.refused += 1
        log.error("not publishing on %.60r: %s", topic, problem)

    # -- connection events (paho's loop thread) ----------------------------------------------

    def connected(self) -> None:
        """A (re)connect: every state topic not yet sent on this connection is sent
        again, in its place at the back (one already sent since the CONNACK is not
        repeated: an app would see the same value twice)."""
        with self._lock:
            self._unacked.clear()
            self._early_acks.clear()
            self._requeue(self._sent_on_link)

    def refresh(self) -> None:
        """Send every state topic again (a broker may not have kept a retained message)."""
        with self._lock:
            self._requeue(set())

    def _requeue(self, skip: set[str]) -> None:
        for topic in self._state:
            if topic not in self._queued_state and topic not in skip:
                self._queued_state.add(topic)
                self._line.append(topic)
        self._notify()

    def disconnected(self) -> None:
        """The connection dropped: transient messages waiting are stale; state waits."""
        with self._lock:
            self._sent_on_link.clear()
            kept: deque[str | _Message] = deque()
            for item in self._line:
                if isinstance(item, str):
                    kept.append(item)
                else:
                    self.counters.offline += 1
            self._line = kept
            self._transient = 0
            self._answers = 0
            self._notify()

    def acknowledged(self, mid: int, reason_code: Any = None) -> None:
        """The broker acknowledged ``mid`` (on_publish)."""
        with self._lock:
            entry = self._unacked.pop(mid, None)
            if entry is None and self._in_hand:
                # A publish under way may not have noted its mid yet. Any other unknown
                # mid (from before a reconnect) is forgotten, or it would later pass a new
                # message with the same mid for acknowledged.
                self._early_acks.add(mid)
            if entry is not None and getattr(reason_code, "is_failure", False):
                self.counters.rejected += 1
                log.warning("the broker refused the message on %.60r: %s",
                            entry[1].topic, reason_code)
            # Waking the sending thread for every acknowledgement costs a context switch
            # per message: it waits for one only when the broker's Receive Maximum is
            # reached (and drain() waits for the last one).
            if self._draining or (entry is not None and len(self._unacked) + 1
                                  >= max(1, self.client.broker_receive_max)):
                self._notify()

    # -- the sending thread -------------------------------------------------------------------

    def start(self) -> None:
        """Start the ``outbox`` thread."""
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread after it has handed over what it could."""
        with self._lock:
            self._closed = True
            self._notify()

    def drain(self, timeout: float) -> bool:
        """Wait until everything waiting is sent and acknowledged; False on timeout."""
        deadline = self.clock() + timeout
        with self._lock:
            self._draining += 1
            try:
                while self._line or self._unacked or self._in_hand:
                    left = deadline - self.clock()
                    if left <= 0 or not self.client.is_connected():
                        return False
                    self._cond.wait(min(left, 0.1))
            finally:
                self._draining -= 1
        return True

    def pending(self) -> int:
        """Messages waiting or unacknowledged (tests, health)."""
        with self._lock:
            return len(self._line) + len(self._unacked)

    def _notify(self) -> None:
        # Called with the lock held. A wake nobody waits for is skipped: one per message
        # adds up.
        if self._sleeping or self._draining:
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            msg = self._next()
            if msg is None:
                return
            self._send(msg, direct=False)

    def _next(self) -> _Message | None:
        """Block until a message may be sent; None once closed."""
        with self._lock:
            while True:
                if self._closed and not self._line:
                    return None
                if not self._direct:  # else one is under way: this one must follow it
                    msg = self._take()
                    if msg is not None:
                        return msg
                self._sleeping = True
                try:
                    # Nothing waiting: nothing to look at until a producer wakes it
                    # (an idle bike wakes no thread for nothing).
                    self._cond.wait(LOOK_AGAIN if self._line or self._unacked else None)
                finally:
                    self._sleeping = False

    def _take(self) -> _Message | None:
        """With the lock held: the next message that may be sent now (counted in hand)."""
        room = max(1, self.client.broker_receive_max)
        if len(self._unacked) >= room:
            self._expire_unacked()  # only what is stuck at the limit matters
        while self._line and self.client.is_connected() and len(self._unacked) < room:
            item = self._line.popleft()
            if isinstance(item, str):
                self._queued_state.discard(item)
                self._in_hand += 1
                return self._state[item]
            self._transient -= 1
            if item.kind in _ANSWERS:
                self._answers -= 1
            if self.clock() - item.born > self.max_age:
                self._count_shed(item.kind)
                continue
            self._in_hand += 1
            return item
        return None

    def _publish(self, msg: _Message) -> None:
        # Never called with the lock held: paho calls acknowledged() holding its own lock.
        limit = min(MAX_PACKET, self.client.broker_max_packet or MAX_PACKET)
        # Checked against MAX_PACKET when queued: again only for a broker allowing less.
        problem = (packet_problem(msg.topic, msg.payload, msg.properties, limit)
                   if limit < MAX_PACKET else None)
        if problem:
            self._refuse(msg.topic, f"{problem} (the broker's Maximum Packet Size)")
            return
        info = self.client.publish(msg.topic, msg.payload, 1, msg.retain, msg.properties)
        with self._lock:
            if info.rc == MQTT_ERR_SUCCESS and msg.retain:
                self._sent_on_link.add(msg.topic)
            if info.rc in (MQTT_ERR_SUCCESS, MQTT_ERR_NO_CONN):
                # NO_CONN: the connection dropped just now; paho keeps a QoS 1 message
                # and sends it after the reconnect.
                if info.mid in self._early_acks:
                    self._early_acks.discard(info.mid)  # acknowledged before we got here
                else:
                    self._unacked[info.mid] = (self.clock(), msg)
                return
            # Queue full or another refusal: state is put back to be sent again later.
            if msg.retain and msg.topic not in self._queued_state:
                self._queued_state.add(msg.topic)
                self._line.append(msg.topic)
            else:
                self._count_shed(msg.kind)
        log.warning("paho refused the message on %.60r (rc %s)", msg.topic, info.rc)

    def _expire_unacked(self) -> None:
        now = self.clock()
        for mid in [m for m, (t, _) in self._unacked.items() if now - t > ACK_TIMEOUT]:
            del self._unacked[mid]

    def _shed_oldest(self, kinds: frozenset[str] | None = None) -> None:
        """Drop the oldest waiting transient message (of one of ``kinds``, if given)."""
        for i, item in enumerate(self._line):
            if not isinstance(item, str) and (kinds is None or item.kind in kinds):
                del self._line[i]
                self._transient -= 1
                if item.kind in _ANSWERS:
                    self._answers -= 1
                self._count_shed(item.kind)
                return

    def _count_shed(self, kind: str) -> None:
        self.counters.shed[kind] = self.counters.shed.get(kind, 0) + 1
        # The log's flood guard turns a burst of these into one line with a count.
        log.warning("outbox under pressure: shed the oldest waiting message (%s)", kind)
