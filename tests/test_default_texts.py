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


def _readme_defaults() -> dict[str, str]:
    """The text sources `kvkit moe extract | eval | trace` read when none is given."""
    import argparse
    import inspect

    from kvkit.moe.readme import pipeline
    from kvkit.moe.readme.cli import register_cli

    ap = argparse.ArgumentParser()
    register_cli(ap.add_subparsers(dest="command", required=True))
    return {"calib": ap.parse_args(["extract", "--out", "x"]).calib,
            "eval": ap.parse_args(["eval", "x"]).text,
            "trace": ap.parse_args(["trace", "x", "--out", "t.npz"]).text,
            "pipeline": inspect.signature(pipeline.calibrate).parameters["source"].default}


def test_readme_moe_default_sources_ship_with_kvkit_or_python():
    import sysconfig

    from kvkit.moe.readme.calib import source_files, source_texts

    shipped = (Path(kvkit.__file__).parent, Path(sysconfig.get_paths()["stdlib"]))
    for what, source in _readme_defaults().items():
        assert source_texts(source), what
        if not source.startswith("pydoc"):  # pydoc's texts come from Python's own pydoc_data
            assert all(any(f.resolve().is_relative_to(p) for p in shipped)
                       for f in source_files(source)), (what, source)
    for path in ("moe/readme/cli.py", "moe/readme/pipeline.py"):
        assert "vim:" not in (Path(kvkit.__file__).parent / path).read_text()


def test_readme_moe_default_calibration_and_evaluation_texts_are_disjoint_and_long_enough():
    from transformers import AutoTokenizer

    from kvkit.models import smollm2
    from kvkit.moe.readme.calib import source_texts, token_chunks

    defaults = _readme_defaults()
    assert not set(source_texts(defaults["calib"])) & set(source_texts(defaults["eval"]))
    tok = AutoTokenizer.from_pretrained(smollm2())
    assert token_chunks(tok, defaults["calib"], 256, 96).shape == (96, 256)  # extract's defaults
    assert token_chunks(tok, defaults["eval"], 256, 16).shape == (16, 256)  # eval's defaults
