"""The Bluetooth smart-trainer byte layer: FTMS, Cycling Power and Heart Rate values.

Pure encoding and decoding (no Bluetooth stack imported), so the layouts can be tested
byte for byte and both backends (BlueZ, bumble) share them. Field layouts follow the
Fitness Machine Service 1.0 specification (FTMS section numbers below), the Cycling
Power Service 1.1 and the Heart Rate Service 1.0 with the SIG's characteristic
definitions. All multi-octet fields are little-endian.

Readings are encoded leniently: a value out of a field's range is clamped, a missing or
non-finite one leaves its field out (an app then shows nothing rather than a stuck
number). Control Point requests are decoded strictly and never raise: anything not
understood becomes an :class:`Invalid` request answered with the right result code.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

# -- UUIDs (16-bit, SIG assigned numbers) ---------------------------------------------------

FTMS_SERVICE = 0x1826
FITNESS_MACHINE_FEATURE = 0x2ACC
INDOOR_BIKE_DATA = 0x2AD2
TRAINING_STATUS = 0x2AD3
SUPPORTED_INCLINATION_RANGE = 0x2AD5
SUPPORTED_RESISTANCE_RANGE = 0x2AD6
SUPPORTED_POWER_RANGE = 0x2AD8
CONTROL_POINT = 0x2AD9
MACHINE_STATUS = 0x2ADA
CPS_SERVICE = 0x1818
CP_MEASUREMENT = 0x2A63
CP_FEATURE = 0x2A65
SENSOR_LOCATION = 0x2A5D
HRS_SERVICE = 0x180D
HR_MEASUREMENT = 0x2A37

# -- Control Point op codes (FTMS 4.16.1, Table 4.15) and result codes (Table 4.24) ---------

OP_REQUEST_CONTROL = 0x00
OP_RESET = 0x01
OP_SET_TARGET_SPEED = 0x02
OP_SET_TARGET_INCLINATION = 0x03
OP_SET_TARGET_RESISTANCE = 0x04
OP_SET_TARGET_POWER = 0x05
OP_START_RESUME = 0x07
OP_STOP_PAUSE = 0x08
OP_SET_SIMULATION = 0x11
OP_RESPONSE = 0x80

SUCCESS = 0x01
OP_NOT_SUPPORTED = 0x02
INVALID_PARAMETER = 0x03
OPERATION_FAILED = 0x04
CONTROL_NOT_PERMITTED = 0x05

STOP, PAUSE = 0x01, 0x02

# -- Fitness Machine Feature bits (FTMS 4.3.1.1, 4.3.1.2) -----------------------------------

FEATURE_CADENCE = 1 << 1
FEATURE_RESISTANCE_LEVEL = 1 << 7
FEATURE_HEART_RATE = 1 << 10
FEATURE_POWER = 1 << 14
TARGET_INCLINATION = 1 << 1
TARGET_RESISTANCE = 1 << 2
TARGET_POWER = 1 << 3
TARGET_SIMULATION = 1 << 13

# -- Training Status values (FTMS 4.10.1.2) -------------------------------------------------

TRAINING_OTHER = 0x00
TRAINING_IDLE = 0x01
TRAINING_MANUAL = 0x0D

# -- Machine Status op codes (FTMS 4.17, Table 4.26) ----------------------------------------

STATUS_RESET = 0x01
STATUS_STOPPED = 0x02
STATUS_STARTED = 0x04
STATUS_TARGET_INCLINE = 0x06
STATUS_TARGET_RESISTANCE = 0x07
STATUS_TARGET_POWER = 0x08
STATUS_SIMULATION = 0x12
STATUS_CONTROL_LOST = 0xFF


class DecodeError(ValueError):
    """Bytes that are not a value of the characteristic they were read from."""


def _clamp_int(value: float, low: int, high: int) -> int:
    return int(min(max(round(value), low), high))


def _present(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


class _Reader:
    """Little-endian fields out of a buffer; DecodeError when it runs short."""

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)
        self.at = 0

    def take(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise DecodeError(f"{len(self.data)} bytes: too short")
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return int(value)

    def u24(self) -> int:
        low = self.take("<H")
        return low | self.take("<B") << 16

    def end(self) -> None:
        if self.at != len(self.data):
            raise DecodeError(f"{len(self.data) - self.at} bytes too many")


# ============================================================== Indoor Bike Data (FTMS 4.9)

@dataclass(frozen=True)
class IndoorBikeData:
    """What the bike reports to a training app; None leaves a field out.

    ``speed`` km/h (0.01), ``cadence`` RPM (0.5), ``resistance`` the FTMS resistance
    level (sint16, resolution 1), ``power`` W, ``heart_rate`` BPM.
    """

    speed: float | None = None
    cadence: float | None = None
    resistance: float | None = None
    power: float | None = None
    heart_rate: float | None = None


# Flag bits (FTMS 4.9.1.1). Bit 0 "More Data" is inverted: 0 means Instantaneous
# Speed is present.
_IBD_MORE_DATA = 1 << 0
_IBD_AVG_SPEED = 1 << 1
_IBD_CADENCE = 1 << 2
_IBD_AVG_CADENCE = 1 << 3
_IBD_DISTANCE = 1 << 4
_IBD_RESISTANCE = 1 << 5
_IBD_POWER = 1 << 6
_IBD_AVG_POWER = 1 << 7
_IBD_ENERGY = 1 << 8
_IBD_HEART_RATE = 1 << 9
_IBD_MET = 1 << 10
_IBD_ELAPSED = 1 << 11
_IBD_REMAINING = 1 << 12


def encode_indoor_bike_data(data: IndoorBikeData) -> bytes:
    """Indoor Bike Data: flags then the fields present, in the specification's order."""
    flags = 0
    body = b""
    if _present(data.speed):
        assert data.speed is not None
        body += struct.pack("<H", _clamp_int(data.speed * 100, 0, 0xFFFF))
    else:
        flags |= _IBD_MORE_DATA
    if _present(data.cadence):
        assert data.cadence is not None
        flags |= _IBD_CADENCE
        body += struct.pack("<H", _clamp_int(data.cadence * 2, 0, 0xFFFF))
    if _present(data.resistance):
        assert data.resistance is not None
        flags |= _IBD_RESISTANCE
        body += struct.pack("<h", _clamp_int(data.resistance, -0x8000, 0x7FFF))
    if _present(data.power):
        assert data.power is not None
        flags |= _IBD_POWER
        body += struct.pack("<h", _clamp_int(data.power, -0x8000, 0x7FFF))
    if _present(data.heart_rate):
        assert data.heart_rate is not None
        flags |= _IBD_HEART_RATE
        body += struct.pack("<B", _clamp_int(data.heart_rate, 0, 0xFF))
    return struct.pack("<H", flags) + body


