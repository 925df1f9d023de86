"""The ``smartbike`` command: watch a bike, move its actuators, press a simulated button.

A small app built on the project's :class:`~smartbiked.mqtt_client.MQTTClient`,
speaking to a bike exactly as the VR game or the mobile app would::

    smartbike watch                  # live values, availability, health, last refusal
    smartbike watch --all            # every bike on the broker, one line each
    smartbike set incline 5.5        # prints "incline: 5.5 degree", or the refusal
    smartbike press LEFT             # a virtual button (smartbiked --simulate only)
    smartbike record ride.csv        # the bike's reports to a CSV file, until Ctrl-C
    smartbike replay ride.csv        # a simulated bike's sensors ride that file again

The broker and the bike id come from the daemon's config file (``--config``,
default /etc/smartbiked/smartbike.toml, with the same ``MQTT_*``/``DEVICE_ID``
environment overrides) and flags (``--host``, ``--port``, ``--bike``,
``--username``, ``--password-file``) override it. Without a config file the
defaults are localhost:1883 and bike 000001.

Answers to ``set`` and ``press`` come back on a topic under the bike's reply
namespace (``bike/{id}/reply/<random>``, or the first of the config's
``reply_topics``), so an app account allowed only ``bike/{id}/#`` can use them.

Everything shown comes from the network and is treated as hostile: control
characters are escaped, and a payload that is not what the bike sends is shown
as bad, never trusted and never a crash.

Exit status: 0 done; 1 the bike (or simulator) refused; 2 no answer in time, no
broker, or bad usage.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import queue
import re
import secrets
import shlex
import shutil
import socket
import ssl
import sys
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from paho.mqtt.client import MQTTMessage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from smartbiked import __version__
from smartbiked import config as configuration
from smartbiked.errors import ConfigError
from smartbiked.mqtt_client import MQTTClient
from smartbiked.simulator import (
    MAX_RIDE_HOLD,
    RIDE_TOPICS,
    press_topic,
    ride_topic,
    state_topic,
)
from smartbiked.topics import TOPICS, availability_topic, topic_path

#: Exit statuses.
OK, REFUSED, NO_ANSWER = 0, 1, 2
ACTUATORS = [name for name, spec in TOPICS.items() if spec.kind == "actuator"]
#: Rows of the watch table: sensors, then actuators, then events.
ROW_ORDER = [n for kind in ("sensor", "actuator", "event")
             for n, s in TOPICS.items() if s.kind == kind]
#: The daemon's default reply namespace (``[broker] reply_topics``).
DEFAULT_REPLY_PATTERN = "bike/{id}/reply/#"
#: Payloads larger than this are shown as bad without being decoded.
MAX_PAYLOAD = 16 * 1024
#: The layout is made for a classic terminal; wider ones just get the same table. Lines
#: stop one column short of the edge: a full line wraps on some terminals, which would
#: throw the cursor arithmetic of the redraw off.
WIDTH, HEIGHT = 80, 24
LINE = WIDTH - 1


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
    #: Where the bike sends answers; ``{id}`` is the bike id.
    reply_pattern: str = DEFAULT_REPLY_PATTERN


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


def _reply_template(patterns: Sequence[str], bike_id: str) -> str:
    """The config's first reply pattern, its bike id turned back into ``{id}``.

    The loader has filled in the file's bike id; a ``--bike`` flag must move the
    answers to the other bike's namespace, so the id becomes a placeholder again.
    """
    if not patterns:
        return DEFAULT_REPLY_PATTERN
    return "/".join("{id}" if level == bike_id else level for level in patterns[0].split("/"))


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
                            b.ca_file, b.certfile, b.keyfile,
                            _reply_template(b.reply_topics, cfg.bike_id))
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


def reply_address(target: Target) -> tuple[str, bytes]:
    """A fresh reply topic in the bike's reply namespace, and the correlation data.

    A trailing ``#`` or ``+`` becomes a random token (so concurrent commands do not
    see each other's answers); a ``+`` inside the pattern becomes the bike id.
    """
    token = secrets.token_hex(16)
    levels = target.reply_pattern.replace("{id}", target.bike_id).split("/")
    if levels[-1] in ("#", "+"):
        levels[-1] = token
    levels = [target.bike_id if level == "+" else level for level in levels]
    return "/".join(levels), token.encode()


# --------------------------------------------------------------------------- safe text

_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\e"}


def _char_width(ch: str) -> int:
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def _escape(ch: str) -> str:
    if ch.isprintable() and not unicodedata.category(ch).startswith("M"):
        return ch
    code = ord(ch)
    return _NAMED_ESCAPES.get(ch) or (f"\\x{code:02x}" if code < 0x100 else
                                      f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")


def clean(text: str, limit: int = 60) -> str:
    """``text`` made harmless on a terminal, at most ``limit`` columns wide.

    Control, format and combining characters (escape sequences, bidi overrides,
    stacked accents) are shown as escapes such as ``\\e`` or ``\\x07``, never sent.
    """
    # Each character takes at least one column: never walk a megabyte to show 60.
    pieces = [_escape(ch) for ch in text[: limit + 1]]
    if sum(map(_columns, pieces)) <= limit:
        return "".join(pieces)
    out, used = [], 0
    for piece in pieces:  # cut between escapes, never inside one
        used += _columns(piece)
        if used > limit - 3:
            break
        out.append(piece)
    return "".join(out) + "..."


def fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` columns, ending in ``...`` when cut (text already clean)."""
    if _columns(text) <= width:
        return text
    out, used = [], 0
    for ch in text:
        w = _char_width(ch)
        if used + w > width - 3:
            break
        out.append(ch)
        used += w
    return "".join(out) + "..."


