"""Raw log lines -> templates -> vectors: template embedding plus template rarity.

Two parts:

* :class:`LogTemplater` reduces a line to its *template*, the way Drain
  preprocesses lines before clustering: it drops the header (timestamps,
  host, process id, Loghub's label/epoch/date/node prefix) and replaces the
  variable parts of the message by typed placeholders (``<ts>``, ``<ip>``,
  ``<num>``...). Lines printed by one statement of the logging program then
  share one template.
* :class:`LogEncoder` embeds the template text through a :class:`~models.text.TextBackend`
  (each template reaches the model once, thanks to an
  :class:`~models.text.EmbeddingCache`) and appends one rarity feature computed
  from per-source template counts, so a line of a never-seen template lands far
  from everything known even when its words look familiar.

What is kept and what is masked
-------------------------------
Kept: every word, including log levels (``INFO``, ``FATAL``, ``[notice]``),
component and program names (``RAS KERNEL``, ``sshd``, ``dfs.DataNode$PacketResponder``),
error words, short enumerated words (``[preauth]``, ``user=root``, ``tty=ssh``),
a single digit glued to a word of two letters or more (``ssh2``, ``eth1``,
``md5``, ``jk2_init``: these name *things*, they do not count them), and the
HTTP status of an access-log line (``" 404 ``), which says what happened.

Header fields (dropped): a leading timestamp in the syslog, ISO 8601, Apache
error-log, HDFS (``081109 203615 148``), Spark and Android layouts, the syslog
host, and the Loghub BGL/Thunderbird prefix ``label epoch yyyy.mm.dd node``
(plus BGL's ``2005-06-03-15.42.50.675872 node`` that follows it). The label
token of Loghub files is ground truth, not log content, so it must never reach
the template.

Masked in the message, most specific first: URLs ``<url>``, UUIDs ``<uuid>``,
HDFS blocks ``<blk>``, host names ``<host>`` (under a generic TLD, or of three
labels or more under a country code), MAC and longer colon-separated hardware
ids ``<mac>``, dates and times ``<ts>``, IPv4/IPv6 with optional port ``<ip>``,
file paths ``<path>``, and numbers ``<num>`` (decimal, hexadecimal ``0x..`` and
runs of eight or more hex digits, also inside tokens: ``core.1234`` ->
``core.<num>``, ``R02-M1-N0`` -> ``R<num>-M<num>-N<num>``). User names and other
free words are *not* masked: no regex can tell them from message words (Drain
separates them by clustering), so ``Invalid user admin`` and ``Invalid user
oracle`` are two templates; the embedding keeps such variants close.

All patterns are linear in the line length (a 20,000-character adversarial
line takes ~25 ms at most).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

from models.base import State
from models.errors import StateMismatch, WrongType
from models.events import Event
from models.text import EmbeddingCache, TextBackend

ENCODER_VERSION = "1"
"""Bump when a masking rule or the rarity feature changes: saved template counts
are keyed by template text, and vectors in a reference index by the encoder tag."""

_MON = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_HEX4 = r"[0-9A-Fa-f]{1,4}"
_V6 = (
    rf"(?:(?:(?:{_HEX4})?:){{2,6}}(?:\d{{1,3}}\.){{3}}\d{{1,3}}"
    rf"|(?:{_HEX4}:){{7}}{_HEX4}"
    rf"|(?:{_HEX4}:){{1,7}}:(?:{_HEX4}(?::{_HEX4}){{0,5}})?"
    rf"|::{_HEX4}(?::{_HEX4}){{0,6}})(?:%\w+)?"
)

# Header layouts, tried at the start of the line in this order; a match is cut
# off and the rest is tried again (Loghub BGL lines carry two stacked headers).
_HEADERS = tuple(
    re.compile(p)
    for p in (
        # Loghub BGL/Thunderbird: [label] epoch yyyy.mm.dd node
        r"(?:\S+\s+)?\d{9,10}\s+\d{4}\.\d{2}\.\d{2}\s+\S+\s+",
        # BGL after that prefix: 2005-06-03-15.42.50.675872 node
        r"\d{4}-\d{2}-\d{2}-\d{2}\.\d{2}\.\d{2}\.\d+\s+\S+\s+",
        # syslog (RFC 3164, optional <pri>): Jun 14 15:16:01 host  -- the host token
        # must not look like a program tag ("sshd[12]:", "kernel:").
        rf"(?:<\d{{1,3}}>\d?\s*)?{_MON}\s+\d{{1,2}}\s+\d{{2}}:\d{{2}}:\d{{2}}(?:\.\d+)?"
        r"(?:\s+\d{4})?\s+[^\s\[\]]*[^\s:\[\]]\s+",
        # Apache error log: [Sun Dec 04 04:47:44 2005]
        rf"\[{_DAY}\s+{_MON}\s+\d{{1,2}}\s+\d{{2}}:\d{{2}}:\d{{2}}(?:\.\d+)?\s+\d{{4}}\]\s*",
        # HDFS: yymmdd hhmmss pid
        r"\d{6}\s+\d{6}\s+\d+\s+",
        # ISO 8601 / log4j / python logging: 2015-10-18 18:01:47,978 or [2015-10-18T18:01:47Z]
        r"\[?\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?,?"
        r"(?:Z|\s?[+-]\d{2}:?\d{2})?\]?\s+",
        # Spark: 17/06/09 20:10:40
        r"\d{2}/\d{2}/\d{2}\s+\d{2}:\d{2}:\d{2}\s+",
        # Android logcat: 03-17 16:13:38.811  1702  2395
        r"\d{2}-\d{2}\s+\d{2}:\d{2}:\d{2}\.\d+\s+\d+\s+\d+\s+",
    )
)
# Loghub BGL stacks two headers; one more round is spare, and the bound keeps a
# line made of repeated headers from costing more than three matches.
_MAX_HEADERS = 3

# What a host name ends with: a cheap test, because its search starts from the
# literal "." (the full host pattern can start at any letter).
_HOST_HINT = re.compile(r"\.(?:com|net|org|edu|gov|mil|int|info|biz|io|arpa|[a-z]{2})(?![\w.-])")


def _has(*needles: str) -> Callable[[str], bool]:
    return lambda s: any(n in s for n in needles)


# Message masks, applied in this order (each pass sees the previous one's output,
# so e.g. "/10.0.0.1" becomes "/<ip>" and is no longer a path). Each is
# (pattern, replacement, cheap test that must pass for the pattern to have a
# chance): a substring test costs ~50 ns, a regex pass over a 150-character
# line several microseconds. Patterns begin with a character class and check
# the token boundary with a look-behind *after* that first character, so the
# regex engine can skip ahead to candidate characters; this made the number
# pass 3x faster than a leading look-behind on the Loghub lines.
_MASKS: tuple[tuple[re.Pattern[str], str, Callable[[str], bool] | None], ...] = tuple(
    (re.compile(p), repl, test)
    for p, repl, test in (
        (r"[A-Za-z](?<![\w+.-][A-Za-z])[A-Za-z0-9+.-]*://[^\s\"'<>]+", "<url>", _has("://")),
        (
            r"[0-9A-Fa-f](?<!\w[0-9A-Fa-f])[0-9A-Fa-f]{7}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}"
            r"-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}(?!\w)",
            "<uuid>",
            lambda s: s.count("-") >= 4,
        ),
        (r"blk_(?<!\wblk_)-?\d+", "<blk>", _has("blk_")),
        # Host names: under a generic TLD (optionally + a country code:
        # uninet-ide.com.mx), or of three labels or more under a country code
        # (adsl.proxad.fr) unless that code is a common file extension (jquery.min.js).
        (
            r"[A-Za-z0-9-](?<![\w.@/-][A-Za-z0-9-])[A-Za-z0-9-]*(?:"
            r"(?:\.[A-Za-z0-9-]+)*\.(?:com|net|org|edu|gov|mil|int|info|biz|io|arpa)(?:\.[a-z]{2})?"
            r"|(?:\.[A-Za-z0-9-]+)+\.[a-z]{2}(?<!\.(?:gz|js|py|rb|sh|so|ko|md|cc|hh|pl|pm))"
            r"(?<!\.(?:ts|go|rs|db|el|xz|bz|7z|mk|in|am|ml|hs|cs|vb|fs|sv|jl|ps|rc|pb|h5|cf))"
            r")(?![\w.-])",
            "<host>",
            lambda s: _HOST_HINT.search(s) is not None,
        ),
        # MAC and longer colon-separated hardware ids, before times eat "00:11:43".
        (
            r"[0-9A-Fa-f](?<![\w:-][0-9A-Fa-f])[0-9A-Fa-f](?::[0-9A-Fa-f]{2}){5,}(?![\w:-])"
            r"|[0-9A-Fa-f](?<![\w:-][0-9A-Fa-f])[0-9A-Fa-f](?:-[0-9A-Fa-f]{2}){5}(?![\w:-])",
            "<mac>",
            lambda s: s.count(":") >= 5 or s.count("-") >= 5,
        ),
        (
            # ctime and syslog dates inside the message: [Sat ]Jul  9 12:16:49[ 2005]
            rf"\b(?:{_DAY}\s+)?{_MON}\s+\d{{1,2}}\s+\d{{1,2}}:\d{{2}}:\d{{2}}(?:\.\d+)?"
            r"(?:\s+\d{4})?\b",
            "<ts>",
            lambda s: s.count(":") >= 2,
        ),
        (
            # BGL stamp first, then ISO date[time], dotted/slashed dates, access-log
            # 10/Oct/2000:13:55:36 -0700, bare times.
            r"\d(?<!\w\d)(?:"
            r"\d{3}-\d{2}-\d{2}-\d{2}\.\d{2}\.\d{2}(?:\.\d+)?"
            r"|\d{3}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?"
            r"|\d{3}[./]\d{2}[./]\d{2}"
            rf"|\d?/{_MON}/\d{{4}}(?::\d{{2}}:\d{{2}}:\d{{2}})?(?:\s[+-]\d{{4}})?"
            r"|\d?:\d{2}:\d{2}(?:[.,]\d+)?"
            r")(?!\w)",
            "<ts>",
            _has("-", ".", "/", ":"),
        ),
        (
            # IPv6: IPv4-mapped, full, or compressed (needs "::", so that times and
            # MACs never match); bare or bracketed with a port ([::1]:8080).
            rf"\[{_V6}\](?::\d{{1,5}})?|(?<![\w:.]){_V6}(?![\w:.])",
            "<ip>",
            lambda s: "::" in s or s.count(":") >= 7,
        ),
        (r"\d(?<![\w.]\d)\d{0,2}(?:\.\d{1,3}){3}(?::\d{1,5})?(?!\.?\d)(?!\w)", "<ip>", _has(".")),
        (
            # Absolute paths, and ~/ ./ ../ relative ones.
            r"(?:/(?<![\w.~/-]/)|[~.](?<![\w.~/-][~.])\.?/)[\w.+@%~,=-]+(?:/+[\w.+@%~,=-]+)*/?",
            "<path>",
            _has("/"),
        ),
        (r"[A-Za-z](?<!\w[A-Za-z]):\\[^\s\"']+", "<path>", _has("\\")),
        (
            # 0x.. and runs of >= 8 hex digits holding both a digit and a letter
            # (all-digit runs are left to the number pass; letter-only runs are words).
            r"0(?<!\w0)[xX][0-9A-Fa-f]+(?!\w)"
            r"|[0-9A-Fa-f](?<!\w[0-9A-Fa-f])"
            r"(?:(?<=\d)(?=[0-9A-Fa-f]*[A-Fa-f])|(?<=[A-Fa-f])(?=[0-9A-Fa-f]*\d))"
            r"[0-9A-Fa-f]{7,}(?!\w)",
            "<num>",
            None,
        ),
        (
            # A digit run is a number unless it is one digit glued to >= 2 letters
            # (ssh2, eth1). Runs after >= 2 letters and of >= 2 digits are numbers
            # (dn228, bglio12). Not after `digit" ` (the HTTP status of an access log).
            r"\d(?<!\d\" \d)(?:(?<![A-Za-z]{2}\d)(?<!\d\d)\d*|(?<=[A-Za-z]{2}\d)\d+)(?:\.\d+)*",
            "<num>",
            None,
        ),
    )
)
_SPACES = re.compile(r"\s+")


class LogTemplater:
    """Reduce raw log lines to templates by dropping headers and masking variables.

    Pure and deterministic; regexes are compiled once at import. ``cache_size``
    bounds an optional least-recently-used map from raw line to template, which
    pays when the same lines are templated twice in a row (the pipeline encodes
    a batch, then learns from the same batch); 0 disables it.

    >>> LogTemplater().template("081109 203615 148 INFO dfs.DataNode$PacketResponder: "
    ...                         "PacketResponder 1 for block blk_-16069 terminating")
    'INFO dfs.DataNode$PacketResponder: PacketResponder <num> for block <blk> terminating'
    """

    version = ENCODER_VERSION

    def __init__(self, *, cache_size: int = 0) -> None:
        self.cache_size = cache_size
        self._cache: OrderedDict[str, str] = OrderedDict()

    def template(self, line: str) -> str:
        """The template of one line (never empty for a line with a non-space character)."""
        if self.cache_size > 0:
            hit = self._cache.get(line)
            if hit is not None:
                self._cache.move_to_end(line)
                return hit
        out = self._compute(line)
        if self.cache_size > 0:
            self._cache[line] = out
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return out

    def templates(self, lines: Sequence[str]) -> list[str]:
        if self.cache_size <= 0:
            return [self._compute(line) for line in lines]
        # The cache's hits inline (the pipeline asks for each batch's
        # templates three times: prefetch, encode, learn); misses as template().
        get, touch, out = self._cache.get, self._cache.move_to_end, []
        for line in lines:
            hit = get(line)
            if hit is None:
                hit = self.template(line)
            else:
                touch(line)
            out.append(hit)
        return out

    @staticmethod
    def _compute(line: str) -> str:
        body = line.strip()
        for _ in range(_MAX_HEADERS):
            for head in _HEADERS:
                m = head.match(body)
                if m is not None:
                    break
            else:
                break
            body = body[m.end() :]
        if not body:  # the line was only a header: template the whole of it instead
            body = line.strip()
        for pattern, repl, test in _MASKS:
            if test is None or test(body):
                body = pattern.sub(repl, body)
        return _SPACES.sub(" ", body).strip()


class LogEncoder:
    """``log`` events -> ``[template embedding | novelty_weight * rarity]``, metric L2.

    A line is reduced to its template (:class:`LogTemplater`); the template text
    is embedded by ``backend`` through an :class:`~models.text.EmbeddingCache`, so
    all lines of one template share one cached unit vector and the model sees
    each template once. One more column holds the template's *rarity* among
    the lines this encoder has learnt (one encoder per source)::

        rarity = log((N + 2) / (c + 1)) / log(N + 2)

    with ``c`` the template's count and ``N`` the total count: a never-seen
    template has rarity exactly 1 whatever ``N``, a template holding almost all
    lines tends to 0. The normalisation keeps the column in [0, 1] for ever, so
    ``novelty_weight`` means the same after a thousand lines as after a billion
    (the raw ``-log p`` of a new template grows with ``log N``).

    Why L2 and not the cosine: the embedding part is of unit length, so its L2
    distance is a monotone function of the cosine (``|a-b|^2 = 2 - 2 cos``),
    nothing is lost there; and the rarity column then simply adds
    ``(novelty_weight * delta rarity)^2`` to the squared distance. Under the
    cosine the extra column would be renormalised together with the embedding,
    and its effect would depend on the angle between the two embeddings.

    ``learn`` counts templates; ``encode`` reads the counts and changes nothing
    but its caches.

    Parameters
    ----------
    backend
        The sentence embedder of template texts (unit rows), shared by sources.
    cache_size
        Templates whose embeddings are kept; a source rarely has more than a few
        thousand templates, so 20,000 holds them all with room for churn.
    max_templates
        Templates counted; past it the least recently seen one is forgotten (its
        count leaves the total too) and would be "never seen" again.
    novelty_weight
        Scale of the rarity column, in units of the embedding's L2 distance
        (0 to 2). 0.5 was chosen on BGL_2k (``bench/log_templates.py``): any
        weight from 0.25 to 4 lifted the streaming kNN ROC-AUC from 0.59 to
        0.78 when every line is learnt, and when flagged lines are not learnt
        weights up to 0.5 cost nothing while 1 and above lost up to 0.22 AUC (a
        flagged template is never counted, stays "never seen", and a heavy
        rarity column then keeps every later line of it out too).
    line_cache_size
        Raw lines whose template is remembered. The pipeline encodes a batch
        and then learns from the same lines; the cache spares templating them
        twice (about a third of the per-line cost, measured). 2,048 covers a
        batch of any size the stream shell is likely to use.

    >>> from models.events import Event
    >>> from models.text import HashingTextBackend
    >>> enc = LogEncoder(backend=HashingTextBackend(dim=16))
    >>> ev = [Event(id=str(i), kind="log", source="s", ts=0.0,
    ...             payload=f"sshd[{i}]: Accepted password for root from 10.0.0.{i}")
    ...       for i in range(4)]
    >>> X = enc.encode(ev)
    >>> X.shape, bool((X[0] == X[3]).all()), enc.templates_seen
    ((4, 17), True, 0)
    >>> enc.learn(ev)
    >>> enc.templates_seen, float(enc.encode(ev[:1])[0, -1]) < float(X[0, -1])
    (1, True)
    """

    metric = "l2"

    def __init__(
        self,
        *,
        backend: TextBackend,
        cache_size: int = 20_000,
        max_templates: int = 50_000,
        novelty_weight: float = 0.5,
        line_cache_size: int = 2048,
    ) -> None:
        self.backend = backend
        self.cache_size = cache_size
        self.max_templates = max_templates
        self.novelty_weight = novelty_weight
        self.line_cache_size = line_cache_size
        self.templater = LogTemplater(cache_size=line_cache_size)
        self.cache = EmbeddingCache(maxsize=cache_size)
        self._counts: OrderedDict[str, int] = OrderedDict()
        self._total = 0

    @property
    def name(self) -> str:
        return f"log-{self.backend.name}"

    @property
    def version(self) -> str:
        return f"{ENCODER_VERSION}+{self.backend.version}"

    @property
    def dim(self) -> int:
        return self.backend.dim + 1

    @property
    def templates_seen(self) -> int:
        """Distinct templates currently counted (at most ``max_templates``)."""
        return len(self._counts)

    @property
    def lines_learnt(self) -> int:
        """Lines behind the current counts (forgotten templates' lines excluded)."""
        return self._total

    def templates(self, events: Sequence[Event]) -> list[str]:
        """The template of each event's line."""
        lines = [e.payload for e in events]
        if not all(type(line) is str for line in lines):
            for e in events:
                _line(e)  # raises for the first event whose line is not a string
        return self.templater.templates(lines)

    def rarity(self, templates: Sequence[str]) -> np.ndarray:
        """Rarity in [0, 1] of each template under the current counts (1 = never seen)."""
        # A Python loop, not NumPy: batches are often of one line, where array
        # set-up costs more than the arithmetic (measured 3x slower per line).
        log_norm = math.log(self._total + 2.0)
        get = self._counts.get
        return np.array(
            [1.0 - math.log(get(t, 0) + 1.0) / log_norm for t in templates], dtype=np.float64
        )

    def encode(self, events: Sequence[Event]) -> np.ndarray:
        templates = self.templates(events)
        d = self.backend.dim
        out = np.empty((len(templates), d + 1), dtype=np.float32)
        if not templates:
            return out
        out[:, :d] = self.cache.embed(templates, self.backend)
        out[:, d] = self.novelty_weight * self.rarity(templates)
        return out

    def prefetch(self, events: Sequence[Event]) -> None:
        """Embed the templates of ``events`` not cached yet, in one model call."""
        self.cache.embed(self.templates(events), self.backend)

    def learn(self, events: Sequence[Event]) -> None:
        counts = self._counts
        for t in self.templates(events):
            counts[t] = counts.get(t, 0) + 1
            counts.move_to_end(t)
            self._total += 1
        self._evict()

    def _evict(self) -> None:
        while len(self._counts) > self.max_templates:
            _, c = self._counts.popitem(last=False)
            self._total -= c

    def get_state(self) -> State:
        """Template counts, least recently seen first. Caches are not state."""
        return {
            "encoder": self.name,
            "version": self.version,
            "templates": list(self._counts),
            "counts": np.fromiter(self._counts.values(), dtype=np.int64, count=len(self._counts)),
        }

    def set_state(self, state: State) -> None:
        if state.get("encoder") != self.name or state.get("version") != self.version:
            raise StateMismatch(
                f"log encoder state of {state.get('encoder')}@{state.get('version')} "
                f"does not fit {self.name}@{self.version}"
            )
        templates = list(state["templates"])
        counts = np.asarray(state["counts"])
        if (
            counts.ndim != 1
            or len(counts) != len(templates)
            or not all(isinstance(t, str) for t in templates)
            or len(set(templates)) != len(templates)
            or (len(counts) and (counts.min() < 1))
        ):
            raise StateMismatch("log encoder state: templates and counts do not match")
        self._counts = OrderedDict(zip(templates, (int(c) for c in counts)))
        self._total = sum(self._counts.values())
        self._evict()


def _line(event: Event) -> str:
    if not isinstance(event.payload, str):
        raise WrongType(f"a log event's line must be a string, not {type(event.payload).__name__}",
                        field="line")
    return event.payload
