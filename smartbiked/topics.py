"""Topic names, report payloads and command parsing: every payload shape lives here.

Topics follow ``bike/{id}/{topic}/{sub-topic}`` (see the README's topic table).
:func:`parse_command` is the one place a control message becomes a command or a
refusal; it is pure and never raises, so nothing unchecked can reach hardware.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

#: Control payloads larger than this are refused before they are decoded.
MAX_COMMAND_BYTES = 512


@dataclass(frozen=True)
class TopicSpec:
    """What the apps know about a topic: its kind, unit, documented range and safe value.

    Kinds: ``actuator`` (a motor: commands, retained reports), ``sensor``, ``event``
    (buttons), ``virtual`` (a command the trainer logic carries out through actuators:
    target power, grade; no driver of its own) and ``state`` (a retained report only:
    the trainer mode).
    """

    name: str
    kind: Literal["actuator", "sensor", "event", "virtual", "state"]
    unit: str = ""
    low: float = 0.0
    high: float = math.inf
    step: float = 0.0  # 0: any value in range
    safe: float | None = None  # None: hold still when made safe
    #: Decimals a report carries: a sensor's noise in the 15th digit tells an app nothing.
    decimals: int | None = None


TOPICS: dict[str, TopicSpec] = {
    spec.name: spec
    for spec in (
        TopicSpec("incline", "actuator", "degree", -10, 19, 0.5, None),
        TopicSpec("resistance", "actuator", "percentage", 0, 100, 0, 0),
        TopicSpec("fan", "actuator", "percentage", 0, 100, 0, 0),
        TopicSpec("speed", "sensor", "m/s", decimals=3),
        TopicSpec("cadence", "sensor", "RPM", decimals=1),
        TopicSpec("power", "sensor", "W", decimals=1),
        TopicSpec("heartrate", "sensor", "BPM", decimals=1),
        TopicSpec("button", "event"),
        TopicSpec("targetpower", "virtual", "W", 0, 2000, 0, None),
        TopicSpec("grade", "virtual", "percentage", -40, 40, 0, None),
        TopicSpec("mode", "state"),
    )
}

#: Road parameters a grade command may carry besides the grade (FTMS's indoor bike
#: simulation): head wind in m/s, rolling resistance coefficient, drag area CdA in m^2
#: or wind resistance coefficient Cw = 0.5 rho CdA in kg/m. Each with its range.
GRADE_PARAMS: dict[str, tuple[float, float]] = {
    "wind": (-30.0, 30.0), "crr": (0.0, 0.05), "cda": (0.0, 2.0), "cw": (0.0, 2.5)}


@dataclass(frozen=True)
class Limits:
    """The values an actuator accepts: ``low <= v <= high``, on ``step`` from ``low``."""

    low: float
    high: float
    step: float = 0.0

    def problem(self, value: float) -> str | None:
        """Why ``value`` is not acceptable, or None."""
        if not self.low <= value <= self.high:
            return "out of range"
        if self.step:
            steps = (value - self.low) / self.step
            if abs(steps - round(steps)) > 1e-9:
                return "not on a step"
        return None

    def as_dict(self) -> dict[str, float]:
        """The limits as they appear in status payloads."""
        return {"min": self.low, "max": self.high, "step": self.step}


@dataclass(frozen=True)
class Command:
    """A parsed, range-checked request to move one actuator (or a virtual one).

    ``params`` holds a grade command's road parameters as sorted ``(name, value)``
    pairs (see :data:`GRADE_PARAMS`); empty for every other topic.
    """

    topic: str
    value: float
    params: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Refusal:
    """Why a control message was not applied; ``topic`` is None when no topic could be named."""

    topic: str | None
    reason: str
    allowed: Limits | None = None

    def payload(self, timestamp: float, device_name: str) -> dict[str, Any]:
        """The JSON object published on the topic's ``status`` sub-topic."""
        body: dict[str, Any] = {"ok": False, "error": self.reason}
        if self.allowed is not None:
            body["allowed"] = self.allowed.as_dict()
        body["timestamp"] = timestamp
        body["metadata"] = {"deviceName": device_name}
        return body


def topic_path(bike_id: str, topic: str, sub: str) -> str:
    """``bike/{id}/{topic}/{sub}``."""
    return f"bike/{bike_id}/{topic}/{sub}"


def availability_topic(bike_id: str) -> str:
    """The retained topic saying whether the bike's daemon is online."""
    return f"bike/{bike_id}/status"


def control_filter(bike_id: str) -> str:
    """The one subscription the daemon makes: its own bike's control topics."""
    return f"bike/{bike_id}/+/control"


def report_payload(value: float, unit: str, timestamp: float, device_name: str) -> dict[str, Any]:
    """The documented report shape (value, unitName, timestamp, metadata.deviceName)."""
    return {"value": value, "unitName": unit, "timestamp": timestamp,
            "metadata": {"deviceName": device_name}}


def button_payload(button: str, pressed: bool, timestamp: float) -> dict[str, Any]:
    """The documented button event shape; state 1 is pressed, 0 released."""
    return {"button": button, "state": 1 if pressed else 0, "timestamp": timestamp}


