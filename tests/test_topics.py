"""parse_command: every command shape the apps send, every refusal, and that it never raises."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartbiked.topics import (
    MAX_COMMAND_BYTES,
    TOPICS,
    Command,
    Limits,
    Refusal,
    button_payload,
    parse_command,
    report_payload,
)

BIKE = "000001"
LIMITS = {
    "incline": Limits(-10, 19, 0.5),
    "resistance": Limits(0, 100),
    "fan": Limits(0, 100),
}


def parse(topic: str, payload: bytes | str) -> Command | Refusal:
    raw = payload.encode() if isinstance(payload, str) else payload
    return parse_command(f"bike/{BIKE}/{topic}/control", raw, BIKE, LIMITS)


@pytest.mark.parametrize(("topic", "payload", "value"), [
    ("fan", '{"value": 5.5}', 5.5),                       # canonical
    ("incline", '{"incline": 5.5}', 5.5),                 # keyed by topic (VR game)
    ("resistance", '{"resistance": 40}', 40),
    ("fan", '{"power": 60}', 60),                         # fan power key
    ("fan", '{"level": 3}', 60),                          # fan level x 20
    ("fan", '{"level": 0}', 0),
    ("incline", "-10", -10),                              # bare number, text/plain
    ("resistance", " 100\n", 100),
    ("incline", '{"incline": 19, "timestamp": 1722834170.6}', 19),  # extra keys ignored
    ("incline", '{"value": -9.5, "ts": "now", "who": [1]}', -9.5),
])
def test_every_legacy_command_shape_is_accepted(topic, payload, value):
    assert parse(topic, payload) == Command(topic, value)


@pytest.mark.parametrize(("topic", "payload", "reason"), [
    ("fan", b"\xff\xfe", "not UTF-8"),
    ("fan", "fast please", "neither JSON nor a number"),
    ("fan", "true", "not a boolean"),
    ("fan", '{"value": true}', "not a boolean"),
    ("fan", '{"value": "50"}', "not a string"),
    ("fan", '"50"', "not a string"),
    ("fan", "null", "not null"),
    ("fan", "[50]", "not a list"),
    ("fan", '{"value": null}', "not null"),
    ("fan", "NaN", "NaN is not a number"),
    ("fan", '{"value": Infinity}', "Infinity is not a number"),
    ("fan", "-Infinity", "is not a number"),
    ("fan", "1e400", "finite"),
    ("fan", "1" * 310, "finite"),                      # an int no float can hold
    ("fan", "-" + "9" * 400, "finite"),
    ("fan", '{"value": 1%s}' % ("0" * 400), "finite"),
    ("fan", '{"level": %s}' % ("7" * 320), "finite"),
    ("fan", "1e99999999999999999999", "finite"),
    ("fan", '{"value": 500, "value": 5}', 'duplicate key "value"'),
    ("fan", '{"value": 5, "\\u0076alue": 50}', 'duplicate key "value"'),  # same key, escaped
    ("fan", '{"power": 5, "x": 1, "x": 2}', 'duplicate key "x"'),
    ("fan", '{"value": 5, "meta": {"a": 1, "a": 2}}', 'duplicate key "a"'),
    ("fan", "101", "out of range"),
    ("fan", "-0.5", "out of range"),
    ("incline", "19.5", "out of range"),
    ("incline", "5.25", "not on a step"),
    ("fan", '{"level": 6}', "0 to 5"),
    ("fan", '{"level": 2.5}', "0 to 5"),
    ("fan", '{"speed": 50}', "no value"),
    ("fan", '{"value": 10, "power": 20}', "ambiguous"),
    ("resistance", '{"power": 60}', "no value"),       # power/level are fan-only
    ("fan", "[" * 100000, "too large"),
    ("fan", "[" * 200 + "]" * 200, "not a list"),
    ("gear", "3", "unknown topic"),
    ("speed", "3", "speed is a sensor"),
    ("button", "1", "takes no commands"),
])
def test_bad_commands_are_refused_with_a_reason(topic, payload, reason):
    result = parse(topic, payload)
    assert isinstance(result, Refusal), result
    assert reason in result.reason
    if topic in LIMITS:
        assert result.allowed == LIMITS[topic]  # the refusal tells the app what is allowed


def test_nested_json_deeper_than_the_recursion_limit_is_refused_not_raised():
    deep = ("[" * 50000).encode()
    result = parse_command(f"bike/{BIKE}/fan/control", deep[:MAX_COMMAND_BYTES], BIKE, LIMITS)
    assert isinstance(result, Refusal)


def test_oversized_payload_is_refused_before_decoding():
    payload = b"5" + b" " * MAX_COMMAND_BYTES  # valid JSON, but too big
    result = parse_command(f"bike/{BIKE}/fan/control", payload, BIKE, LIMITS)
    assert isinstance(result, Refusal) and "too large" in result.reason


@pytest.mark.parametrize("topic", [
    "bike/000002/fan/control", "bike/000001/fan/report", "bike/000001/fan",
    "bike/000001/fan/control/x", "smartbike/000001/fan/control", "",
])
def test_other_bikes_and_malformed_topics_are_refused(topic):
    assert isinstance(parse_command(topic, b"50", BIKE, LIMITS), Refusal)


def test_actuator_not_fitted_on_this_bike_is_refused():
    result = parse_command(f"bike/{BIKE}/incline/control", b"5", BIKE, {"fan": Limits(0, 100)})
    assert isinstance(result, Refusal) and "no incline actuator" in result.reason


def test_documented_payload_shapes():
    assert report_payload(6.0, "RPM", 1722834169.6, "bike000001") == {
        "value": 6.0, "unitName": "RPM", "timestamp": 1722834169.6,
        "metadata": {"deviceName": "bike000001"}}
    assert button_payload("LEFT", True, 1.5) == {"button": "LEFT", "state": 1, "timestamp": 1.5}
    assert button_payload("BRAKE", False, 2.0)["state"] == 0
    assert [TOPICS[t].unit for t in ("incline", "fan", "speed", "cadence", "power",
                                     "heartrate")] == ["degree", "percentage", "m/s", "RPM",
                                                       "W", "BPM"]


def test_refusal_payload_carries_reason_and_range():
    refusal = parse("incline", "25")
    body = refusal.payload(10.0, "bike000001")
    assert body["ok"] is False and "out of range" in body["error"]
    assert body["allowed"] == {"min": -10, "max": 19, "step": 0.5}


# -- property-based: whatever arrives, parse_command answers and never lets a bad value by ---

#: JSON integers are exact: these need 309 digits or more, beyond any float.
huge_integers = (st.integers(min_value=2**1024, max_value=10**450)
                 | st.integers(min_value=-10**450, max_value=-2**1024))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | huge_integers | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["value", "fan", "incline", "resistance", "power",
                                       "level", "timestamp", "x"]) | st.text(max_size=8),
                      children, max_size=4),
    max_leaves=12,
)
topics = st.sampled_from([f"bike/{BIKE}/{t}/control" for t in TOPICS] + [
    "bike/000002/fan/control", f"bike/{BIKE}/gear/control", "bike/+/fan/control", "#"]) \
    | st.text(max_size=40)


def _check(result: Command | Refusal) -> None:
    assert isinstance(result, (Command, Refusal))
    if isinstance(result, Command):
        limits = LIMITS[result.topic]
        assert isinstance(result.value, float) and math.isfinite(result.value)
        assert limits.low <= result.value <= limits.high
        assert limits.problem(result.value) is None
    else:
        assert result.reason


@settings(max_examples=600, deadline=None)
@given(topics, st.binary(max_size=700))
def test_arbitrary_bytes_never_raise_and_accepted_values_are_in_range(topic, payload):
    _check(parse_command(topic, payload, BIKE, LIMITS))


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(sorted(LIMITS)), json_values)
def test_arbitrary_json_never_raises_and_accepted_values_are_in_range(name, value):
    payload = json.dumps(value).encode()
    _check(parse_command(f"bike/{BIKE}/{name}/control", payload, BIKE, LIMITS))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(LIMITS)), huge_integers,
       st.sampled_from(["{}", '{{"value": {}}}', '{{"level": {}}}', '{{"power": {}}}',
                        '{{"TOPIC": {}}}']))
def test_integers_beyond_float_range_are_refused_in_every_shape(name, number, shape):
    payload = shape.replace("TOPIC", name).format(number).encode()
    result = parse_command(f"bike/{BIKE}/{name}/control", payload, BIKE, LIMITS)
    assert isinstance(result, Refusal), result
    fan_only = "power" in shape or "level" in shape
    if len(payload) <= MAX_COMMAND_BYTES and (name == "fan" or not fan_only):
        assert "finite number" in result.reason, result


#: Number-like payloads of up to 500 digits, with and without fractions and exponents.
numeric_text = st.builds(
    lambda sign, digits, fraction, exponent: sign + digits + fraction + exponent,
    st.sampled_from(["", "-"]),
    st.integers(0, 10**500).map(str) | st.text("0123456789", min_size=1, max_size=500),
    st.sampled_from(["", ".", ".5", ".000001"]),
    st.sampled_from(["", "e0", "e400", "E-400", "e+99999999999999999999"])
    | st.integers(-10**40, 10**40).map(lambda e: f"e{e}"),
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(LIMITS)), numeric_text)
def test_any_number_text_never_raises(name, text):
    _check(parse_command(f"bike/{BIKE}/{name}/control", text.encode(), BIKE, LIMITS))


value_keys = st.sampled_from(["value", "fan", "incline", "resistance", "power", "level",
                              "timestamp", "x"])


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(sorted(LIMITS)),
       st.lists(st.tuples(value_keys, st.integers(-20, 120) | json_values), max_size=5),
       st.booleans())
def test_duplicate_keys_are_refused_at_any_depth(name, pairs, nested):
    body = "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs) + "}"
    if nested:  # the duplicates sit one level down, beside a valid value
        body = '{"value": 1, "extra": ' + body + "}"
    result = parse_command(f"bike/{BIKE}/{name}/control", body.encode(), BIKE, LIMITS)
    _check(result)
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys) and len(body) <= MAX_COMMAND_BYTES:
        assert isinstance(result, Refusal), result
        if "NaN" not in body and "Infinity" not in body:  # those are refused while parsing
            assert "duplicate key" in result.reason, result
    elif len(body) <= MAX_COMMAND_BYTES:
        # Without duplicates the text means what its dict means.
        document = json.loads(body)
        assert result == parse_command(f"bike/{BIKE}/{name}/control",
                                       json.dumps(document).encode(), BIKE, LIMITS)


# -- the trainer's topics: targetpower and grade (virtual), mode (a report) ------------------

from smartbiked.topics import GRADE_PARAMS, mode_payload  # noqa: E402

TRAINER_LIMITS = {**LIMITS, "targetpower": Limits(0, 1500), "grade": Limits(-40, 40)}


def parse_trainer(topic: str, payload: str, limits: dict = TRAINER_LIMITS) -> Command | Refusal:
    return parse_command(f"bike/{BIKE}/{topic}/control", payload.encode(), BIKE, limits)


@pytest.mark.parametrize(("topic", "payload", "expected"), [
    ("targetpower", '{"value": 200}', Command("targetpower", 200)),
    ("targetpower", '{"targetpower": 200, "timestamp": 1}', Command("targetpower", 200)),
    ("targetpower", "200", Command("targetpower", 200)),
    ("targetpower", "0", Command("targetpower", 0)),
    ("targetpower", "null", Command("targetpower", 0)),           # null: no target, as 0
    ("targetpower", '{"value": null}', Command("targetpower", 0)),
    ("targetpower", '{"targetpower": null}', Command("targetpower", 0)),
    ("grade", "-3.5", Command("grade", -3.5)),
    ("grade", '{"grade": 8}', Command("grade", 8)),
    ("grade", '{"value": 5, "wind": 2.0, "crr": 0.004, "cw": 0.51}',
     Command("grade", 5, (("crr", 0.004), ("cw", 0.51), ("wind", 2.0)))),
    ("grade", '{"value": 5, "cda": 0.3, "who": "zwift"}', Command("grade", 5, (("cda", 0.3),))),
    ("grade", '{"value": 0, "wind": -30}', Command("grade", 0, (("wind", -30),))),
])
def test_trainer_commands_in_every_shape(topic, payload, expected):
    assert parse_trainer(topic, payload) == expected


@pytest.mark.parametrize(("topic", "payload", "reason"), [
    ("targetpower", "1600", "out of range"),
    ("targetpower", "-5", "out of range"),
    ("targetpower", '"200"', "not a string"),
    ("targetpower", "true", "not a boolean"),
    ("targetpower", '{"power": 200}', "no value"),                # "power" is the fan's
    ("targetpower", '{"value": 200, "targetpower": 100}', "ambiguous"),
    ("grade", "null", "not null"),                                # no "no grade": use 0
    ("grade", "41", "out of range"),
    ("grade", '{"value": 5, "cda": 0.3, "cw": 0.5}', "ambiguous"),
    ("grade", '{"value": 5, "crr": 0.5}', '"crr" 0.5 is out of range'),
    ("grade", '{"value": 5, "wind": "strong"}', '"wind" must be a number'),
    ("grade", '{"value": 5, "cw": null}', '"cw" must be a number'),
    ("grade", '{"value": 5, "wind": 1e400}', "finite"),
    ("grade", '{"value": 5, "wind": 1, "wind": 2}', "duplicate key"),
    ("mode", '{"mode": "erg"}', "mode is a report, it takes no commands"),
])
def test_bad_trainer_commands_are_refused_with_a_reason(topic, payload, reason):
    result = parse_trainer(topic, payload)
    assert isinstance(result, Refusal), result
    assert reason in result.reason
    if topic in TRAINER_LIMITS:
        assert result.allowed == TRAINER_LIMITS[topic]


def test_trainer_topics_need_the_bike_to_offer_them():
    result = parse_trainer("targetpower", "200", LIMITS)
    assert isinstance(result, Refusal) and "does not offer targetpower" in result.reason


def test_a_grade_command_is_hashable_and_says_its_road():
    a = parse_trainer("grade", '{"value": 5, "wind": 2.0}')
    b = parse_trainer("grade", '{"wind": 2.0, "value": 5}')
    assert a == b and hash(a) == hash(b) and dict(a.params) == {"wind": 2.0}
    assert {a, b, Command("grade", 5)} == {a, Command("grade", 5)}


def test_mode_payload_shape():
    assert mode_payload({"mode": "erg", "target": 200.0}, 1.5, "bike000001") == {
        "mode": "erg", "target": 200.0, "timestamp": 1.5,
        "metadata": {"deviceName": "bike000001"}}


trainer_documents = st.fixed_dictionaries(
    {}, optional={"value": json_values | st.floats(-50, 50), "grade": json_values,
                  "targetpower": json_values, "wind": json_values | st.floats(-40, 40),
                  "crr": json_values | st.floats(0, 0.1), "cda": json_values,
                  "cw": json_values | st.floats(0, 3)}) | json_values


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(["targetpower", "grade"]), trainer_documents)
def test_trainer_commands_never_raise_and_accepted_ones_are_in_range(name, document):
    try:
        payload = json.dumps(document).encode()
    except ValueError:
        return
    result = parse_command(f"bike/{BIKE}/{name}/control", payload, BIKE, TRAINER_LIMITS)
    assert isinstance(result, (Command, Refusal))
    if isinstance(result, Command):
        assert TRAINER_LIMITS[name].problem(result.value) is None
        assert list(result.params) == sorted(result.params)
        for key, value in result.params:
            low, high = GRADE_PARAMS[key]
            assert math.isfinite(value) and low <= value <= high
        assert not ({"cda", "cw"} <= dict(result.params).keys())
        if name == "targetpower":
            assert result.params == ()
    else:
        assert result.reason


#: JSON number text: integers of any length, fractions, exponents (also out of range).
json_number_text = st.builds(
    lambda sign, digits, fraction, exponent: sign + digits + fraction + exponent,
    st.sampled_from(["", "-"]),
    st.sampled_from(["0"]) | st.integers(1, 10**400).map(str),
    st.sampled_from(["", ".0", ".5", ".000001"]) | st.integers(0, 10**20).map(lambda f: f".{f}"),
    st.sampled_from(["", "e0", "e400", "E-400", "e+2"]) | st.integers(-400, 400).map(
        lambda e: f"e{e}"),
)
json_space = st.text(" \t\n\r", max_size=2)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from([*sorted(LIMITS), "targetpower", "grade"]), json_number_text,
       json_space, json_space)
def test_the_plain_value_shape_reads_as_the_full_parse_does(name, number, before, after):
    # {"value": n} is read without json.loads; with another key beside it the full
    # parse runs. Both must give the same command, or the same refusal.
    limits = {**LIMITS, "targetpower": Limits(0, 2000), "grade": Limits(-20, 20)}
    topic = f"bike/{BIKE}/{name}/control"
    plain = f'{before}{{{after}"value"{before}:{after}{number}{before}}}{after}'.encode()
    full = f'{{"value": {number}, "x": 1}}'.encode()
    fast, slow = (parse_command(topic, p, BIKE, limits) for p in (plain, full))
    assert fast == slow
    if isinstance(fast, Command):
        assert math.copysign(1, fast.value) == math.copysign(1, slow.value)
