"""The Fitness Machine Control Point as a state machine: who controls the bike, and what
a request turns into.

One client at a time holds control (it asked with Request Control and nobody else held
it); every other command from anyone else is answered "control not permitted". An
accepted request becomes an ordinary command handed to ``submit(topic, payload)`` --
the same short topic name (``resistance``, ``targetpower``, ``grade``, ``incline``)
and JSON payload an MQTT app would send on ``bike/{id}/{topic}/control`` -- so the
service runs it through exactly the MQTT path (parse_command, limits, min_interval,
safe values, the trainer). ``submit`` answers None when the command was taken, else
the refusal reason; a refusal is answered "operation failed".

No Bluetooth stack and no thread of its own: a backend calls :meth:`ControlPoint.write`
with the bytes a client wrote and sends back what it returns.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from smartbiked import ftms
from smartbiked.ftms import (
    Invalid,
    Request,
    RequestControl,
    Reset,
    SetSimulation,
    SetTargetInclination,
    SetTargetPower,
    SetTargetResistance,
    StartResume,
    StopPause,
    Unsupported,
)
from smartbiked.topics import GRADE_PARAMS, Limits

#: The command topics FTMS requests turn into: an MQTT command on one of these takes
#: control from a Bluetooth app.
FTMS_TOPICS = frozenset({"resistance", "targetpower", "grade", "incline"})

#: ``submit(topic, payload)``: None when the command was taken, else why not.
Submit = Callable[[str, bytes], "str | None"]

#: FTMS resistance levels the bike's 0-100 % range is shown as: 20.0 at 0.1 steps fits
#: the 1-byte Set Target Resistance form (uint8 at 0.1, at most 25.5) that older apps send.
DEFAULT_LEVELS = 20.0


@dataclass(frozen=True)
class Answer:
    """What a Control Point write causes.

    ``response`` is the indication to the writer (None only for an empty write, which
    a backend refuses at the ATT level); ``status`` a Machine Status notification for
    every subscriber, when the request changed something.
    """

    response: bytes | None
    status: bytes | None = None


class ControlPoint:
    """FTMS control of one bike; safe to call from any thread.

    ``limits`` maps each topic the bike accepts commands on to its limits (the
    service's command limits): which requests are supported follows from it.
    ``on_control(controller, reason)`` is told whenever control changes hands
    (``controller`` None: nobody over Bluetooth), for the ``mode`` report.
    ``may_take()`` says why a Request Control must wait (an MQTT app holds the bike),
    or None.
    """

    def __init__(self, submit: Submit, limits: Mapping[str, Limits], *,
                 levels: float = DEFAULT_LEVELS,
                 on_control: Callable[[str | None, str], None] | None = None,
                 may_take: Callable[[], str | None] | None = None) -> None:
        self._submit = submit
        self._may_take = may_take
        self.limits = dict(limits)
        self.levels = levels
        self._on_control = on_control
        self._lock = threading.Lock()
        self.controller: str | None = None
        self.last_refusal: str | None = None

    # -- what the bike offers -------------------------------------------------------------

    def features(self) -> tuple[int, int]:
        """(Fitness Machine Features, Target Setting Features) for the Feature value."""
        machine = (ftms.FEATURE_CADENCE | ftms.FEATURE_POWER | ftms.FEATURE_HEART_RATE
                   | (ftms.FEATURE_RESISTANCE_LEVEL if "resistance" in self.limits else 0))
        target = 0
        for topic, bit in (("resistance", ftms.TARGET_RESISTANCE),
                           ("targetpower", ftms.TARGET_POWER),
                           ("grade", ftms.TARGET_SIMULATION),
                           ("incline", ftms.TARGET_INCLINATION)):
            if topic in self.limits:
                target |= bit
        return machine, target

    def resistance_range(self) -> bytes:
        """Supported Resistance Level Range: 0 to ``levels`` in 0.1 steps."""
        return ftms.encode_resistance_range(0.0, self.levels, 0.1)

    def power_range(self) -> bytes:
        """Supported Power Range from the ``targetpower`` limits."""
        lim = self.limits.get("targetpower", Limits(0, 0))
        return ftms.encode_power_range(lim.low, lim.high, max(lim.step, 1.0))

    def inclination_range(self) -> bytes:
        """Supported Inclination Range (percent) from the ``incline`` limits (degrees)."""
        lim = self.limits.get("incline", Limits(0, 0))
        return ftms.encode_inclination_range(_percent(lim.low), _percent(lim.high), 0.1)

    def level_of(self, percent: float) -> float:
        """The FTMS resistance level shown for a resistance of ``percent``."""
        lim = self.limits.get("resistance", Limits(0, 100))
        span = lim.high - lim.low
        return 0.0 if span <= 0 else (percent - lim.low) / span * self.levels

    # -- requests ------------------------------------------------------------------------

    def write(self, peer: str, raw: bytes) -> Answer:
        """A client ``peer`` wrote ``raw`` to the Control Point."""
        request = ftms.decode_request(raw)
        if request is None:
            return Answer(None)
        op = ftms.op_code(request)
        with self._lock:
            result = self._result(peer, request)
        answer = Answer(ftms.encode_response(op, result),
                        ftms.status_for(request) if result == ftms.SUCCESS else None)
        return answer

    def _result(self, peer: str, request: Request) -> int:
        if isinstance(request, Unsupported) or not self._supported(request):
            return ftms.OP_NOT_SUPPORTED
        if isinstance(request, RequestControl):
            if self.controller not in (None, peer):
                return ftms.CONTROL_NOT_PERMITTED
            if self.controller is None:
                held = self._may_take() if self._may_take is not None else None
                if held is not None:
                    self.last_refusal = held
                    return ftms.CONTROL_NOT_PERMITTED
                self._hand_over(peer, "requested control over Bluetooth")
            return ftms.SUCCESS
        if self.controller != peer:
            return ftms.CONTROL_NOT_PERMITTED
        if isinstance(request, Invalid):
            return ftms.INVALID_PARAMETER
        if isinstance(request, Reset):
            self._hand_over(None, "reset by the Bluetooth app")
            return ftms.SUCCESS
        if isinstance(request, StartResume | StopPause):
            return ftms.SUCCESS
        command = self._command(request)
        if command is None:
            return ftms.INVALID_PARAMETER
        topic, document = command
        why = self._submit(topic, json.dumps(document).encode())
        if why is not None:
            self.last_refusal = why
            return ftms.OPERATION_FAILED
        return ftms.SUCCESS

    def _supported(self, request: Request) -> bool:
        needs = {SetTargetResistance: "resistance", SetTargetPower: "targetpower",
                 SetSimulation: "grade", SetTargetInclination: "incline"}.get(type(request))
        if isinstance(request, Invalid):
            needs = {ftms.OP_SET_TARGET_RESISTANCE: "resistance",
                     ftms.OP_SET_TARGET_POWER: "targetpower", ftms.OP_SET_SIMULATION: "grade",
                     ftms.OP_SET_TARGET_INCLINATION: "incline"}.get(request.op)
        return needs is None or needs in self.limits

    def _command(self, request: Request) -> tuple[str, dict[str, float]] | None:
        """The (topic, JSON document) for a setting request; None if out of range."""
        if isinstance(request, SetTargetResistance):
            if not 0.0 <= request.level <= self.levels:
                return None
            lim = self.limits["resistance"]
            value = _on_step(lim.low + request.level / self.levels * (lim.high - lim.low), lim)
            return ("resistance", {"value": value}) if lim.problem(value) is None else None
        if isinstance(request, SetTargetPower):
            lim = self.limits["targetpower"]
            ok = lim.problem(float(request.watts)) is None
            return ("targetpower", {"value": request.watts}) if ok else None
        if isinstance(request, SetTargetInclination):
            lim = self.limits["incline"]
            value = _on_step(math.degrees(math.atan(request.percent / 100.0)), lim)
            return ("incline", {"value": value}) if lim.problem(value) is None else None
        if isinstance(request, SetSimulation):
            if self.limits["grade"].problem(request.grade) is not None:
                return None
            document = {"value": request.grade, "wind": request.wind, "crr": request.crr,
                        "cw": request.cw}
            for key, (low, high) in GRADE_PARAMS.items():
                if key in document and not low <= document[key] <= high:
                    return None
            return "grade", document
        return None

    # -- control changing hands ------------------------------------------------------------

    def disconnected(self, peer: str) -> bytes | None:
        """``peer``'s link is gone: Control Permission Lost when it held control."""
        with self._lock:
            if self.controller != peer:
                return None
            self._hand_over(None, "the Bluetooth app disconnected")
        return ftms.CONTROL_LOST

    def revoke(self, reason: str) -> bytes | None:
        """Someone else (an MQTT app) took over: Control Permission Lost, if anyone held it."""
        with self._lock:
            if self.controller is None:
                return None
            self._hand_over(None, reason)
        return ftms.CONTROL_LOST

    def _hand_over(self, controller: str | None, reason: str) -> None:
        self.controller = controller
        if self._on_control is not None:
            self._on_control(controller, reason)


def _percent(degrees: float) -> float:
    return math.tan(math.radians(degrees)) * 100.0


def _on_step(value: float, limits: Limits) -> float:
    """``value`` rounded to the limits' step from their low end (what a command may say)."""
    if limits.step:
        value = limits.low + math.floor((value - limits.low) / limits.step + 0.5) * limits.step
    return round(value, 3)
