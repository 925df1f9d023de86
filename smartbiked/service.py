"""The daemon: wires the config, the MQTT connection, the hardware thread and systemd.

Threads: the main thread runs paho's ``loop_forever`` (every MQTT callback runs
there); the ``hardware`` thread (:class:`smartbiked.bike.Bike`) owns every pin and
port; a ``signals`` thread turns SIGTERM/SIGINT/SIGHUP into a clean stop or a
reload (paho must not be called from a signal handler); a ``watchdog`` thread pings
systemd only while both loops show life.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import queue
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from paho.mqtt.client import MQTTMessage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from smartbiked import config as configuration
from smartbiked import logs
from smartbiked.bike import Bike
from smartbiked.errors import EX_CONFIG, ConfigError
from smartbiked.hardware import Hardware
from smartbiked.mqtt_client import MQTTClient
from smartbiked.notify import notify, watchdog_period
from smartbiked.topics import (
    TOPICS,
    Command,
    Refusal,
    applied_payload,
    availability_topic,
    control_filter,
    parse_command,
    report_payload,
    topic_path,
)

log = logging.getLogger("smartbiked.service")

#: Payloads of the retained availability topic. The Last Will says "lost", so an app
#: can tell a crash or a cut cable ("lost") from an operator's stop ("offline").
ONLINE, OFFLINE, LOST = "online", "offline", "lost"
#: The hardware thread must have shown life within max(this, the ping period) seconds
#: for a watchdog ping. It wakes every second; a slow serial acknowledgement may hold it
#: for ack_timeout x (retries + 1).
HARDWARE_STALE = 3.0


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

    def problem(self) -> str | None:
        """Why answers cannot be sent to this topic, or None."""
        if "+" in self.topic or "#" in self.topic:
            return "ResponseTopic must not contain wildcards"
        return None


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
        )
        self.service = service

    def on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                   properties: Any) -> None:
        self.service.connected()

    def on_disconnect(self, reason_code: Any) -> None:
        self.service.disconnected()

    def on_message(self, client: Any, userdata: Any, msg: MQTTMessage) -> None:
        super().on_message(client, userdata, msg)
        self.service.handle_control(msg)


class Service:
    """One bike's daemon; also the :class:`smartbiked.bike.Outbox` of its hardware thread."""

    def __init__(self, config: configuration.Config, hardware: Hardware) -> None:
        self.config = config
        self.limits = config.actuator_limits()
        self.bike = Bike(config, hardware, self)
        self.client = BikeConnection(self)
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._exit_status = 0

    # -- lifecycle ----------------------------------------------------------------------

    def run(self, install_signals: bool = True) -> int:
        """Start everything and serve until SIGTERM/SIGINT; return the exit status.

        ``install_signals=False`` lets a test run the service on another thread and
        stop it with :meth:`shutdown`.
        """
        cfg = self.config
        if install_signals:
            # The handler only queues: paho is not reentrant, so the work happens on a thread.
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, lambda n, _frame: self._signals.put(n))
        notify("STATUS=opening hardware")
        self.client.setup_mqtt_client()
        self.client.subscribe(control_filter(cfg.bike_id))
        self.bike.offline_since = time.monotonic()
        self.bike.start()
        broken = f", {len(self.bike.failed)} failed" if self.bike.failed else ""
        log.info("bike %s: %d drivers running%s", cfg.bike_id, len(self.bike.drivers), broken)
        notify("READY=1", f"STATUS=connecting to {cfg.broker.host}:{cfg.broker.port}")
        for target, name in ((self._handle_signals, "signals"), (self._watchdog, "watchdog")):
            threading.Thread(target=target, name=name, daemon=True).start()
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
                if signum == signal.SIGHUP:
                    self.reload()
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

    def shutdown(self) -> None:
        """Actuators to safe values, say offline, disconnect: loop_forever then returns."""
        notify("STOPPING=1", "STATUS=stopping: actuators to safe values")
        self._stopping.set()
        if not self.bike.stop():
            log.error("the hardware thread did not finish: actuators may not be safe")
            self._exit_status = 1
        if self.client.is_connected():
            info = self.client.publish(availability_topic(self.config.bike_id), OFFLINE,
                                       retain=True)
            try:
                info.wait_for_publish(timeout=1.5)
            except (RuntimeError, ValueError):
                pass  # the broker went away meanwhile; the will says "lost" instead
        self.client.disconnect()

    def reload(self) -> None:
        """Re-read the config file; keep the running one when the new one is invalid."""
        notify("RELOADING=1", "STATUS=reloading configuration")
        old = self.config
        try:
            new = configuration.load(old.path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("%s", problem)
            log.error("new configuration is invalid: keeping the running one")
            notify("READY=1", "STATUS=reload refused: configuration invalid")
            return
        if (new.bike_id, new.broker, new.device_name) != (old.bike_id, old.broker,
                                                          old.device_name):
            log.warning("bike id, device name and [broker] changes take effect on restart")
            new = dataclasses.replace(new, bike_id=old.bike_id, broker=old.broker,
                                      device_name=old.device_name)
        self.config = new
        self.limits = new.actuator_limits()
        self.bike.reload(new)
        log.info("reloaded %s", new.path)
        notify("READY=1", "STATUS=configuration reloaded")

    def _watchdog(self) -> None:
        period = watchdog_period()
        if period is None:
            return
        mqtt_stale = self.config.broker.reconnect_max + 15.0  # a slow connect attempt included
        hardware_stale = max(HARDWARE_STALE, period)
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
        self.client.publish(availability_topic(self.config.bike_id), ONLINE, retain=True)
        notify(f"STATUS=connected to {self.config.broker.host}:{self.config.broker.port}")

    def disconnected(self) -> None:
        """The connection dropped: paho reconnects; the hardware starts counting."""
        self.bike.offline_since = time.monotonic()
        notify(f"STATUS=reconnecting to {self.config.broker.host}:{self.config.broker.port}")

    def handle_control(self, msg: MQTTMessage) -> None:
        """Parse a control message; refuse it or hand it to the hardware thread."""
        if msg.retain:
            # Retained commands replay on every subscribe: a stale one must not move a motor.
            log.warning("ignoring a retained command on %s", msg.topic)
            return
        result = parse_command(msg.topic, msg.payload, self.config.bike_id, self.limits)
        reply = Reply.of(msg)
        bad_reply = reply.problem() if reply else None
        if bad_reply:
            reply = None  # nowhere valid to answer; the status topic says why
            if isinstance(result, Command):
                result = Refusal(result.topic, bad_reply, self.limits.get(result.topic))
        if isinstance(result, Refusal):
            self._refuse(result, [reply] if reply else [])
        else:
            self.bike.submit(result, reply)

    def _refuse(self, refusal: Refusal, replies: list[Reply]) -> None:
        fields = {"TOPIC": refusal.topic or ""}
        log.warning("%s: command refused: %s", refusal.topic, refusal.reason, extra=fields)
        body = refusal.payload(time.time(), self.config.device_name)
        if refusal.topic is not None:
            self._send(topic_path(self.config.bike_id, refusal.topic, "status"), body)
        for reply in replies:
            self._answer(reply, body)

    def _answer(self, reply: Reply, body: dict[str, Any]) -> None:
        props = Properties(PacketTypes.PUBLISH)
        if reply.correlation is not None:
            props.CorrelationData = reply.correlation
        self._send(reply.topic, body, properties=props)

    def _send(self, topic: str, body: Any, **kwargs: Any) -> None:
        """Publish; a message paho refuses is logged, never raised into a loop."""
        try:
            self.client.publish(topic, body, **kwargs)
        except (ValueError, TypeError) as exc:
            log.error("cannot publish on %s: %s", topic, exc)

    # -- the hardware thread's outbox -------------------------------------------------------

    def report(self, topic: str, value: float, *, sensor: bool) -> None:
        """Publish a value on the topic's report sub-topic."""
        if sensor and not self.client.is_connected():
            return  # a reading queued through an outage is stale by the time it arrives
        body = report_payload(value, TOPICS[topic].unit, time.time(), self.config.device_name)
        # An actuator's report is its state: retained, so an app that starts later sees it.
        self._send(topic_path(self.config.bike_id, topic, "report"), body, retain=not sensor)

    def event(self, topic: str, payload: dict[str, Any]) -> None:
        """Publish an event (a button press) on the topic's report sub-topic."""
        if not self.client.is_connected():
            return  # a brake press delivered after an outage would steer a game wrongly
        self._send(topic_path(self.config.bike_id, topic, "report"), payload)

    def outcome(self, command: Command, replies: list[Any], value: float | None,
                error: str | None) -> None:
        """Answer requesters; a failure is also published on the status topic."""
        if error is not None:
            self._refuse(Refusal(command.topic, error, self.limits.get(command.topic)), replies)
            return
        body = applied_payload(value, time.time(), self.config.device_name)
        for reply in replies:
            self._answer(reply, body)


    def driver_state(self, topic: str, state: str, reason: str | None) -> None:
        """A driver's state changed (health message; a sensor's status topic)."""


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``smartbiked`` command."""
    args = _parser().parse_args(argv)
    handler = logs.setup(level=getattr(logging, args.log_level))
    try:
        cfg = configuration.load(args.config)
    except ConfigError as exc:
        print(f"smartbiked: invalid configuration ({len(exc.problems)} problems):",
              file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EX_CONFIG
    if args.check_config:
        print(f"{cfg.path}: OK: bike {cfg.bike_id}, {len(cfg.drivers)} drivers "
              f"({', '.join(d.topic for d in cfg.drivers) or 'none'})")
        return 0
    logs.set_bike_id(handler, cfg.bike_id)
    if args.simulate:
        # Only where pins and ports come from changes; the service cannot tell.
        from smartbiked.simulator import VirtualBike

        with VirtualBike(cfg, seed=args.seed) as virtual:
            return Service(cfg, virtual.hardware).run()
    return Service(cfg, Hardware()).run()
