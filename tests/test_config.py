"""The config loader: the example passes; every mistake is named, all at once, exit 78."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from smartbiked import config
from smartbiked.errors import EX_CONFIG, ConfigError
from smartbiked.topics import Limits
from tests.conftest import ROOT

EXAMPLE = ROOT / "config" / "smartbike.toml"
MINIMAL = """
[bike]
id = "000001"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bike.toml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, text), environ=env or {})
    return [str(p) for p in info.value.problems]


def test_example_config_is_complete_and_valid():
    cfg = config.load(EXAMPLE, environ={})
    assert cfg.bike_id == "000001"
    assert {d.topic for d in cfg.drivers} == {
        "button", "cadence", "speed", "fan", "heartrate", "power", "resistance", "incline"}
    assert set(cfg.serial) == {"sensors", "motors"}
    assert cfg.actuator_limits()["incline"].step == 0.5
    incline = next(d for d in cfg.drivers if d.topic == "incline")
    assert incline.options["safe"] == "hold"


def test_defaults_fill_a_minimal_file(tmp_path):
    cfg = config.load(write(tmp_path, MINIMAL), environ={})
    assert cfg.broker.host == "localhost" and cfg.broker.port == 1883  # MQTT's default
    assert cfg.broker.client_id == "smartbiked-000001"
    assert cfg.device_name  # the host name
    assert cfg.drivers == ()


def test_every_problem_is_reported_at_once_with_file_table_key_and_value(tmp_path):
    found = problems(tmp_path, """
        [bike]
        id = "12 34"
        [broker]
        port = 70000
        keepalive = "often"
        colour = "red"
        [fan]
        driver = "gpio_pwm"
        pin = 12
        max = 120
        [gear]
        driver = "x"
        """)
    path = str(tmp_path / "bike.toml")
    assert all(p.startswith(path + ": ") for p in found)
    text = "\n".join(found)
    assert "[bike] id: must be non-empty, without +, #, / or white space (found '12 34')" in text
    assert "[broker] port: must be a port number from 1 to 65535 (found 70000)" in text
    assert "[broker] keepalive: must be an integer (found 'often')" in text
    assert "[broker] colour: unknown key" in text
    assert "[fan] max: min and max must satisfy 0 <= min < max <= 100 (found 120.0)" in text
    assert "[gear]" in text and "unknown table" in text
    assert len(found) == 6


@pytest.mark.parametrize(("bike", "expected"), [
    ("id = 1", 'must be a quoted string such as "000001"'),
    ('id = ""', "must be non-empty"),
    ('id = "000/01"', "without +, #, /"),
    ('id = "00000+"', "without +, #, /"),
    ('id = "1234"', "does not match id_pattern"),
    ("", "[bike] id: missing (required)"),
])
def test_bike_ids_that_would_break_topics_are_refused(tmp_path, bike, expected):
    found = problems(tmp_path, f"[bike]\n{bike}\n")
    assert any(expected in p for p in found), found


def test_id_pattern_allows_lab_names(tmp_path):
    cfg = config.load(write(tmp_path, '[bike]\nid = "lab-a"\nid_pattern = "[a-z-]+"\n'),
                      environ={})
    assert cfg.bike_id == "lab-a"


def test_old_environment_variables_override_the_file(tmp_path):
    env = {"MQTT_HOSTNAME": "broker.lab", "MQTT_PORT": "8883", "MQTT_USERNAME": "bike7",
           "MQTT_PASSWORD": "s3cret", "DEVICE_ID": "000007"}
    cfg = config.load(write(tmp_path, MINIMAL), environ=env)
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.username) == ("broker.lab", 8883,
                                                                       "bike7")
    assert cfg.broker.password == "s3cret" and cfg.bike_id == "000007"
    assert "s3cret" not in repr(cfg)


def test_bad_environment_value_is_named(tmp_path):
    found = problems(tmp_path, MINIMAL, env={"MQTT_PORT": "eighty"})
    assert found == [f"{tmp_path / 'bike.toml'}: [environment] MQTT_PORT: "
                     "must be a whole number (found 'eighty')"]


