"""The daemon: wires the config, the MQTT connection, the hardware thread and systemd.

Threads: the main thread runs paho's ``loop_forever`` (every MQTT callback runs
there); the ``hardware`` thread (:class:`smartbiked.bike.Bike`) owns every pin and
port; the ``outbox`` thread (:class:`smartbiked.outbox.Outbox`) hands paho the
messages queued while another was waiting (the rest go from the thread that queued
them); a ``signals`` thread turns SIGTERM/SIGINT/SIGHUP into a clean
stop or a reload (paho must not be called from a signal handler); a ``watchdog``
thread pings systemd only while both loops show life; a ``housekeeping`` thread
publishes the health message and the log flood guard's summaries; with ``[ble]``
enabled, a ``ble`` thread (:class:`smartbiked.ble.radio.Radio`) runs the Bluetooth
smart trainer, whose Control Point requests come back through :meth:`Service.command`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import queue
import random
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from paho.mqtt.client import MQTTMessage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from smartbiked import __version__, homeassistant, logs, runtime
from smartbiked import config as configuration
from smartbiked.bike import Bike
from smartbiked.ble.control import FTMS_TOPICS
from smartbiked.ble.radio import Radio
from smartbiked.coach import TRAINER_TOPICS, Coach
from smartbiked.errors import EX_CONFIG, ConfigError
from smartbiked.hardware import Hardware
from smartbiked.hardware.gpio import check_pin_factory
from smartbiked.mqtt_client import MQTTClient
from smartbiked.notify import notify, watchdog_period
from smartbiked.outbox import Outbox
from smartbiked.topics import (
    TOPICS,
    Command,
    Refusal,
    applied_payload,
    availability_topic,
    control_filter,
    correlation_problem,
    parse_command,
    reply_topic_problem,
    report_payload,
    topic_path,
)

log = logging.getLogger("smartbiked.service")
#: SIGHUP's number, or -1 where there is none (Windows).
_SIGHUP: int = getattr(signal, "SIGHUP", -1)

#: Payloads of the retained availability topic. The Last Will says "lost", so an app
#: can tell a crash or a cut cable ("lost") from an operator's stop ("offline").
ONLINE, OFFLINE, LOST = "online", "offline", "lost"
#: The hardware thread must have shown life within max(this, the ping period) seconds
#: for a watchdog ping. It wakes every second; acknowledgement waits happen on the
#: boards' own threads, so only a stuck hardware thread withholds the ping.
HARDWARE_STALE = 3.0
#: Without a systemd watchdog nobody reads the hardware thread's heartbeat: it sleeps
#: up to this long when nothing is due.
IDLE_SLEEP = 60.0
#: The health message goes out on a change, but at most this often (seconds)...
HEALTH_MIN_INTERVAL = 2.0
#: ...and at least this often, so its uptime and counters stay current.
HEALTH_MAX_INTERVAL = 60.0
#: How often the log flood guard's summaries are written.
FLUSH_INTERVAL = 10.0
#: Retained state (availability, actuators, health) is sent again this often: a broker
#: may confirm a retained publish it did not keep (a cluster node, a restart).
STATE_REFRESH = 300.0


def health_topic(bike_id: str) -> str:
    """The retained topic carrying the daemon's health (drivers, counters, version)."""
    return f"bike/{bike_id}/health"


@dataclass(frozen=True)
class Reply:
    """Where an MQTT v5 request wants its answer (ResponseTopic + CorrelationData)."""

    topic: str
    correlation: bytes | None

    @classmethod
    def of(cls, msg: MQTTMessage) -> Reply | None:
        """The reply address a message asks for, or None."""
        props = getattr(msg, "properties", None)
        topic = getattr(props, "ResponseTopic", None)  # absent properties raise AttributeError
        if not topic:
            return None
        return cls(topic, getattr(props, "CorrelationData", None))

    def problem(self, namespaces: tuple[str, ...]) -> str | None:
        """Why answers cannot be sent here (outside ``namespaces``, too big...), or None."""
        return (reply_topic_problem(self.topic, namespaces)
                or correlation_problem(self.correlation))


def failover_order(addresses: Sequence[tuple[str, int]], bike_id: str) -> list[tuple[str, int]]:
    """The bike's own order of its brokers: the same on every start, different per bike,
    so the bikes of a broker that fails spread over the others."""
    order = list(addresses) or []
    random.Random(f"smartbiked-{bike_id}").shuffle(order)
    return order


