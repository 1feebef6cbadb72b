"""The man pages packaging/man/mkman.py writes for the Debian package stay true to the code."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

from agent import cli
from agent.config import Config

REPO = Path(__file__).resolve().parents[2]


def _load_mkman():
    spec = importlib.util.spec_from_file_location("mkman", REPO / "packaging" / "man" / "mkman.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mkman = _load_mkman()


def _roff_text(page: str) -> str:
    """The words a reader sees, near enough: roff's minus escapes undone."""
    return page.replace("\\-", "-")


def test_switch_agent_8_names_every_command_and_option():
    page = _roff_text(mkman.switch_agent_8())
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, subparser in sub.choices.items():
        assert f".SS {name}\n" in page
        for action in subparser._actions:
            if not isinstance(action, argparse._HelpAction):
                assert all(f"\\fB{option}\\fR" in page for option in action.option_strings), (name, action)
    for action in parser._actions:
        if not isinstance(action, argparse._HelpAction):
            assert all(f"\\fB{option}\\fR" in page for option in action.option_strings), action
    for section in ("SYNOPSIS", "DESCRIPTION", "OPTIONS", "COMMANDS", "EXIT STATUS", "FILES", "EXAMPLES"):
        assert f".SH {section}\n" in page


def test_switch_agent_toml_5_documents_every_key_with_its_default():
    page = _roff_text(mkman.switch_agent_toml_5())
    for field in dataclasses.fields(Config):
        assert f"\\fB{field.name}\\fR" in page
    assert 'poll_interval_s = 15.0' in page and 'early_paths = true' in page


def test_a_key_the_code_does_not_know_stops_the_page(tmp_path):
    config = tmp_path / "switch-agent.toml"
    config.write_text(mkman.CONFIG_FILE.read_text() + "\n# A key no code reads.\npoll_intervall_s = 5.0\n")
    with pytest.raises(mkman.ManError, match="poll_intervall_s"):
        mkman.switch_agent_toml_5(config)


def test_a_key_missing_from_the_file_stops_the_page(tmp_path):
    config = tmp_path / "switch-agent.toml"
    text = mkman.CONFIG_FILE.read_text()
    config.write_text(text.replace("debounce_s = 0.5\n", ""))
    with pytest.raises(mkman.ManError, match="debounce_s"):
        mkman.switch_agent_toml_5(config)


@pytest.mark.skipif(shutil.which("groff") is None, reason="needs groff (Debian: groff-base)")
def test_pages_format_without_groff_warnings(tmp_path):
    assert mkman.main(["--out", str(tmp_path)]) == 0
    for name in ("switch-agent.8", "switch-agent.toml.5"):
        run = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(tmp_path / name)],
                             capture_output=True, text=True, check=False)
        assert run.returncode == 0 and run.stderr == "", (name, run.stderr)
