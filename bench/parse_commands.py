"""How fast parse_command turns control messages into commands or refusals.

Prints microseconds per message for a mix of good and bad payloads; a Pi 4 runs
about 4x slower than a desktop core.
"""

from __future__ import annotations

import time

from smartbiked.topics import Limits, parse_command

LIMITS = {"incline": Limits(-10, 19, 0.5), "fan": Limits(0, 100), "resistance": Limits(0, 100)}
CASES = [
    ("bike/000001/incline/control", b'{"incline": 5.5, "timestamp": 1722834170.6}'),
    ("bike/000001/fan/control", b'{"level": 3}'),
    ("bike/000001/resistance/control", b"40"),
    ("bike/000001/fan/control", b'{"value": 150}'),
    ("bike/000001/fan/control", b"\xff\xfe"),
    ("bike/000001/fan/control", b"[" * 400),
]


def main() -> None:
    rounds = 20000
    for topic, payload in CASES:
        start = time.perf_counter()
        for _ in range(rounds):
            parse_command(topic, payload, "000001", LIMITS)
        per = (time.perf_counter() - start) / rounds * 1e6
        print(f"{per:8.2f} us  {topic.split('/')[2]:<10} {payload[:40]!r}")


if __name__ == "__main__":
    main()