def _columns(text: str) -> int:
    return sum(_char_width(ch) for ch in text)


def _pad(text: str, width: int, right: bool = False) -> str:
    """``text`` fitted and padded to exactly ``width`` columns."""
    text = fit(text, width)
    gap = " " * (width - _columns(text))
    return gap + text if right else text + gap


# --------------------------------------------------------------------------- payloads


class _Bad(Exception):
    """Internal: a payload that is not what a bike sends; the message says why."""


def _no_constant(name: str) -> Any:
    raise _Bad(f"{name} in JSON")


def decode(payload: bytes) -> Any:
    """The JSON document in ``payload``; :class:`_Bad` when it cannot be one."""
    if len(payload) > MAX_PAYLOAD:
        raise _Bad(f"too large ({len(payload)} bytes)")
    try:
        return json.loads(payload.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise _Bad("not UTF-8") from None
    except (ValueError, RecursionError):  # JSONDecodeError, huge integers, deep nesting
        raise _Bad("not JSON") from None


def _json(msg: MQTTMessage) -> Any:
    """The document in a message, or None when it is not a usable one."""
    try:
        return decode(bytes(msg.payload))
    except _Bad:
        return None


def number(value: Any) -> float | None:
    """``value`` as a finite float, or None (booleans, strings, huge or infinite numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        result = float(value)
    except OverflowError:
        return None
    return result if math.isfinite(result) else None


def _text(value: Any, limit: int = 40) -> str:
    """A string field of a payload, cleaned; anything else shown as its JSON, cleaned."""
    if not isinstance(value, str):
        try:
            value = json.dumps(value)[: limit * 2]
        except (ValueError, TypeError, RecursionError):
            value = "?"
    return clean(value, limit)


def _correlation(msg: MQTTMessage) -> bytes | None:
    return getattr(getattr(msg, "properties", None), "CorrelationData", None)


def _unit(topic: str) -> str:
    spec = TOPICS.get(topic)
    return spec.unit if spec else ""


def show_number(value: float, topic: str = "") -> str:
    """A value as the watch shows it: to each topic's useful resolution, never 15 digits."""
    if abs(value) >= 1e6:
        return f"{value:.3g}"
    digits = {"speed": 2, "cadence": 1, "power": 0, "heartrate": 0}.get(topic, 1)
    text = f"{value:.{digits}f}"
    if digits and topic not in ("speed", "cadence"):  # 5.5, 40: no trailing .0
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "-0.0", "-0.00") else text


def refusal_reason(body: dict[str, Any]) -> str:
    """``25 is out of range (allowed -10..19 step 0.5)`` from a refusal, cleaned."""
    text = _text(body.get("error", "no reason given"), 60)
    allowed = body.get("allowed")
    if isinstance(allowed, dict):
        low, high, step = (number(allowed.get(k)) for k in ("min", "max", "step"))
        if low is not None and high is not None:
            text += f" (allowed {low:g}..{high:g}" + (f" step {step:g})" if step else ")")
    return text


def refusal_text(topic: str, body: dict[str, Any]) -> str:
    """``incline refused: 25 is out of range (allowed -10..19 step 0.5)``, cleaned."""
    return f"{clean(topic, 20)} refused: {refusal_reason(body)}"


# --------------------------------------------------------------------------- a session


class Session(MQTTClient):
    """One app connection: everything it receives lands in :attr:`inbox`."""

    def __init__(self, target: Target) -> None:
        super().__init__(target.host, target.username, target.password, target.port,
                         client_id="", tls=target.tls, ca_file=target.ca_file,
                         certfile=target.certfile, keyfile=target.keyfile, reconnect_max=2)
        self.target = target
        self.inbox: queue.Queue[MQTTMessage] = queue.Queue()

    def on_message(self, client: Any, userdata: Any, msg: MQTTMessage) -> None:
        self.inbox.put(msg)  # nothing here may raise: paho would drop the connection

    def open(self, timeout: float) -> None:
        """Connect (subscriptions made before are in place); Failure saying why if not."""
        self.setup_mqtt_client()
        self.loop_start()
        deadline = time.monotonic() + timeout
        while not self.connected.wait(0.05):
            why = connect_problem(self.target, self.refused, self._paho().last_error)
            if why:  # retrying would only repeat it
                raise Failure(why)
            if time.monotonic() > deadline:
                last = self._paho().last_error
                raise Failure(f"cannot connect to the broker at {self.target.host}:"
                              f"{self.target.port} within {timeout:g} s"
                              + (f" ({clean(str(last), 100)})" if last else ""))

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


