"""``epd-receiver``: simulate a workload, measure, replay a scenario, hunt bug variants, explore and walk
small worlds, and check or regenerate the spec. The parser is ``arguments.py``; this module runs what it
parsed."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest, start_http_server
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from epd_receiver.adapters.kit.quint import QuintMissing, SpecDirError, check_all, writable_spec_dir
from epd_receiver.adapters.kit.scenario import ScenarioError, load_scenario, replay
from epd_receiver.adapters.kit.variant_records import record_catch, variants_markdown
from epd_receiver.adapters.kit.variants import CATALOGUE, VARIANTS
from epd_receiver.adapters.kit.world_config import WorldConfig
from epd_receiver.adapters.ports.payload import token_bytes
from epd_receiver.adapters.ports.prometheus import PrometheusMetrics
from epd_receiver.adapters.tools import arguments
from epd_receiver.adapters.tools.bench import GOALS, run_bench
from epd_receiver.adapters.tools.bench_config import BenchConfig
from epd_receiver.adapters.tools.bench_plot import write_plot
from epd_receiver.adapters.tools.simulate import Workload, simulate
from epd_receiver.fsm import load_spec
from epd_receiver.fsm.diagram import SYNCED_DOCUMENTS, mermaid, sync_documents


def main(argv: Sequence[str] | None = None) -> int:
    parser = arguments.parser()
    args = parser.parse_args(argv)
    problem = arguments.impossible(args)
    if problem is not None:
        parser.error(problem)  # status 2, after the usage line
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


def _spec_dir(args: argparse.Namespace) -> Path | None:
    """The checkout's spec directory the command may write in; None, after saying why on stderr, if none."""
    try:
        return writable_spec_dir(args.spec_dir)
    except SpecDirError as error:
        print(f"epd-receiver spec {args.spec_command}: {error}", file=sys.stderr)
        return None


def _check(args: argparse.Namespace) -> int:
    directory = _spec_dir(args)
    if directory is None:
        return 2
    try:
        outcomes = check_all(directory, samples=args.samples, steps=args.steps)
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
    """The generated sections, from the same directory's receiver.toml and recorded bug scenarios, each in the
    document that holds it (RECEIVER.md or VERIFICATION.md)."""
    spec_dir = _spec_dir(args)
    if spec_dir is None:
        return 2
    paths = {name: spec_dir / name for name in SYNCED_DOCUMENTS if (spec_dir / name).is_file()}
    current = {name: path.read_text(encoding="utf-8") for name, path in paths.items()}
    variants = {"variants": variants_markdown(spec_dir / "scenarios" / "bugs")}
    fresh = sync_documents(current, load_spec(spec_dir / "receiver.toml"), variants)
    stale = [name for name in paths if fresh[name] != current[name]]
    for name, path in paths.items():
        if name not in stale:
            print(f"{path}: up to date")
        elif args.check:
            print(f"{path}: generated sections are stale; run `epd-receiver spec sync`", file=sys.stderr)
        else:
            path.write_text(fresh[name], encoding="utf-8")
            print(f"{path}: regenerated")
    return 1 if stale and args.check else 0


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
        metrics = _metrics(args, config)
        summary = simulate(config, workload, progress=lambda n: bar.advance(task, n), metrics=metrics)
    if metrics is not None and args.metrics_out is not None:
        args.metrics_out.write_bytes(generate_latest(metrics.registry))
    return _report(args, summary)


def _metrics(args: argparse.Namespace, config: WorldConfig) -> PrometheusMetrics | None:
    """The Prometheus families, served on loopback while the run lasts when a port is named (the server is
    a daemon thread: it goes with the process)."""
    if args.metrics_port is None and args.metrics_out is None:
        return None
    metrics = PrometheusMetrics(bytes_per_token=token_bytes(config.hidden_size, config.deepstack))
    if args.metrics_port is not None:
        start_http_server(args.metrics_port, addr="127.0.0.1", registry=metrics.registry)
    return metrics


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
    for key in ("bytes", "gb_per_s", "raw_gb_per_s", "write_vs_raw", "idle_raw_gb_per_s", "write_vs_idle_raw"):
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
        scale_sizes=tuple(args.scale_sizes) if args.scale_sizes else None,
        memory_requests=args.memory_requests,
    )
    result = run_bench(config)
    if args.plot is not None:
        write_plot(args.plot, result)
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
    success = Table("success path", "value", title="Success with a checksum, one rank of two")
    for key, value in result["success_path"].items():
        success.add_row(key.replace("_", " "), str(value))
    mooncake = Table("mooncake writes", "value", title="the Encode side's writes into two ranks, over raw writes")
    for key, value in result["mooncake_write"].items():
        mooncake.add_row(key.replace("_", " "), str(value))
    rows = result["scale"]
    scaled = Table("scale", *(f"{row['in_flight']:,} in flight" for row in rows), title="as the work grows")
    for key in [k for k in rows[0] if k != "in_flight"]:
        scaled.add_row(key.replace("_", " "), *(str(row[key]) for row in rows))
    return [goals, assembly, success, mooncake, scaled]


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
    from epd_receiver.adapters.kit.fuzz import hunt
    from epd_receiver.adapters.kit.fuzz_profiles import register_profiles

    register_profiles()
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
