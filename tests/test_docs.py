"""The README's config reference is the one the code generates."""

from __future__ import annotations

from smartbiked import reference
from tests.conftest import ROOT


def test_readme_config_reference_matches_the_code():
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- config-reference:start -->\n") + len(
        "<!-- config-reference:start -->\n")
    end = text.index("<!-- config-reference:end -->")
    assert text[start:end] == reference.markdown(), (
        "README config reference is stale: regenerate with python -m smartbiked.reference")


def test_every_driver_documents_every_option():
    from smartbiked.hardware import DRIVERS

    for kind, cls in DRIVERS.items():
        assert cls.__doc__, kind
        for name, opt in cls.options().items():
            assert opt.doc, f"{kind}.{name} has no documentation"
