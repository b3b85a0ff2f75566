"""The ``epd-receiver`` command line's parser: what it refuses and what its help says.

An unknown command or an impossible value is refused with status 2 and the reason on stderr, before
anything runs; ``--help`` lists every command on one line each, and every option's help shows its default.
"""

from __future__ import annotations

import argparse

import pytest

from epd_receiver.adapters.tools.arguments import parser
from epd_receiver.adapters.tools.cli import main


def test_usage_errors_exit_through_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["no-such-command"])
    assert raised.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["simulate", "--num-blocks", "0"], "--num-blocks: must be a positive whole number, not 0"),
        (["simulate", "--deliver-prob", "-1"], "--deliver-prob: must be above 0 and at most 1"),
        (["simulate", "--deliver-prob", "0"], "--deliver-prob: must be above 0 and at most 1"),
        (["simulate", "--abort-rate", "1.5"], "--abort-rate: must be between 0 and 1"),
        (["simulate", "--deepstack", "-2"], "--deepstack: must not be negative"),
        (["simulate", "--requests", "many"], "--requests: not a whole number: 'many'"),
        (["bench", "--threads", "0"], "--threads: must be a positive whole number"),
        (["walk", "--steps", "-5"], "--steps: must be a positive whole number"),
        (["walk", "--steps", "-1"], "--steps: must be a positive whole number"),
        (["walk", "--ranks", "4"], "--ranks: invalid choice"),
        (
            ["simulate", "--num-blocks", "2", "--default-alloc-tokens", "100000"],
            "default_alloc_tokens=100000 needs 782 blocks of block_size=128 tokens, more than the pool's num_blocks=2",
        ),
        (["simulate", "--num-blocks", "1", "--block-size", "4", "--default-alloc", "5"], "num_blocks=1"),
        (["explore", "--depth", "0"], "--depth: must be a positive whole number"),
        (["explore", "--ranks", "3"], "--ranks: invalid choice"),
        (["explore", "--variant", "no-such-bug"], "--variant: invalid choice"),
        (["bench", "--total-tokens", "100"], "--total-tokens 100 fits in A0"),
        (["bench", "--block-sizes", "0"], "--block-sizes: must be a positive whole number"),
        (["replay"], "the following arguments are required: scenario"),
        (["replay", "x.json", "--variant", "no-such-bug"], "--variant: invalid choice"),
        (["variants", "no-such-bug"], "unknown variant 'no-such-bug'"),
        (["spec", "check", "--samples", "0"], "--samples: must be a positive whole number"),
    ],
)
def test_an_impossible_value_is_refused_by_the_parser_with_status_2(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert says in capsys.readouterr().err


def subparsers(top: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by its name, nested commands as ``spec check``."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                prefix = command.prog.split(" ", 1)[1]
                found[prefix] = command
                found |= subparsers(command)
    return found


COMMANDS = subparsers(parser())


def test_help_lists_every_command_with_one_line_each(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as stopped:
        main(["--help"])
    assert stopped.value.code == 0
    listing = capsys.readouterr().out
    commands = listing[listing.index("  COMMAND\n") : listing.index("\noptions:")].splitlines()[1:]
    top = [name for name in COMMANDS if " " not in name]
    assert set(top) == {"simulate", "bench", "replay", "variants", "explore", "walk", "spec"}
    assert [line.split()[0] for line in commands if line.strip()] == top, "one line per command, in order"
    for line in commands:
        assert len(line.split(maxsplit=1)) == 2, f"{line.strip()}: no help line"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_shows_its_default(name: str) -> None:
    """Each option with a default says it in its help; a None default is named in the help or not at all."""
    command = COMMANDS[name]
    shown = command.format_help()
    assert command.formatter_class is not argparse.HelpFormatter
    for action in command._actions:
        if not action.option_strings or action.default in (None, argparse.SUPPRESS):
            continue
        text = command._get_formatter()._format_action(action)
        assert "(default:" in text and str(action.default) in " ".join(text.split()), (name, action.dest)
    assert "(default: None)" not in shown
