"""The ``smartbike`` command: watch a bike, move its actuators, press a simulated button.

A small app built on the project's :class:`~smartbiked.mqtt_client.MQTTClient`,
speaking to a bike exactly as the VR game or the mobile app would::

    smartbike watch                  # live values, availability, last refusal
    smartbike set incline 5.5        # prints "incline: 5.5 degree", or the refusal
    smartbike press LEFT             # a virtual button (smartbiked --simulate only)

The broker and the bike id come from the daemon's config file (``--config``,
default /etc/smartbiked/smartbike.toml, with the same ``MQTT_*``/``DEVICE_ID``
environment overrides) and flags (``--host``, ``--port``, ``--bike``,
``--username``, ``--password-file``) override it. Without a config file the
defaults are localhost:1883 and bike 000001.

Exit status: 0 done; 1 the bike (or simulator) refused; 2 no answer in time, no
broker, or bad usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import queue
import shlex
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from paho.mqtt.client import MQTTMessage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from smartbiked import config as configuration
from smartbiked.errors import ConfigError
from smartbiked.mqtt_client import MQTTClient
from smartbiked.simulator import press_topic, state_topic
from smartbiked.topics import TOPICS, availability_topic, topic_path

#: Exit statuses.
OK, REFUSED, NO_ANSWER = 0, 1, 2
ACTUATORS = [name for name, spec in TOPICS.items() if spec.kind == "actuator"]
#: Rows of the watch table: sensors, then actuators, then events.
ROW_ORDER = [n for kind in ("sensor", "actuator", "event")
             for n, s in TOPICS.items() if s.kind == kind]


class Failure(Exception):
    """A reason to stop with a message and an exit status."""

    def __init__(self, message: str, status: int = NO_ANSWER) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Target:
    """Which broker to connect to, as whom, and which bike to talk to."""

    host: str = "localhost"
    port: int = 1883
    username: str = ""
    password: str = field(default="", repr=False)
    bike_id: str = "000001"
    tls: bool = False
    ca_file: str = ""
    certfile: str = ""
    keyfile: str = ""


#: The daemon's systemd unit reads this (EnvironmentFile=): bikes moved from the old
#: scripts keep MQTT_* and DEVICE_ID there, so the command must see them too.
DAEMON_ENV_FILE = Path("/etc/smartbiked/env")


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a systemd EnvironmentFile (or an old ~/.env); {} if unreadable."""
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    found = {}
    for line in text.splitlines():
        key, sep, value = line.strip().removeprefix("export ").partition("=")
        if sep and key.strip().isidentifier() and not key.startswith("#"):
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            found[key.strip()] = value
    return found