def connect_problem(target: Target, refused: str | None, error: OSError | None) -> str | None:
    """Why connecting cannot succeed by retrying, in words; None while it still might."""
    where = f"{target.host}:{target.port}"
    if refused:
        return (f"the broker at {where} refused the connection ({clean(refused)}): "
                "not authorised; check --username and --password-file")
    if isinstance(error, ConnectionRefusedError):
        return (f"nothing is listening at {where} (connection refused): is the broker "
                "running, and are --host and --port right?")
    if isinstance(error, socket.gaierror):
        return f"unknown host {clean(target.host)!r} ({clean(str(error.strerror), 60)})"
    if isinstance(error, ssl.SSLCertVerificationError):
        return (f"TLS failure with {where}: the broker's certificate is not trusted "
                f"({clean(str(error.verify_message), 60)}); check ca_file")
    if isinstance(error, ssl.SSLError):
        return f"TLS failure with {where}: {clean(str(error.reason or error), 80)}"
    return None


# --------------------------------------------------------------------------- set


def cmd_set(args: argparse.Namespace, target: Target) -> int:
    """Send one command and wait for the bike's answer."""
    reply_topic, correlation = reply_address(target)
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
                status = clean(msg.payload[:100].decode("utf-8", "replace"), 20)
                continue
            if _correlation(msg) != correlation:
                continue
            body = _json(msg)
            if not isinstance(body, dict):
                raise Failure(f"bike {target.bike_id} answered, but not with a JSON object; "
                              "is it running smartbiked?")
            if body.get("ok") is True:
                value = number(body.get("value"))
                if value is None:
                    value = args.value  # an odd answer still means it was applied
                print(f"{args.topic}: {show_number(value, args.topic)} {_unit(args.topic)}")
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
    reply_topic, correlation = reply_address(target)
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
                    print(f"press refused: {_text(body.get('error'), 70)}", file=sys.stderr)
                    return REFUSED
                answered = True
            elif (msg.topic == report_topic and isinstance(body.get("button"), str)
                  and body["button"].upper() == name):
                state = "pressed" if body.get("state") == 1 else "released"
                print(f"{clean(body['button'], 20)}: {state}")
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
    raise Failure(f"the virtual hand pressed {clean(name, 20)}, but bike {target.bike_id} "
                  f"reported no press within {args.timeout:g} s")


# --------------------------------------------------------------------------- record, replay

#: The columns of a recorded ride, in order.
RIDE_COLUMNS = ("time", "topic", "value", "unit")
#: How long past its next recorded value a replayed value holds (the next one replaces
#: it): a late message must not let the rider model show through between two values.
HOLD_MARGIN = 1.0


def ride_row(msg: MQTTMessage) -> tuple[float, str, float, str] | None:
    """(time, topic, value, unit) of a report worth recording; None for anything else.

    Values come with their report's own timestamp; a button event is topic
    ``button/NAME`` with value 1 (pressed) or 0 (released).
    """
    levels = msg.topic.split("/")
    if len(levels) != 4 or levels[0] != "bike" or levels[3] != "report":
        return None
    body = _json(msg)
    if not isinstance(body, dict):
        return None
    when = number(body.get("timestamp"))
    if when is None:
        return None
    topic = levels[2]
    if topic == "button":
        name, state = body.get("button"), body.get("state")
        if (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", name)
                or state not in (0, 1) or isinstance(state, bool)):
            return None
        return when, f"button/{name}", float(state), ""
    value = number(body.get("value"))
    if topic not in TOPICS or value is None:
        return None  # mode reports, unknown topics, malformed values
    return when, topic, value, _unit(topic)


def cmd_record(args: argparse.Namespace, target: Target) -> int:
    """Write the bike's reports to a CSV file until Ctrl-C (or ``--duration``)."""
    path = Path(args.file)
    try:
        out = path.open("w" if args.force else "x", newline="", encoding="utf-8")
    except FileExistsError:
        raise Failure(f"{args.file} exists; use --force to overwrite it") from None
    except OSError as exc:
        raise Failure(f"cannot write {args.file}: {exc.strerror}") from None
    session = Session(target)
    session.subscribe(f"bike/{target.bike_id}/+/report")
    rows = 0
    with out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(RIDE_COLUMNS)
        out.flush()
        try:
            session.open(args.timeout)
            print(f"recording bike {target.bike_id} from {target.host}:{target.port} to "
                  f"{args.file}" + ("" if args.duration else " (Ctrl-C stops)"),
                  file=sys.stderr)
            end = time.monotonic() + args.duration if args.duration else math.inf
            while time.monotonic() < end:
                msg = session.next(min(end, time.monotonic() + 1.0))
                row = ride_row(msg) if msg is not None else None
                if row is None:
                    continue
                when, topic, value, unit = row
                writer.writerow((f"{when:.3f}", topic, f"{value:g}", unit))
                out.flush()  # a killed recorder leaves every row it saw
                rows += 1
        except KeyboardInterrupt:
            pass
        finally:
            session.close()
    print(f"{rows} values recorded in {args.file}", file=sys.stderr)
    return OK


@dataclass(frozen=True)
class RideStep:
    """One message of a replay: at ``at`` s from the start, publish ``payload`` there."""

    at: float
    topic: str  # "ride" or "press"
    payload: dict[str, Any]


