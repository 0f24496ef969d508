"""Default texts ship with kvkit or Python, so no result depends on one Linux image's files."""

from __future__ import annotations

from pathlib import Path

import kvkit
from kvkit import cli
from kvkit.tools import calibrate_cskv as calibrate


def test_ppl_default_text_ships_with_the_package():
    assert cli.DEFAULT_TEXT.is_relative_to(Path(kvkit.__file__).parent)
    text = cli.DEFAULT_TEXT.read_text()
    assert text.lstrip().startswith("Apache License") and len(text) > 10_000


def test_calibration_text_comes_from_python_itself():
    prose = calibrate.reference_text()
    text = calibrate.calibration_text()
    assert "Assignment statements" in prose and prose[:2000] in text
    assert calibrate.stdlib_text()[:12_000] in text  # the stdlib sources between the prose chunks
    assert text == calibrate.calibration_text()  # the same text every time
    assert "/usr/share" not in Path(calibrate.__file__).read_text()
