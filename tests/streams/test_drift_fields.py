"""A transaction source's drift explanation names the fields that moved, not only column numbers."""

from __future__ import annotations

import numpy as np
import orjson

from streams.config import Settings
from streams.pipeline import Pipeline, name_fields


def _rows(n: int, start: int, amount_mean: float, rng: np.random.Generator) -> list[bytes]:
    return [
        orjson.dumps({
            "id": f"t{start + i}", "source": "cards", "kind": "transaction",
            "fields": {
                "latency_ms": float(rng.normal(120.0, 10.0)),
                "amount": float(rng.normal(amount_mean, 5.0)),
                "items": float(rng.normal(3.0, 0.5)),
                "country": str(rng.choice(["GB", "FR", "DE"])),
            },
        })
        for i in range(n)
    ]


def test_a_shift_of_one_field_is_named_first_in_the_drift_explanation():
    rng = np.random.default_rng(0)
    lines = _rows(3000, 0, 50.0, rng) + _rows(2000, 3000, 80.0, rng)  # amount moves by 6 sd
    pipeline = Pipeline(settings=Settings())
    drifts = []
    for i in range(0, len(lines), 250):
        drifts += pipeline.process_raw(lines[i : i + 250]).drifts
    after = [d for d in drifts if d.events_seen > 3000]
    assert after, "the shift of amount raised no drift alarm"
    explanation = after[0].explanation
    fields = explanation["top_fields"]
    assert len(fields) == len(explanation["top_dimensions"])
    assert fields[0] == "num:amount"
    # every name is one of the encoder's; no seasonal (time) dimension among them
    names = pipeline.sources["cards"].encoder.dim_names()
    assert all(f in names and not f.startswith("time:") for f in fields)


def test_name_fields_leaves_an_explanation_without_dimensions_alone_and_marks_unknown_columns():
    empty: dict = {"exemplars": ["a"]}
    name_fields(empty, ["num:a"])
    assert "top_fields" not in empty
    some = {"top_dimensions": [1, 0, 7]}
    name_fields(some, ["num:a", "num:b"])
    assert some["top_fields"] == ["num:b", "num:a", "#7"]
