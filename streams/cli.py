"""``nwatch``: the command line. Run ``nwatch --help`` or ``nwatch COMMAND --help``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence

from pydantic import ValidationError
from pydantic_settings import SettingsError

from streams.config import Settings, check_topic_name, explain_settings_error, load_settings, unknown_variables


def _settings(args: argparse.Namespace) -> Settings:
    for name in unknown_variables(os.environ):
        print(f"nwatch: warning: {name} is not a setting and is ignored (nwatch config lists the settings)",
              file=sys.stderr)
    return load_settings(getattr(args, "config", None))


def cmd_replay(args: argparse.Namespace) -> int:
    from streams.pipeline import Pipeline
    from streams.replay import open_input, replay

    settings = _settings(args)
    pipeline = Pipeline(settings=settings)
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(open_input(args.file)) if args.file != "-" else open_input("-")
        out = stack.enter_context(open(args.out, "wb")) if args.out else None
        drift_out = stack.enter_context(open(args.drift_out, "wb")) if args.drift_out else None
        rejects = stack.enter_context(open(args.rejects, "wb")) if args.rejects else None
        show = args.progress or (sys.stderr.isatty() and not args.quiet)
        summary = replay(
            pipeline,
            src,
            out=out,
            drift_out=drift_out,
            rejects=rejects,
            batch_size=args.batch_size or settings.batch_size,
            progress=sys.stderr if show else None,
        )
    if summary.interrupted:
        done = f"the records of lines 1-{summary.lines:,}" if summary.lines else "no records yet"
        print(f"nwatch: interrupted; the outputs hold {done}", file=sys.stderr)
    if not args.quiet:
        for line in summary.lines_text():
            print(line, file=sys.stderr)
        for name, s in pipeline.summary().items():
            print(
                f"  {name:<16} {s['kind']:<11} events {s['events']:>8,}  anomalies {s['anomalies']:>6,}  "
                f"reference {s['reference_size']:>6,}  {s['encoder']}",
                file=sys.stderr,
            )
    return 130 if summary.interrupted else 0


def cmd_run(args: argparse.Namespace) -> int:
    from streams.run import run_worker

    settings = _settings(args)
    if args.metrics_port is not None:
        settings = settings.model_copy(update={"metrics": settings.metrics.model_copy(update={"port": args.metrics_port})})
    return run_worker(settings, loglevel=args.loglevel)


def cmd_demo(args: argparse.Namespace) -> int:
    from streams.demo import run_demo

    return run_demo(
        _settings(args), duration=args.duration, rate=args.rate, events=args.events, seed=args.seed,
        metrics_port=args.metrics_port,
    )


def cmd_produce(args: argparse.Namespace) -> int:
    from streams.broker import ensure_topics, kafka_client_config
    from streams.produce import ProduceError, ProduceInterrupted, ProgressLine, produce_file

    settings = _settings(args)
    kafka = settings.kafka
    if args.bootstrap_servers:
        kafka = kafka.model_copy(update={"bootstrap_servers": args.bootstrap_servers})
    topic = args.topic or kafka.input_topics[0]
    try:
        check_topic_name(topic)
    except ValueError as err:
        print(f"nwatch: {err}", file=sys.stderr)
        return 2
    if args.create_topic:  # a BrokerError is printed by main, exit 1
        ensure_topics(kafka.bootstrap_servers, {topic: args.partitions}, client_config=kafka_client_config(kafka))
    line = ProgressLine(sys.stderr) if args.progress or (sys.stderr.isatty() and not args.quiet) else None
    try:
        summary = produce_file(args.file, topic=topic, kafka_settings=kafka, key_field=args.key_field, progress=line,
                               shards=settings.shard_counts)
    except ProduceError as err:
        if line:
            line.close()
        print(f"nwatch: {err}", file=sys.stderr)
        for t in err.summary.lines_text():
            print(t, file=sys.stderr)
        return 130 if isinstance(err, ProduceInterrupted) else 1
    if line:
        line.close()
    if not args.quiet:
        for t in summary.lines_text():
            print(t, file=sys.stderr)
    return 1 if summary.failed else 0


def cmd_generate(args: argparse.Namespace) -> int:
    from streams.samples import write_sample_stream

    with contextlib.ExitStack() as stack:
        out = sys.stdout.buffer if args.out in (None, "-") else stack.enter_context(open(args.out, "wb"))
        n = write_sample_stream(
            out, events=args.events, seed=args.seed, broken=args.broken, kinds=args.kinds
        )
    if args.out not in (None, "-"):
        print(f"wrote {n:,} lines to {args.out}", file=sys.stderr)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(json.dumps(_settings(args).masked(), indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "index":
        from streams.bench_index import main as bench_index

        return bench_index(json_out=args.json)
    if args.what == "quality":
        from streams.bench_quality import main as bench_quality

        settings = _settings(args)
        return bench_quality(
            data_dir=args.data_dir or settings.data_dir, seeds=args.seeds,
            max_events=args.max_events, json_out=args.json, only=args.only, out=args.out,
            baselines=not args.no_baselines, settings=settings,
        )
    if args.what == "speed":
        from streams.bench_speed import main as bench_speed

        settings = _settings(args)
        return bench_speed(
            data_dir=args.data_dir or settings.data_dir, json_out=args.json, only=args.only,
            events=args.events, log_passes=args.log_passes, text_events=args.text_events,
            ilof_seconds=args.ilof_seconds, long_events=args.long_events, kafka=args.kafka,
            kafka_events=args.kafka_events,
            kafka_repeat=args.kafka_repeat,
        )
    raise AssertionError(args.what)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nwatch",
        description="neighbourwatch: streaming anomaly and drift detection "
        "(rolling kNN references, calibrated alarms, centroid drift).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "replay",
        help="run the pipeline offline over a JSONL file (or - for stdin), in file order",
        description="Score every event of a JSONL file in order (each event is scored before the "
        "reference learns from it). Invalid lines are reported, never fatal.",
    )
    p.add_argument("file", help="JSONL file of events, or - for stdin")
    p.add_argument("--out", help="write one score record per valid event here (JSONL)")
    p.add_argument("--drift-out", help="write drift records here (JSONL)")
    p.add_argument("--rejects", help="write invalid lines here (JSONL: line, reason, error, raw)")
    p.add_argument("--config", help="TOML config file (NWATCH_* variables override it)")
    p.add_argument("--batch-size", type=int, help="events per batch (default: settings batch_size)")
    p.add_argument("--progress", action="store_true", help="show progress even when not on a terminal")
    p.add_argument("--quiet", action="store_true", help="no progress and no summary")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "demo",
        help="the whole system on loopback: embedded broker, worker, event generator, live view",
        description="Start a Kafka-compatible broker on a free loopback port, the worker and a "
        "generator of events of every kind (with anomalies and a drift), and show what is "
        "detected. Ctrl-C or --duration stops everything, the broker included.",
    )
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: run until Ctrl-C)")
    p.add_argument("--rate", type=float, default=300.0, help="events per second produced (default 300)")
    p.add_argument("--events", type=int, default=100_000, help="events in the generated stream (default 100000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics-port", type=int, help="port of /metrics (default NWATCH_METRICS__PORT, 9650)")
    p.add_argument("--config", help="TOML config file")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "run",
        help="the worker against the configured Kafka cluster (NWATCH_KAFKA__BOOTSTRAP_SERVERS)",
        description="Consume the input topics, score every event, publish scores, anomalies, drift "
        "records, alerts and dead letters. Stops cleanly on Ctrl-C or SIGTERM.",
    )
    p.add_argument("--config", help="TOML config file (NWATCH_* variables override it)")
    p.add_argument("--loglevel", default="warning", choices=["debug", "info", "warning", "error"])
    p.add_argument("--metrics-port", type=int, help="port of /metrics (default NWATCH_METRICS__PORT, 9650)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "produce",
        help="publish a JSONL file (or stdin) to a Kafka topic, one message per line, keyed by source",
    )
    p.add_argument("file", help="JSONL file of events, or - for stdin")
    p.add_argument("--topic", help="destination topic (default: the first input topic, nwatch.events)")
    p.add_argument("--bootstrap-servers", help="Kafka cluster (default NWATCH_KAFKA__BOOTSTRAP_SERVERS)")
    p.add_argument("--key-field", default="source", help="event field used as the key (default source)")
    p.add_argument("--create-topic", action="store_true", help="create the topic first if it is missing")
    p.add_argument("--partitions", type=int, default=1, help="partitions of a created topic (default 1)")
    p.add_argument("--config", help="TOML config file (NWATCH_* variables override it)")
    p.add_argument("--progress", action="store_true", help="show progress even when not on a terminal")
    p.add_argument("--quiet", action="store_true", help="no progress and no summary")
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser(
        "generate",
        help="write a realistic sample stream of every kind, with anomalies, a drift and broken lines",
    )
    p.add_argument("--out", help="output JSONL file (default stdout)")
    p.add_argument("--events", type=int, default=20_000, help="number of events (default 20000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--broken", type=int, default=20, help="deliberately invalid lines to mix in")
    p.add_argument(
        "--kinds", nargs="+", default=None,
        choices=["transaction", "log", "text", "audio", "vector"], help="only these kinds",
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("config", help="print the effective settings (secrets masked)")
    p.add_argument("--config", help="TOML config file")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("bench", help="benchmarks")
    p.add_argument(
        "what", choices=["index", "quality", "speed"],
        help="index: exact scan vs hnswlib per event; quality: ROC-AUC and alarms on the labelled data; "
        "speed: events/s and memory per kind against river and plain sentence-transformers",
    )
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--data-dir", help="labelled data (default: settings data_dir, ../shared/data)")
    p.add_argument("--seeds", type=int, default=3, help="shuffles per tabular set (quality)")
    p.add_argument("--max-events", type=int, default=50_000, help="events per stream at most (quality)")
    p.add_argument("--only", nargs="+", help="only these groups (tabular, vectors, logs, drift, audio) "
                   "or streams whose name contains one of these (quality); "
                   "speed: only these parts (tabular vector logs text memory kafka)")
    p.add_argument("--out", help="write DIR/quality.md, its PNG plots and quality.json under DIR/quality/ (quality)")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip river HalfSpaceTrees and PyOD KNN/IForest (quality)")
    p.add_argument("--events", type=int, default=30_000, help="tabular/vector events per stream (speed)")
    p.add_argument("--log-passes", type=int, default=10, help="times each 2k-line log sample is replayed (speed)")
    p.add_argument("--text-events", type=int, default=2_000, help="texts encoded (speed)")
    p.add_argument("--ilof-seconds", type=float, default=10.0, help="time budget of river's LOF per stream (speed)")
    p.add_argument("--long-events", type=int, default=0,
                   help="speed: also run this many tabular events and report the resident-memory slope")
    p.add_argument("--kafka", action="store_true", help="speed: also measure end to end through the embedded broker")
    p.add_argument("--kafka-events", type=int, default=40_000, help="shuttle rows of the saturation run (speed --kafka)")
    p.add_argument("--kafka-repeat", type=int, default=2,
                   help="the rows this many times over, with fresh ids, in the saturation run (speed --kafka)")
    p.add_argument("--config", help="TOML config file")
    p.set_defaults(func=cmd_bench)
    return parser


def _terminated(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    from streams.broker import BrokerError
    from streams.runtime import StartupError, configure_gc, configure_threads

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.func is cmd_run:
        # As a container's PID 1 (`docker run` without --init, a Kubernetes pod without
        # an init in the image) the kernel drops every signal the process has no handler
        # for: a SIGTERM before faust installs its own (start-up, ~1 s) was lost, and the
        # stop waited out the whole grace period for a SIGKILL. Until faust takes over,
        # SIGTERM ends the worker at once (nothing started yet that needs saving).
        signal.signal(signal.SIGTERM, _terminated)
    try:
        configure_threads()
        configure_gc()
        return int(args.func(args) or 0)
    except ValidationError as err:
        print(f"nwatch: invalid settings:\n{err}", file=sys.stderr)
        return 2
    except SettingsError as err:  # a value pydantic-settings could not even parse (not JSON where JSON is due)
        print(f"nwatch: invalid settings: {explain_settings_error(err, os.environ)}", file=sys.stderr)
        return 2
    except (StartupError, BrokerError, FileNotFoundError) as err:
        print(f"nwatch: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