def test_password_from_file_and_from_systemd_credentials(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    cfg = config.load(write(tmp_path, MINIMAL + f'[broker]\npassword_file = "{secret}"\n'),
                      environ={})
    assert cfg.broker.password == "hunter2"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-systemd")
    cfg = config.load(write(tmp_path, MINIMAL), environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert cfg.broker.password == "from-systemd"


def test_secrets_never_appear_in_errors(tmp_path):
    found = problems(tmp_path, MINIMAL + '[broker]\npassword_file = "/nonexistent/pw"\n'
                     'password = "inline-secret"\n', env={})
    text = "\n".join(found)
    assert "cannot read the password file" in text and "/nonexistent/pw" in text
    assert "inline-secret" not in text
    assert any(p.endswith("[broker] password: unknown key; known keys: ca_file, certfile, "
                          "client_id, failover_hosts, host, keepalive, keyfile, "
                          "keyfile_credential, max_packet_size, "
                          "password_credential, password_file, port, reconnect_max, "
                          "reply_topics, tls, username") for p in found)


def test_driver_must_exist_and_fit_its_topic(tmp_path):
    found = problems(tmp_path, MINIMAL + '[fan]\ndriver = "gpio_pulse"\npin = 3\n'
                     '[speed]\npin = 4\n')
    assert any("[fan] driver: not a driver for this topic; choose one of: gpio_pwm, "
               "gpio_relay, serial_actuator (found 'gpio_pulse')" in p for p in found)
    assert any("[speed] driver: missing (required)" in p for p in found)


def test_serial_port_must_name_a_board(tmp_path):
    found = problems(tmp_path, MINIMAL + '[power]\ndriver = "serial_sensor"\nport = "usb0"\n')
    assert any("[power] port: no [serial.NAME] table by this name" in p for p in found)


@pytest.mark.parametrize(("body", "expected"), [
    ("min = -12", "min and max must satisfy -10 <= min < max <= 19"),
    ("safe = 30", "[incline] safe: out of range (found 30.0)"),
    ("safe = 2.25", "[incline] safe: not on a step"),
    ('safe = "park"', '[incline] safe: must be a number or "hold"'),
    ("step = 0.3", "[incline] step: must be a multiple of 0.5"),
    ("step = 0", "[incline] step: must be a multiple of 0.5"),
    ("min_interval = -1", "[incline] min_interval: must be at least 0"),
])
def test_actuator_range_may_narrow_but_never_widen(tmp_path, body, expected):
    text = MINIMAL + ('[serial.m]\nurl = "loop://"\n[incline]\ndriver = "serial_actuator"\n'
                      f'port = "m"\n{body}\n')
    found = problems(tmp_path, text)
    assert any(expected in p for p in found), found


def test_cross_key_problems_are_config_errors(tmp_path):
    found = problems(tmp_path, MINIMAL + '[resistance]\ndriver = "gpio_servo"\npin = 18\n'
                     "min_pulse_width = 0.002\nmax_pulse_width = 0.001\n")
    assert any("[resistance] min_pulse_width: must be below max_pulse_width" in p for p in found)


def test_booleans_are_not_numbers(tmp_path):
    found = problems(tmp_path, MINIMAL + "[broker]\nport = true\n")
    assert any("[broker] port: must be an integer (found True)" in p for p in found)


def test_unreadable_and_invalid_files_are_named(tmp_path):
    with pytest.raises(ConfigError) as missing:
        config.load(tmp_path / "missing.toml", environ={})
    text = str(missing.value)
    assert text.startswith(f"{tmp_path / 'missing.toml'}: missing: ")
    assert "--config FILE" in text and "--simulate" in text
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError, match="dir.toml: cannot read the file: Is a directory"):
        config.load(tmp_path / "dir.toml", environ={})
    with pytest.raises(ConfigError) as invalid:
        config.load(write(tmp_path, "[bike\n"), environ={})
    # A whole-file problem has no table or key to name: no empty ": :" in its place.
    assert str(invalid.value).startswith(f"{tmp_path / 'bike.toml'}: not valid TOML: ")


def test_problem_counts_are_worded_for_one_and_for_several(tmp_path):
    with pytest.raises(ConfigError) as one:
        config.load(tmp_path / "missing.toml", environ={})
    assert one.value.headline == "invalid configuration (1 problem)"
    with pytest.raises(ConfigError) as two:
        config.load(write(tmp_path, '[bike]\nid = "x"\n[broker]\nport = 0\n'), environ={})
    assert two.value.headline == "invalid configuration (2 problems)"


def _smartbiked(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smartbiked", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60, env={"PATH": "/usr/bin:/bin", **env})


def test_check_config_exits_0_for_the_example_and_78_for_a_bad_file(tmp_path):
    ok = _smartbiked("--check-config", "--config", str(EXAMPLE))
    assert ok.returncode == 0, ok.stderr
    assert "OK: bike 000001, 8 drivers" in ok.stdout
    bad = write(tmp_path, '[bike]\nid = "x"\n[broker]\nport = 0\n')
    result = _smartbiked("--check-config", "--config", str(bad))
    assert result.returncode == EX_CONFIG
    assert f"{bad}: [bike] id: does not match id_pattern" in result.stderr
    assert f"{bad}: [broker] port: must be a port number" in result.stderr


def test_invalid_config_exits_78_before_touching_hardware_or_network(tmp_path):
    # No --check-config: the daemon itself must refuse to start, quickly and cleanly.
    bad = write(tmp_path, '[bike]\nid = "000001"\n[fan]\ndriver = "gpio_pwm"\n')
    result = _smartbiked("--config", str(bad))
    assert result.returncode == EX_CONFIG
    assert "[fan] pin: missing (required)" in result.stderr
    assert "connect" not in result.stderr.lower()


@pytest.mark.parametrize(("body", "expected"), [
    ("[broker]\npassword_file = 5\n", "[broker] password_file: must be a string"),
    ('[broker]\npassword_credential = true\n', "[broker] password_credential: must be a string"),
    ('[bike]\nid_pattern = "([0-9"\n', "[bike] id_pattern: not a regular expression"),
    ('[broker]\nhost = "bad..host"\n', "[broker] host: not a valid host name"),
    ('[broker]\nhost = "a b"\n', "[broker] host: not a valid host name"),
])
def test_values_that_would_crash_at_start_are_config_errors(tmp_path, body, expected):
    text = MINIMAL.replace("[bike]\n", "") if body.startswith("[bike]") else MINIMAL
    if body.startswith("[bike]"):
        body = '[bike]\nid = "000001"\n' + body.split("\n", 1)[1]
    found = problems(tmp_path, text + body)
    assert any(expected in p for p in found), found


def test_tls_files_are_loaded_at_check_time(tmp_path):
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    found = problems(tmp_path, MINIMAL + f'[broker]\ntls = true\nca_file = "{bogus}"\n')
    assert any("[broker] ca_file: not a CA certificate file" in p for p in found), found
    cfg = config.load(write(tmp_path, MINIMAL + "[broker]\ntls = true\n"), environ={})
    assert cfg.broker.tls  # the system's CAs load fine


def test_errors_from_environment_variables_name_the_variable(tmp_path):
    found = problems(tmp_path, MINIMAL, env={"MQTT_PORT": "99999", "DEVICE_ID": "12/4"})
    text = "\n".join(found)
    assert "[environment] MQTT_PORT: must be a port number from 1 to 65535 (found 99999)" in text
    assert "[environment] DEVICE_ID: must be non-empty, without +, #, / or white space" in text


# -- secrets: only known, non-secret keys have their values echoed ------------------------

SECRET = "hunter2-do-not-echo"


@pytest.mark.parametrize(("table", "key"), [
    ("broker", "pasword"), ("broker", "pw"), ("broker", "passwd"), ("broker", "Password"),
    ("broker", "pwd"), ("broker", "mqtt_pass"), ("broker", "secret"), ("broker", "pass_word"),
    ("bike", "pw"), ("service", "key"), ("serial.m", "pasword"), ("fan", "pw"),
])
def test_misspelt_or_unknown_keys_never_have_their_value_echoed(tmp_path, table, key):
    body = {"bike": "", "broker": "", "service": "",
            "serial.m": 'url = "loop://"\n',
            "fan": 'driver = "gpio_pwm"\npin = 12\n'}
    body[table] += f'{key} = "{SECRET}"\n'
    text = f'[bike]\nid = "000001"\n{body["bike"]}' + "".join(
        f"[{name}]\n{lines}" for name, lines in body.items() if name != "bike" and lines)
    found = problems(tmp_path, text)
    assert any(f"[{table}] {key}: unknown key" in p for p in found), found
    assert not any(SECRET in p for p in found), found


def test_check_config_never_prints_a_misspelt_secret(tmp_path):
    bad = write(tmp_path, MINIMAL + f'[broker]\npasword = "{SECRET}"\npw = 1234567\n'
                f'port = "{SECRET}-port"\n[broker.login]\npassword = "{SECRET}"\n')
    result = _smartbiked("--check-config", "--config", str(bad))
    assert result.returncode == EX_CONFIG
    assert "[broker] pasword: unknown key" in result.stderr
    assert "[broker] pw: unknown key" in result.stderr and "1234567" not in result.stderr
    assert "[broker] login: unknown key" in result.stderr
    # A known, non-secret key still shows what was found: that is what makes errors useful.
    assert f"[broker] port: must be an integer (found '{SECRET}-port')" in result.stderr
    assert result.stderr.count(SECRET) == 1


def test_a_table_given_as_a_value_is_named_by_its_type_not_echoed(tmp_path):
    found = problems(tmp_path, f'broker = "{SECRET}"\n' + MINIMAL)
    assert any(p.endswith("[broker]: must be a table, not a string") for p in found), found


# -- warnings: risky but working settings, never the secret itself ------------------------

@pytest.mark.parametrize(("host", "tls", "warned"), [
    ("broker.example.org", False, True),
    ("192.168.1.10", False, True),
    ("broker.example.org", True, False),
    ("localhost", False, False),
    ("127.0.0.1", False, False),
    ("127.0.1.1", False, False),
    ("::1", False, False),
    ("bike.localhost", False, False),
])
def test_a_password_sent_in_clear_off_this_machine_is_warned_about(tmp_path, host, tls,
                                                                   warned):
    text = MINIMAL + f'[broker]\nhost = "{host}"\ntls = {"true" if tls else "false"}\n'
    cfg = config.load(write(tmp_path, text), environ={"MQTT_PASSWORD": SECRET},
                      env_file=tmp_path / "no-env")
    clear = [w for w in cfg.warnings if "without TLS" in w]
    assert bool(clear) == warned, cfg.warnings
    if warned:
        port = 1883  # the default port: this config names none
        assert clear == [f"[broker] the password goes to {host}:{port} without TLS, readable "
                         "on the network: set tls = true (and a TLS port)"]
    # No password, nothing to leak.
    cfg = config.load(write(tmp_path, text), environ={}, env_file=tmp_path / "no-env")
    assert cfg.warnings == ()


@pytest.mark.parametrize(("mode", "who"), [
    (0o600, None), (0o400, None), (0o640, "group"), (0o604, "others"),
    (0o644, "group and others"),
])
def test_a_password_file_others_can_read_is_warned_about(tmp_path, mode, who):
    secret = tmp_path / "pw"
    secret.write_text(SECRET + "\n")
    secret.chmod(mode)
    cfg = config.load(write(tmp_path, MINIMAL + f'[broker]\npassword_file = "{secret}"\n'),
                      environ={}, env_file=tmp_path / "no-env")
    assert cfg.broker.password == SECRET
    expected = [] if who is None else [
        f"the password file {secret} is readable by {who} (mode {mode:04o}): chmod 600 {secret}"]
    assert list(cfg.warnings) == expected


@pytest.mark.parametrize(("text", "mode", "warned"), [
    (f"MQTT_PASSWORD={SECRET}\n", 0o644, True),
    (f"DEVICE_ID=000001\nexport MQTT_PASSWORD='{SECRET}'\n", 0o640, True),
    (f"MQTT_PASSWORD={SECRET}\n", 0o600, False),
    ("DEVICE_ID=000001\nMQTT_HOSTNAME=broker\n", 0o644, False),  # nothing secret in it
])
def test_an_env_file_others_can_read_is_warned_about(tmp_path, monkeypatch, text, mode,
                                                     warned):
    env_file = tmp_path / "env"
    env_file.write_text(text)
    env_file.chmod(mode)
    # The module constant is the default, read when load() runs: tests can point it here.
    monkeypatch.setattr(config, "ENV_FILE", env_file)
    cfg = config.load(write(tmp_path, MINIMAL), environ={})
    about = [w for w in cfg.warnings if str(env_file) in w]
    assert bool(about) == warned, cfg.warnings
    if warned:
        assert about[0].startswith(f"{env_file} is readable by ")
        assert f"chmod 600 {env_file}" in about[0]
    assert not any(SECRET in w for w in cfg.warnings)


def test_no_env_file_no_warning(tmp_path):
    cfg = config.load(write(tmp_path, MINIMAL), environ={}, env_file=tmp_path / "absent")
    assert cfg.warnings == ()


def test_the_example_config_has_no_warnings(tmp_path):
    assert config.load(EXAMPLE, environ={}, env_file=tmp_path / "absent").warnings == ()


# -- pins: what start-up would fail on, caught by the check --------------------------------

@pytest.fixture
def mock_board(monkeypatch):
    monkeypatch.setenv("GPIOZERO_PIN_FACTORY", "mock")
    monkeypatch.setenv("GPIOZERO_MOCK_REVISION", "a02082")


PWM = 'driver = "gpio_pwm"\npin = {}\n'
PULSE = 'driver = "gpio_pulse"\npin = {}\n'


@pytest.mark.parametrize(("body", "expected"), [
    # one pin, two topics
    (f"[resistance]\n{PWM.format(12)}[fan]\n{PWM.format(12)}",
     "[fan] pin: GPIO12 (J8:32) is already used by [resistance] pin (found 12)"),
    # one pin under two names
    (f'[cadence]\n{PULSE.format(chr(34) + "BOARD29" + chr(34))}'
     f'[speed]\n{PULSE.format(chr(34) + "GPIO5" + chr(34))}',
     "[speed] pin: GPIO5 (J8:29) is already used by [cadence] pin (found 'GPIO5')"),
    (f'[cadence]\n{PULSE.format(5)}[fan]\n{PWM.format(chr(34) + "J8:29" + chr(34))}',
     "[fan] pin: GPIO5 (J8:29) is already used by [cadence] pin (found 'J8:29')"),
    # a button's pin taken by another topic (the default buttons: BOARD11, 12, 15)
    ('[fan]\ndriver = "gpio_relay"\npin = 17\n[button]\ndriver = "gpio_buttons"\n',
     "[button] pins.LEFT: GPIO17 (J8:11) is already used by [fan] pin (found 'BOARD11')"),
    # one pin twice in the buttons table
    ('[button]\ndriver = "gpio_buttons"\npins = { LEFT = "BOARD11", RIGHT = 17 }\n',
     "[button] pins: LEFT and RIGHT are the same pin, GPIO17 (J8:11) "
     "(found {'LEFT': 'BOARD11', 'RIGHT': 17})"),
    # pins not on the header, or not GPIO pins
    (f'[fan]\n{PWM.format(chr(34) + "GPIO99" + chr(34))}',
     "[fan] pin: no GPIO pin by this name on a Raspberry Pi 3B"),
    (f"[fan]\n{PWM.format(40)}", "[fan] pin: no GPIO pin by this name"),
    (f'[fan]\n{PWM.format(chr(34) + "BOARD6" + chr(34))}',
     "[fan] pin: J8:6 is GND, not a GPIO pin (found 'BOARD6')"),
    ('[button]\ndriver = "gpio_buttons"\npins = { LEFT = "BOARD11", UP = "GPIO99" }\n',
     "[button] pins: pin of UP: no GPIO pin by this name"),
])
def test_pin_conflicts_and_unknown_pins_are_config_errors(tmp_path, mock_board, body,
                                                          expected):
    found = problems(tmp_path, MINIMAL + body)
    assert any(expected in p for p in found), found
    assert len(found) == 1, found  # each mistake reported once


def test_distinct_pins_under_any_names_pass(tmp_path, mock_board):
    cfg = config.load(write(tmp_path, MINIMAL + f'[cadence]\n{PULSE.format(5)}'
                            f'[speed]\n{PULSE.format(chr(34) + "BCM6" + chr(34))}'
                            f'[fan]\n{PWM.format(chr(34) + "J8:33" + chr(34))}'
                            '[button]\ndriver = "gpio_buttons"\n'), environ={})
    assert len(cfg.drivers) == 4


@pytest.mark.parametrize("extra_env", [{}, {"GPIOZERO_PIN_FACTORY": "mock"}])
def test_check_config_exits_78_on_a_pin_used_twice(tmp_path, extra_env):
    # Without GPIOZERO_PIN_FACTORY (a laptop, no Pi) and with the mock, as tests run it.
    bad = write(tmp_path, MINIMAL + f'[cadence]\n{PULSE.format(chr(34) + "BOARD29" + chr(34))}'
                f'[fan]\n{PWM.format(chr(34) + "GPIO5" + chr(34))}'
                f'[resistance]\n{PWM.format(chr(34) + "GPIO99" + chr(34))}')
    result = _smartbiked("--check-config", "--config", str(bad), **extra_env)
    assert result.returncode == EX_CONFIG, result.stderr
    assert f"{bad}: [fan] pin: GPIO5 (J8:29) is already used by [cadence] pin" in result.stderr
    assert f"{bad}: [resistance] pin: no GPIO pin by this name" in result.stderr
    assert "Traceback" not in result.stderr


# -- nesting and where min/max errors are reported ------------------------------------------

@pytest.mark.parametrize("text", ["a = " + "[" * 100000, "a = " + "{b = " * 100000])
def test_deeply_nested_toml_is_a_config_error(tmp_path, text):
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, text), environ={})
    assert str(info.value) == f"{tmp_path / 'bike.toml'}: not valid TOML: arrays or tables " \
        "nested too deeply"


