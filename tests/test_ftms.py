"""The FTMS / Cycling Power / Heart Rate byte layer: fixed vectors and properties.

Fixed vectors are written by hand from the field tables of the specifications (cited
per test): Fitness Machine Service 1.0 (FTMS), Cycling Power Service 1.1 with the SIG
characteristic definition org.bluetooth.characteristic.cycling_power_measurement
(flags bits 4/5, uint32 + uint16 wheel pair at 1/2048 s, uint16 + uint16 crank pair at
1/1024 s), Heart Rate Service 1.0 (org.bluetooth.characteristic.heart_rate_measurement).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smartbiked import ftms
from smartbiked.ftms import (
    CyclingPower,
    HeartRate,
    IndoorBikeData,
    Invalid,
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

# -- Indoor Bike Data (FTMS 4.9, Table 4.9; flags 4.9.1.1) ----------------------------------


def test_indoor_bike_data_vector_all_fields():
    # Flags: bit 0 More Data = 0 (speed present), bit 2 cadence, bit 5 resistance,
    # bit 6 power, bit 9 heart rate -> 0x0264. Speed uint16 0.01 km/h: 25.00 -> 2500
    # (c4 09); cadence uint16 0.5/min: 90 -> 180 (b4 00); resistance sint16: 7;
    # power sint16 W: 200 (c8 00); heart rate uint8: 140 (8c).
    data = IndoorBikeData(speed=25.0, cadence=90.0, resistance=7, power=200, heart_rate=140)
    raw = bytes.fromhex("6402" "c409" "b400" "0700" "c800" "8c")
    assert ftms.encode_indoor_bike_data(data) == raw
    assert ftms.decode_indoor_bike_data(raw) == data


def test_indoor_bike_data_without_speed_sets_more_data():
    # FTMS 4.9.1.1: bit 0 set means Instantaneous Speed is absent (inverted logic).
    raw = ftms.encode_indoor_bike_data(IndoorBikeData(power=150))
    assert raw == bytes.fromhex("4100" "9600")
    assert ftms.decode_indoor_bike_data(raw) == IndoorBikeData(power=150)


def test_indoor_bike_data_leaves_out_non_finite_and_clamps():
    raw = ftms.encode_indoor_bike_data(
        IndoorBikeData(speed=float("nan"), cadence=-3, power=99999, heart_rate=400))
    assert ftms.decode_indoor_bike_data(raw) == IndoorBikeData(
        cadence=0, power=0x7FFF, heart_rate=255)


def test_indoor_bike_data_decoder_skips_fields_other_machines_send():
    # Average speed (bit 1), total distance uint24 (bit 4), elapsed time (bit 11).
    raw = bytes.fromhex("1208" "e803" "d007" "102700" "3c00")
    assert ftms.decode_indoor_bike_data(raw) == IndoorBikeData(speed=10.0)


# -- Feature, ranges, status, service data --------------------------------------------------


def test_feature_vector():
    # FTMS 4.3.1.1: cadence bit 1, resistance level bit 7, heart rate bit 10, power bit 14;
    # 4.3.1.2: resistance target bit 2, power target bit 3, simulation bit 13.
    machine = (ftms.FEATURE_CADENCE | ftms.FEATURE_RESISTANCE_LEVEL | ftms.FEATURE_HEART_RATE
               | ftms.FEATURE_POWER)
    target = ftms.TARGET_RESISTANCE | ftms.TARGET_POWER | ftms.TARGET_SIMULATION
    raw = ftms.encode_feature(machine, target)
    assert raw == bytes.fromhex("82440000" "0c200000")
    assert ftms.decode_feature(raw) == (machine, target)


def test_range_vectors():
    # FTMS 4.5 resistance and 4.4 inclination: sint16 min, sint16 max, uint16 increment, 0.1.
    assert ftms.encode_resistance_range(0, 20, 0.1) == bytes.fromhex("0000" "c800" "0100")
    assert ftms.encode_inclination_range(-10, 19.5, 0.5) == bytes.fromhex("9cff" "c300" "0500")
    assert ftms.decode_range(bytes.fromhex("9cffc3000500"), 0.1) == (-10.0, 19.5, 0.5)
    # FTMS 4.6 power: watts, resolution 1.
    assert ftms.encode_power_range(0, 2000, 1) == bytes.fromhex("0000" "d007" "0100")
    with pytest.raises(ftms.DecodeError):
        ftms.decode_range(b"\x00\x00", 1)


def test_service_data_and_training_status():
    # FTMS 3.1.1: Flags uint8 (bit 0 available), Fitness Machine Type uint16 (bit 5 bike).
    assert ftms.ftms_service_data() == bytes.fromhex("01" "2000")
    # FTMS 4.10: flags 0 (no string), 0x01 idle, 0x0D manual mode.
    assert ftms.encode_training_status(ftms.TRAINING_IDLE) == b"\x00\x01"
    assert ftms.encode_training_status(ftms.TRAINING_MANUAL) == b"\x00\x0d"


# -- Control Point (FTMS 4.16, Table 4.15; parameters 4.16.2.x) -----------------------------

REQUEST_VECTORS = [
    ("00", RequestControl()),
    ("01", Reset()),
    ("07", StartResume()),
    ("0801", StopPause(pause=False)),
    ("0802", StopPause(pause=True)),
    # 4.16.2.6 Set Target Power: sint16 W; 250 W -> fa 00 (also measured, ble-notes.md).
    ("05fa00", SetTargetPower(250)),
    # 4.16.2.5 Set Target Resistance Level: uint8 at 0.1 (FTMS 1.0): 3.0 -> 30 (1e).
    ("041e", SetTargetResistance(3.0)),
    # The 2-byte sint16 form at 0.1 that later apps send: 30.0 -> 300 (2c 01).
    ("042c01", SetTargetResistance(30.0, wide=True)),
    # 4.16.2.4 Set Target Inclination: sint16 at 0.1 %: 5.0 % -> 50, -2.5 % -> -25.
    ("033200", SetTargetInclination(5.0)),
    ("03e7ff", SetTargetInclination(-2.5)),
    # 4.16.2.18 Indoor Bike Simulation: wind sint16 0.001 m/s, grade sint16 0.01 %,
    # Crr uint8 0.0001, Cw uint8 0.01 kg/m. Grade 5 % -> 500 (f4 01), Crr 0.004 -> 40
    # (28), Cw 0.51 -> 51 (33); a head wind of -1.5 m/s -> -1500 (24 fa).
    ("110000f4012833", SetSimulation(0.0, 5.0, 0.004, 0.51)),
    ("1124fa9cff2833", SetSimulation(-1.5, -1.0, 0.004, 0.51)),
]


@pytest.mark.parametrize(("hex_bytes", "request_"), REQUEST_VECTORS)
def test_request_vectors(hex_bytes, request_):
    raw = bytes.fromhex(hex_bytes)
    assert ftms.decode_request(raw) == request_
    assert ftms.encode_request(request_) == raw


@pytest.mark.parametrize(("hex_bytes", "op"), [
    ("0005", 0x00), ("05fa", 0x05), ("05fa0000", 0x05), ("04", 0x04), ("04010203", 0x04),
    ("08", 0x08), ("0803", 0x08), ("110000f40128", 0x11), ("03", 0x03), ("0701", 0x07),
])
def test_malformed_parameters_are_invalid(hex_bytes, op):
    request = ftms.decode_request(bytes.fromhex(hex_bytes))
    assert isinstance(request, Invalid)
    assert ftms.op_code(request) == op


def test_unknown_and_unimplemented_ops():
    assert ftms.decode_request(b"\x02\x10\x27") == Unsupported(0x02)  # target speed
    assert ftms.decode_request(b"\x13\x01") == Unsupported(0x13)  # spin down
    assert ftms.decode_request(b"\xfe") == Unsupported(0xFE)
    assert ftms.decode_request(b"") is None


def test_response_vectors():
    # FTMS 4.16.1 / Table 4.24: 0x80, request op code, result code.
    assert ftms.encode_response(0x05, ftms.SUCCESS) == b"\x80\x05\x01"
    assert ftms.encode_response(0x13, ftms.OP_NOT_SUPPORTED) == b"\x80\x13\x02"
    assert ftms.encode_response(0x04, ftms.INVALID_PARAMETER) == b"\x80\x04\x03"
    assert ftms.encode_response(0x05, ftms.CONTROL_NOT_PERMITTED) == b"\x80\x05\x05"
    assert ftms.decode_response(b"\x80\x05\x05") == (0x05, 0x05)
    with pytest.raises(ftms.DecodeError):
        ftms.decode_response(b"\x05\x05")


def test_machine_status_vectors():
    # FTMS 4.17, Table 4.26.
    assert ftms.status_for(SetTargetPower(250)) == bytes.fromhex("08fa00")  # ble-notes.md
    assert ftms.status_for(SetSimulation(0, 5.0, 0.004, 0.51)) == bytes.fromhex("120000f4012833")
    # The status field is a uint8 at 0.1: a wide request beyond 25.5 is reported as 25.5.
    assert ftms.status_for(SetTargetResistance(30.0, wide=True)) == bytes.fromhex("07ff")
    assert ftms.status_for(SetTargetResistance(3.0)) == bytes.fromhex("071e")
    assert ftms.status_for(SetTargetInclination(5.0)) == bytes.fromhex("063200")
    assert ftms.status_for(Reset()) == b"\x01"
    assert ftms.status_for(StartResume()) == b"\x04"
    assert ftms.status_for(StopPause(pause=True)) == b"\x02\x02"
    assert ftms.status_for(RequestControl()) is None
    assert ftms.CONTROL_LOST == b"\xff"


# -- Cycling Power Measurement, Heart Rate ---------------------------------------------------


def test_cycling_power_vector():
    # Flags bit 4 wheel pair + bit 5 crank pair -> 0x0030; power sint16 200 (c8 00);
    # wheel revs uint32 1000 (e8 03 00 00), time uint16 1/2048 s: 1 s -> 2048 (00 08);
    # crank revs uint16 50 (32 00), time uint16 1/1024 s: 1 s -> 1024 (00 04).
    m = CyclingPower(200, crank_revs=50, crank_time=1024, wheel_revs=1000, wheel_time=2048)
    raw = bytes.fromhex("3000" "c800" "e8030000" "0008" "3200" "0004")
    assert ftms.encode_cycling_power(m) == raw
    assert ftms.decode_cycling_power(raw) == m


def test_cycling_power_counters_wrap_and_pairs_need_both_halves():
    m = CyclingPower(100, crank_revs=65536 + 3, crank_time=65536 + 7)
    assert ftms.decode_cycling_power(ftms.encode_cycling_power(m)) == CyclingPower(100, 3, 7)
    only_revs = CyclingPower(100, crank_revs=5)
    assert ftms.encode_cycling_power(only_revs) == bytes.fromhex("0000" "6400")
    assert ftms.encode_cp_feature(wheel=True, crank=True) == bytes.fromhex("0c000000")


def test_heart_rate_vectors():
    # Flags bit 0: value format uint8 (0) or uint16 (1); bit 4: RR intervals present.
    assert ftms.encode_heart_rate(HeartRate(72)) == bytes.fromhex("0048")
    assert ftms.encode_heart_rate(HeartRate(300)) == bytes.fromhex("012c01")
    assert ftms.encode_heart_rate(HeartRate(64, rr=(1024,))) == bytes.fromhex("10400004")
    # Energy expended (bit 3) is skipped by the decoder.
    assert ftms.decode_heart_rate(bytes.fromhex("08481000")) == HeartRate(72)


# -- properties ------------------------------------------------------------------------------

s16 = st.integers(-0x8000, 0x7FFF)
u8 = st.integers(0, 0xFF)

requests = st.one_of(
    st.builds(RequestControl), st.builds(Reset), st.builds(StartResume),
    st.builds(StopPause, st.booleans()),
    st.builds(SetTargetPower, s16),
    st.builds(lambda n: SetTargetResistance(n / 10), u8),
    st.builds(lambda n: SetTargetResistance(n / 10, wide=True), s16),
    st.builds(lambda n: SetTargetInclination(n / 10), s16),
    st.builds(lambda w, g, c, x: SetSimulation(w / 1000, g / 100, c / 10000, x / 100),
              s16, s16, u8, u8),
)


@given(requests)
def test_request_round_trip(request_):
    assert ftms.decode_request(ftms.encode_request(request_)) == request_


@given(st.binary(max_size=12))
def test_decode_request_never_raises(raw):
    request = ftms.decode_request(raw)
    if raw:
        assert request is not None and ftms.op_code(request) == raw[0]


@given(st.builds(
    IndoorBikeData,
    speed=st.none() | st.integers(0, 0xFFFF).map(lambda n: n / 100),
    cadence=st.none() | st.integers(0, 0xFFFF).map(lambda n: n / 2),
    resistance=st.none() | s16.map(float),
    power=st.none() | s16.map(float),
    heart_rate=st.none() | u8.map(float)))
def test_indoor_bike_data_round_trip(data):
    assert ftms.decode_indoor_bike_data(ftms.encode_indoor_bike_data(data)) == data


@given(st.builds(CyclingPower, s16.map(float),
                 st.none() | st.integers(0, 0xFFFF), st.none() | st.integers(0, 0xFFFF),
                 st.none() | st.integers(0, 0xFFFFFFFF), st.none() | st.integers(0, 0xFFFF)))
def test_cycling_power_round_trip(m):
    crank = m.crank_revs is not None and m.crank_time is not None
    wheel = m.wheel_revs is not None and m.wheel_time is not None
    expected = CyclingPower(m.power, m.crank_revs if crank else None,
                            m.crank_time if crank else None, m.wheel_revs if wheel else None,
                            m.wheel_time if wheel else None)
    assert ftms.decode_cycling_power(ftms.encode_cycling_power(m)) == expected


@given(st.builds(HeartRate, st.integers(0, 0xFFFF),
                 st.lists(st.integers(0, 0xFFFF), max_size=4).map(tuple)))
def test_heart_rate_round_trip(m):
    assert ftms.decode_heart_rate(ftms.encode_heart_rate(m)) == m


@pytest.mark.parametrize("decode", [
    ftms.decode_indoor_bike_data, ftms.decode_cycling_power, ftms.decode_heart_rate,
    ftms.decode_feature, ftms.decode_response, lambda raw: ftms.decode_range(raw, 0.1)])
@given(raw=st.binary(max_size=24))
def test_decoders_raise_only_decode_error(decode, raw):
    try:
        decode(raw)
    except ftms.DecodeError:
        pass
