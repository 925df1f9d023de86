"""The config reference (every table, key and default) rendered from the code itself.

``python -m smartbiked.reference`` prints it; the README carries the same text and a
test keeps the two in step, so the documentation cannot drift from the loader.
"""

from __future__ import annotations

from smartbiked.config import TABLES
from smartbiked.hardware import DRIVERS, Option, SerialBoard
from smartbiked.hardware.base import REQUIRED


def _default(opt: Option) -> str:
    if opt.default is REQUIRED:
        return "required"
    if opt.default is None:
        return "the topic's"
    if isinstance(opt.default, bool):
        return "true" if opt.default else "false"
    if isinstance(opt.default, str):
        return repr(opt.default).replace("'", '"')
    if isinstance(opt.default, dict):
        return "{" + ", ".join(f'{k} = "{v}"' for k, v in opt.default.items()) + "}"
    return str(opt.default)


def _table(options: tuple[Option, ...] | dict[str, Option]) -> list[str]:
    opts = options.values() if isinstance(options, dict) else options
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for opt in opts:
        doc = opt.doc.replace("|", "\\|")
        default = _default(opt).replace("|", "\\|").replace("\n", "\\n")
        rows.append(f"| `{opt.name}` | `{default}` | {doc} |")
    return rows


def markdown() -> str:
    """The reference as Markdown."""
    out: list[str] = []
    for title, options in (*TABLES, ("[serial.NAME]", SerialBoard.OPTIONS)):
        out += [f"#### `{title}`", "", *_table(options), ""]
    for kind, cls in DRIVERS.items():
        topics = ", ".join(sorted(cls.TOPICS))
        out += [f"#### `driver = \"{kind}\"` (topics: {topics})", ""]
        out += [(cls.__doc__ or "").strip().splitlines()[0].replace("``", "`"), ""]
        out += [*_table(cls.options()), ""]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