def test_check_config_exits_78_on_deep_nesting(tmp_path):
    result = _smartbiked("--check-config", "--config",
                         str(write(tmp_path, "a = " + "[" * 100000)))
    assert result.returncode == EX_CONFIG, result.stderr
    assert "nested too deeply" in result.stderr and "Traceback" not in result.stderr


def test_a_deeply_nested_wrong_value_is_named_without_showing_it(tmp_path):
    found = problems(tmp_path, MINIMAL + '[fan]\ndriver = "gpio_pwm"\npin.' + "a." * 3000
                     + "b = 1\n")
    assert found == [f"{tmp_path / 'bike.toml'}: [fan] pin: must be an integer or a string "
                     "(found a value nested too deeply to show)"]


@pytest.mark.parametrize(("body", "key", "value"), [
    ("max = 800", "max", 800.0),
    ("min = -5", "min", -5.0),
    ("min = 101", "min", 101.0),
    ("max = -1", "max", -1.0),
    ("min = 100", "min", 100.0),           # max is the default 100: min is the one set
    ("max = 0", "max", 0.0),               # min is the default 0: max is the one set
    ("min = 60\nmax = 40", "max", 40.0),
])
def test_limit_errors_are_reported_under_the_key_that_is_wrong(tmp_path, body, key, value):
    found = problems(tmp_path, MINIMAL + f'[fan]\ndriver = "gpio_pwm"\npin = 12\n{body}\n')
    assert found == [f"{tmp_path / 'bike.toml'}: [fan] {key}: min and max must satisfy "
                     f"0 <= min < max <= 100 (found {value})"]