def mode_payload(body: Mapping[str, Any], timestamp: float, device_name: str) -> dict[str, Any]:
    """The retained ``mode`` report: the trainer's body plus timestamp and metadata.

    ``body`` is ``{"mode": "erg" | "sim" | "resistance", "target": ...}``, with
    ``params`` (a grade's road) and ``reason`` (why a mode was left) when there are any.
    """
    return {**body, "timestamp": timestamp, "metadata": {"deviceName": device_name}}


def applied_payload(value: float, timestamp: float, device_name: str) -> dict[str, Any]:
    """The answer to a request that was applied (MQTT v5 ResponseTopic)."""
    return {"ok": True, "value": value, "timestamp": timestamp,
            "metadata": {"deviceName": device_name}}


class _Unusable(Exception):
    """Internal: a payload that is not a command; the message is the refusal reason."""


def _reject_constant(name: str) -> float:
    raise _Unusable(f"{name} is not a number")


def _number(value: Any, what: str) -> float:
    # bool is an int subclass: true is not 1 for an actuator.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Unusable(f"{what} must be a number, not {_json_type(value)}")
    try:
        number = float(value)
    except OverflowError:
        # JSON integers are exact: one of 310 digits is beyond any float.
        raise _Unusable(f"{what} must be a finite number (too large)") from None
    if not math.isfinite(number):
        raise _Unusable(f"{what} must be a finite number")
    return number


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads object hook: a key given twice is refused, not silently overwritten.

    ``{"value": 500, "value": 5}`` would otherwise mean whatever the last key says,
    while an app or a broker-side filter that reads the first one sees 500.
    """
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            # json.dumps escapes control characters; the prefix keeps the reason short.
            raise _Unusable(f"duplicate key {json.dumps(key)[:40]}")
        document[key] = value
    return document


def _json_type(value: Any) -> str:
    return {bool: "a boolean", str: "a string", list: "a list", dict: "an object",
            type(None): "null"}.get(type(value), type(value).__name__)


def _value_from(topic: str, document: Any) -> float:
    """Pick the value out of any of the command shapes the existing apps send."""
    # "No target power" is said with 0 or null, as FTMS apps do.
    nullable = topic == "targetpower"
    if not isinstance(document, dict):
        if document is None and nullable:
            return 0.0
        return _number(document, "the command")
    keys = ["value", topic] + (["power", "level"] if topic == "fan" else [])
    present = [k for k in keys if k in document]
    if not present:
        raise _Unusable(f"no value: expected one of the keys {', '.join(keys)}")
    if len(present) > 1:
        raise _Unusable(f"ambiguous: several value keys ({', '.join(present)})")
    key = present[0]
    if document[key] is None and nullable:
        return 0.0
    number = _number(document[key], f'"{key}"')
    if key == "level":
        if number != int(number) or not 0 <= number <= 5:
            raise _Unusable('"level" must be a whole number from 0 to 5')
        number *= 20
    return number


def parse_command(
    topic: str, payload: bytes, bike_id: str, actuators: Mapping[str, Limits]
) -> Command | Refusal:
    """Turn one control message into a :class:`Command` or a :class:`Refusal`; never raises.

    ``actuators`` maps each topic this bike can move to its limits.
    Accepted shapes: ``{"value": v}``, ``{"<topic>": v}``, fan ``{"power": v}`` and
    ``{"level": 0..5}`` (x20 percent), and a bare number; other keys are ignored.
    Virtual topics (``targetpower``, ``grade``) are accepted when ``actuators`` lists
    them; a target power of null means 0 (no target); a grade may carry ``wind``,
    ``crr`` and ``cda`` or ``cw`` (:data:`GRADE_PARAMS`), returned in ``params``.
    Refused besides bad values: a key given twice in any object, and numbers no float
    can hold (``1e400``, an integer of 310 digits).
    """
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != "bike" or parts[3] != "control":
        return Refusal(None, "not a control topic")
    _, target, name, _ = parts
    if target != bike_id:
        return Refusal(name or None, f"for bike {target!r}, this is bike {bike_id!r}")
    spec = TOPICS.get(name)
    if spec is None:
        return Refusal(name, "unknown topic")
    if spec.kind not in ("actuator", "virtual"):
        kind = "report" if spec.kind == "state" else spec.kind
        return Refusal(name, f"{name} is a {kind}, it takes no commands")
    limits = actuators.get(name)
    if limits is None:
        if spec.kind == "virtual":
            return Refusal(name, f"this bike does not offer {name} (no [trainer] for it)")
        return Refusal(name, f"this bike has no {name} actuator")
    if len(payload) > MAX_COMMAND_BYTES:
        return Refusal(name, f"payload too large (over {MAX_COMMAND_BYTES} bytes)", limits)
    value = _plain_value(payload)
    if value is not None:
        problem = limits.problem(value)
        if problem:
            return Refusal(name, f"{value:g} is {problem}", limits)
        return Command(name, value, ())
    try:
        text = payload.decode("utf-8")
        document = json.loads(text, parse_constant=_reject_constant,
                              object_pairs_hook=_unique_keys)
        value = _value_from(name, document)
        params = _grade_params(document) if name == "grade" else ()
    except UnicodeDecodeError:
        return Refusal(name, "payload is not UTF-8 text", limits)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return Refusal(name, "payload is neither JSON nor a number", limits)
    except _Unusable as exc:
        return Refusal(name, str(exc), limits)
    problem = limits.problem(value)
    if problem:
        return Refusal(name, f"{value:g} is {problem}", limits)
    return Command(name, value, params)


#: ``{"value": <JSON number>}``, the shape nearly every command has (JSON whitespace only).
_PLAIN_VALUE = re.compile(
    rb'[ \t\n\r]*\{[ \t\n\r]*"value"[ \t\n\r]*:[ \t\n\r]*'
    rb'(-?(?:0|[1-9][0-9]*))(\.[0-9]+)?([eE][+-]?[0-9]+)?[ \t\n\r]*\}[ \t\n\r]*')


def _plain_value(payload: bytes) -> float | None:
    """The value of a ``{"value": <number>}`` payload, read without json.loads; else None.

    The value json.loads and :func:`_value_from` would give, for every topic: a JSON
    integer is exact, so it is converted from the integer (``-0`` is 0.0). Anything
    else (other keys, an infinite or too large number) is None: the full parse decides.
    """
    match = _PLAIN_VALUE.fullmatch(payload)
    if match is None:
        return None
    integer, fraction, exponent = match.groups()
    try:
        number = (float(int(integer)) if fraction is None and exponent is None
                  else float(match.group(1) + (fraction or b"") + (exponent or b"")))
    except OverflowError:  # an integer of 310 digits or more
        return None
    return number if math.isfinite(number) else None


def _grade_params(document: Any) -> tuple[tuple[str, float], ...]:
    """The road parameters beside a grade: each optional, each a number in its range."""
    if not isinstance(document, dict):
        return ()
    if "cda" in document and "cw" in document:
        raise _Unusable('ambiguous: both "cda" and "cw" (give one drag figure)')
    params = []
    for key, (low, high) in GRADE_PARAMS.items():
        if key in document:
            number = _number(document[key], f'"{key}"')
            if not low <= number <= high:
                raise _Unusable(f'"{key}" {number:g} is out of range ({low:g} to {high:g})')
            params.append((key, number))
    return tuple(sorted(params))


# --------------------------------------------------------------------------- replies

#: Bounds on where an MQTT v5 answer may go and what it may carry back.
MAX_REPLY_TOPIC_BYTES = 256
MAX_REPLY_LEVELS = 8
MAX_CORRELATION_BYTES = 64
#: A reply never lands on a topic ending in one of these: on any bike (or the virtual
#: world) it would be a command, a reading, an availability or a health message.
PROTECTED_LEAVES = frozenset({"control", "report", "status", "health", "press", "state"})


def _topic_shape_problem(topic: str) -> str | None:
    """Limits shared by reply topics and the patterns that admit them."""
    if not topic:
        return "is empty"
    if "\0" in topic:
        return "contains NUL"
    if topic.startswith("$"):
        return "is a broker ($) topic"
    if len(topic.encode("utf-8", "surrogatepass")) > MAX_REPLY_TOPIC_BYTES:
        return f"is longer than {MAX_REPLY_TOPIC_BYTES} bytes"
    if topic.count("/") + 1 > MAX_REPLY_LEVELS:
        return f"has more than {MAX_REPLY_LEVELS} levels"
    return None


def reply_pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be a reply namespace (config ``reply_topics``), or None."""
    problem = _topic_shape_problem(pattern)
    if problem:
        return problem
    levels = pattern.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "# must be the whole last level"
        if "+" in level and level != "+":
            return "+ must be a whole level"
    return None


def reply_topic_problem(topic: str, patterns: tuple[str, ...]) -> str | None:
    """Why answers must not be published to ``topic``, or None when it is a reply topic.

    ``patterns`` are the bike's reply namespaces (``{id}`` already filled in).
    """
    problem = _topic_shape_problem(topic)
    if problem:
        return f"ResponseTopic {problem}"
    if "+" in topic or "#" in topic:
        return "ResponseTopic must not contain wildcards"
    if not topic.isprintable():
        return "ResponseTopic contains control characters"
    if topic.rsplit("/", 1)[-1] in PROTECTED_LEAVES:
        return "ResponseTopic must not be a control, report, status or health topic"
    from paho.mqtt.client import topic_matches_sub

    if not any(topic_matches_sub(p, topic) for p in patterns):
        return f"ResponseTopic must lie under {' or '.join(patterns)}"
    return None


def correlation_problem(data: bytes | None) -> str | None:
    """Why CorrelationData cannot be echoed back, or None."""
    if data is not None and len(data) > MAX_CORRELATION_BYTES:
        return f"CorrelationData is longer than {MAX_CORRELATION_BYTES} bytes"
    return None
