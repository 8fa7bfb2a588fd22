"""The smoke table (tests/smoke.py) covers every command, and its judge misses nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from loratool.cli.main import BUG_MARK, COMMANDS
from tests.smoke import STEPS, Run, Step, error_line, json_out, judge


def test_every_command_has_a_passing_smoke_step() -> None:
    succeeding = {s.command for s in STEPS if s.code == 0}
    missing = sorted(set(COMMANDS) - succeeding)
    assert not missing, f"add rows for {missing} to STEPS in tests/smoke.py"


def test_every_command_has_an_expected_failure_or_is_listed() -> None:
    """Commands that take a file or a name can fail; each such failure is a smoke row."""
    failing = {s.command for s in STEPS if s.code != 0}
    assert {"inspect", "convert", "fetch", "config"} <= failing


@pytest.mark.parametrize(("step", "run", "complaint"), [
    (Step("inspect x"), Run(0, "", "Traceback (most recent call last):\n  ...", Path()), "traceback on stderr"),
    (Step("inspect x"), Run(0, "Traceback (most recent call last):", "", Path()), "traceback on stdout"),
    (Step("inspect x", code=70), Run(70, "", f"error: x: internal error (E); {BUG_MARK}", Path()), "an internal error on stderr"),
    (Step("convert x"), Run(0, "", "/a/b.py:3: UserWarning: careful\n  x = 1\n", Path()), "a Python warning on stderr"),
    (Step("inspect x"), Run(1, "", "error: x: bad", Path()), "exit code 1, expected 0"),
    (Step("inspect x", code=1, check=error_line("bad")), Run(1, "", "error: x: bad\nerror: y: bad", Path()),
     "expected one 'error: …bad…' line on stderr"),
    (Step("inspect --json x", check=json_out(lambda d: True, "anything")), Run(0, '{"a": NaN}', "", Path()),
     "stdout is not strict JSON: non-standard JSON constant NaN"),
])
def test_judge_catches(step: Step, run: Run, complaint: str) -> None:
    assert judge(step, run) == complaint


def test_judge_passes_a_clean_run() -> None:
    step = Step("inspect --json x", code=1, check=error_line("bad"))
    assert judge(step, Run(1, "[]", "error: x: bad input\n", Path())) is None
    assert Step("--debug inspect x").command == "inspect" and Step("--help").command == ""
