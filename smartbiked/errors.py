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
        where = f"[{self.table}] {self.key}" if self.table else self.key
        text = f"{self.file}: {where}: {self.problem}"
        return f"{text} (found {self.found})" if self.found is not None else text


class ConfigError(SmartbikeError):
    """A configuration that cannot be used; carries every problem found, not just the first."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class HardwareError(SmartbikeError):
    """A pin or port could not be opened, read or written."""