def load_ride(path: str) -> list[RideStep]:
    """The replay of a recorded ride: sensor values and button presses, in time order.

    Raises Failure naming the file and line of the first problem; actuator values are
    skipped (the app under test moves those), as are rows of other topics.
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            lines = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise Failure(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not lines or [c.strip().lower() for c in lines[0][:3]] != list(RIDE_COLUMNS[:3]):
        raise Failure(f"{path}: line 1 must be the header {','.join(RIDE_COLUMNS)} "
                      "(as smartbike record writes it)")
    rows: list[tuple[float, str, float]] = []
    for number_, line in enumerate(lines[1:], 2):
        if not line:
            continue
        if len(line) < 3:
            raise Failure(f"{path}: line {number_}: expected time,topic,value")
        try:
            when, value = float(line[0]), float(line[2])
        except ValueError:
            raise Failure(f"{path}: line {number_}: time and value must be numbers") from None
        if not (math.isfinite(when) and math.isfinite(value)):
            raise Failure(f"{path}: line {number_}: time and value must be finite")
        rows.append((when, line[1].strip(), value))
    rows.sort(key=lambda r: r[0])  # stable: rows of one instant keep their order
    wanted = [r for r in rows if r[1] in RIDE_TOPICS or r[1].startswith("button/")]
    if not wanted:
        raise Failure(f"{path}: no {', '.join(RIDE_TOPICS)} or button rows to replay")
    start = wanted[0][0]
    steps: list[RideStep] = []
    for i, (when, topic, value) in enumerate(wanted):
        if topic.startswith("button/"):
            if value != 1:
                continue  # the press below holds until its release
            name = topic.split("/", 1)[1]
            release = next((w for w, t, v in wanted[i + 1:] if t == topic and v == 0), None)
            hold = min(10.0, release - when) if release is not None else 0.2
            steps.append(RideStep(when - start, "press", {"button": name, "hold": hold}))
            continue
        if not 0 <= value <= 10_000:
            raise Failure(f"{path}: {topic} value {value:g} is out of range (0 to 10000)")
        following = next((w for w, t, _ in wanted[i + 1:] if t == topic), None)
        hold = (following - when if following is not None else 1.0) + HOLD_MARGIN
        steps.append(RideStep(when - start, "ride",
                              {topic: value, "hold": round(min(hold, MAX_RIDE_HOLD), 3)}))
    return steps


def cmd_replay(args: argparse.Namespace, target: Target) -> int:
    """Drive a simulated bike's sensors with a recorded ride, at the recorded pace."""
    steps = load_ride(args.file)  # all checked before anything is sent
    reply_topic, correlation = reply_address(target)
    session = Session(target)
    session.subscribe(reply_topic)
    try:
        session.open(args.timeout)
        # The first step as a request: only a simulated bike (with replay) answers it.
        first = next((s for s in steps if s.topic == "ride"), None)
        probe_payload = first.payload if first else {"hold": 0.1, "power": 0}
        session.request(ride_topic(target.bike_id), probe_payload, reply_topic, correlation)
        deadline = time.monotonic() + args.timeout
        while True:
            msg = session.next(deadline)
            if msg is None:
                raise Failure(f"no simulated bike {target.bike_id} answered within "
                              f"{args.timeout:g} s (replay works with smartbiked --simulate "
                              "only)")
            if msg.topic == reply_topic and _correlation(msg) == correlation:
                body = _json(msg)
                if isinstance(body, dict) and body.get("ok") is True:
                    break
                reason = body.get("error") if isinstance(body, dict) else body
                print(f"replay refused: {_text(reason, 70)}", file=sys.stderr)
                return REFUSED
        length = steps[-1].at
        print(f"replaying {len(steps)} values ({length:.0f} s) of {args.file} on bike "
              f"{target.bike_id}", file=sys.stderr)
        start = time.monotonic() - (first.at if first else 0.0)
        for step in steps:
            if step is first:
                continue
            # Waits on the inbox (nothing else arrives there): it returns at the deadline.
            while (left := start + step.at - time.monotonic()) > 0:
                session.next(time.monotonic() + left)
            topic = (ride_topic if step.topic == "ride" else press_topic)(target.bike_id)
            session.publish(topic, step.payload)
    finally:
        session.close()
    print("replay done", file=sys.stderr)
    return OK


# --------------------------------------------------------------------------- what a bike says


@dataclass
class Reading:
    """The latest report on one topic, as shown."""

    text: str            # the value (or button name), clean
    unit: str            # the unit (or button state), clean
    when: float          # wall-clock time of the reading: its own timestamp, else arrival
    value: float | None = None
    bad: str | None = None  # why the latest message on this topic was unusable


@dataclass
class Health:
    """The daemon's retained health message, checked field by field."""

    version: str = ""
    uptime: float | None = None
    reconnects: float | None = None
    drivers: dict[str, tuple[str, str]] = field(default_factory=dict)  # state, reason
    counters: dict[str, float] = field(default_factory=dict)
    #: The Bluetooth smart trainer's line (state, then reason or who controls), if any.
    bluetooth: tuple[str, str] | None = None
    bad: str | None = None


def _when(body: dict[str, Any], arrived: float) -> float:
    """When a payload says it was made; its arrival when it says nothing believable."""
    stamp = number(body.get("timestamp"))
    if stamp is None or stamp < 1e9:  # not a Unix time of this century
        return arrived
    return min(stamp, arrived)  # a bike clock ahead of ours: it cannot be from the future