def decode_indoor_bike_data(raw: bytes) -> IndoorBikeData:
    """Read Indoor Bike Data, skipping the fields this bike never sends."""
    r = _Reader(raw)
    flags = r.take("<H")
    speed = cadence = resistance = power = heart_rate = None
    if not flags & _IBD_MORE_DATA:
        speed = r.take("<H") / 100
    if flags & _IBD_AVG_SPEED:
        r.take("<H")
    if flags & _IBD_CADENCE:
        cadence = r.take("<H") / 2
    if flags & _IBD_AVG_CADENCE:
        r.take("<H")
    if flags & _IBD_DISTANCE:
        r.u24()
    if flags & _IBD_RESISTANCE:
        resistance = float(r.take("<h"))
    if flags & _IBD_POWER:
        power = float(r.take("<h"))
    if flags & _IBD_AVG_POWER:
        r.take("<h")
    if flags & _IBD_ENERGY:
        r.take("<H"), r.take("<H"), r.take("<B")
    if flags & _IBD_HEART_RATE:
        heart_rate = float(r.take("<B"))
    if flags & _IBD_MET:
        r.take("<B")
    if flags & _IBD_ELAPSED:
        r.take("<H")
    if flags & _IBD_REMAINING:
        r.take("<H")
    r.end()
    return IndoorBikeData(speed, cadence, resistance, power, heart_rate)


# ===================================================== Feature, ranges, service data

def encode_feature(machine: int, target: int) -> bytes:
    """Fitness Machine Feature (FTMS 4.3): two uint32 bit fields."""
    return struct.pack("<II", machine, target)


def decode_feature(raw: bytes) -> tuple[int, int]:
    """(Fitness Machine Features, Target Setting Features)."""
    r = _Reader(raw)
    machine, target = r.take("<I"), r.take("<I")
    r.end()
    return machine, target


def encode_resistance_range(low: float, high: float, step: float) -> bytes:
    """Supported Resistance Level Range (FTMS 4.5): sint16, sint16, uint16 at 0.1."""
    return struct.pack("<hhH", _clamp_int(low * 10, -0x8000, 0x7FFF),
                       _clamp_int(high * 10, -0x8000, 0x7FFF), _clamp_int(step * 10, 0, 0xFFFF))


