"""A realistic sample stream of every kind, with labelled anomalies, a drift and broken lines.

Used by the demo, the README walk-through and the end-to-end tests. Sources:

- ``cards`` (transaction): card payments; fraud is a large online payment at a
  rare merchant type from an unusual country at night. Drift after the change
  point: amounts rise and online payments become common.
- ``checkout-svc`` (log): service log lines; anomalies are error lines of
  templates never seen before.
- ``tickets`` (text): customer support tickets; anomalies are off-topic texts.
- ``pump-7`` (audio): one-second machine-sound clips as MFCC frames; anomalies
  are faults (bearing tone, clicks, shifted resonance).
- ``embeddings`` (vector): precomputed 32-d embeddings from a mixture of
  clusters; anomalies lie far from every cluster. Drift: the cluster mix changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from typing import IO, Any

import numpy as np
import orjson

START = datetime(2026, 11, 23, tzinfo=timezone.utc).timestamp()
KIND_WEIGHTS = {"transaction": 0.35, "log": 0.25, "text": 0.15, "audio": 0.08, "vector": 0.17}
SOURCES = {
    "transaction": "cards",
    "log": "checkout-svc",
    "text": "tickets",
    "audio": "pump-7",
    "vector": "embeddings",
}
ANOMALY_RATE = 0.01
DRIFT_AT = 0.6  # share of the stream after which cards and embeddings drift

_MERCHANTS = ["grocery", "fuel", "restaurant", "transport", "pharmacy", "clothing", "online_retail", "utilities"]
_MERCHANT_P = [0.3, 0.12, 0.18, 0.12, 0.06, 0.08, 0.1, 0.04]
_FRAUD_MERCHANTS = ["electronics", "jewellery", "crypto_exchange", "gift_cards"]
_COUNTRIES = ["GB", "GB", "GB", "GB", "GB", "GB", "GB", "GB", "GB", "FR", "ES", "IE"]
_FRAUD_COUNTRIES = ["NG", "RU", "BR", "VN", "KP"]

_LOG_TEMPLATES = [
    "INFO request GET /api/cart/{n} completed in {ms} ms status=200",
    "INFO request POST /api/checkout/{n} completed in {ms} ms status=201",
    "INFO user {user} logged in from {ip}",
    "DEBUG cache hit key=session:{hex}",
    "DEBUG cache miss key=basket:{hex} loading from db",
    "WARN slow query took {ms} ms on table orders",
    "INFO payment {n} authorised amount={amount} currency=GBP",
    "INFO worker {pid} heartbeat ok queue_depth={small}",
]
_LOG_ANOMALIES = [
    "ERROR connection pool exhausted: 0 of {small} connections available",
    "FATAL out of memory in worker {pid} while allocating {n} bytes",
    "ERROR TLS handshake failed with upstream {ip}: certificate has expired",
    "panic: runtime error: index out of range [{small}] with length {small}",
    "ERROR disk /var/lib/checkout is full, cannot write journal segment {n}",
    "CRITICAL database replica lag {n} seconds exceeds limit, failing over",
]
_USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]

_PRODUCTS = ["card", "mobile app", "savings account", "bank transfer", "direct debit", "overdraft", "statement"]
_PROBLEMS = [
    "was declined at the till", "shows a payment I do not recognise", "will not let me log in",
    "has been pending for three days", "charged me twice", "is showing the wrong balance",
    "keeps crashing when I open it", "was blocked without warning",
]
_REQUESTS = [
    "Can you help?", "Please fix this as soon as possible.", "What should I do?",
    "I would like a refund.", "Could someone call me back?", "Is there an outage?",
]
_OPENERS = ["Hi,", "Hello,", "Good morning,", "Dear support,", "Hey,", ""]
_OFF_TOPIC = [
    "Preheat the oven to 180 degrees and fold the egg whites gently into the batter.",
    "The migration of arctic terns covers the longest distance of any bird on earth.",
    "WIN a FREE luxury cruise!!! click here now to claim your prize before midnight",
    "Le chat dort sur le canapé pendant que la pluie tombe sur Paris.",
    "In the third act the protagonist finally confronts the ghost of his father.",
    "Mix two parts sand with one part cement and add water until it holds its shape.",
]

_VEC_DIM = 32


class SampleStream:
    """Deterministic generator of sample events (dicts) for a seed."""

    def __init__(
        self, *, events: int = 20_000, seed: int = 0, kinds: list[str] | None = None, drift_at: int | None = None,
        start: float = START,
    ) -> None:
        self.start = start  # event time of the first event; each next one ~2 s later
        self.events = events
        self.seed = seed
        self.kinds = kinds or list(KIND_WEIGHTS)
        self.drift_at = drift_at  # event index of the change; default DRIFT_AT of the stream

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rng = np.random.default_rng(self.seed)
        w = np.array([KIND_WEIGHTS[k] for k in self.kinds])
        kinds = rng.choice(self.kinds, size=self.events, p=w / w.sum())
        vec_rng = np.random.default_rng(self.seed + 1)
        self._centres = vec_rng.normal(size=(8, _VEC_DIM)) * 3.0
        drift_at = self.drift_at if self.drift_at is not None else int(self.events * DRIFT_AT)
        counters: dict[str, int] = {}
        for i, kind in enumerate(kinds):
            ts = self.start + i * 2.0 + float(rng.uniform(0, 1))
            anomaly = bool(rng.random() < ANOMALY_RATE)
            drifted = i >= drift_at
            source = SOURCES[kind]
            n = counters.get(source, 0)
            counters[source] = n + 1
            event: dict[str, Any] = {"id": f"{source}-{n}", "source": source, "kind": str(kind)}
            # half the events carry RFC 3339 times, half epoch seconds: both are valid
            event["ts"] = _rfc3339(ts) if n % 2 else round(ts, 3)
            event.update(getattr(self, f"_{kind}")(rng, anomaly, drifted, ts))
            event["label"] = int(anomaly)
            yield event

    # -- kinds --------------------------------------------------------------------------
    def _transaction(self, rng, anomaly, drifted, ts) -> dict:
        if anomaly:
            hour_ts = ts - (ts % 86400) + rng.uniform(1, 4) * 3600  # small hours
            return {
                "fields": {
                    "amount": round(float(rng.lognormal(6.8, 0.4)), 2),
                    "merchant_category": str(rng.choice(_FRAUD_MERCHANTS)),
                    "country": str(rng.choice(_FRAUD_COUNTRIES)),
                    "channel": "online",
                    "card_present": False,
                    "attempts_last_hour": int(rng.integers(4, 12)),
                },
                "ts": _rfc3339(hour_ts),
            }
        scale = 1.0 if not drifted else 2.5
        online_p = 0.15 if not drifted else 0.6
        online = bool(rng.random() < online_p)
        return {
            "fields": {
                "amount": round(float(rng.lognormal(3.2, 0.8)) * scale, 2),
                "merchant_category": str(rng.choice(_MERCHANTS, p=_MERCHANT_P)),
                "country": str(rng.choice(_COUNTRIES)),
                "channel": "online" if online else str(rng.choice(["chip", "contactless"])),
                "card_present": not online,
                "attempts_last_hour": int(rng.poisson(0.3)),
            }
        }

    def _log(self, rng, anomaly, drifted, ts) -> dict:
        template = str(rng.choice(_LOG_ANOMALIES if anomaly else _LOG_TEMPLATES))
        body = template.format(
            n=int(rng.integers(1000, 999_999)),
            ms=int(rng.gamma(2.0, 40.0)) + 1,
            user=str(rng.choice(_USERS)),
            ip=f"10.{rng.integers(0, 255)}.{rng.integers(0, 255)}.{rng.integers(1, 254)}",
            hex="".join(rng.choice(list("0123456789abcdef"), size=16)),
            amount=f"{rng.lognormal(3, 0.8):.2f}",
            pid=int(rng.integers(100, 30000)),
            small=int(rng.integers(0, 64)),
        )
        return {"line": f"{_rfc3339(ts)} checkout-svc[{int(rng.integers(1000, 1100))}]: {body}"}

    def _text(self, rng, anomaly, drifted, ts) -> dict:
        if anomaly:
            return {"text": str(rng.choice(_OFF_TOPIC))}
        opener = str(rng.choice(_OPENERS))
        text = f"{opener} my {rng.choice(_PRODUCTS)} {rng.choice(_PROBLEMS)}. {rng.choice(_REQUESTS)}"
        return {"text": text.strip()}

    def _audio(self, rng, anomaly, drifted, ts) -> dict:
        from models.audio import mfcc
        from streams.synth_audio import FAULTS, machine_sound

        fault = str(rng.choice(FAULTS)) if anomaly else None
        rate = 16_000
        x = machine_sound(rng, seconds=1.0, sample_rate=rate, fault=fault)
        frames = mfcc(x, rate)
        return {"mfcc": np.round(frames.astype(np.float64), 3).tolist()}

    def _vector(self, rng, anomaly, drifted, ts) -> dict:
        if anomaly:
            v = rng.normal(size=_VEC_DIM) * 3.0
            v += rng.choice([-1, 1], size=_VEC_DIM) * 6.0
        else:
            weights = np.array([0.3, 0.25, 0.2, 0.15, 0.1, 0.0, 0.0, 0.0])
            if drifted:
                weights = np.array([0.05, 0.05, 0.1, 0.1, 0.1, 0.3, 0.3, 0.0])
            c = rng.choice(8, p=weights)
            v = self._centres[c] + rng.normal(size=_VEC_DIM)
        return {"vector": np.round(v, 4).tolist()}


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


BROKEN_LINES: list[tuple[bytes, str]] = [
    (b'{"id": "b1", "kind": "text", "text": "unterminated', "not_json"),
    (b'{"kind": "text", "text": "no id here"}', "missing_field"),
    (b'{"id": "b3", "kind": "hologram", "data": 1}', "unknown_kind"),
    (b'{"id": "b4", "kind": "vector", "source": "embeddings", "vector": [NaN, 1.0]}', "non_finite"),
    (b'{"id": "b5", "kind": "vector", "source": "embeddings", "vector": [1.0, 2.0, 3.0]}', "wrong_dimension"),
    (b'{"id": "b6", "kind": "text", "source": "tickets", "text": "   "}', "empty_payload"),
    (b'{"id": "b7", "kind": "transaction", "source": "cards", "fields": {"amount": [1, 2]}}', "wrong_type"),
    (b'[1, 2, 3]', "not_an_object"),
    (b'{"id": "b9", "kind": "log", "source": "checkout-svc", "line": "x", "ts": "yesterday"}', "bad_timestamp"),
    (b'{"id": "b10", "kind": "audio", "source": "pump-7", "mfcc": [[1, 2], [3]]}', "wrong_type"),
    (b'{"id": "b11", "kind": "text", "txt": "typo in the field name"}', "unknown_field"),
    (b'\xff\xfe{"id": "b12"}', "bad_encoding"),
]


def sample_lines(
    *, events: int = 20_000, seed: int = 0, broken: int = 20, kinds: list[str] | None = None,
    drift_at: int | None = None, start: float = START,
) -> Iterator[bytes]:
    """The sample stream as JSONL lines, generated lazily, with ``broken`` invalid lines spread through it."""
    rng = np.random.default_rng(seed + 7)
    at = set(rng.choice(np.arange(300, max(301, events)), size=min(broken, max(0, events - 300)), replace=False).tolist())
    written = 0
    for i, event in enumerate(SampleStream(events=events, seed=seed, kinds=kinds, drift_at=drift_at, start=start)):
        if i in at:
            raw, _ = BROKEN_LINES[written % len(BROKEN_LINES)]
            yield raw.replace(b'"b', f'"broken{i}-b'.encode(), 1)
            written += 1
        yield orjson.dumps(event)


def write_sample_stream(
    out: IO[bytes], *, events: int = 20_000, seed: int = 0, broken: int = 20, kinds: list[str] | None = None
) -> int:
    """Write :func:`sample_lines` to ``out``; returns the number of lines."""
    n = 0
    for line in sample_lines(events=events, seed=seed, broken=broken, kinds=kinds):
        out.write(line + b"\n")
        n += 1
    return n


def valid_ids(lines: list[bytes]) -> list[str]:
    """Ids of the valid events among sample lines (the broken ones carry ``broken...`` ids or none)."""
    ids = []
    for line in lines:
        try:
            d = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(d, dict) and "id" in d and not str(d["id"]).startswith("broken"):
            ids.append(d["id"])
    return ids
