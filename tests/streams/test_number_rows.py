"""A batch's numbers read by the decoder (``models.events.NumberRows``) give the pipeline the results
the payloads give: every source, shard and segment of a batch takes its rows by batch position."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from models.tabular import TransactionEncoder
from streams.config import Settings, SourceSettings
from streams.pipeline import Pipeline


def _lines(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        source = ("cards", "pos", "web")[int(rng.integers(3))]
        fields = {"amount": float(rng.gamma(2.0, 30.0)), "hour": float(rng.integers(24)), "items": float(rng.integers(1, 9))}
        if i % 97 == 0:
            fields["amount"] = 5e4  # anomalies
        out.append(orjson.dumps({"id": f"e{i}", "source": source, "kind": "transaction", "fields": fields}))
    return out


def _run(settings: Settings, lines: list[bytes], use_numbers: bool) -> list:
    pipe = Pipeline(settings=settings, clock=lambda: 1_700_000_000.0)
    out = []
    for start in range(0, len(lines), 256):
        raws = lines[start : start + 256]
        if use_numbers:
            assert pipe.decode_batch(raws)[2] is not None
            result = pipe.process_raw(raws)
        else:
            result = pipe.process(pipe.decode(raws)[0])
        out += [(i, r.to_dict()) for i, r in result.scores]
        out += [d.to_dict() | {"ts": None} for d in result.drifts]
    return out


@pytest.mark.parametrize("shards", [1, 3])
def test_results_with_the_decoders_numbers_are_those_of_the_payloads(shards, monkeypatch):
    # three sources interleaved (rows picked by position), shards (more picks), blocks of 32
    # cut across batches of 256 (slices), and a source learning from its warm-up on
    settings = Settings(defaults=SourceSettings(shards=shards, min_reference=64, drift_reference_size=200))
    lines = _lines(3000, shards)
    plain = _run(settings, lines, False)
    calls = []
    taker = TransactionEncoder.encode_numbers
    monkeypatch.setattr(TransactionEncoder, "encode_numbers", lambda self, e, n: calls.append(len(e)) or taker(self, e, n))
    fast = _run(settings, lines, True)
    assert sum(calls) == 3000 and len(plain) > 2900 and plain == fast