def encode_inclination_range(low: float, high: float, step: float) -> bytes:
    """Supported Inclination Range (FTMS 4.4): percent, sint16, sint16, uint16 at 0.1."""
    return encode_resistance_range(low, high, step)  # the same layout and resolution


def encode_power_range(low: float, high: float, step: float) -> bytes:
    """Supported Power Range (FTMS 4.6): watts, sint16, sint16, uint16 at 1."""
    return struct.pack("<hhH", _clamp_int(low, -0x8000, 0x7FFF),
                       _clamp_int(high, -0x8000, 0x7FFF), _clamp_int(step, 0, 0xFFFF))


def decode_range(raw: bytes, resolution: float) -> tuple[float, float, float]:
    """(minimum, maximum, increment) of a Supported ... Range value."""
    r = _Reader(raw)
    low, high, step = r.take("<h"), r.take("<h"), r.take("<H")
    r.end()
    return (round(low * resolution, 3), round(high * resolution, 3),
            round(step * resolution, 3))


def ftms_service_data(available: bool = True) -> bytes:
    """The FTMS advertising Service Data (FTMS 3.1.1): flags, machine type "indoor bike".

    Apps filter their scan on it: bit 0 of the flags says the machine is available,
    bit 5 of the uint16 type says it is an indoor bike.
    """
    return struct.pack("<BH", 0x01 if available else 0x00, 1 << 5)


def encode_training_status(status: int) -> bytes:
    """Training Status (FTMS 4.10): flags (no string) and the status value."""
    return bytes([0x00, status & 0xFF])


# =============================================== Control Point requests (FTMS 4.16)

@dataclass(frozen=True)
class RequestControl:
    """Op 0x00: the client asks to be the controller."""


@dataclass(frozen=True)
class Reset:
    """Op 0x01: back to the initial state; control is released."""


@dataclass(frozen=True)
class SetTargetInclination:
    """Op 0x03: ``percent`` grade of the frame (sint16, 0.1 %)."""

    percent: float


@dataclass(frozen=True)
class SetTargetResistance:
    """Op 0x04: ``level`` (0.1 resolution). ``wide`` is the 2-byte sint16 form.

    FTMS 1.0 gives a uint8; later revisions and some apps (pyftms) send a sint16: both
    arrive in the field and both are accepted.
    """

    level: float
    wide: bool = False


@dataclass(frozen=True)
class SetTargetPower:
    """Op 0x05: ERG target in W (sint16)."""

    watts: int


@dataclass(frozen=True)
class StartResume:
    """Op 0x07."""


@dataclass(frozen=True)
class StopPause:
    """Op 0x08: ``pause`` False is Stop (0x01), True is Pause (0x02)."""

    pause: bool = False


@dataclass(frozen=True)
class SetSimulation:
    """Op 0x11: Indoor Bike Simulation Parameters (FTMS 4.16.2.18).

    ``wind`` m/s head wind (sint16, 0.001), ``grade`` % (sint16, 0.01), ``crr``
    (uint8, 0.0001), ``cw`` wind resistance coefficient kg/m (uint8, 0.01).
    """

    wind: float
    grade: float
    crr: float
    cw: float


@dataclass(frozen=True)
class Unsupported:
    """A well-formed op code this bike does not implement (or an unknown one)."""

    op: int


@dataclass(frozen=True)
class Invalid:
    """A known op code with a parameter of the wrong length or value."""

    op: int
    reason: str


Request = (RequestControl | Reset | SetTargetInclination | SetTargetResistance
           | SetTargetPower | StartResume | StopPause | SetSimulation | Unsupported | Invalid)

_OP_OF: dict[type, int] = {
    RequestControl: OP_REQUEST_CONTROL, Reset: OP_RESET,
    SetTargetInclination: OP_SET_TARGET_INCLINATION,
    SetTargetResistance: OP_SET_TARGET_RESISTANCE, SetTargetPower: OP_SET_TARGET_POWER,
    StartResume: OP_START_RESUME, StopPause: OP_STOP_PAUSE, SetSimulation: OP_SET_SIMULATION,
}


def op_code(request: Request) -> int:
    """The op code a request came with (what its response names)."""
    if isinstance(request, Unsupported | Invalid):
        return request.op
    return _OP_OF[type(request)]