def parse_health(payload: bytes) -> Health:
    """A :class:`Health` from the message; ``bad`` says what was wrong with it."""
    try:
        body = decode(payload)
    except _Bad as exc:
        return Health(bad=str(exc))
    if not isinstance(body, dict):
        return Health(bad="not a JSON object")
    health = Health(version=clean(body["version"], 16) if isinstance(body.get("version"), str)
                    else "", uptime=number(body.get("uptime")),
                    reconnects=number(body.get("reconnects")))
    drivers = body.get("drivers")
    if isinstance(drivers, dict):
        for topic, info in list(drivers.items())[:50]:
            if isinstance(info, dict) and isinstance(info.get("state"), str):
                reason = info.get("reason")
                health.drivers[clean(topic, 20)] = (
                    clean(info["state"], 12), _text(reason, 60) if reason is not None else "")
            else:
                health.drivers[clean(topic, 20)] = ("?", "unreadable entry")
    elif drivers is not None:
        health.bad = "drivers is not an object"
    counters = body.get("counters")
    if isinstance(counters, dict):
        for name, value in list(counters.items())[:20]:
            if number(value):
                health.counters[clean(name, 20)] = number(value) or 0.0
    ble = body.get("bluetooth")
    if isinstance(ble, dict) and isinstance(ble.get("state"), str):
        said = ble.get("reason") or (f"controlled by {ble['controller']}"
                                     if ble.get("controller") else "")
        health.bluetooth = (clean(ble["state"], 12), _text(said, 60))
    return health


@dataclass
class Board:
    """What ``watch`` knows about a bike, from its messages."""

    bike_id: str
    values: dict[str, Reading] = field(default_factory=dict)
    availability: str | None = None
    refusal: tuple[str, float] | None = None
    #: Driver states by topic (health message and sensor status), state and reason.
    states: dict[str, tuple[str, str]] = field(default_factory=dict)
    health: Health | None = None
    #: Topics the bike does not have (a misconfigured or hostile publisher).
    unknown: set[str] = field(default_factory=set)
    #: The buttons of a simulated bike (its virtual world publishes a state); else None.
    simulated: list[str] | None = None

    def states_down(self) -> dict[str, tuple[str, str]]:
        """The drivers whose state is not ``running``."""
        return {t: s for t, s in self.states.items() if s[0] != "running"}

    def take(self, msg: MQTTMessage, now: float) -> None:
        """Update from one message on ``bike/{id}/#`` or the simulator's state topic.

        ``now`` is the wall-clock arrival time. Never raises, whatever the message.
        """
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # brokers check topics are UTF-8; nothing to show
            return
        if topic == state_topic(self.bike_id):
            world = _json(msg)
            buttons = world.get("buttons") if isinstance(world, dict) else None
            self.simulated = ([clean(str(b), 12) for b in buttons[:10] if isinstance(b, str)]
                              if isinstance(buttons, list) else [])
            return
        parts = topic.split("/")
        if len(parts) < 3 or parts[:2] != ["bike", self.bike_id]:
            return
        if len(parts) == 3 and parts[2] == "status":
            text = msg.payload[:64].decode("utf-8", "replace")
            self.availability = (text if text in ("online", "offline", "lost")
                                 else f"bad status '{clean(text, 24)}'")
        elif len(parts) == 3 and parts[2] == "health":
            self.health = parse_health(bytes(msg.payload))
            self.states = dict(self.health.drivers)  # the daemon's whole picture, now
        elif len(parts) == 4 and parts[3] in ("report", "status"):
            name = parts[2]
            if name not in TOPICS:
                if len(self.unknown) < 100:  # a flood of made-up topics costs nothing
                    self.unknown.add(clean(name, 20))
                return
            if parts[3] == "report":
                self._report(name, bytes(msg.payload), now)
            else:
                self._status(name, bytes(msg.payload), now)

    def _report(self, topic: str, payload: bytes, now: float) -> None:
        try:
            body = decode(payload)
            if not isinstance(body, dict):
                raise _Bad("not a JSON object")
            when = _when(body, now)
            if TOPICS[topic].kind == "event":
                if not isinstance(body.get("button"), str) or body.get("state") not in (0, 1):
                    raise _Bad("no button and state")
                state = "pressed" if body["state"] == 1 else "released"
                self.values[topic] = Reading(clean(body["button"], 12), state, when)
                return
            value = number(body.get("value"))
            if value is None:
                raise _Bad("no finite number in value")
            unit = body.get("unitName", _unit(topic))
            self.values[topic] = Reading(show_number(value, topic), _text(unit, 11), when, value)
        except _Bad as exc:
            self.values[topic] = Reading("bad", _unit(topic), now, bad=str(exc))

    def _status(self, topic: str, payload: bytes, now: float) -> None:
        try:
            body = decode(payload)
        except _Bad as exc:
            self.refusal = (f"{topic}: bad status message ({exc})", now)
            return
        if not isinstance(body, dict):
            self.refusal = (f"{topic}: bad status message (not a JSON object)", now)
        elif "state" in body:  # a driver's state (a sensor lost or back), not a refusal
            reason = body.get("error", body.get("reason"))
            self.states[topic] = (_text(body["state"], 12),
                                  _text(reason, 60) if reason is not None else "")
        elif body.get("ok") is False:
            self.refusal = (f"{topic}: {refusal_reason(body)}", _when(body, now))