class BikeConnection(MQTTClient):
    """The daemon's single MQTT connection: the documented client, told about the service."""

    def __init__(self, service: Service) -> None:
        cfg, broker = service.config, service.config.broker
        super().__init__(
            broker.host, broker.username, broker.password, broker.port,
            client_id=broker.client_id, keepalive=broker.keepalive, tls=broker.tls,
            ca_file=broker.ca_file, certfile=broker.certfile, keyfile=broker.keyfile,
            reconnect_max=broker.reconnect_max,
            will=(availability_topic(cfg.bike_id), LOST),
            max_packet_size=broker.max_packet_size,
            addresses=failover_order(broker.addresses, cfg.bike_id),
        )
        self.service = service
        self.drop_transient_on_reconnect = True

    def on_ready(self) -> None:
        # Only once the broker granted the control subscription: "online" means listening.
        self.service.connected()

    def on_disconnect(self, reason_code: Any) -> None:
        self.service.disconnected()

    def on_publish(self, mid: int, reason_code: Any) -> None:
        self.service.outbox.acknowledged(mid, reason_code)

    def on_message(self, client: Any, userdata: Any, msg: MQTTMessage) -> None:
        super().on_message(client, userdata, msg)
        self.service.handle_control(msg)

    def after_read(self) -> None:
        self.service.hand_over()