def decode_request(raw: bytes) -> Request | None:
    """A Control Point write as a request; None for an empty write. Never raises."""
    data = bytes(raw)
    if not data:
        return None
    op, param = data[0], data[1:]

    def exactly(n: int) -> bool:
        return len(param) == n

    if op in (OP_REQUEST_CONTROL, OP_RESET, OP_START_RESUME):
        if not exactly(0):
            return Invalid(op, f"takes no parameter, got {len(param)} bytes")
        if op == OP_REQUEST_CONTROL:
            return RequestControl()
        return Reset() if op == OP_RESET else StartResume()
    if op == OP_SET_TARGET_INCLINATION:
        if not exactly(2):
            return Invalid(op, "inclination is a 2-byte sint16")
        return SetTargetInclination(struct.unpack("<h", param)[0] / 10)
    if op == OP_SET_TARGET_RESISTANCE:
        if exactly(1):
            return SetTargetResistance(param[0] / 10, wide=False)
        if exactly(2):
            return SetTargetResistance(struct.unpack("<h", param)[0] / 10, wide=True)
        return Invalid(op, "resistance is a 1-byte uint8 or a 2-byte sint16")
    if op == OP_SET_TARGET_POWER:
        if not exactly(2):
            return Invalid(op, "power is a 2-byte sint16")
        return SetTargetPower(struct.unpack("<h", param)[0])
    if op == OP_STOP_PAUSE:
        if not exactly(1) or param[0] not in (STOP, PAUSE):
            return Invalid(op, "stop or pause takes one byte, 1 (stop) or 2 (pause)")
        return StopPause(pause=param[0] == PAUSE)
    if op == OP_SET_SIMULATION:
        if not exactly(6):
            return Invalid(op, "simulation parameters are 6 bytes")
        wind, grade, crr, cw = struct.unpack("<hhBB", param)
        return SetSimulation(wind / 1000, grade / 100, crr / 10000, cw / 100)
    return Unsupported(op)


def encode_request(request: Request) -> bytes:
    """A request as a client writes it (the test central and fixed vectors use this)."""
    if isinstance(request, Unsupported):
        return bytes([request.op])
    if isinstance(request, Invalid):
        raise ValueError("an invalid request has no encoding")
    op = bytes([op_code(request)])
    if isinstance(request, SetTargetInclination):
        return op + struct.pack("<h", round(request.percent * 10))
    if isinstance(request, SetTargetResistance):
        if request.wide:
            return op + struct.pack("<h", round(request.level * 10))
        return op + struct.pack("<B", round(request.level * 10))
    if isinstance(request, SetTargetPower):
        return op + struct.pack("<h", request.watts)
    if isinstance(request, StopPause):
        return op + bytes([PAUSE if request.pause else STOP])
    if isinstance(request, SetSimulation):
        return op + struct.pack("<hhBB", round(request.wind * 1000), round(request.grade * 100),
                                round(request.crr * 10000), round(request.cw * 100))
    return op


def encode_response(op: int, result: int) -> bytes:
    """The Control Point indication answering ``op``: 0x80, the op code, the result."""
    return bytes([OP_RESPONSE, op & 0xFF, result & 0xFF])


def decode_response(raw: bytes) -> tuple[int, int]:
    """(request op code, result code) of a Control Point indication."""
    if len(raw) < 3 or raw[0] != OP_RESPONSE:
        raise DecodeError(f"not a control point response: {bytes(raw).hex()}")
    return raw[1], raw[2]


# ============================================================ Machine Status (FTMS 4.17)

def status_for(request: Request) -> bytes | None:
    """The Machine Status notification an applied request causes (None: none)."""
    if isinstance(request, Reset):
        return bytes([STATUS_RESET])
    if isinstance(request, StartResume):
        return bytes([STATUS_STARTED])
    if isinstance(request, StopPause):
        return bytes([STATUS_STOPPED, PAUSE if request.pause else STOP])
    if isinstance(request, SetTargetPower):
        return bytes([STATUS_TARGET_POWER]) + struct.pack("<h", request.watts)
    if isinstance(request, SetTargetInclination):
        return bytes([STATUS_TARGET_INCLINE]) + struct.pack("<h", round(request.percent * 10))
    if isinstance(request, SetTargetResistance):
        # The status field is a uint8 at 0.1 whatever form the request came in.
        return bytes([STATUS_TARGET_RESISTANCE, _clamp_int(request.level * 10, 0, 0xFF)])
    if isinstance(request, SetSimulation):
        return bytes([STATUS_SIMULATION]) + encode_request(request)[1:]
    return None


