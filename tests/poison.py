"""Hostile and broken input of every kind the reliability issue lists, with the reason each must get.

``poison_lines(now, vector_dim)`` returns ``(raw bytes, expected reason)`` pairs for
the sample stream's sources: it assumes the ``embeddings`` source (vectors of
``vector_dim``) and the ``cards`` source already saw the event ``seen_id``.
"""

from __future__ import annotations

import orjson


def poison_lines(*, now: float, vector_dim: int, seen_id: str = "embeddings-5") -> list[tuple[bytes, str]]:
    vec = [0.5] * vector_dim

    def ev(**kw) -> bytes:
        return orjson.dumps(kw)

    return [
        (b'\xc3\x28{"id": "p1", "kind": "vector"}', "bad_encoding"),
        (b'{"id": "p2", "kind": "vector", "vector": [1, 2', "not_json"),
        (ev(kind="vector", source="embeddings", vector=vec), "missing_field"),
        (ev(id="p4", source="embeddings", vector=vec), "missing_field"),
        (ev(id="p5", kind="vector", source="embeddings", vector=vec, colour="red"), "unknown_field"),
        (ev(id="p6", kind="vector", source="embeddings", vector="0.5, 0.5"), "wrong_type"),
        (ev(id=7, kind="vector", source="embeddings", vector=vec), "wrong_type"),
        (ev(id="p8", kind="transaction", source="cards", fields={"amount": {"value": 3}}), "wrong_type"),
        (b'{"id": "p9", "kind": "text", "source": "tickets", "text": "' + b"a" * (2 << 20) + b'"}', "oversized"),
        (ev(id="p10", kind="text", source="tickets", text="x" * 1_000_000), "oversized"),
        (ev(id="p11", kind="text", source="tickets", text=""), "empty_payload"),
        (ev(id="", kind="vector", source="embeddings", vector=vec), "empty_payload"),
        (b'{"id": "p13", "kind": "vector", "source": "embeddings", "vector": [NaN' + b", 0.5" * (vector_dim - 1) + b"]}",
         "non_finite"),
        (b'{"id": "p14", "kind": "vector", "source": "embeddings", "vector": [Infinity' + b", 0.5" * (vector_dim - 1)
         + b"]}", "non_finite"),
        (b'{"id": "p15", "kind": "vector", "source": "embeddings", "vector": [1e999' + b", 0.5" * (vector_dim - 1)
         + b"]}", "non_finite"),
        (ev(id="p16", kind="vector", source="embeddings", vector=[0.0] * vector_dim), "zero_vector"),
        (ev(id="p17", kind="vector", source="embeddings", vector=vec + [0.5]), "wrong_dimension"),
        (ev(id="p18", kind="vector", source="embeddings", vector=[]), "empty_payload"),
        (ev(id=seen_id, kind="vector", source="embeddings", vector=vec), "duplicate_id"),
        (ev(id="p20", kind="vector", source="embeddings", vector=vec, ts=now + 7 * 86_400), "future_timestamp"),
        (ev(id="p21", kind="vector", source="embeddings", vector=vec, ts=1.0), "late_event"),
        (ev(id="p22", kind="transaction", source="cards", fields={}), "empty_payload"),
        (ev(id="p23", kind="hologram", source="embeddings", data=1), "unknown_kind"),
        (b"[1, 2, 3]", "not_an_object"),
        (b"", "not_json"),
        (ev(id="p26", kind="vector", source="embeddings", vector=vec, ts="the day after tomorrow"), "bad_timestamp"),
        (ev(id="p27", kind="log", source="checkout-svc", line=" \t "), "empty_payload"),
        (ev(id="p28", kind="audio", source="pump-7", mfcc=[[1.0, 2.0], [3.0]]), "wrong_type"),
    ]