@dataclass
class Fleet:
    """Every bike seen on the broker (``watch --all``), by id."""

    boards: dict[str, Board] = field(default_factory=dict)
    #: Bikes beyond this are counted, not tracked: made-up ids must not exhaust memory.
    limit: int = 500
    ignored: int = 0

    def take(self, msg: MQTTMessage, now: float) -> None:
        """Route one message to its bike's board."""
        try:
            parts = msg.topic.split("/")
        except UnicodeDecodeError:
            return
        if len(parts) < 3 or parts[0] != "bike" or not parts[1]:
            return
        board = self.boards.get(parts[1])
        if board is None:
            if len(self.boards) >= self.limit:
                self.ignored += 1
                return
            board = self.boards[parts[1]] = Board(parts[1])
        board.take(msg, now)


# --------------------------------------------------------------------------- drawing

#: SGR colours by meaning.
COLOURS = {"good": "32", "warn": "33", "bad": "31", "dim": "2", "bold": "1"}
#: A line is a list of (text, meaning) pieces, meaning "" for plain.
Line = list[tuple[str, str]]


def _emit(line: Line, width: int, colour: bool) -> str:
    """One line: cut to ``width`` columns, coloured when asked."""
    out, left = [], width
    for text, meaning in line:
        if left <= 0:
            break
        piece = fit(text, left) if _columns(text) > left else text
        left -= _columns(piece)
        out.append(f"\x1b[{COLOURS[meaning]}m{piece}\x1b[0m" if colour and meaning and piece
                   else piece)
    return "".join(out).rstrip()


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def _availability(board: Board, connected: bool, ever: bool) -> tuple[str, str]:
    if not connected:
        return ("connection lost, reconnecting..." if ever else "connecting to the broker...",
                "warn")
    if board.availability is None:
        return "no status yet (daemon never seen)", "warn"
    meaning = {"online": "good", "offline": "warn"}.get(board.availability, "bad")
    return board.availability, meaning


def _state_meaning(state: str) -> str:
    return "bad" if state == "failed" else "warn"


def _health_lines(board: Board) -> list[Line]:
    health = board.health
    if health is None:
        return [[("health: ", ""), ("none published", "dim")]]
    if health.bad and not health.drivers:
        return [[("health: ", ""), (f"bad message ({health.bad})", "bad")]]
    about = [f"v{health.version}" if health.version else "version unknown"]
    if health.uptime is not None:
        about.append(f"up {_age(health.uptime)}")
    if health.reconnects is not None:
        about.append(f"{health.reconnects:.0f} reconnects")
    line: Line = [("health: ", ""), (", ".join(about), "")]
    down = board.states_down()
    if down:
        line.append(("; ", ""))
        listed = [(f"{topic} {state}", _state_meaning(state))
                  for topic, (state, _) in sorted(down.items())]
        if sum(_columns(t) for t, _ in line + listed) + 2 * len(listed) > LINE:
            listed = _count_states(down)  # the rows above name them
        line += [((", " if i else "") + text, m) for i, (text, m) in enumerate(listed)]
    elif health.drivers:
        line.append(("; all drivers running", "good"))
    lines = [line]
    if health.bluetooth is not None:
        state, said = health.bluetooth
        lines.append([("bluetooth: ", ""),
                      (state, "good" if state == "advertising" else "warn"),
                      (f" ({said})" if said else "", "")])
    if health.counters:  # only the ones that are not 0: something was shed or lost
        lines.append([("counters: " + ", ".join(
            f"{name} {value:.0f}" for name, value in sorted(health.counters.items())), "warn")])
    return lines


def _count_states(down: dict[str, tuple[str, str]]) -> list[tuple[str, str]]:
    """``2 failed, 1 stale``: drivers not running, by state."""
    states = sorted({s for s, _ in down.values()})
    return [(f"{sum(1 for s, _ in down.values() if s == state)} {state}",
             _state_meaning(state)) for state in states]


#: The single bike's table: topic, value, unit, age, then a note (driver state, why bad).
_ROW = "  {:<11}{:>10}  {:<10}{:>8}"


def render(board: Board, where: str, connected: bool, now: float, command: str = "",
           colour: bool = False, width: int = LINE, ever: bool = True) -> list[str]:
    """The watch table, one string per line; ``command`` starts the hints under it.

    ``now`` is the wall-clock time; ``ever`` says whether the broker was ever reached.
    At most 19 lines of at most ``width`` (79) columns: it fits 80x24.
    """
    state, meaning = _availability(board, connected, ever)
    name = f"bike {board.bike_id}" + (" (simulated)" if board.simulated is not None else "")
    head = f"{clean(name, 30)} on {clean(where, 30)}: "
    clock = datetime.fromtimestamp(now).strftime("%H:%M:%S")
    room = LINE - _columns(head) - len(clock) - 2
    lines: list[Line] = [
        [(head, "bold"), (_pad(state, room), meaning), ("  " + clock, "dim")],
        [(_ROW.format("topic", "value", "unit", "age"), "dim")],
    ]
    for topic in ROW_ORDER:
        reading = board.values.get(topic)
        if reading is None:
            row: Line = [(_ROW.format(topic, "-", _unit(topic), ""), "dim")]
        elif reading.bad:
            row = [(f"  {topic:<11}", ""), (f"{'bad':>10}", "bad"),
                   (f"  {_pad(reading.unit, 10)}{_age(now - reading.when):>8}", ""),
                   (f"  {reading.bad}", "bad")]
        else:
            row = [(_ROW.format(topic, _pad(reading.text, 10, right=True),
                                _pad(reading.unit, 10), _age(now - reading.when)), "")]
        driver = board.states.get(topic)
        if driver and driver[0] != "running":
            text = driver[0] + (f": {driver[1]}" if driver[1] else "")
            row.append(("  " + text, _state_meaning(driver[0])))
        elif topic == "speed" and reading is not None and reading.value is not None:
            row.append((f"  ({reading.value * 3.6:.1f} km/h)", "dim"))
        lines.append(row)
    if len(board.values) < len(ROW_ORDER):
        lines.append([("  (-: nothing reported yet; actuators report when they move)", "dim")])
    if board.unknown:
        names = sorted(board.unknown)
        more = f" (+{len(names) - 3})" if len(names) > 3 else ""
        lines.append([(f"unknown topics: {', '.join(names[:3])}{more}", "warn")])
    lines += _health_lines(board)
    if board.refusal:
        text, when = board.refusal
        lines.append([(f"last refusal {_age(now - when)} ago: ", ""), (text, "warn")])
    else:
        lines.append([("last refusal: none", "")])
    rendered = [_emit(line, width, colour) for line in lines]
    if command:  # whole, even when long: a cut command is no use to copy
        rendered += ["", "From another terminal:", f"  {command} set incline 5.5"]
        if board.simulated:
            rendered.append(f"  {command} press {board.simulated[0]}")
    return rendered


