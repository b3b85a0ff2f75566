"""The ``epd-receiver`` command line's parser: its commands and options, the types that refuse an impossible
value, and the check of combinations no single type can see, so that every refusal is the parser's (a usage
line, a message, status 2) rather than a traceback or a run that can never finish."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from epd_receiver.adapters.kit.geometry import first_allocation_problem
from epd_receiver.adapters.kit.quint import SIMULATION_SAMPLES, SIMULATION_STEPS
from epd_receiver.adapters.kit.variants import VARIANTS
from epd_receiver.adapters.tools.bench_config import BenchConfig
from epd_receiver.fsm.config import first_allocation

DESCRIPTION = (
    "epd-receiver: simulate a workload, measure, replay a scenario, hunt bug variants, explore and walk small "
    "worlds, and check or regenerate the spec."
)


def _whole(*, positive: bool) -> Callable[[str], int]:
    """An argument type: a whole number, positive or not negative, else the parser's error (status 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < int(positive):
            bound = "must be a positive whole number" if positive else "must not be negative"
            raise argparse.ArgumentTypeError(f"{bound}, not {value}")
        return value

    return parse


def _fraction(*, above_zero: bool) -> Callable[[str], float]:
    """An argument type: a share or a rate from 0 to 1; ``above_zero`` for a chance per iteration that
    something happens at all (at 0 nothing would ever land)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (value > 0.0 if above_zero else value >= 0.0) or value > 1.0:
            bound = "above 0 and at most 1" if above_zero else "between 0 and 1"
            raise argparse.ArgumentTypeError(f"must be {bound}, not {value:g}")
        return value

    return parse


_positive, _not_negative = _whole(positive=True), _whole(positive=False)
_share, _chance = _fraction(above_zero=False), _fraction(above_zero=True)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option shows its default; one whose default is None (not given) shows none, and says in its help
    what happens then where that is not plain."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


SPEC_DIR_HELP = (
    "a checkout's spec/ directory, {} (default: ./spec when the current directory is a checkout; "
    "never an installed package)"
)


def parser() -> argparse.ArgumentParser:
    """The whole command line; ``main`` dispatches on ``command`` (and ``spec_command``)."""
    parser = argparse.ArgumentParser(prog="epd-receiver", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = commands.add_parser("simulate", help="run an end-to-end simulated EPD transfer workload")
    sim.add_argument("--requests", type=_positive, default=200)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--hidden-size", type=_positive, default=3584)
    sim.add_argument("--block-size", type=_positive, default=128)
    sim.add_argument(
        "--default-alloc-tokens",
        "--default-alloc",
        dest="default_alloc",
        metavar="TOKENS",
        type=_positive,
        default=8192,
        help="D: tokens allocated before T is known; its blocks must fit the pool",
    )
    sim.add_argument("--num-blocks", type=_positive, default=512, help="blocks in the receive pool")
    sim.add_argument("--deepstack", type=_not_negative, default=0, help="deepstack layers K")
    sim.add_argument("--resume-share", type=_share, default=0.35, help="share of requests longer than the default")
    sim.add_argument("--deliver-prob", type=_chance, default=0.5, help="chance the sender lands a chunk per iteration")
    sim.add_argument("--fail-rate", type=_share, default=0.02, help="share of requests whose sender fails mid-resume")
    sim.add_argument("--abort-rate", type=_share, default=0.02, help="share of requests the client aborts")
    sim.add_argument(
        "--progress-share", type=_share, default=0.0, help="share of senders reporting progress (rounds possible)"
    )
    sim.add_argument(
        "--transport",
        choices=("inprocess", "mooncake"),
        default="inprocess",
        help="mooncake: an Encode process writes into every rank's pool with Mooncake over loopback tcp",
    )
    sim.add_argument("--ranks", type=_positive, default=1, help="tensor-parallel rank processes (gloo); needs mooncake")
    sim.add_argument(
        "--metrics-port",
        type=_positive,
        metavar="PORT",
        help="serve Prometheus /metrics on 127.0.0.1 while it runs",
    )
    sim.add_argument("--metrics-out", type=Path, metavar="FILE", help="write the final Prometheus exposition text")
    sim.add_argument("--json", action="store_true", help="print the summary as JSON")
    sim.add_argument("--no-progress", action="store_true")

    bench = commands.add_parser("bench", help="measure the controller against its performance goals")
    defaults = BenchConfig()
    bench.add_argument("--in-flight", type=_positive, default=defaults.in_flight, help="requests polled per iteration")
    bench.add_argument("--poll-iterations", type=_positive, default=defaults.poll_iterations)
    bench.add_argument("--lifecycles", type=_positive, default=defaults.lifecycles, help="requests for transition_us")
    bench.add_argument("--hidden-size", type=_positive, default=defaults.hidden_size)
    bench.add_argument("--total-tokens", type=_positive, default=defaults.total_tokens, help="T of the resumed payload")
    bench.add_argument(
        "--default-alloc-tokens",
        "--default-alloc",
        dest="default_alloc",
        metavar="TOKENS",
        type=_positive,
        default=defaults.default_tokens,
        help="D: tokens in A0",
    )
    bench.add_argument("--block-sizes", type=_positive, nargs="+", default=list(defaults.block_sizes))
    bench.add_argument("--repeats", type=_positive, default=defaults.repeats, help="runs per figure; the best is kept")
    bench.add_argument("--fuzz-steps", type=_positive, default=defaults.fuzz_steps)
    bench.add_argument("--threads", type=_positive, help="torch intra-op threads (default: torch's own choice)")
    bench.add_argument("--json", action="store_true", help="print every figure as JSON")
    bench.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    bench.add_argument(
        "--scale-sizes",
        type=_positive,
        nargs="+",
        metavar="N",
        help="requests in flight for the scale section (default: --in-flight times 1, 10 and 50)",
    )
    bench.add_argument(
        "--memory-requests", type=_positive, help="admissions traced for bytes_per_request (default: 10 x --in-flight)"
    )
    bench.add_argument("--plot", type=Path, metavar="FILE", help="draw the scale section as SVG")

    rep = commands.add_parser("replay", help="replay an exact event schedule and report as JSON")
    rep.add_argument("scenario", type=Path)
    rep.add_argument("--variant", choices=sorted(VARIANTS), help="replay against a catalogued bug variant")

    var = commands.add_parser("variants", help="fuzz every catalogued bug variant and report what caught it")
    var.add_argument("names", nargs="*", help="only these variants")
    var.add_argument("--record", type=Path, metavar="DIR", help="write each minimal failing schedule to DIR")
    var.add_argument("--json", action="store_true")

    exp = commands.add_parser("explore", help="walk small worlds exhaustively: every interleaving to a depth")
    exp.add_argument("--depth", type=_positive, help="events from the empty world (default: each world's own bound)")
    exp.add_argument("--ranks", type=int, choices=(1, 2), help="only the worlds of this many ranks")
    exp.add_argument("--variant", choices=sorted(VARIANTS), help="hunt a catalogued bug variant instead")
    exp.add_argument("--json", action="store_true", help="the counts, and the first violation as a scenario")

    walk = commands.add_parser("walk", help="a seeded random walk over the World's events, each one judged")
    walk.add_argument("--steps", type=_positive, default=100_000, help="judged events to walk")
    walk.add_argument("--seed", type=int, default=0)
    walk.add_argument("--ranks", type=int, choices=(0, 1, 2, 3), default=1, help="ranks per run (0: draw 1 to 3)")
    walk.add_argument("--variant", choices=sorted(VARIANTS), help="hunt a catalogued bug variant instead")
    walk.add_argument("--json", action="store_true", help="the counts, and the first violation as a scenario")

    spec = commands.add_parser("spec", help="the specification")
    spec_commands = spec.add_subparsers(dest="spec_command", required=True)
    spec_commands.add_parser("diagram", help="print the Mermaid state diagram generated from the Machine")
    check = spec_commands.add_parser("check", help="run the Quint model's typecheck, tests and invariant simulation")
    check.add_argument("--samples", type=_positive, default=SIMULATION_SAMPLES, help="simulation runs")
    check.add_argument("--steps", type=_positive, default=SIMULATION_STEPS, help="steps per simulation run")
    sync = spec_commands.add_parser("sync", help="regenerate the tables in RECEIVER.md and VERIFICATION.md")
    sync.add_argument("--check", action="store_true", help="only report whether the document is up to date")
    regenerated = "whose RECEIVER.md and VERIFICATION.md are regenerated"
    for command, what in ((check, "whose node_modules holds Quint"), (sync, regenerated)):
        command.add_argument("--spec-dir", type=Path, metavar="PATH", help=SPEC_DIR_HELP.format(what))
    _show_defaults(parser)
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every command's help, and its subcommands', shows each option's default."""
    parser.formatter_class = _Help
    for action in parser._actions:
        if action.help is None and action.option_strings:
            action.help = action.dest.replace("_", " ")  # argparse shows a default only beside a help line
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _show_defaults(command)


def impossible(args: argparse.Namespace) -> str | None:
    """What no single option's type can see: a combination that could never run; None when all can."""
    if args.command == "simulate":
        if args.transport == "mooncake" and (args.metrics_port is not None or args.metrics_out is not None):
            return (
                "--metrics-port and --metrics-out need --transport inprocess: the ranks' queues run in other processes"
            )
        return first_allocation_problem(args.block_size, args.num_blocks, args.default_alloc)
    if args.command == "bench":
        fits = [b for b in args.block_sizes if first_allocation(args.default_alloc, b) * b >= args.total_tokens]
        if fits:
            return f"--total-tokens {args.total_tokens} fits in A0 at block size {fits[0]}: nothing would resume"
    if args.command == "variants":
        unknown = sorted(set(args.names) - set(VARIANTS))
        if unknown:
            return f"unknown variant {', '.join(map(repr, unknown))}; known: {', '.join(sorted(VARIANTS))}"
    return None