# -- [trainer] and [homeassistant] --------------------------------------------------------

TRAINER_BIKE = MINIMAL + """
[resistance]
driver = "gpio_pwm"
pin = 18
max = 80
[power]
driver = "serial_sensor"
port = "board"
[cadence]
driver = "gpio_pulse"
pin = 5
[speed]
driver = "gpio_pulse"
pin = 6
[serial.board]
url = "loop://"
"""


def test_trainer_and_home_assistant_are_off_by_default(tmp_path):
    cfg = config.load(write(tmp_path, TRAINER_BIKE), environ={})
    assert not cfg.trainer.enabled and not cfg.homeassistant.enabled
    assert cfg.control_limits() == cfg.actuator_limits()


def test_an_enabled_trainer_offers_target_power_and_grade(tmp_path):
    cfg = config.load(write(tmp_path, TRAINER_BIKE + """
        [trainer]
        enabled = true
        max_power = 900
        calibration = [[0, 20], [40, 180], [80, 600]]
        grade_gain = 0.5
        """), environ={})
    limits = cfg.control_limits()
    assert limits["targetpower"] == Limits(0, 900) and limits["grade"] == Limits(-40, 40)
    assert limits["resistance"] == Limits(0, 80)
    assert cfg.trainer.calibration == ((0, 20), (40, 180), (80, 600))
    assert cfg.trainer.grade_gain == 0.5 and cfg.trainer.erg_gain == 0.15
    # Loading the same file twice gives equal settings (a reload sees "nothing changed").
    assert config.load(cfg.path, environ={}) == cfg