def resolve(args: argparse.Namespace, environ: dict[str, str] | None = None,
            daemon_env: Path = DAEMON_ENV_FILE) -> Target:
    """The target from the config file (if any), the environment, then the flags."""
    env = dict(os.environ if environ is None else environ)
    if not args.config:  # the installed bike: see what its daemon sees
        env = {**env_file(daemon_env), **env}
    if args.password_file:
        try:
            # Through the variable the loader honours first, so a password_file named in
            # the config (often readable by the daemon only) is not even opened.
            env["MQTT_PASSWORD"] = Path(args.password_file).read_text("utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise Failure(f"cannot read the password file {args.password_file}: {exc}") from None
    path = Path(args.config) if args.config else configuration.DEFAULT_PATH
    target: Target | None = None
    if args.config or path.exists():
        try:
            cfg = configuration.load(path, env)
        except ConfigError as exc:
            problems = "\n".join(f"  {p}" for p in exc.problems)
            if args.config:
                raise Failure(f"invalid configuration:\n{problems}") from None
            print(f"smartbike: ignoring {path}:\n{problems}", file=sys.stderr)
        else:
            b = cfg.broker
            target = Target(b.host, b.port, b.username, b.password, cfg.bike_id, b.tls,
                            b.ca_file, b.certfile, b.keyfile)
    if target is None:
        try:
            port = int(env.get("MQTT_PORT", "1883"))
        except ValueError:
            raise Failure(f"MQTT_PORT is not a port number: {env['MQTT_PORT']!r}") from None
        target = Target(env.get("MQTT_HOSTNAME", "localhost"), port,
                        env.get("MQTT_USERNAME", ""), env.get("MQTT_PASSWORD", ""),
                        env.get("DEVICE_ID", "000001"))
    overrides = {"host": args.host, "port": args.port, "bike_id": args.bike,
                 "username": args.username}
    if args.password_file:
        overrides["password"] = env["MQTT_PASSWORD"]
    return dataclasses.replace(target, **{k: v for k, v in overrides.items() if v is not None})


class Session(MQTTClient):
    """One app connection: everything it receives lands in :attr:`inbox`."""

    def __init__(self, target: Target) -> None:
        super().__init__(target.host, target.username, target.password, target.port,
                         client_id="", tls=target.tls, ca_file=target.ca_file,
                         certfile=target.certfile, keyfile=target.keyfile, reconnect_max=2)
        self.target = target
        self.inbox: queue.Queue[MQTTMessage] = queue.Queue()

    def on_message(self, client: Any, userdata: Any, msg: MQTTMessage) -> None:
        super().on_message(client, userdata, msg)
        self.inbox.put(msg)

    def open(self, timeout: float) -> None:
        """Connect (subscriptions made before are in place); Failure if it takes too long."""
        self.setup_mqtt_client()
        self.loop_start()
        deadline = time.monotonic() + timeout
        while not self.connected.wait(0.05):
            if self.refused:  # retrying a refused login only repeats the refusal
                raise Failure(f"the broker at {self.target.host}:{self.target.port} refused "
                              f"the connection ({self.refused}); check --username and "
                              "--password-file")
            if time.monotonic() > deadline:
                raise Failure(f"cannot connect to the broker at {self.target.host}:"
                              f"{self.target.port} within {timeout:g} s")

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        if self.client is not None:
            self.disconnect()
            self.loop_stop()

    def next(self, deadline: float) -> MQTTMessage | None:
        """The next message received, or None once ``deadline`` (monotonic) has passed."""
        try:
            return self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None

    def request(self, topic: str, payload: Any, reply_topic: str, correlation: bytes) -> None:
        """Publish an MQTT v5 request whose answer goes to ``reply_topic``."""
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        props.CorrelationData = correlation
        self.publish(topic, payload, properties=props)


def _json(msg: MQTTMessage) -> Any:
    try:
        return json.loads(msg.payload)
    except (ValueError, UnicodeDecodeError):
        return None


def _correlation(msg: MQTTMessage) -> bytes | None:
    return getattr(getattr(msg, "properties", None), "CorrelationData", None)


def _unit(topic: str) -> str:
    spec = TOPICS.get(topic)
    return spec.unit if spec else ""


def refusal_text(topic: str, body: dict[str, Any]) -> str:
    """``incline refused: 25 is out of range (allowed -10..19 step 0.5)``."""
    text = f"{topic} refused: {body.get('error', 'no reason given')}"
    allowed = body.get("allowed")
    if isinstance(allowed, dict) and {"min", "max"} <= allowed.keys():
        text += f" (allowed {allowed['min']:g}..{allowed['max']:g}"
        text += f" step {allowed['step']:g})" if allowed.get("step") else ")"
    return text


def _reply_topic(bike_id: str) -> tuple[str, bytes]:
    token = uuid.uuid4().hex
    return f"bike/{bike_id}/reply/{token}", token.encode()


# --------------------------------------------------------------------------- set


def cmd_set(args: argparse.Namespace, target: Target) -> int:
    """Send one command and wait for the bike's answer."""
    reply_topic, correlation = _reply_topic(target.bike_id)
    session = Session(target)
    # Subscribed before connecting: the broker handles our SUBSCRIBE before the request,
    # so the answer cannot overtake the subscription.
    session.subscribe(reply_topic)
    session.subscribe(availability_topic(target.bike_id))
    deadline = time.monotonic() + args.timeout
    status = None
    try:
        session.open(args.timeout)
        session.request(topic_path(target.bike_id, args.topic, "control"),
                        {"value": args.value}, reply_topic, correlation)
        while (msg := session.next(deadline)) is not None:
            if msg.topic == availability_topic(target.bike_id):
                status = msg.payload.decode("utf-8", "replace")
                continue
            body = _json(msg)
            if _correlation(msg) != correlation or not isinstance(body, dict):
                continue
            if body.get("ok") is True:
                value = body.get("value")
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    value = args.value  # an odd answer still means it was applied
                print(f"{args.topic}: {value:g} {_unit(args.topic)}")
                return OK
            print(refusal_text(args.topic, body), file=sys.stderr)
            return REFUSED
    finally:
        session.close()
    why = (f"its status is {status!r}" if status is not None
           else "it has never been online on this broker")
    raise Failure(f"no answer from bike {target.bike_id} within {args.timeout:g} s ({why})")


# --------------------------------------------------------------------------- press


def cmd_press(args: argparse.Namespace, target: Target) -> int:
    """Ask a simulated bike's virtual hand to press a button; wait for the bike's report."""
    reply_topic, correlation = _reply_topic(target.bike_id)
    report_topic = topic_path(target.bike_id, "button", "report")
    session = Session(target)
    session.subscribe(reply_topic)
    session.subscribe(report_topic)
    deadline = time.monotonic() + args.timeout
    answered = pressed = False
    name = args.button.upper()
    try:
        session.open(args.timeout)
        session.request(press_topic(target.bike_id),
                        {"button": args.button, "hold": args.hold}, reply_topic, correlation)
        while (msg := session.next(deadline)) is not None:
            body = _json(msg)
            if not isinstance(body, dict):
                continue
            if msg.topic == reply_topic and _correlation(msg) == correlation:
                if body.get("ok") is not True:
                    print(f"press refused: {body.get('error')}", file=sys.stderr)
                    return REFUSED
                answered = True
            elif msg.topic == report_topic and str(body.get("button", "")).upper() == name:
                state = "pressed" if body.get("state") == 1 else "released"
                print(f"{body['button']}: {state}")
                if state == "pressed":
                    pressed = True
                    # Wait for the release too, but not forever.
                    deadline = min(deadline, time.monotonic() + args.hold + 2.0)
                else:
                    return OK
    finally:
        session.close()
    if pressed:
        return OK
    if not answered:
        raise Failure(f"no simulated bike {target.bike_id} answered within {args.timeout:g} s "
                      "(press works with smartbiked --simulate only)")
    raise Failure(f"the virtual hand pressed {name}, but bike {target.bike_id} reported no "
                  f"press within {args.timeout:g} s")


# --------------------------------------------------------------------------- watch


@dataclass
class Board:
    """What ``watch`` knows about a bike, from its messages."""

    bike_id: str
    values: dict[str, tuple[str, str, float]] = field(default_factory=dict)  # text, unit, when
    availability: str | None = None
    refusal: tuple[str, float] | None = None
    #: The buttons of a simulated bike (its virtual world publishes a state); else None.
    simulated: list[str] | None = None

    def take(self, msg: MQTTMessage, now: float) -> None:
        """Update from one message on ``bike/{id}/#`` or the simulator's state topic."""
        parts = msg.topic.split("/")
        if msg.topic == state_topic(self.bike_id):
            world = _json(msg)
            buttons = world.get("buttons") if isinstance(world, dict) else None
            self.simulated = [str(b) for b in buttons] if isinstance(buttons, list) else []
            return
        if msg.topic == availability_topic(self.bike_id):
            self.availability = msg.payload.decode("utf-8", "replace")
            return
        if len(parts) != 4 or parts[:2] != ["bike", self.bike_id]:
            return
        topic, sub = parts[2], parts[3]
        body = _json(msg)
        if not isinstance(body, dict):
            return
        if sub == "report" and "button" in body:
            state = "pressed" if body.get("state") == 1 else "released"
            self.values[topic] = (str(body["button"]), state, now)
        elif sub == "report" and isinstance(body.get("value"), (int, float)):
            self.values[topic] = (_format(topic, float(body["value"])),
                                  str(body.get("unitName", _unit(topic))), now)
        elif sub == "status" and body.get("ok") is False:
            self.refusal = (refusal_text(topic, body), now)


def _format(topic: str, value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if topic == "speed":
        return f"{value:.2f}"
    if topic == "cadence":
        return f"{value:.1f}"
    if TOPICS.get(topic) and TOPICS[topic].kind == "sensor":
        return f"{value:.0f}"
    return f"{value:g}"


def _age(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"


def render(board: Board, where: str, connected: bool, now: float,
           command: str = "") -> list[str]:
    """The watch table, one string per line; ``command`` starts the hints under it."""
    if not connected:
        state = "connecting to the broker..."
    else:
        state = board.availability or "no status yet (daemon never seen)"
    name = f"bike {board.bike_id}" + (" (simulated)" if board.simulated is not None else "")
    lines = [f"{name} on {where}: {state}"
             f"{datetime.now().strftime('%H:%M:%S'):>12}",
             f"  {'topic':<11}{'value':>14}  {'unit':<11}{'age':>8}"]
    rows = ROW_ORDER + sorted(set(board.values) - set(ROW_ORDER))
    for topic in rows:
        if topic not in board.values:
            lines.append(f"  {topic:<11}{'-':>14}  {_unit(topic):<11}")
            continue
        text, unit, when = board.values[topic]
        extra = f"  ({float(text) * 3.6:.1f} km/h)" if topic == "speed" else ""
        lines.append(f"  {topic:<11}{text:>14}  {unit:<11}{_age(now - when):>8}{extra}")
    if len(board.values) < len(rows):
        lines.append("  (-: nothing reported since the watch began; actuators report when "
                     "they move)")
    if board.refusal:
        text, when = board.refusal
        lines.append(f"last refusal: {text}, {_age(now - when)} ago")
    else:
        lines.append("last refusal: none")
    if command:
        lines += ["", "From another terminal:", f"  {command} set incline 5.5"]
        if board.simulated:
            lines.append(f"  {command} press {board.simulated[0]}")
    return lines


def redraw(lines: list[str], previous: int, rows: int) -> str:
    """Terminal output replacing the last ``previous`` lines drawn with ``lines``.

    Moves the cursor back up rather than home, so what was printed above the table
    (the run script's instructions) stays on screen; each line is cleared to its end
    and whatever the old table left below is cleared too, so nothing flickers.
    """
    if not previous:
        start = ""
    elif previous < rows:
        start = f"\x1b[{previous}F"
    else:
        start = "\x1b[H"  # taller than the terminal: the rows above have scrolled away
    return start + "".join(f"{ln}\x1b[K\n" for ln in lines) + "\x1b[J"


def cmd_watch(args: argparse.Namespace, target: Target, command: str = "",
              out: TextIO | None = None) -> int:
    """Redraw the table every ``--interval`` seconds (in place on a terminal)."""
    out = out or sys.stdout
    tty = out.isatty()
    board = Board(target.bike_id)
    session = Session(target)
    session.subscribe(f"bike/{target.bike_id}/#")
    session.subscribe(state_topic(target.bike_id))
    session.setup_mqtt_client()
    session.loop_start()
    where = f"{target.host}:{target.port}"
    drawn = shown = 0
    reached = False  # was the broker ever reached: the exit status says so
    next_draw = time.monotonic() + args.interval
    try:
        while args.count is None or drawn < args.count:
            if time.monotonic() < next_draw:
                msg = session.next(next_draw)
                if msg is not None:
                    board.take(msg, time.monotonic())
                continue
            now = time.monotonic()
            next_draw = max(next_draw + args.interval, now)
            connected = session.is_connected()
            reached = reached or connected
            lines = render(board, where, connected, now, command)
            if tty:
                out.write(redraw(lines, shown, shutil.get_terminal_size((80, 24)).lines))
                shown = len(lines)
            else:
                out.write("\n".join(lines) + "\n\n")
            out.flush()
            drawn += 1
    except KeyboardInterrupt:
        pass
    finally:
        session.close()
    return OK if reached else NO_ANSWER


# --------------------------------------------------------------------------- main


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _positive(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0: {text!r}")
    return value


def _connection_options(parser: argparse.ArgumentParser, sub: bool) -> None:
    # On the subcommands too, so "smartbike set incline 5 --port 41234" works; there
    # they default to SUPPRESS, or argparse would overwrite what came before the command.
    d = argparse.SUPPRESS if sub else None
    parser.add_argument("--config", default=d, help="the bike's TOML file "
                        f"(default: {configuration.DEFAULT_PATH}, if present)")
    parser.add_argument("--host", default=d, help="broker host (overrides the config)")
    parser.add_argument("--port", type=int, default=d, help="broker port")
    parser.add_argument("--bike", default=d, help="bike id, e.g. 000001")
    parser.add_argument("--username", default=d, help="broker account")
    parser.add_argument("--password-file", default=d, help="file holding the password")
    parser.add_argument("--timeout", type=_positive, default=d if sub else 5.0,
                        help="seconds to wait for connection and answer (default: 5)")


def parser() -> argparse.ArgumentParser:
    """The command line of ``smartbike``."""
    p = argparse.ArgumentParser(prog="smartbike", description="Watch a Smartbike, move its "
                                "actuators, press a simulated bike's buttons.",
                                epilog="exit status: 0 done, 1 refused, 2 no answer/usage")
    _connection_options(p, sub=False)
    subs = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    watch = subs.add_parser("watch", help="show the bike's live values, refreshing in place")
    watch.add_argument("--count", type=int, default=None, help="stop after N redraws")
    watch.add_argument("--interval", type=_positive, default=1.0,
                       help="seconds between redraws (default: 1)")
    set_ = subs.add_parser("set", help="move an actuator and print the outcome")
    set_.add_argument("topic", choices=ACTUATORS, help=", ".join(ACTUATORS))
    set_.add_argument("value", type=_finite, help="the new value, e.g. 5.5")
    press = subs.add_parser("press", help="press a button of a simulated bike")
    press.add_argument("button", help="button name from the config, e.g. LEFT")
    press.add_argument("--hold", type=float, default=0.2, help="seconds held (default 0.2)")
    for sub in (watch, set_, press):
        _connection_options(sub, sub=True)
    return p


def _command(args: argparse.Namespace) -> str:
    """``smartbike`` with the connection flags given, for the hints under the watch."""
    prog = sys.argv[0] if os.path.basename(sys.argv[0]) == "smartbike" else "smartbike"
    words = [prog]
    for flag in ("config", "host", "port", "bike", "username", "password_file"):
        value = getattr(args, flag, None)
        if value is not None:
            words += [f"--{flag.replace('_', '-')}", str(value)]
    return " ".join(shlex.quote(w) for w in words)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``smartbike`` command."""
    args = parser().parse_args(argv)
    # The client logs connection trouble at WARNING; the command says it once, itself.
    logging.basicConfig(level=logging.ERROR, format="smartbike: %(message)s")
    try:
        target = resolve(args)
        if args.command == "set":
            return cmd_set(args, target)
        if args.command == "press":
            return cmd_press(args, target)
        return cmd_watch(args, target, _command(args))
    except Failure as exc:
        print(f"smartbike: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return NO_ANSWER


if __name__ == "__main__":
    sys.exit(main())