#: ``watch --all``: a column per field, then the health (what room is left).
_FLEET = "{:<6}  {:<8} {:>5} {:>7} {:>5} {:>5}  {:<14}  "


def _fleet_cell(board: Board, topic: str) -> str:
    reading = board.values.get(topic)
    if reading is None:
        return "-"
    return "bad" if reading.bad else reading.text


def render_all(fleet: Fleet, where: str, connected: bool, now: float, colour: bool = False,
               width: int = LINE, ever: bool = True, rows: int = HEIGHT) -> list[str]:
    """The ``watch --all`` table: one line per bike, at most ``rows`` lines."""
    clock = datetime.fromtimestamp(now).strftime("%H:%M:%S")
    if not connected:
        state = ("connection lost, reconnecting..." if ever
                 else "connecting to the broker..."), "warn"
    else:
        state = f"{len(fleet.boards) + fleet.ignored} bikes", ""
    head = f"bikes on {clean(where, 30)}: "
    lines: list[Line] = [
        [(head, "bold"), (_pad(state[0], LINE - 2 - _columns(head) - len(clock)), state[1]),
         ("  " + clock, "dim")],
        [(_FLEET.format("bike", "status", "power", "cadence", "speed", "heart",
                        "last refusal") + "health", "dim")],
        [(_FLEET.format("", "", "W", "RPM", "m/s", "BPM", ""), "dim")],
    ]
    boards = sorted(fleet.boards.values(), key=lambda b: b.bike_id)
    room = max(2, rows - len(lines))
    shown = boards if len(boards) <= room and not fleet.ignored else boards[: room - 1]
    for board in shown:
        avail = board.availability or "-"
        cells = _FLEET.format(clean(board.bike_id, 6), fit(avail, 8),
                              *(fit(_fleet_cell(board, t), w) for t, w in (
                                  ("power", 5), ("cadence", 7), ("speed", 5),
                                  ("heartrate", 5))),
                              fit(board.refusal[0], 14) if board.refusal else "-")
        meaning = {"online": "good", "offline": "warn", "-": "dim"}.get(avail, "bad")
        # The availability in its colour; the columns stay where the format put them.
        row: Line = [(cells[:8], ""), (cells[8:16], meaning), (cells[16:], "")]
        down = sorted(f"{t} {s[0]}" for t, s in board.states.items() if s[0] != "running")
        if board.health is not None and board.health.bad and not board.health.drivers:
            row.append(("bad health message", "bad"))
        elif down:
            text = ", ".join(down)
            if _columns(cells + text) > LINE:
                text = ", ".join(t for t, _ in _count_states(board.states_down()))
            row.append((text, "bad" if any("failed" in d for d in down) else "warn"))
        else:
            row.append(("-", "dim") if board.health is None else ("ok", "good"))
        lines.append(row)
    hidden = len(boards) - len(shown) + fleet.ignored
    if hidden:
        lines.append([(f"(+{hidden} more bikes)", "dim")])
    if not boards:
        lines.append([("(no bike has published anything on this broker yet)", "dim")])
    return [_emit(line, width, colour) for line in lines]