class Service:
    """One bike's daemon; also the :class:`smartbiked.bike.Outbox` of its hardware thread."""

    def __init__(self, config: configuration.Config, hardware: Hardware) -> None:
        self.config = config
        self.limits = config.control_limits()
        self.bike = Bike(config, hardware, self)
        self.client = BikeConnection(self)
        self.outbox = Outbox(self.client)
        #: When an MQTT app last sent an FTMS-like command (resistance, incline,
        #: targetpower, grade), on the monotonic clock: it holds control for a while.
        self._mqtt_commanded = -math.inf
        self._health_due = threading.Event()
        self.radio = self._make_radio(config)
        self.coach = self._make_coach(config)
        self.started = time.monotonic()
        self.reconnects = -1  # the first connect is not a reconnect
        self.reload_state: runtime.ReloadState | None = None
        self._drivers: dict[str, tuple[str, str | None]] = {}
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._exit_status = 0
        # Commands parsed on the loop thread, not yet handed to the hardware thread.
        self._arrived: list[tuple[Command, Reply | None]] = []

    def _make_coach(self, config: configuration.Config) -> Coach | None:
        # A reload does not take control from a Bluetooth app that holds it.
        held = self.radio is not None and self.radio.control.controller is not None
        return Coach.create(config, lambda command: self.bike.submit(command, None),
                            self.outbox.state, "bluetooth" if held else "mqtt")

    def _make_radio(self, config: configuration.Config) -> Radio | None:
        if not config.ble.enabled:
            return None
        radio = Radio(config.ble, config.ble.limits(self.limits), self.bluetooth_command,
                      self._bluetooth_control, name=config.ble_name, seed=config.bike_id,
                      may_take=self._bluetooth_may_take, on_change=self._health_due.set)
        self.bike.on_revolutions = radio.revolutions
        return radio

    def _offline_too_long(self) -> bool:
        since = self.bike.offline_since
        return since is not None and time.monotonic() - since >= self.config.offline_safe_after

    # -- lifecycle ----------------------------------------------------------------------

    def run(self, install_signals: bool = True) -> int:
        """Start everything and serve until SIGTERM/SIGINT; return the exit status.

        ``install_signals=False`` lets a test run the service on another thread and
        stop it with :meth:`shutdown`.
        """
        cfg = self.config
        if install_signals:
            # The handler only queues: paho is not reentrant, so the work happens on a thread.
            # Windows has no SIGHUP (a virtual bike there reloads by restarting).
            for signum in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)):
                if signum is None:
                    continue
                signal.signal(signum, lambda n, _frame: self._signals.put(n))
        notify("STATUS=opening hardware")
        for warning in cfg.warnings:
            log.warning("%s", warning)
        self.client.setup_mqtt_client()
        self.client.subscribe(control_filter(cfg.bike_id))
        if cfg.homeassistant.enabled:
            self.client.subscribe(homeassistant.status_topic(cfg.homeassistant))
            self._announce_to_homeassistant()
        self.outbox.start()
        self.bike.offline_since = time.monotonic()
        self.bike.start()
        broken = f", {len(self.bike.failed)} failed" if self.bike.failed else ""
        log.info("bike %s: %d drivers running%s", cfg.bike_id, len(self.bike.drivers), broken)
        notify("READY=1", f"STATUS=connecting to {cfg.broker.host}:{cfg.broker.port}")
        for target, name in ((self._handle_signals, "signals"), (self._watchdog, "watchdog"),
                             (self._housekeeping, "housekeeping")):
            threading.Thread(target=target, name=name, daemon=True).start()
        if self.coach is not None:
            self.coach.start(self._offline_too_long)
        if self.radio is not None:
            self.radio.start()
        try:
            self.client.loop_forever()
        except Exception:
            log.exception("MQTT loop failed")
            self.bike.stop()
            return 1
        finally:
            self._stopped.set()
        log.info("stopped")
        return self._exit_status

    def _handle_signals(self) -> None:
        while True:
            signum = self._signals.get()
            try:
                if signum == _SIGHUP:
                    # However many SIGHUPs a burst brought, one reload reads the file as
                    # it is now; one arriving during that reload causes one more.
                    signum = self._coalesce_reloads()
                    self.reload()
                    if signum == _SIGHUP:
                        continue
                log.info("%s received: stopping", signal.Signals(signum).name)
                self.shutdown()
                # A connect that was in flight may still succeed after disconnect();
                # connected() then disconnects again, and so does this loop.
                while not self._stopped.wait(2.0):
                    self.client.disconnect()
                return
            except Exception:
                log.exception("handling signal %d failed", signum)

    def _coalesce_reloads(self) -> int:
        """Take every signal already queued; the last one that is not SIGHUP, or SIGHUP."""
        result: int = _SIGHUP
        while True:
            try:
                signum = self._signals.get_nowait()
            except queue.Empty:
                return result
            if signum != _SIGHUP:
                result = signum

    def shutdown(self) -> None:
        """Actuators to safe values, say offline, disconnect: loop_forever then returns."""
        notify("STOPPING=1", "STATUS=stopping: actuators to safe values")
        self._stopping.set()
        if self.radio is not None:
            # Asked only: _stopping already refuses its commands, and a hung bluetoothd
            # must not hold up the safe values. Waited for below.
            self.radio.stop(timeout=0)
        if self.coach is not None:
            self.coach.release("stopping")
            self.coach.stop()
        if not self.bike.stop():
            log.error("the hardware thread did not finish: actuators may not be safe")
            self._exit_status = 1
        self.outbox.state(availability_topic(self.config.bike_id), OFFLINE)
        # The safe values' reports and "offline" first; if the broker went away
        # meanwhile, the will says "lost" instead.
        self.outbox.drain(timeout=1.5)
        self.outbox.close()
        if self.radio is not None:
            self.radio.stop(timeout=2.0)
        self.client.disconnect()
        handlers = logging.getLogger().handlers
        guard = logs.flood_guard(handlers[0]) if handlers else None
        if guard is not None:
            guard.flush(final=True)  # what a flood held back is said before the exit

    def reload(self) -> bool:
        """Re-read the config file; keep the running one when the new one is invalid.

        Returns True once the new settings are in force. The outcome is also written
        for ``smartbiked --reload`` (systemd's ExecReload) to pick up.
        """
        notify("RELOADING=1", "STATUS=reloading configuration")
        ok, status, details = self._reload()
        if self.reload_state is not None:
            self.reload_state.done(ok, f"{status}: {details}" if details else status)
        notify("READY=1", f"STATUS={status}")
        return ok

    def _reload(self) -> tuple[bool, str, str]:
        """(applied, a status line for systemd, details for ``--reload``)."""
        old = self.config
        try:
            new = configuration.load(old.path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("%s", problem)
            log.error("new configuration is invalid: keeping the running one")
            return (False, "reload refused: configuration invalid",
                    "; ".join(str(p) for p in exc.problems))
        if (new.bike_id, new.broker, new.device_name, new.ble) != (
                old.bike_id, old.broker, old.device_name, old.ble):
            log.warning("bike id, device name, [broker] and [ble] changes take effect on "
                        "restart")
            new = dataclasses.replace(new, bike_id=old.bike_id, broker=old.broker,
                                      device_name=old.device_name, ble=old.ble)
        if new == old:
            log.info("reloaded %s: nothing changed", new.path)
            return True, "configuration reloaded", "nothing changed"
        bluetooth_mode = False
        if self.coach is not None:
            bluetooth_mode = self.coach.mode_owner() == "bluetooth"
            self.coach.release("configuration reloaded")
            self.coach.stop()
        self.config = new
        self.limits = new.control_limits()
        if self.radio is not None:
            self.radio.control.limits = new.ble.limits(self.limits)
        self.coach = self._make_coach(new)
        if self.coach is not None:
            self.coach.start(self._offline_too_long)
        if bluetooth_mode and self.radio is not None:
            # Its ERG or simulation was left: the app must hear so and ask again, not
            # believe it still runs.
            self.radio.control_lost("configuration reloaded: ask for control again")
        if self.bike.reload(new) is False:
            log.error("the hardware thread did not apply the new configuration in time")
            return False, "reload not confirmed", "the hardware thread did not answer in time"
        log.info("reloaded %s", new.path)
        self._health_due.set()
        return True, "configuration reloaded", ""

    def _watchdog(self) -> None:
        period = watchdog_period()
        if period is None:
            self.bike.max_sleep = IDLE_SLEEP
            return
        mqtt_stale = self.config.broker.reconnect_max + 15.0  # a slow connect attempt included
        hardware_stale = max(HARDWARE_STALE, period)
        # Three heartbeats per stale period: a busy machine may delay one.
        self.bike.max_sleep = hardware_stale / 3
        complained = False
        while not self._stopped.wait(period):
            healthy = (self.bike.alive(hardware_stale)
                       and self.client.loop_age() < mqtt_stale)
            if healthy:
                notify("WATCHDOG=1")
                complained = False
            elif not complained:
                stuck = "hardware thread" if not self.bike.alive(hardware_stale) else "MQTT loop"
                log.error("the %s is stuck: withholding the watchdog ping", stuck)
                complained = True

    # -- MQTT side ------------------------------------------------------------------------

    def connected(self) -> None:
        """The connection is up: say online, let the hardware know."""
        if self._stopping.is_set():
            self.client.disconnect()  # the connect raced a stop: do not claim to be online
            return
        self.bike.offline_since = None
        self.reconnects += 1
        self.outbox.state(availability_topic(self.config.bike_id), ONLINE)
        self.outbox.connected()
        self._health_due.set()
        notify(f"STATUS=connected to {self.client.broker_address}:{self.client.port}")

    def disconnected(self) -> None:
        """The connection dropped: paho reconnects; the hardware starts counting."""
        self.bike.offline_since = time.monotonic()
        self.outbox.disconnected()
        notify(f"STATUS=reconnecting to {self.client.broker_address}:{self.client.port}")

    def handle_control(self, msg: MQTTMessage) -> None:
        """Parse a control message; refuse it or hand it to the hardware thread."""
        ha = self.config.homeassistant
        if ha.enabled and msg.topic == homeassistant.status_topic(ha):
            if bytes(msg.payload) == b"online":  # Home Assistant restarted: tell it again
                self._announce_to_homeassistant()
            return
        if msg.retain:
            # Retained commands replay on every subscribe: a stale one must not move a motor.
            log.warning("ignoring a retained command on %.80s", msg.topic)
            return
        result = parse_command(msg.topic, bytes(msg.payload), self.config.bike_id, self.limits)
        reply = Reply.of(msg)
        bad_reply = reply.problem(self.config.broker.reply_topics) if reply else None
        if bad_reply:
            # Answering there could move another bike's motor or forge a reading: refuse
            # the whole command, and say why on the status topic only.
            reply = None
            if isinstance(result, Command):
                result = Refusal(result.topic, bad_reply, self.limits.get(result.topic))
        if (isinstance(result, Command) and result.topic in FTMS_TOPICS
                and self.radio is not None):
            # One controller at a time, and an MQTT app (the game, an operator) always
            # gets it: a Bluetooth app holding control is told Control Permission Lost
            # (its ERG or simulation is left) before this command runs.
            self._mqtt_commanded = time.monotonic()
            try:
                self.radio.control_lost(f"an MQTT app sent a {result.topic} command")
            except Exception:  # the MQTT command must run whatever Bluetooth does
                log.exception("revoking Bluetooth control failed")
        self.command(result, reply)

    def hand_over(self) -> None:
        """Give the hardware thread the MQTT commands parsed since the last read (loop
        thread only). Called by the connection after each read, in the order they came.
        """
        if not self._arrived:
            return
        arrived, self._arrived = self._arrived, []
        for command, reply in arrived:
            if self.coach is not None:
                self.coach.app_command(command)
            self.bike.submit(command, reply)

    def command(self, result: Command | Refusal, reply: Reply | None = None,
                source: str = "mqtt") -> str | None:
        """Refuse or carry out a parsed command from ``source`` ("mqtt" or "bluetooth"):
        None when taken, else the reason (also said on the topic's status and to
        ``reply``)."""
        replies = [reply] if reply else []
        if isinstance(result, Refusal):
            self._refuse(result, replies)
            return result.reason
        if result.topic in TRAINER_TOPICS:
            if source == "mqtt":
                # The coach hears of commands in their order: an app's resistance before
                # this target power leaves ERG before this enters it, not after.
                self.hand_over()
            return self._coach_command(result, replies, source)
        if source == "mqtt":
            # On paho's loop thread: handed over once paho has acknowledged it (after
            # the read); the hardware thread would only wait for the GIL meanwhile.
            self._arrived.append((result, reply))
            return None
        if self.coach is not None:
            self.coach.app_command(result)
        self.bike.submit(result, reply)
        return None

    def bluetooth_command(self, topic: str, payload: bytes) -> str | None:
        """A Control Point request as the JSON command an MQTT app would send on
        ``topic``: the same parsing, limits and path (see :class:`Radio`)."""
        bike_id = self.config.bike_id
        if self._stopping.is_set():
            return "the bike is stopping"
        # The Bluetooth limits again, not only the Control Point's: the incline stays
        # out of reach unless [ble] incline says otherwise, whatever asks for it.
        return self.command(parse_command(topic_path(bike_id, topic, "control"), payload,
                                          bike_id, self.config.ble.limits(self.limits)),
                            source="bluetooth")

    def _bluetooth_may_take(self) -> str | None:
        """Why a Bluetooth app may not take control now: an MQTT app holds the bike."""
        hold = self.config.ble.mqtt_hold
        if time.monotonic() - self._mqtt_commanded < hold:
            return f"an MQTT app commanded the bike in the last {hold:g} s"
        coach = self.coach
        if coach is not None and coach.mode_owner() == "mqtt":
            return "an MQTT app's ERG or simulation is running"
        return None

    def _bluetooth_control(self, controller: str | None, reason: str) -> None:
        """Bluetooth control changed hands: the mode report and health say so; a mode
        the app set is left when it lets go (resistance holds)."""
        log.info("Bluetooth control: %s (%s)", controller or "released", reason)
        if self.coach is not None:
            self.coach.set_controller("mqtt" if controller is None else "bluetooth",
                                      release=reason if controller is None else None)
        self._health_due.set()

    def _coach_command(self, command: Command, replies: list[Reply],
                       source: str = "mqtt") -> str | None:
        # A grade from Bluetooth tilts the frame only with [ble] incline.
        tilt = source != "bluetooth" or self.config.ble.incline
        why = (self.coach.command(command, source, tilt=tilt) if self.coach is not None
               else "this bike has no trainer ([trainer] enabled = false)")
        if why is not None:
            self._refuse(Refusal(command.topic, why, self.limits.get(command.topic)), replies)
            return why
        body = applied_payload(command.value, time.time(), self.config.device_name)
        for each in replies:
            self._answer(each, body)
        return None

    def _announce_to_homeassistant(self) -> None:
        """MQTT discovery for Home Assistant: retained, and sent again after reconnects."""
        for topic in homeassistant.stale_topics(self.config):
            self.outbox.state(topic, b"")
        for topic, payload in homeassistant.discovery(self.config):
            self.outbox.state(topic, payload)

    def _refuse(self, refusal: Refusal, replies: list[Reply]) -> None:
        # The topic level comes from the sender: only a short prefix is logged.
        name = (refusal.topic or "")[:40]
        log.warning("%.40s: command refused: %.200s", name, refusal.reason,
                    extra={"TOPIC": name})
        body = refusal.payload(time.time(), self.config.device_name)
        spec = TOPICS.get(refusal.topic or "")
        if spec is not None and spec.kind in ("actuator", "virtual"):
            # Only a topic that takes commands has refusals on its status topic: a
            # sensor's carries its health, an unknown name is nobody's.
            self.outbox.send(topic_path(self.config.bike_id, spec.name, "status"), body,
                             "refusals")
        for reply in replies:
            self._answer(reply, body)

    def _answer(self, reply: Reply, body: dict[str, Any]) -> None:
        props = Properties(PacketTypes.PUBLISH)
        if reply.correlation is not None:
            props.CorrelationData = reply.correlation
        self.outbox.send(reply.topic, body, "replies", properties=props)

    # -- the hardware thread's outbox -------------------------------------------------------

    def report(self, topic: str, value: float, *, sensor: bool) -> None:
        """Publish a value on the topic's report sub-topic."""
        if self.coach is not None:
            self.coach.reading(topic, value)
        if self.radio is not None:
            self.radio.reading(topic, value)
        spec = TOPICS[topic]
        if spec.decimals is not None:
            value = round(value, spec.decimals)
        body = report_payload(value, spec.unit, time.time(), self.config.device_name)
        where = topic_path(self.config.bike_id, topic, "report")
        if sensor:
            # Never queued through an outage: a reading that late is stale.
            self.outbox.send(where, body, "reports")
        else:
            # An actuator's report is its state: retained, so an app that starts later
            # sees it, and coalesced, so after any burst it is the actuator's real value.
            self.outbox.state(where, body)

    def event(self, topic: str, payload: dict[str, Any]) -> None:
        """Publish an event (a button press) on the topic's report sub-topic."""
        # Dropped while offline: a brake press delivered after an outage would steer a
        # game wrongly.
        self.outbox.send(topic_path(self.config.bike_id, topic, "report"), payload, "events")

    def outcome(self, command: Command, replies: list[Any], value: float | None,
                error: str | None) -> None:
        """Answer requesters; a failure is also published on the status topic."""
        if error is not None or value is None:
            why = error or "not applied"
            self._refuse(Refusal(command.topic, why, self.limits.get(command.topic)), replies)
            return
        if replies:
            body = applied_payload(value, time.time(), self.config.device_name)
            for reply in replies:
                self._answer(reply, body)
        if not self._health_due.is_set():  # set() takes a lock: once per health message
            self._health_due.set()  # counters (coalesced commands) may have moved


    def driver_state(self, topic: str, state: str, reason: str | None) -> None:
        """A driver's state changed (health message; a sensor's status topic)."""
        previous = self._drivers.get(topic)
        self._drivers[topic] = (state, reason)
        self._health_due.set()
        if previous is None and state == "running":
            return  # the ordinary start: nothing to tell
        if previous is not None and previous[0] == state:
            return
        if TOPICS.get(topic) is not None and TOPICS[topic].kind == "sensor":
            body: dict[str, Any] = {"ok": state == "running", "state": state}
            if reason:
                body["error"] = reason
            body["timestamp"] = time.time()
            body["metadata"] = {"deviceName": self.config.device_name}
            self.outbox.send(topic_path(self.config.bike_id, topic, "status"), body, "status")
            log.log(logging.INFO if state == "running" else logging.WARNING,
                    "%s: sensor %s%s", topic, state, f" ({reason})" if reason else "",
                    extra={"TOPIC": topic})

    # -- health ---------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """The health message: each topic's driver state, counters, version, uptime."""
        drivers: dict[str, dict[str, str]] = {}
        states = dict(self._drivers)
        for topic in list(self.bike.drivers):
            states.setdefault(topic, ("running", None))
        for topic, why in list(self.bike.failed.items()):
            states.setdefault(topic, ("failed", why))
        for topic, (state, reason) in sorted(states.items()):
            drivers[topic] = {"state": state, **({"reason": reason} if reason else {})}
        counters = self.outbox.counters.as_dict()
        snapshot = getattr(self.bike, "counters_snapshot", None)
        if snapshot is not None:
            counters.update(snapshot())
        body = {"version": __version__, "uptime": round(time.monotonic() - self.started, 1),
                "broker": f"{self.client.broker_address}:{self.client.port}",
                "reconnects": max(0, self.reconnects), "drivers": drivers,
                "counters": counters}
        if self.radio is not None:
            body["bluetooth"] = self.radio.health()
        return {**body, "timestamp": time.time(),
                "metadata": {"deviceName": self.config.device_name}}

    def _housekeeping(self) -> None:
        while not self._stopping.is_set():
            try:
                self._housekeep()
            except Exception:
                # Health, the flood guard's counts and the state refresh must not end
                # with one bad pass.
                log.exception("housekeeping failed")
                self._stopping.wait(FLUSH_INTERVAL)

    def _housekeep(self) -> None:
        guard = logs.flood_guard(logging.getLogger().handlers[0]) if (
            logging.getLogger().handlers) else None
        last = -HEALTH_MAX_INTERVAL
        refreshed = time.monotonic()
        while not self._stopping.is_set():
            due = self._health_due.wait(FLUSH_INTERVAL)
            if guard is not None:
                guard.flush()
            if time.monotonic() - refreshed >= STATE_REFRESH:
                refreshed = time.monotonic()
                self.outbox.refresh()  # every state topic again
            if self._stopping.is_set():
                return
            if not due and time.monotonic() - last < HEALTH_MAX_INTERVAL:
                continue
            wait = last + HEALTH_MIN_INTERVAL - time.monotonic()
            if wait > 0 and self._stopping.wait(wait):
                return
            self._health_due.clear()
            last = time.monotonic()
            self.outbox.state(health_topic(self.config.bike_id), self.health())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smartbiked", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=str, default=str(configuration.DEFAULT_PATH),
                        help="the bike's TOML file (default: %(default)s)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config file and exit (78 if invalid)")
    parser.add_argument("--simulate", action="store_true",
                        help="drive a virtual bike: mock pins and fake serial boards, "
                        "same config and MQTT behaviour")
    parser.add_argument("--seed", type=int, default=None,
                        help="with --simulate: make the virtual rider repeatable")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--reload", type=int, metavar="PID", default=None,
                        help="check the config file, then have the daemon PID reload it and "
                        "wait until it is in force (systemd's ExecReload); exit 0 when "
                        "applied, 78 when invalid, 1 when refused")
    parser.add_argument("--version", action="version", version=f"smartbiked {__version__}")
    return parser


