"""The few exceptions smartbiked raises, and the exit status they map to."""

from __future__ import annotations

from dataclasses import dataclass

#: sysexits.h EX_CONFIG: systemd's RestartPreventExitStatus stops a restart loop on it.
EX_CONFIG = 78


class SmartbikeError(Exception):
    """Base class for every error smartbiked raises on purpose."""


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a config: where it is, what is wrong, what was found."""

    file: str
    table: str
    key: str
    problem: str
    found: str | None = None  # already rendered; None when it is a secret or absent

    def __str__(self) -> str:
        # A problem with the whole file (unreadable, not TOML) has no table or key:
        # leave the place out rather than print an empty "file: : ...".
        where = " ".join(part for part in (f"[{self.table}]" if self.table else "", self.key)
                         if part)
        text = f"{self.file}: {where}: {self.problem}" if where else f"{self.file}: {self.problem}"
        return f"{text} (found {self.found})" if self.found is not None else text


class ConfigError(SmartbikeError):
    """A configuration that cannot be used; carries every problem found, not just the first."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @property
    def headline(self) -> str:
        """``invalid configuration (1 problem)`` or ``(N problems)``: the line before the list."""
        count = len(self.problems)
        return f"invalid configuration ({count} problem{'' if count == 1 else 's'})"


class HardwareError(SmartbikeError):
    """A pin or port could not be opened, read or written."""


class BluetoothUnavailable(SmartbikeError):
    """The Bluetooth stack or adapter is not there (no BlueZ, no adapter, no dongle).

    The message is one line an operator can act on; the daemon keeps running over MQTT
    and tries Bluetooth again later.
    """
