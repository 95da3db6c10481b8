"""How the loopback broker's fetches slow down with the record batches a partition holds.

Starts the embedded broker (Tansu, in-memory storage, as ``nwatch demo`` and the
tests use it), fills one partition with small record batches, and at each
checkpoint times a group-less kafka-python consumer asked for 1,000 records
from the middle of the partition, with the broker's CPU time spent on it. A
second partition holds the same number of records in batches of ``--per-batch``
records, for comparison.

    python bench/broker_batches.py                       # checkpoints 20k 50k 64k 67k 75k
    python bench/broker_batches.py --checkpoints 10000 30000 --per-batch 10

Measured 2026-11-29 on a quiet machine (Tansu 0.6.0, 300-byte records, one
record per batch): middle fetch of 1,000 records 0.10 s at 50,000 batches,
0.29 s at 64,000, 0.47 s at 75,000, 74 records in 10 s at 90,000 (the broker at
a full core), none at 110,000; the same records ten to a batch: 0.06 s
throughout. Under load it dies earlier (79 records in 10 s at 75,000). Another
partition of the same broker with 20,000 batches answered in 0.1 s
throughout: the cost is per partition. This is why the soak's producer
lingers (tests/integration/test_soak.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RECORD = b"x" * 300


def _fetch_middle(bootstrap: str, topic: str, offset: int, want: int, timeout: float) -> tuple[int, float]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=50)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek(tp, offset)
    t0 = time.monotonic()
    got = 0
    try:
        while got < want and time.monotonic() - t0 < timeout:
            got += sum(len(v) for v in consumer.poll(timeout_ms=500).values())
    finally:
        consumer.close()
    return got, time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[20_000, 50_000, 64_000, 67_000, 75_000],
                    help="batch counts at which to time a fetch (ascending)")
    ap.add_argument("--per-batch", type=int, default=10, help="records per batch in the comparison partition")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds allowed for one fetch of 1,000 records")
    args = ap.parse_args(argv)

    import psutil
    from kafka import KafkaProducer

    from streams.broker import EmbeddedBroker, ensure_topics

    with EmbeddedBroker(host="127.0.0.1") as broker:
        bootstrap = broker.bootstrap_servers
        ensure_topics(bootstrap, ["single", "batched"])
        cpu = psutil.Process(broker.pid)
        single = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, max_in_flight_requests_per_connection=1)
        batched = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=1000, batch_size=1 << 20)
        held = 0  # records in each partition
        print("| one-record batches in the partition | middle fetch of 1,000 records | broker CPU | "
              f"same records, {args.per_batch} per batch |")
        print("|---|---|---|---|")
        for target in sorted(args.checkpoints):
            for _ in range(held, target):
                single.send("single", RECORD)
                single.flush()  # one request per record: one batch per record
            for start in range(held, target, args.per_batch):
                for _ in range(min(args.per_batch, target - start)):
                    batched.send("batched", RECORD)
                batched.flush()  # one batch of up to per_batch records
            held = max(held, target)
            used = sum(cpu.cpu_times()[:2])
            got, took = _fetch_middle(bootstrap, "single", held // 2, 1000, args.timeout)
            used = sum(cpu.cpu_times()[:2]) - used
            got_b, took_b = _fetch_middle(bootstrap, "batched", held // 2, 1000, args.timeout)
            print(f"| {held:,} | {got:,} in {took:.2f} s | {used:.1f} s | "
                  f"{got_b:,} in {took_b:.2f} s ({held // args.per_batch:,} batches) |", flush=True)
        single.close()
        batched.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