def test_grade_needs_a_speed_sensor_and_target_power_a_power_sensor(tmp_path):
    no_speed = TRAINER_BIKE.replace('[speed]\ndriver = "gpio_pulse"\npin = 6\n', "")
    cfg = config.load(write(tmp_path, no_speed + "[trainer]\nenabled = true\n"), environ={})
    assert "targetpower" in cfg.control_limits() and "grade" not in cfg.control_limits()


@pytest.mark.parametrize(("body", "expected"), [
    ("[trainer]\nenabled = true\n", "[trainer] enabled: needs a [resistance] actuator"),
    ("[trainer]\nenabled = true\n[fan]\ndriver = 'gpio_pwm'\npin = 4\n",
     "needs a [power] sensor (target power) or a [speed] sensor"),
    ("[trainer]\ncalibration = [[0, 100], [50, 90]]\n", "[trainer] calibration: resistance "
     "and watts must both rise"),
    ("[trainer]\ncalibration = [[0, 100]]\n", "[trainer] calibration: must be a list of"),
    ("[trainer]\ncalibration = [[0, true], [50, 90]]\n", "[trainer] calibration: must be a"),
    ("[trainer]\ncalibration = [[0, 10], [120, 90]]\n", "resistance must lie in 0..100"),
    ("[trainer]\ncalibration_sensor = 'wheel'\n", "must be one of: cadence, speed"),
    ("[trainer]\nerg_gain = 5\n", "[trainer] erg_gain: must be between 0 and 2"),
    ("[trainer]\nincline_follows_grade = true\n",
     "[trainer] incline_follows_grade: needs an [incline] actuator"),
    ("[trainer]\nincline_min = 4\nincline_max = 2\n", "[trainer] incline_max: must be above"),
    ("[trainer]\nmass = true\n", "[trainer] mass: must be a number"),
    ("[trainer]\ngears = 3\n", "[trainer] gears: unknown key"),
    ("[homeassistant]\nprefix = 'ha/#'\n", "[homeassistant] prefix: must be a topic prefix"),
    ("[homeassistant]\nprefix = ''\n", "[homeassistant] prefix: must be a topic prefix"),
    ("[homeassistant]\nenabled = 'yes'\n", "[homeassistant] enabled: must be true or false"),
    ("[targetpower]\ndriver = 'gpio_pwm'\n", "[targetpower]: unknown table"),
    ("[mode]\n", "[mode]: unknown table"),
])
def test_trainer_and_home_assistant_mistakes_are_named(tmp_path, body, expected):
    found = problems(tmp_path, MINIMAL + body)
    assert any(expected in p for p in found), found


