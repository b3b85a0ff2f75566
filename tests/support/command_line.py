"""The command line run in-process, its exit status and both streams captured."""

from __future__ import annotations

import pytest

from epd_receiver.adapters.tools.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err