def _print_problems(exc: ConfigError, out: TextIO) -> None:
    print(f"smartbiked: {exc.headline}:", file=out)
    for problem in exc.problems:
        print(f"  {problem}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``smartbiked`` command."""
    args = _parser().parse_args(argv)
    handler = logs.setup(level=getattr(logging, args.log_level))
    try:
        cfg = configuration.load(args.config)
    except ConfigError as exc:
        _print_problems(exc, sys.stderr)
        return EX_CONFIG
    if args.check_config:
        for warning in cfg.warnings:
            print(f"smartbiked: warning: {warning}", file=sys.stderr)
        print(f"{cfg.path}: OK: bike {cfg.bike_id}, {len(cfg.drivers)} drivers "
              f"({', '.join(d.topic for d in cfg.drivers) or 'none'})")
        return 0
    if args.reload is not None:
        ok, why = runtime.request_reload(args.reload)
        print(f"smartbiked: {why}", file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    logs.set_bike_id(handler, cfg.bike_id)
    lock = runtime.BikeLock(cfg.bike_id)
    try:
        lock.acquire()
    except runtime.AlreadyRunning as exc:
        print(f"smartbiked: not starting: {exc}", file=sys.stderr)
        return 1
    state = runtime.ReloadState()
    try:
        if args.simulate:
            # Only where pins and ports come from changes; the service cannot tell.
            from smartbiked.simulator import VirtualBike

            with VirtualBike(cfg, seed=args.seed) as virtual:
                return _serve(Service(cfg, virtual.hardware), state)
        if any(d.kind.startswith("gpio_") for d in cfg.drivers):
            no_gpio = check_pin_factory()
            if no_gpio is not None:
                log.error("no GPIO on this machine (%s): on a Pi, install python3-lgpio; to "
                          "try the daemon without the hardware, run it with --simulate", no_gpio)
        return _serve(Service(cfg, Hardware()), state)
    finally:
        state.remove()
        lock.release()


def _serve(service: Service, state: runtime.ReloadState) -> int:
    service.reload_state = state
    return service.run()