def test_calibration_sensor_and_incline_range_must_fit_the_bike(tmp_path):
    found = problems(tmp_path, TRAINER_BIKE.replace('[cadence]\ndriver = "gpio_pulse"\npin = 5\n',
                                                    "") + """
        [incline]
        driver = "serial_actuator"
        port = "board"
        min = -2
        max = 6
        [trainer]
        enabled = true
        incline_follows_grade = true
        incline_min = -5
        """)
    assert any("[trainer] calibration_sensor: this bike has no [cadence] sensor" in p
               for p in found), found
    assert any("[trainer] incline_min: must lie within [incline] min..max (-2..6)" in p
               for p in found), found


def test_home_assistant_settings(tmp_path):
    cfg = config.load(write(tmp_path, MINIMAL + """
        [homeassistant]
        enabled = true
        prefix = "ha"
        name = "Bike in the lab"
        """), environ={})
    assert cfg.homeassistant.enabled and cfg.homeassistant.prefix == "ha"
    assert cfg.homeassistant.name == "Bike in the lab"


def test_bluetooth_settings_and_their_defaults(tmp_path):
    plain = config.load(write(tmp_path, MINIMAL), environ={})
    assert not plain.ble.enabled and plain.ble.backend == "bluez"
    assert plain.ble_name == f"Smartbike {plain.bike_id}"
    cfg = config.load(write(tmp_path, MINIMAL + """
        [ble]
        enabled = true
        backend = "bumble"
        transport = "hci-socket:0"
        name = "Vélo 7"
        resistance_levels = 25.5
        """), environ={})
    assert (cfg.ble.enabled, cfg.ble.backend, cfg.ble.transport) == (True, "bumble",
                                                                      "hci-socket:0")
    assert cfg.ble_name == "Vélo 7" and cfg.ble.resistance_levels == 25.5
    # Bluetooth apps get what MQTT apps get, but the incline only on request.
    mqtt = {"resistance": Limits(0, 100), "incline": Limits(-10, 19, 0.5)}
    assert set(cfg.ble.limits(mqtt)) == {"resistance"}
    assert set(dataclasses.replace(cfg.ble, incline=True).limits(mqtt)) == set(mqtt)


