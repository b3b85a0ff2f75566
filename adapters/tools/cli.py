"""``epd-receiver``: simulate a workload, measure, replay a scenario, hunt bug variants, explore and walk
small worlds, and check or regenerate the spec."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from epd_receiver.adapters.kit.quint import SIMULATION_SAMPLES, SIMULATION_STEPS, QuintMissing, check_all
from epd_receiver.adapters.kit.scenario import ScenarioError, load_scenario, replay
from epd_receiver.adapters.kit.variants import CATALOGUE, VARIANTS, record_catch, variants_markdown
from epd_receiver.adapters.kit.world import WorldConfig
from epd_receiver.adapters.tools.bench import GOALS, BenchConfig, run_bench
from epd_receiver.adapters.tools.simulate import Workload, simulate
from epd_receiver.fsm import load_spec
from epd_receiver.fsm.diagram import mermaid, sync_generated


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
    """Every option shows its default."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epd-receiver", description=__doc__, formatter_class=_Help)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = commands.add_parser("simulate", help="run an end-to-end simulated EPD transfer workload")
    sim.add_argument("--requests", type=_positive, default=200)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--hidden-size", type=_positive, default=3584)
    sim.add_argument("--block-size", type=_positive, default=128)
    sim.add_argument("--default-alloc", type=_positive, default=8192, help="tokens allocated before T is known")
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
    sim.add_argument("--json", action="store_true", help="print the summary as JSON")
    sim.add_argument("--no-progress", action="store_true")

    bench = commands.add_parser("bench", help="measure the controller against its performance goals")
    defaults = BenchConfig()
    bench.add_argument("--in-flight", type=_positive, default=defaults.in_flight, help="requests polled per iteration")
    bench.add_argument("--poll-iterations", type=_positive, default=defaults.poll_iterations)
    bench.add_argument("--lifecycles", type=_positive, default=defaults.lifecycles, help="requests for transition_us")
    bench.add_argument("--hidden-size", type=_positive, default=defaults.hidden_size)
    bench.add_argument("--total-tokens", type=_positive, default=defaults.total_tokens, help="T of the resumed payload")
    bench.add_argument("--default-alloc", type=_positive, default=defaults.default_tokens, help="D: tokens in A0")
    bench.add_argument("--block-sizes", type=_positive, nargs="+", default=list(defaults.block_sizes))
    bench.add_argument("--repeats", type=_positive, default=defaults.repeats, help="runs per figure; the best is kept")
    bench.add_argument("--fuzz-steps", type=_positive, default=defaults.fuzz_steps)
    bench.add_argument("--threads", type=_positive, help="torch intra-op threads (default: torch's own choice)")
    bench.add_argument("--json", action="store_true", help="print every figure as JSON")
    bench.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")

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

    walk = commands.add_parser("walk", help="a seeded random walk over the World's vocabulary, judged every event")
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
    sync = spec_commands.add_parser("sync", help="regenerate the generated sections of spec/RECEIVER.md")
    sync.add_argument("--check", action="store_true", help="only report whether the document is up to date")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "simulate":
        return _simulate(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "replay":
        return _replay(args)
    if args.command == "explore":
        return _explore(args)
    if args.command == "variants":
        return _variants(args)
    if args.command == "walk":
        return _walk(args)
    if args.spec_command == "sync":
        return _sync(args)
    if args.spec_command == "check":
        return _check(args)
    print(mermaid(load_spec()))
    return 0


def _check(args: argparse.Namespace) -> int:
    try:
        outcomes = check_all(samples=args.samples, steps=args.steps)
    except QuintMissing as missing:
        print(f"epd-receiver spec check: {missing}", file=sys.stderr)
        return 2
    for outcome in outcomes:
        verdict = "ok" if outcome.returncode == 0 else "FAILED"
        print(f"{verdict:6} {outcome.command}")
        if outcome.returncode != 0:
            print(outcome.output)
    return 0 if all(o.returncode == 0 for o in outcomes) else 1


def _sync(args: argparse.Namespace) -> int:
    spec_dir = Path(str(resources.files("epd_receiver.spec")))
    document = spec_dir / "RECEIVER.md"
    current = document.read_text(encoding="utf-8")
    fresh = sync_generated(current, load_spec(), {"variants": variants_markdown(spec_dir / "scenarios" / "bugs")})
    if fresh == current:
        print(f"{document}: up to date")
        return 0
    if args.check:
        print(f"{document}: generated sections are stale; run `epd-receiver spec sync`", file=sys.stderr)
        return 1
    document.write_text(fresh, encoding="utf-8")
    print(f"{document}: regenerated")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    config = WorldConfig(
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        default_alloc_tokens=args.default_alloc,
        hidden_size=args.hidden_size,
        deepstack=args.deepstack,
    )
    workload = Workload(
        requests=args.requests,
        seed=args.seed,
        deliver_prob=args.deliver_prob,
        resume_share=args.resume_share,
        fail_rate=args.fail_rate,
        abort_rate=args.abort_rate,
        progress_share=args.progress_share,
    )
    if args.transport == "mooncake":
        from epd_receiver.adapters.tools.distributed import (
            simulate_distributed,  # pyzmq and the transfer engine are needed only here
        )

        summary = simulate_distributed(config, workload, args.ranks)
        return _report(args, summary)
    if args.ranks != 1:
        print("epd-receiver simulate: --ranks other than 1 needs --transport mooncake", file=sys.stderr)
        return 2
    console = Console(stderr=True)
    with Progress(
        TextColumn("receiving"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=args.no_progress or args.json,
    ) as bar:
        task = bar.add_task("requests", total=args.requests)
        summary = simulate(config, workload, progress=lambda n: bar.advance(task, n))
    return _report(args, summary)


def _report(args: argparse.Namespace, summary: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        Console().print(_summary_table(summary))
    healthy = (
        not summary["violations"]
        and summary["verified"] == summary["succeeded"]
        and summary["unfinished"] == 0
        and summary["leaked_blocks"] == 0
    )
    return 0 if healthy else 1


def _summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="epd-receiver simulate", show_header=False)
    for key in (
        "requests",
        "succeeded",
        "failed",
        "resumed",
        "verified",
        "mean_reads_per_request",
        "max_reads_per_request",
        "leaked_blocks",
        "iterations",
        "seconds",
        "requests_per_s",
        "payload_gb_per_s",
    ):
        table.add_row(key.replace("_", " "), str(summary[key]))
    for key in ("fenced_blocks", "ranks", "verified_on_every_rank"):
        if key in summary:
            table.add_row(key.replace("_", " "), str(summary[key]))
    transfer = summary.get("transfer", {})
    for key in ("bytes", "gb_per_s", "raw_gb_per_s"):
        if key in transfer:
            table.add_row(f"transfer {key.replace('_', ' ')}", str(transfer[key]))
    table.add_row("config", ", ".join(f"{k}={v}" for k, v in summary["config"].items()))
    table.add_row("violations", "\n".join(summary["violations"]) or "none")
    return table


def _bench(args: argparse.Namespace) -> int:
    config = BenchConfig(
        in_flight=args.in_flight,
        poll_iterations=args.poll_iterations,
        lifecycles=args.lifecycles,
        hidden_size=args.hidden_size,
        total_tokens=args.total_tokens,
        default_tokens=args.default_alloc,
        block_sizes=tuple(args.block_sizes),
        repeats=args.repeats,
        fuzz_steps=args.fuzz_steps,
        threads=args.threads,
    )
    result = run_bench(config)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        console = Console()
        for table in _bench_tables(result):
            console.print(table)
    missed = [key for key, verdict in result["goals"].items() if not verdict["met"]]
    return 1 if args.check and missed else 0


def _bench_tables(result: dict[str, Any]) -> list[Table]:
    goals = Table("figure", "value", "goal", "met", title="epd-receiver bench")
    for key in [*GOALS, "poll_iteration_us", "poll_iteration_original_us", "fuzz_steps_per_s"]:
        verdict = result["goals"].get(key)
        met = "" if verdict is None else ("yes" if verdict["met"] else "NO")
        goals.add_row(key.replace("_", " "), str(result[key]), verdict["goal"] if verdict else "", met)
    goals.add_row("machine", ", ".join(f"{k}={v}" for k, v in result["machine"].items()), "", "")
    cases = result["assembly_by_block_size"]
    assembly = Table("assembly", *(f"B={case['block_size']}" for case in cases), title="resumed payload assembly")
    for key in [k for k in cases[0] if k != "block_size"]:
        assembly.add_row(key.replace("_", " "), *(str(case[key]) for case in cases))
    return [goals, assembly]


def _replay(args: argparse.Namespace) -> int:
    variant = VARIANTS[args.variant] if args.variant else None
    try:
        report = replay(
            load_scenario(args.scenario),
            rig=variant.rig if variant else None,
            **(variant.options() if variant else {}),
        )
    except ScenarioError as error:
        print(f"epd-receiver replay: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0 if not report["violations"] else 1


def _explore(args: argparse.Namespace) -> int:
    from epd_receiver.adapters.kit.explore import command

    return command(args.depth, args.ranks, VARIANTS[args.variant] if args.variant else None, args.json)


def _walk(args: argparse.Namespace) -> int:
    from epd_receiver.adapters.kit.walk import command

    variant = VARIANTS[args.variant] if args.variant else None
    return command(args.steps, args.seed, args.ranks or None, variant, args.json)


def _variants(args: argparse.Namespace) -> int:
    from epd_receiver.adapters.kit.fuzz import hunt, register_profiles  # hypothesis is needed only here

    register_profiles()
    unknown = set(args.names) - set(VARIANTS)
    if unknown:
        print(f"epd-receiver variants: unknown {sorted(unknown)}; known: {sorted(VARIANTS)}", file=sys.stderr)
        return 2
    chosen = [v for v in CATALOGUE if not args.names or v.name in args.names]
    table = Table("bug", "variant", "caught", "by", "steps", "seconds", "first violation", title="bug variants")
    for column in (table.columns[1], table.columns[-1]):
        column.overflow, column.no_wrap = "ellipsis", True
    results = []
    for variant in chosen:
        catch = hunt(variant)
        results.append(catch)
        if args.record and catch.scenario is not None:
            record_catch(args.record, variant, catch)
        table.add_row(
            f"#{variant.bug}",
            variant.name,
            "yes" if catch.caught else "NO",
            catch.by,
            str(catch.steps),
            f"{catch.seconds:.1f}",
            catch.violation[:80],
        )
    if args.json:
        print(json.dumps([dataclasses.asdict(c) | {"scenario": None} for c in results], indent=2))
    else:
        Console(width=max(Console().width, 160)).print(table)
    missed = [c.variant for c in results if not c.caught or c.by not in VARIANTS[c.variant].caught_by]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
