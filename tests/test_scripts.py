"""The README's run command, as a newcomer runs it: it comes up, and it cleans up."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from tests.conftest import ROOT, wait_until


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line or environment mention ``text`` (the demo's folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                seen = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
            except OSError:
                continue
            if text.encode() in seen:
                found.append(int(entry.name))
    return found


def test_run_virtual_bike_shows_values_and_stops_everything_on_term():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "DEVICE_ID"))}
    proc = subprocess.Popen([str(ROOT / "scripts" / "run-virtual-bike"), "--seed", "1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True).start()
    try:
        wait_until(lambda: re.search(r"speed\s+\d+\.\d+", "".join(output)), 120,
                   "a speed value in the watch")
        text = "".join(output)
        work = re.search(r"Daemon log:\s+(\S+)/smartbiked\.log", text)[1]
        port = re.search(r"mqtt://127\.0\.0\.1:(\d+)", text)[1]
        assert f"--port {port} set incline 5.5" in text  # the README's second-terminal line
        assert len(_pids_mentioning(work)) >= 2, "the broker and the daemon should be running"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) != 0
        wait_until(lambda: not _pids_mentioning(work), 10, "every child to stop")
        assert not Path(work).exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_command_latency_bench_runs_without_pytest_or_the_tests():
    # The bench is a tool for a bike or a laptop without the test tools: it must not
    # import pytest or tests/, and its first command must not race the daemon's start.
    blocker = ("import runpy, sys; sys.modules['pytest'] = sys.modules['tests'] = None; "
               "sys.argv = ['command_latency.py', '20']; "
               "runpy.run_path('bench/command_latency.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", blocker], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("20 commands: median ") and "daemon RSS:" in done.stdout