CONTROL_LOST = bytes([STATUS_CONTROL_LOST])


# ======================================== Cycling Power Measurement (CPS 1.1, 0x2A63)

_CP_WHEEL = 1 << 4
_CP_CRANK = 1 << 5
#: Cycling Power Feature bits: wheel and crank revolution data supported.
CP_FEATURE_WHEEL = 1 << 2
CP_FEATURE_CRANK = 1 << 3
#: Sensor Location "rear hub" (the bike's brake is where the power is measured).
LOCATION_REAR_HUB = 12


@dataclass(frozen=True)
class CyclingPower:
    """A power measurement with the revolution counters apps derive cadence and speed from.

    ``crank_revs`` is cumulative (uint16, wraps), ``crank_time`` the last crank event
    in 1/1024 s ticks (uint16, wraps); ``wheel_revs`` cumulative (uint32),
    ``wheel_time`` in 1/2048 s ticks (uint16). A pair is sent only when both are set.
    """

    power: float
    crank_revs: int | None = None
    crank_time: int | None = None
    wheel_revs: int | None = None
    wheel_time: int | None = None


def encode_cycling_power(m: CyclingPower) -> bytes:
    """Cycling Power Measurement: flags, power, then wheel and crank pairs (counters wrap)."""
    flags = 0
    body = struct.pack("<h", _clamp_int(m.power, -0x8000, 0x7FFF) if _present(m.power) else 0)
    if m.wheel_revs is not None and m.wheel_time is not None:
        flags |= _CP_WHEEL
        body += struct.pack("<IH", m.wheel_revs & 0xFFFFFFFF, m.wheel_time & 0xFFFF)
    if m.crank_revs is not None and m.crank_time is not None:
        flags |= _CP_CRANK
        body += struct.pack("<HH", m.crank_revs & 0xFFFF, m.crank_time & 0xFFFF)
    return struct.pack("<H", flags) + body


def decode_cycling_power(raw: bytes) -> CyclingPower:
    """Read a Cycling Power Measurement this bike sends (other optional fields refused)."""
    r = _Reader(raw)
    flags = r.take("<H")
    if flags & ~(_CP_WHEEL | _CP_CRANK):
        raise DecodeError(f"flags {flags:#06x}: fields this decoder does not read")
    power = float(r.take("<h"))
    wheel_revs = wheel_time = crank_revs = crank_time = None
    if flags & _CP_WHEEL:
        wheel_revs, wheel_time = r.take("<I"), r.take("<H")
    if flags & _CP_CRANK:
        crank_revs, crank_time = r.take("<H"), r.take("<H")
    r.end()
    return CyclingPower(power, crank_revs, crank_time, wheel_revs, wheel_time)


def encode_cp_feature(wheel: bool, crank: bool) -> bytes:
    """Cycling Power Feature (uint32)."""
    bits = (CP_FEATURE_WHEEL if wheel else 0) | (CP_FEATURE_CRANK if crank else 0)
    return struct.pack("<I", bits)


# ======================================== Heart Rate Measurement (HRS 1.0, 0x2A37)

@dataclass(frozen=True)
class HeartRate:
    """A heart-rate measurement: ``bpm``, optional RR intervals in 1/1024 s."""

    bpm: int
    rr: tuple[int, ...] = ()


def encode_heart_rate(m: HeartRate) -> bytes:
    """Heart Rate Measurement: uint8 format below 256 BPM, else uint16 (flag bit 0)."""
    bpm = max(0, min(int(m.bpm), 0xFFFF))
    flags = 0x00 if bpm <= 0xFF else 0x01
    body = struct.pack("<B" if flags == 0 else "<H", bpm)
    if m.rr:
        flags |= 0x10
        body += b"".join(struct.pack("<H", v & 0xFFFF) for v in m.rr)
    return bytes([flags]) + body


def decode_heart_rate(raw: bytes) -> HeartRate:
    """Read a Heart Rate Measurement (energy expended is skipped)."""
    r = _Reader(raw)
    flags = r.take("<B")
    bpm = r.take("<H") if flags & 0x01 else r.take("<B")
    if flags & 0x08:
        r.take("<H")
    rr: list[int] = []
    if flags & 0x10:
        if (len(r.data) - r.at) % 2:
            raise DecodeError("RR intervals are 2 bytes each")
        while r.at < len(r.data):
            rr.append(r.take("<H"))
    r.end()
    return HeartRate(bpm, tuple(rr))