def test_bad_bluetooth_settings_are_named(tmp_path):
    found = problems(tmp_path, MINIMAL + """
        [ble]
        enabled = true
        backend = "bluetoothd"
        adapter = "wlan0"
        transport = "usb"
        name = "A name far too long for the scan response"
        notify_period = 0
        resistance_levels = 30
        """)
    for key in ("backend", "adapter", "transport", "name", "notify_period",
                "resistance_levels"):
        assert any(f"[ble] {key}:" in p for p in found), (key, found)


def test_bluetooth_without_its_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(config.BACKENDS, "bumble", "no_such_bluetooth_package")
    found = problems(tmp_path, MINIMAL + '[ble]\nenabled = true\nbackend = "bumble"\n')
    assert any("[ble] backend: needs the Python package no_such_bluetooth_package" in p
               and "smartbiked[ble]" in p for p in found), found
    # Not enabled: nothing is needed.
    assert not config.load(write(tmp_path, MINIMAL + '[ble]\nbackend = "bumble"\n'),
                           environ={}).ble.enabled


def test_the_reference_tables_list_the_new_tables():
    titles = [title for title, _ in config.TABLES]
    assert titles == ["[bike]", "[broker]", "[service]", "[trainer]", "[homeassistant]",
                      "[ble]"]
    for _, options in config.TABLES:
        assert all(opt.doc for opt in options)