def redraw(lines: list[str], previous: int, rows: int) -> str:
    """Terminal output replacing the last ``previous`` rows drawn with ``lines``.

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


_SGR = re.compile(r"\x1b\[[0-9;]*m")


def screen_rows(lines: list[str], columns: int) -> int:
    """How many terminal rows ``lines`` take on a terminal ``columns`` wide (long ones wrap)."""
    return sum(max(1, -(-_columns(_SGR.sub("", line)) // max(1, columns))) for line in lines)


def use_colour(out: TextIO, environ: dict[str, str] | None = None) -> bool:
    """Colour on a terminal only, and never when NO_COLOR is set (no-color.org)."""
    env = os.environ if environ is None else environ
    return out.isatty() and not env.get("NO_COLOR") and env.get("TERM") != "dumb"


def cmd_watch(args: argparse.Namespace, target: Target, command: str = "",
              out: TextIO | None = None) -> int:
    """Redraw the table every ``--interval`` seconds (in place on a terminal).

    The first table is drawn once the broker has sent the retained messages (the
    bike's actuator values, availability and health), not half-empty before them.
    """
    out = out or sys.stdout
    tty = out.isatty()
    colour = use_colour(out)
    everyone = getattr(args, "all", False)
    model: Board | Fleet = Fleet() if everyone else Board(target.bike_id)
    session = Session(target)
    marker, _ = reply_address(target)
    if everyone:
        for pattern in ("bike/+/status", "bike/+/health", "bike/+/+/report",
                        "bike/+/+/status", marker):
            session.subscribe(pattern)
    else:
        session.subscribe(f"bike/{target.bike_id}/#")
        session.subscribe(state_topic(target.bike_id))
        session.subscribe(marker)  # also when the reply namespace lies elsewhere
    where = f"{target.host}:{target.port}"
    drawn = shown = 0
    try:
        session.open(args.timeout)
        # The broker sends retained messages in order, before anything published after
        # our SUBSCRIBE: once our own marker comes back, they have all arrived.
        session.publish(marker, b"smartbike watch: retained messages done", qos=1)
        deadline = time.monotonic() + args.timeout
        while (msg := session.next(deadline)) is not None and msg.topic != marker:
            model.take(msg, time.time())
        next_draw = time.monotonic()
        while args.count is None or drawn < args.count:
            if time.monotonic() < next_draw:
                msg = session.next(next_draw)
                if msg is not None and msg.topic != marker:
                    model.take(msg, time.time())
                continue
            next_draw = max(next_draw + args.interval, time.monotonic())
            size = shutil.get_terminal_size((WIDTH, HEIGHT)) if tty else None
            width = min(LINE, size.columns - 1) if size else LINE
            connected = session.is_connected()
            if isinstance(model, Fleet):
                lines = render_all(model, where, connected, time.time(), colour, width,
                                   rows=size.lines if size else HEIGHT)
            else:
                lines = render(model, where, connected, time.time(), command, colour, width)
            if tty:
                out.write(redraw(lines, shown, size.lines if size else HEIGHT))
                shown = screen_rows(lines, size.columns if size else WIDTH)
            else:
                out.write("\n".join(lines) + "\n\n")
            out.flush()
            drawn += 1
    except KeyboardInterrupt:
        pass
    finally:
        session.close()
    return OK


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


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number (1 to 65535): {text!r}")
    return int(text)


def _connection_options(parser: argparse.ArgumentParser, sub: bool) -> None:
    # On the subcommands too, so "smartbike set incline 5 --port 41234" works; there
    # they default to SUPPRESS, or argparse would overwrite what came before the command.
    d = argparse.SUPPRESS if sub else None
    parser.add_argument("--config", default=d, help="the bike's TOML file "
                        f"(default: {configuration.DEFAULT_PATH}, if present)")
    parser.add_argument("--host", default=d, help="broker host (overrides the config)")
    parser.add_argument("--port", type=_port, default=d, help="broker port")
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
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _connection_options(p, sub=False)
    subs = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    watch = subs.add_parser("watch", help="show the bike's live values, refreshing in place")
    watch.add_argument("--all", action="store_true",
                       help="every bike on the broker, one line each")
    watch.add_argument("--count", type=int, default=None, help="stop after N redraws")
    watch.add_argument("--interval", type=_positive, default=1.0,
                       help="seconds between redraws (default: 1)")
    set_ = subs.add_parser("set", help="move an actuator and print the outcome")
    set_.add_argument("topic", choices=ACTUATORS, help=", ".join(ACTUATORS))
    set_.add_argument("value", type=_finite, help="the new value, e.g. 5.5")
    press = subs.add_parser("press", help="press a button of a simulated bike")
    press.add_argument("button", help="button name from the config, e.g. LEFT")
    press.add_argument("--hold", type=float, default=0.2, help="seconds held (default 0.2)")
    record = subs.add_parser("record", help="write the bike's reports to a CSV file "
                             "(columns time,topic,value,unit) until Ctrl-C")
    record.add_argument("file", help="the CSV file to write, e.g. ride.csv")
    record.add_argument("--duration", type=_positive, default=None,
                        help="stop after this many seconds")
    record.add_argument("--force", action="store_true", help="overwrite an existing file")
    replay = subs.add_parser("replay", help="have a simulated bike's sensors ride a recorded "
                             "CSV file again, at its pace")
    replay.add_argument("file", help="a CSV file written by smartbike record")
    for sub in (watch, set_, press, record, replay):
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


COMMANDS: dict[str, Callable[[argparse.Namespace, Target], int]] = {
    "set": cmd_set, "press": cmd_press, "record": cmd_record, "replay": cmd_replay,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``smartbike`` command."""
    args = parser().parse_args(argv)
    # The command says what went wrong itself, once; the client library's log lines
    # would repeat it (and land in the middle of the watch's table).
    logging.basicConfig(level=logging.CRITICAL, format="smartbike: %(message)s")
    try:
        target = resolve(args)
        if args.command in COMMANDS:
            return COMMANDS[args.command](args, target)
        return cmd_watch(args, target, _command(args))
    except Failure as exc:
        print(f"smartbike: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return NO_ANSWER


if __name__ == "__main__":
    sys.exit(main())
