"""One encoder per event kind, made by name."""

from __future__ import annotations

from collections.abc import Callable

from models.base import Encoder
from models.text import TextBackend


def make_encoder(
    kind: str,
    *,
    text_backend: Callable[[], TextBackend],
    metric: str | None = None,
    text_cache_size: int = 10_000,
    seed: int = 0,
) -> Encoder:
    """A fresh encoder for one source of ``kind``.

    ``text_backend`` is called only for kinds that need the text model, so a
    process that sees no text or log events never loads it.
    """
    if kind == "transaction":
        from models.tabular import TransactionEncoder

        enc: Encoder = TransactionEncoder(seed=seed)
    elif kind == "audio":
        from models.audio import AudioEncoder

        enc = AudioEncoder(seed=seed)
    elif kind == "vector":
        from models.vector import VectorEncoder

        enc = VectorEncoder(metric=metric or "cosine")
    elif kind == "text":
        from models.text import TextEncoder

        enc = TextEncoder(backend=text_backend(), cache_size=text_cache_size)
    elif kind == "log":
        from models.logs import LogEncoder

        enc = LogEncoder(backend=text_backend(), cache_size=text_cache_size)
    else:
        raise ValueError(f"no encoder for kind {kind!r}")
    if metric is not None and kind != "vector" and metric != enc.metric:
        raise ValueError(f"the {kind} encoder works with the {enc.metric} metric, not {metric}")
    return enc
