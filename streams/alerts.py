"""Alerts and their delivery hooks: a generic signed JSON webhook and Alertmanager.

Three layers, from pure to effectful:

1. :class:`Alert`, a small frozen record built from a score record (anomaly)
   or a drift record (drift), with a stable fingerprint. It travels through
   the ``nwatch.alerts`` topic as JSON (:meth:`Alert.to_json`), keyed by that
   fingerprint.
2. Pure helpers: the Alertmanager v2 API body (:func:`alertmanager_api_payload`),
   an Alertmanager-style webhook notification (:func:`webhook_payload`),
   Standard Webhooks signing and verification (:func:`sign`, :func:`verify`),
   ``Retry-After`` parsing, the backoff schedule, URL masking.
3. I/O: the :class:`Hook` protocol and its two aiohttp implementations
   (:class:`WebhookHook`, :class:`AlertmanagerHook`), and the
   :class:`Deliverer`, which adds per-source rate limiting, retries with capped
   exponential backoff and full jitter, a circuit breaker per hook and a
   dead-letter path. No alert is dropped without a trace: each one is
   delivered, dead-lettered (``on_dead_letter``) or suppressed by the rate
   limit (counted, ``on_suppressed``).

Delivery is at least once: a receiver whose response got lost is sent the same
alert again. Receivers de-duplicate by the ``webhook-id`` header (the alert
fingerprint, or a batch id derived from the fingerprints) or, inside a batch,
by each alert's ``fingerprint``.

URLs may carry credentials (``https://user:password@host/...``, ``?token=``):
they are only ever shown through :func:`mask_url`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import hashlib
import hmac
import inspect
import logging
import math
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timezone
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import orjson

from models.errors import InvalidEvent, NeighbourwatchError
from models.events import format_ts, parse_ts

if TYPE_CHECKING:
    from streams.config import AlertsSettings

log = logging.getLogger(__name__)

ANOMALY_ALERTNAME = "NeighbourwatchAnomaly"
DRIFT_ALERTNAME = "NeighbourwatchDrift"

# Alertmanager's webhook notification format version (its `version: "4"`),
# which existing receivers check.
WEBHOOK_VERSION = "4"
# Alertmanager's webhook renders an unset endsAt as Go's zero time.
_ZERO_TIME = "0001-01-01T00:00:00Z"

# Neighbours / exemplars named in an annotation: an analyst opens the first few;
# the full list stays in the score record on the anomalies topic.
MAX_LISTED_IDS = 5
# Annotations are shown in UIs and chat messages; a long drift explanation is
# cut here rather than bloat every notification (the drift topic has it whole).
MAX_ANNOTATION_CHARS = 2000
# Error bodies quoted in a dead-letter reason: enough for Alertmanager's
# validation message, short enough for a Kafka header.
MAX_ERROR_BODY_CHARS = 200

OUTCOMES = ("delivered", "retried", "failed", "dead_lettered", "suppressed", "breaker_open")


class InvalidAlertRecord(NeighbourwatchError, ValueError):
    """A score or drift record (or an alert's JSON) that no alert can be built from."""

    reason = "invalid_alert_record"


class DeliveryError(NeighbourwatchError):
    """One delivery attempt failed.

    Parameters
    ----------
    message : str
        What happened, with any URL masked.
    retryable : bool
        True for timeouts, connection errors, HTTP 408, 429 and 5xx: the same
        request may succeed later. False for other answers (a 4xx means the
        request itself is wrong; sending it again cannot help).
    retry_after : float or None
        Seconds the receiver asked to wait (``Retry-After``), if it did.
    status : int or None
        HTTP status, when there was an answer.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status


# --------------------------------------------------------------------------- masking


_USERINFO = re.compile(r"(?<=//)[^/?#@\s]+@")


def mask_url(url: str) -> str:
    """``url`` with its credentials hidden: user info and query values become ``***``.

    Examples
    --------
    >>> mask_url("https://bob:hunter2@am.example:9093/hook?token=abc&x=1")
    'https://***@am.example:9093/hook?token=***&x=***'
    """
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            netloc = "***@" + netloc.rsplit("@", 1)[1]
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***") for k, _ in pairs], safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:
        return "<unparsable url>"


def _mask_text(text: str) -> str:
    """Hide user info of any URL quoted in ``text`` (exception messages may quote the URL)."""
    return _USERINFO.sub("***@", text)


def _reveal(value: Any) -> str | None:
    """The plain string of a ``str`` or a pydantic ``SecretStr`` (how settings hold secrets)."""
    if value is None:
        return None
    getter = getattr(value, "get_secret_value", None)
    return getter() if callable(getter) else str(value)


# --------------------------------------------------------------------------- alerts


def _fingerprint(*parts: str) -> str:
    # A JSON array keeps ("a.b", "c") and ("a", "b.c") apart; no separator can.
    return hashlib.sha256(orjson.dumps(list(parts))).hexdigest()


def _rfc3339(ts: Any) -> str:
    try:
        return format_ts(parse_ts(ts))
    except (InvalidEvent, OverflowError, OSError, ValueError) as err:
        raise InvalidAlertRecord(f"'ts' {str(ts)[:40]!r} is not a timestamp") from err


def _require(record: Mapping[str, Any], names: Sequence[str], what: str) -> None:
    if not isinstance(record, Mapping):
        raise InvalidAlertRecord(f"a {what} must be a JSON object, not {type(record).__name__}")
    missing = [n for n in names if record.get(n) is None]
    if missing:
        raise InvalidAlertRecord(f"{what} lacks {', '.join(missing)}")


def _number(record: Mapping[str, Any], name: str) -> float:
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidAlertRecord(f"'{name}' must be a number, not {type(value).__name__}")
    return float(value)


def _distance(value: Any) -> str:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"{value:.4g}" if ok else "?"


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ANNOTATION_CHARS else text[: MAX_ANNOTATION_CHARS - 1] + "…"


@dataclass(frozen=True)
class Alert:
    """One alert: an anomalous event or a drift alarm, ready for any hook.

    Build it with :meth:`from_anomaly` or :meth:`from_drift`. Its
    ``fingerprint`` depends only on what the alert is about (kind of alert,
    source, event id or drift position), so a replayed event gives the same
    fingerprint and receivers can de-duplicate.

    ``labels`` and ``annotations`` map strings to strings, as Alertmanager
    wants them. Alerts hash by fingerprint.

    Examples
    --------
    >>> a = Alert.from_anomaly({"id": "e1", "source": "pay", "kind": "transaction",
    ...                         "ts": 0, "score": 3.2, "p_value": 0.001, "is_anomaly": True,
    ...                         "neighbours": [{"id": "e0", "distance": 1.5}]})
    >>> a.labels["alertname"], a.starts_at
    ('NeighbourwatchAnomaly', '1970-01-01T00:00:00.000Z')
    >>> Alert.from_json(a.to_json()) == a
    True
    """

    fingerprint: str
    alertname: str
    severity: str
    source: str
    kind: str
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: str
    ends_at: str | None = None
    generator_url: str | None = None

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    @classmethod
    def from_anomaly(
        cls,
        score: Mapping[str, Any],
        *,
        severity: str = "warning",
        generator_url: str | None = None,
        ends_at: str | None = None,
    ) -> Alert:
        """The alert of one score record with ``is_anomaly`` true.

        Raises
        ------
        InvalidAlertRecord
            The record lacks a field, has a mistyped one, or is not an anomaly.
        """
        _require(score, ("id", "source", "kind", "ts", "score", "p_value"), "score record")
        if score.get("is_anomaly") is False:
            raise InvalidAlertRecord(f"event {str(score['id'])[:40]!r} is not an anomaly")
        event_id, source, kind = str(score["id"]), str(score["source"]), str(score["kind"])
        value, p_value = _number(score, "score"), _number(score, "p_value")
        neighbours = score.get("neighbours") or []
        listed = ", ".join(
            f"{n.get('id')} ({_distance(n.get('distance'))})"
            for n in list(neighbours)[:MAX_LISTED_IDS]
            if isinstance(n, Mapping)
        )
        annotations = {
            "summary": f"Anomalous {kind} event {event_id} in source {source}",
            "description": (
                f"Event {event_id} scored {value:.4g} (p-value {p_value:.3g}) against its "
                f"nearest reference neighbours in source {source}."
            ),
            "score": repr(value),
            "p_value": repr(p_value),
            "neighbours": listed,
        }
        # Alertmanager identifies an alert by its label set: without the
        # event id two anomalies of one source would merge into one alert.
        return cls._build(
            "anomaly", ANOMALY_ALERTNAME, score, ("event_id", event_id), annotations,
            severity=severity, generator_url=generator_url, ends_at=ends_at,
        )

    @classmethod
    def from_drift(
        cls,
        drift: Mapping[str, Any],
        *,
        severity: str = "warning",
        generator_url: str | None = None,
        ends_at: str | None = None,
    ) -> Alert:
        """The alert of one drift record.

        Raises
        ------
        InvalidAlertRecord
            The record lacks a field or has a mistyped one.
        """
        required = ("source", "kind", "ts", "detected_at", "statistic", "threshold")
        _require(drift, required, "drift record")
        source, kind, at = str(drift["source"]), str(drift["kind"]), str(drift["detected_at"])
        statistic, threshold = _number(drift, "statistic"), _number(drift, "threshold")
        explanation = drift.get("explanation") or {}
        exemplars = (explanation.get("exemplars") or []) if isinstance(explanation, Mapping) else []
        annotations = {
            "summary": f"Drift in source {source} ({kind})",
            "description": (
                f"The embedding centroid of source {source} moved: statistic {statistic:.4g} "
                f"crossed threshold {threshold:.4g} at event {at}"
                f" after {drift.get('events_seen', '?')} events"
                f" (window {drift.get('window_size', '?')},"
                f" reference {drift.get('reference_size', '?')})."
            ),
            "statistic": repr(statistic),
            "threshold": repr(threshold),
            "exemplars": ", ".join(str(e) for e in list(exemplars)[:MAX_LISTED_IDS]),
            "explanation": orjson.dumps(explanation, default=str).decode() if explanation else "",
        }
        # one alert per alarm, as event_id for anomalies
        return cls._build(
            "drift", DRIFT_ALERTNAME, drift, ("detected_at", at), annotations,
            severity=severity, generator_url=generator_url, ends_at=ends_at,
        )

    @classmethod
    def _build(
        cls,
        what: str,
        alertname: str,
        record: Mapping[str, Any],
        identity: tuple[str, str],
        annotations: dict[str, str],
        *,
        severity: str,
        generator_url: str | None,
        ends_at: str | None,
    ) -> Alert:
        """The parts both alert kinds share; ``identity`` is the label naming this one alert."""
        source, kind = str(record["source"]), str(record["kind"])
        if record.get("encoder"):
            annotations["encoder"] = str(record["encoder"])
        labels = {"alertname": alertname, "source": source, "kind": kind, "severity": severity}
        labels[identity[0]] = identity[1]
        return cls(
            fingerprint=_fingerprint(what, source, identity[1]),
            alertname=alertname,
            severity=severity,
            source=source,
            kind=kind,
            labels=labels,
            annotations={k: _clip(v) for k, v in annotations.items() if v},
            starts_at=_rfc3339(record["ts"]),
            ends_at=ends_at,
            generator_url=generator_url,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "alertname": self.alertname,
            "severity": self.severity,
            "source": self.source,
            "kind": self.kind,
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "starts_at": self.starts_at,
            "ends_at": self.ends_at,
            "generator_url": self.generator_url,
        }

    def to_json(self) -> bytes:
        """UTF-8 JSON, the value of this alert's message on the alerts topic."""
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes | str) -> Alert:
        """The alert :meth:`to_json` wrote. Unknown keys are ignored (a newer writer may add some).

        Raises
        ------
        InvalidAlertRecord
            Not JSON, or a field is missing or mistyped.
        """
        try:
            d = orjson.loads(data)
        except orjson.JSONDecodeError as err:
            raise InvalidAlertRecord(f"alert is not JSON: {err}") from None
        required = ("fingerprint", "alertname", "severity", "source", "kind", "starts_at")
        _require(d, required, "alert")
        for name in required:
            if not isinstance(d[name], str):
                raise InvalidAlertRecord(f"alert field '{name}' must be a string")
        maps: dict[str, dict[str, str]] = {}
        for name in ("labels", "annotations"):
            m = d.get(name) or {}
            if not isinstance(m, dict) or not all(isinstance(v, str) for v in m.values()):
                raise InvalidAlertRecord(f"alert field '{name}' must map strings to strings")
            maps[name] = m
        for name in ("ends_at", "generator_url"):
            if d.get(name) is not None and not isinstance(d[name], str):
                raise InvalidAlertRecord(f"alert field '{name}' must be a string or null")
        return cls(
            fingerprint=d["fingerprint"],
            alertname=d["alertname"],
            severity=d["severity"],
            source=d["source"],
            kind=d["kind"],
            labels=maps["labels"],
            annotations=maps["annotations"],
            starts_at=d["starts_at"],
            ends_at=d.get("ends_at"),
            generator_url=d.get("generator_url"),
        )


# --------------------------------------------------------------------------- payloads


def alertmanager_api_payload(alerts: Sequence[Alert]) -> list[dict[str, Any]]:
    """The body of Alertmanager's ``POST /api/v2/alerts`` (a list of postable alerts).

    ``endsAt`` and ``generatorURL`` are left out when unset: Alertmanager then
    resolves the alert after its ``resolve_timeout``, the right life for a
    one-off anomaly, and would reject an empty URL.
    """
    body: list[dict[str, Any]] = []
    for a in alerts:
        item: dict[str, Any] = {
            "labels": dict(a.labels),
            "annotations": dict(a.annotations),
            "startsAt": a.starts_at,
        }
        if a.ends_at:
            item["endsAt"] = a.ends_at
        if a.generator_url:
            item["generatorURL"] = a.generator_url
        body.append(item)
    return body


def _common(maps: Sequence[Mapping[str, str]]) -> dict[str, str]:
    if not maps:
        return {}
    first = maps[0]
    return {k: v for k, v in first.items() if all(m.get(k) == v for m in maps[1:])}


def webhook_payload(
    alerts: Sequence[Alert], *, receiver: str = "neighbourwatch", external_url: str = ""
) -> dict[str, Any]:
    """A notification shaped like Alertmanager's webhook (``version`` "4") for its receivers.

    The group is the alerts' common ``alertname`` and ``source`` (as
    Alertmanager's ``group_by: [alertname, source]`` would make it).
    """
    labels = [a.labels for a in alerts]
    common_labels = _common(labels)
    group_labels = {k: common_labels[k] for k in ("alertname", "source") if k in common_labels}
    group_key = "{}:{" + ", ".join(
        f"{k}={orjson.dumps(v).decode()}" for k, v in sorted(group_labels.items())
    ) + "}"
    return {
        "version": WEBHOOK_VERSION,
        "groupKey": group_key,
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": receiver,
        "groupLabels": group_labels,
        "commonLabels": common_labels,
        "commonAnnotations": _common([a.annotations for a in alerts]),
        "externalURL": external_url,
        "alerts": [
            {
                "status": "firing",
                "labels": dict(a.labels),
                "annotations": dict(a.annotations),
                "startsAt": a.starts_at,
                "endsAt": a.ends_at or _ZERO_TIME,
                "generatorURL": a.generator_url or "",
                "fingerprint": a.fingerprint,
            }
            for a in alerts
        ],
    }


def webhook_id(alerts: Sequence[Alert]) -> str:
    """The ``webhook-id`` of a call: the fingerprint of a single alert, else a batch id.

    The batch id is derived from the fingerprints in order, so every retry of
    one batch carries the same id and the receiver can de-duplicate.
    """
    if len(alerts) == 1:
        return alerts[0].fingerprint
    return "batch_" + _fingerprint("batch", *(a.fingerprint for a in alerts))[:48]


# --------------------------------------------------------------------------- signing

_WHSEC = "whsec_"


def signing_key(secret: str) -> bytes:
    """The HMAC key of a webhook secret: ``whsec_<base64>`` is that key, any other string its UTF-8.

    Raises
    ------
    ValueError
        A ``whsec_`` secret whose rest is not base64.
    """
    if secret.startswith(_WHSEC):
        try:
            return base64.b64decode(secret[len(_WHSEC) :], validate=True)
        except binascii.Error:
            raise ValueError("a whsec_ secret must be followed by base64") from None
    return secret.encode("utf-8")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks signature: ``v1,<base64 HMAC-SHA256 of "msg_id.timestamp.body">``.

    Examples
    --------
    >>> sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek",
    ...      1614265330, b'{"test": 2432232314}')
    'v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE='
    """
    mac = hmac.new(signing_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode("ascii")


def signature_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers of one call."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:  # a plain dict is case-sensitive; HTTP header names are not
        lower = {k.lower(): v for k, v in headers.items()}
        value = lower.get(name)
    return value


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: float = 300,
    now: float | None = None,
) -> bool:
    """True if ``headers`` sign ``body`` validly, timestamped within ``tolerance`` s of ``now``.

    The receiver's side of :func:`sign`. The signature header may list several
    space-separated signatures (key rotation); one valid ``v1`` is enough.
    Comparison is constant-time. The tolerance (Standard Webhooks suggests
    5 minutes) bounds how long a captured call can be replayed.
    """
    msg_id = _header(headers, "webhook-id")
    ts_text = _header(headers, "webhook-timestamp")
    signatures = _header(headers, "webhook-signature")
    if not msg_id or not ts_text or not signatures:
        return False
    try:
        timestamp = int(ts_text)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        return False
    expected = sign(secret, msg_id, timestamp, body).encode("ascii")
    found = False
    for candidate in signatures.split():
        # Keep comparing after a match: the time taken must not depend on which one matched.
        if candidate.startswith("v1,") and hmac.compare_digest(candidate.encode("utf-8"), expected):
            found = True
    return found


# --------------------------------------------------------------------------- retry helpers


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or HTTP date), or None.

    ``now`` is the wall clock (epoch seconds) an HTTP date is measured from.

    Examples
    --------
    >>> parse_retry_after("7", now=0.0)
    7.0
    >>> parse_retry_after("Thu, 01 Jan 1970 00:01:00 GMT", now=30.0)
    30.0
    """
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now)


def backoff_delay(
    failures: int,
    *,
    base_delay: float,
    max_delay: float,
    jitter: bool,
    rng: random.Random,
    retry_after: float | None = None,
    max_retry_after: float = math.inf,
) -> float:
    """Seconds to wait after the ``failures``-th failed attempt (1-based).

    Capped exponential backoff ``min(max_delay, base_delay * 2**(failures-1))``;
    with ``jitter`` a uniform draw below it ("full jitter", which spreads the
    retries of many clients best). A ``Retry-After`` from the receiver is a
    floor, itself capped at ``max_retry_after``.
    """
    cap = min(max_delay, base_delay * 2.0 ** (failures - 1))
    delay = rng.uniform(0.0, cap) if jitter else cap
    if retry_after is not None:
        delay = max(delay, min(retry_after, max_retry_after))
    return delay


# --------------------------------------------------------------------------- hooks


@runtime_checkable
class Hook(Protocol):
    """Somewhere alerts go. One method: deliver a batch, or raise :class:`DeliveryError`.

    ``deliver`` makes one attempt; retries, the circuit breaker and dead
    letters are the :class:`Deliverer`'s. It must raise ``DeliveryError`` with
    ``retryable`` set truthfully; anything else it raises counts as a
    non-retryable failure.
    """

    @property
    def name(self) -> str: ...

    async def deliver(self, alerts: Sequence[Alert]) -> None: ...


# Why 10 s: Alertmanager and typical webhook receivers answer in milliseconds;
# one that takes 10 s is as good as down, and a longer wait would hold up the
# alerts behind it (the deliverer retries, so a slow one-off costs little).
DEFAULT_TIMEOUT = 10.0
_USER_AGENT = "neighbourwatch-alerts/0.1"
_RETRYABLE_STATUS = frozenset({408, 429})


class _HttpHook:
    """What both HTTP hooks share: a lazily opened aiohttp session and the error mapping."""

    def __init__(
        self,
        *,
        name: str,
        url: str,
        timeout: float,
        session: aiohttp.ClientSession | None,
        wall_clock: Callable[[], float],
    ) -> None:
        self._name = name
        self._url = url
        self.timeout = timeout
        self._session = session
        self._own_session = session is None
        self._wall_clock = wall_clock

    @property
    def name(self) -> str:
        return self._name

    @property
    def display_url(self) -> str:
        """The target URL with credentials masked: the only form of it ever shown."""
        return mask_url(self._url)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self._name!r}, url={self.display_url!r})"

    __str__ = __repr__

    async def aclose(self) -> None:
        """Close the session this hook opened (not one it was given)."""
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def _post(self, target: str, body: bytes, headers: Mapping[str, str]) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"User-Agent": _USER_AGENT},
            )
            self._own_session = True
        where = mask_url(target)
        try:
            async with self._session.post(
                target,
                data=body,
                headers={"Content-Type": "application/json", **headers},
                # A redirected POST is a misconfigured URL; following it could
                # also send credentials elsewhere.
                allow_redirects=False,
            ) as resp:
                if 200 <= resp.status < 300:
                    await resp.read()  # drain, so the connection can be reused
                    return
                text = (await resp.text(errors="replace"))[:MAX_ERROR_BODY_CHARS].strip()
                text = _mask_text(text)
                retryable = resp.status in _RETRYABLE_STATUS or resp.status >= 500
                retry_after = (
                    parse_retry_after(resp.headers.get("Retry-After"), now=self._wall_clock())
                    if retryable
                    else None
                )
                raise DeliveryError(
                    f"HTTP {resp.status} from {where}" + (f": {text}" if text else ""),
                    retryable=retryable,
                    retry_after=retry_after,
                    status=resp.status,
                )
        except DeliveryError:
            raise
        except asyncio.TimeoutError:
            raise DeliveryError(
                f"timed out after {self.timeout:g} s: {where}", retryable=True
            ) from None
        except aiohttp.InvalidURL:
            raise DeliveryError(f"invalid URL {where}", retryable=False) from None
        except (aiohttp.ClientError, OSError) as err:
            # `from None`: a chained aiohttp error could print the unmasked URL.
            raise DeliveryError(
                f"{type(err).__name__} on {where}: {_mask_text(str(err))}", retryable=True
            ) from None


class WebhookHook(_HttpHook):
    """POSTs an Alertmanager-style notification (:func:`webhook_payload`) to ``url``.

    With a ``secret`` each call carries Standard Webhooks headers
    (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``), signed
    afresh at every attempt so that a retry is not refused as stale.

    Parameters
    ----------
    url : str or SecretStr
        The receiver; may carry credentials (sent as basic auth, never shown).
    secret : str or SecretStr or None
        Signing secret: ``whsec_<base64>`` or any string (used as UTF-8).
    timeout : float
        Seconds for a whole attempt (connect, send, answer).
    receiver, external_url : str
        The ``receiver`` and ``externalURL`` of the notification.
    name : str
        Name in metrics, logs and dead letters.
    session : aiohttp.ClientSession or None
        A session to use (then not closed by :meth:`aclose`); None: one is
        opened at the first delivery.
    wall_clock : callable
        Epoch seconds: the signature timestamp and ``Retry-After`` dates.
    """

    def __init__(
        self,
        *,
        url: Any,
        secret: Any = None,
        timeout: float = DEFAULT_TIMEOUT,
        receiver: str = "neighbourwatch",
        external_url: str = "",
        name: str = "webhook",
        session: aiohttp.ClientSession | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            name=name,
            url=_reveal(url) or "",
            timeout=timeout,
            session=session,
            wall_clock=wall_clock,
        )
        self._secret = _reveal(secret)
        self.receiver = receiver
        self.external_url = external_url

    @property
    def is_signed(self) -> bool:
        return self._secret is not None

    def __repr__(self) -> str:
        return (
            f"WebhookHook(name={self._name!r}, url={self.display_url!r}, signed={self.is_signed})"
        )

    __str__ = __repr__

    async def deliver(self, alerts: Sequence[Alert]) -> None:
        if not alerts:
            return
        body = orjson.dumps(
            webhook_payload(alerts, receiver=self.receiver, external_url=self.external_url)
        )
        msg_id = webhook_id(alerts)
        if self._secret is not None:
            try:
                headers = signature_headers(self._secret, msg_id, int(self._wall_clock()), body)
            except ValueError as err:  # a malformed whsec_ secret: no retry can fix it
                raise DeliveryError(str(err), retryable=False) from None
        else:
            headers = {"webhook-id": msg_id}  # still lets the receiver de-duplicate
        await self._post(self._url, body, headers)


class AlertmanagerHook(_HttpHook):
    """POSTs alerts to Alertmanager's v2 API, ``base_url + /api/v2/alerts``.

    Parameters
    ----------
    base_url : str or SecretStr
        Alertmanager's base URL (with its route prefix if any); may carry
        basic-auth credentials.
    timeout, name, session, wall_clock
        As for :class:`WebhookHook`.
    """

    def __init__(
        self,
        *,
        base_url: Any,
        timeout: float = DEFAULT_TIMEOUT,
        name: str = "alertmanager",
        session: aiohttp.ClientSession | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        base = (_reveal(base_url) or "").rstrip("/")
        super().__init__(
            name=name,
            url=base + "/api/v2/alerts",
            timeout=timeout,
            session=session,
            wall_clock=wall_clock,
        )

    async def deliver(self, alerts: Sequence[Alert]) -> None:
        if not alerts:
            return
        await self._post(self._url, orjson.dumps(alertmanager_api_payload(alerts)), {})


def hooks_from_settings(
    alerts: AlertsSettings, *, timeout: float = DEFAULT_TIMEOUT
) -> list[Hook]:
    """The hooks an ``AlertsSettings`` configures (none when no URL is set).

    Raises
    ------
    ValueError
        A ``whsec_`` webhook secret that is not base64 (found at start, not
        at the first alert).
    """
    hooks: list[Hook] = []
    url = _reveal(alerts.webhook_url)
    if url:
        secret = _reveal(alerts.webhook_secret)
        if secret is not None:
            signing_key(secret)
        hooks.append(WebhookHook(url=url, secret=secret, timeout=timeout))
    am = _reveal(alerts.alertmanager_url)
    if am:
        hooks.append(AlertmanagerHook(base_url=am, timeout=timeout))
    return hooks


# --------------------------------------------------------------------------- breaker, rate limit


class CircuitBreaker:
    """Closed -> open after ``failures`` consecutive failures -> half-open after ``reset`` seconds.

    Half-open lets one trial call through: its success closes the breaker,
    its failure opens it for another ``reset`` seconds.
    """

    def __init__(self, *, failures: int, reset: float, clock: Callable[[], float]) -> None:
        self.failures = failures
        self.reset = reset
        self._clock = clock
        self._consecutive = 0
        self._opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at >= self.reset:
            return "half_open"
        return "open"

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive

    def allow(self) -> bool:
        """May a call go through now? In half-open state only one at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._trial:
            self._trial = True
            return True
        return False

    def record_success(self) -> None:
        self._consecutive = 0
        self._opened_at = None
        self._trial = False

    def record_failure(self) -> None:
        self._consecutive += 1
        if self._trial or self._consecutive >= self.failures:
            self._opened_at = self._clock()
        self._trial = False

    def abandon(self) -> None:
        """A call that was let through ended without an answer (cancelled): free the trial slot."""
        self._trial = False


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; one alert takes one token."""

    def __init__(self, *, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def is_full(self, now: float) -> bool:
        return self.tokens + (now - self.updated) * self.rate >= self.burst


# --------------------------------------------------------------------------- deliverer


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Alerts one hook could not take, and why (``reason``: ``code: detail``)."""

    hook: str
    alerts: tuple[Alert, ...]
    reason: str

    @property
    def code(self) -> str:
        """``rejected``, ``attempts_exhausted``, ``breaker_open`` or ``error``."""
        return self.reason.split(":", 1)[0]


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """What one :meth:`Deliverer.deliver` call did."""

    delivered: Mapping[str, int] = field(default_factory=dict)  # hook -> alerts delivered
    dead_letters: tuple[DeadLetter, ...] = ()
    suppressed: tuple[Alert, ...] = ()
    attempts: Mapping[str, int] = field(default_factory=dict)  # hook -> calls made

    @property
    def is_complete(self) -> bool:
        """Every hook took every alert that was not suppressed."""
        return not self.dead_letters


MaybeAwaitable = Awaitable[None] | None
DeadLetterCallback = Callable[[str, tuple[Alert, ...], str], MaybeAwaitable]
SuppressedCallback = Callable[[str, tuple[Alert, ...]], MaybeAwaitable]
OutcomeCallback = Callable[[str, str, int], None]

# How many per-source buckets to keep before forgetting idle (full) ones: a
# bound on memory if sources are many; a full bucket is the same as a new one.
_MAX_BUCKETS = 10_000


class Deliverer:
    """Delivers alerts to every hook: rate limit, retries, circuit breaker, dead letters.

    Parameters
    ----------
    hooks : sequence of Hook
        Where alerts go; names must be unique.
    max_attempts : int
        Calls per hook and batch before the batch is dead-lettered.
    base_delay, max_delay : float
        Backoff after the n-th failure: up to ``min(max_delay, base_delay * 2**(n-1))`` seconds.
    jitter : bool
        Full jitter (a uniform draw below that bound) rather than the bound itself.
    max_retry_after : float
        Cap on a receiver's ``Retry-After``, so one answer cannot stall a hook for hours.
    breaker_failures : int
        Consecutive retryable failures that open a hook's breaker.
    breaker_reset : float
        Seconds an open breaker waits before letting a trial call through.
    rate_limit_per_source : float or None
        Alerts per minute per source (token bucket); None or 0: no limit.
    rate_burst : float or None
        Bucket size; None: one minute's worth (``rate_limit_per_source``).
    on_dead_letter : callable(hook, alerts, reason), optional
        Called (awaited if it returns an awaitable) with alerts a hook could not take.
    on_suppressed : callable(source, alerts), optional
        Called with alerts the rate limit held back, once per source and call.
    on_outcome : callable(hook, outcome, count), optional
        For metrics: ``count`` alerts had ``outcome`` (one of :data:`OUTCOMES`) at ``hook``.
    sleep, clock : callables
        ``asyncio.sleep`` and ``time.monotonic``; tests inject fakes.
    rng : random.Random or None
        Source of the jitter; None: a fresh unseeded one.

    Notes
    -----
    Per hook, a batch is tried up to ``max_attempts`` times. Retryable
    failures (timeouts, connection errors, 408, 429, 5xx) count towards the
    breaker; a non-retryable answer (other 4xx) dead-letters the batch at once
    and, being an answer, closes the breaker. An open breaker dead-letters at
    once with reason ``breaker_open``. Hooks are served concurrently, so a
    hook that is down does not delay the others.
    """

    def __init__(
        self,
        *,
        hooks: Sequence[Hook],
        # 5 attempts with the delays below span about 0.5+1+2+4 = 7.5 s (less
        # with jitter): long enough to ride out a receiver restart, short
        # enough not to hold the alert stream for long.
        max_attempts: int = 5,
        base_delay: float = 0.5,
        # A cap well under a minute: an outage longer than that is the
        # breaker's and the dead-letter topic's business, not the retry loop's.
        max_delay: float = 30.0,
        jitter: bool = True,
        # Alertmanager and rate limiters ask for seconds to a minute; more than
        # two minutes would stall every alert behind this batch.
        max_retry_after: float = 120.0,
        # Five consecutive failures is a receiver that is down, not one that hiccuped.
        breaker_failures: int = 5,
        # Try again every 10 s: while the breaker is open every batch goes to
        # the dead letters, so this is also how long alerts keep going there
        # after the receiver is back (measured: a 3 s outage dead-lettered the
        # next breaker_reset seconds of alerts). A dead receiver costs one
        # refused trial per 10 s, which is nothing.
        breaker_reset: float = 10.0,
        # One alert a second per source on average: more is an incident, and
        # paging for each event of it helps nobody.
        rate_limit_per_source: float | None = 60.0,
        rate_burst: float | None = None,
        on_dead_letter: DeadLetterCallback | None = None,
        on_suppressed: SuppressedCallback | None = None,
        on_outcome: OutcomeCallback | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        names = [h.name for h in hooks]
        if len(set(names)) != len(names):
            raise ValueError(f"hook names must be unique: {names}")
        if max_attempts < 1 or breaker_failures < 1:
            raise ValueError("max_attempts and breaker_failures must be at least 1")
        self.hooks = tuple(hooks)
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.jitter = jitter
        self.max_retry_after = max_retry_after
        self.breaker_failures = breaker_failures
        self.breaker_reset = breaker_reset
        self.rate_limit_per_source = rate_limit_per_source
        self.rate_burst = rate_burst
        self.on_dead_letter = on_dead_letter
        self.on_suppressed = on_suppressed
        self.on_outcome = on_outcome
        self._sleep = sleep
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._breakers: dict[str, CircuitBreaker] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self.suppressed: Counter[str] = Counter()  # per source, since start
        self.dead_lettered: Counter[str] = Counter()  # per hook, alerts, since start
        self.delivered: Counter[str] = Counter()  # per hook, alerts, since start

    def __repr__(self) -> str:
        return f"Deliverer(hooks={list(self.hooks)!r}, max_attempts={self.max_attempts})"

    def breaker(self, hook_name: str) -> CircuitBreaker:
        """The circuit breaker of one hook (created on first use)."""
        b = self._breakers.get(hook_name)
        if b is None:
            b = self._breakers[hook_name] = CircuitBreaker(
                failures=self.breaker_failures, reset=self.breaker_reset, clock=self._clock
            )
        return b

    async def aclose(self) -> None:
        """Close the hooks that hold connections."""
        for hook in self.hooks:
            close = getattr(hook, "aclose", None)
            if close is not None:
                await close()

    async def __aenter__(self) -> Deliverer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- rate limit

    def _admit(self, alerts: Sequence[Alert]) -> tuple[list[Alert], dict[str, list[Alert]]]:
        rate = self.rate_limit_per_source
        if not rate:
            return list(alerts), {}
        now = self._clock()
        burst = self.rate_burst if self.rate_burst is not None else max(1.0, rate)
        passed: list[Alert] = []
        held: dict[str, list[Alert]] = {}
        for a in alerts:
            bucket = self._buckets.get(a.source)
            if bucket is None:
                if len(self._buckets) >= _MAX_BUCKETS:
                    self._buckets = {s: b for s, b in self._buckets.items() if not b.is_full(now)}
                bucket = TokenBucket(rate=rate / 60.0, burst=burst, now=now)
                self._buckets[a.source] = bucket
            if bucket.take(now):
                passed.append(a)
            else:
                held.setdefault(a.source, []).append(a)
        return passed, held

    # -- delivery

    def _outcome(self, hook: str, outcome: str, count: int) -> None:
        if self.on_outcome is not None and count:
            self.on_outcome(hook, outcome, count)

    @staticmethod
    async def _call(callback: Callable[..., Any] | None, *args: Any) -> None:
        if callback is None:
            return
        result = callback(*args)
        if inspect.isawaitable(result):
            await result

    async def deliver(
        self,
        alerts: Sequence[Alert],
        *,
        only: Collection[str] | None = None,
        rate_limit: bool = True,
    ) -> DeliveryReport:
        """Deliver ``alerts`` (one batch) to every hook, or to the hooks named in ``only``.

        ``rate_limit=False`` skips the per-source limit: for re-sending dead
        letters, which passed it once already.

        Returns
        -------
        DeliveryReport
            Alerts delivered per hook, the dead letters (also given to
            ``on_dead_letter``) and the suppressed alerts (also given to
            ``on_suppressed``).
        """
        hooks = [h for h in self.hooks if only is None or h.name in only]
        if rate_limit:
            passed, held = self._admit(alerts)
        else:
            passed, held = list(alerts), {}
        suppressed: list[Alert] = []
        for source, items in held.items():
            self.suppressed[source] += len(items)
            suppressed.extend(items)
            for hook in hooks:
                self._outcome(hook.name, "suppressed", len(items))
            await self._call(self.on_suppressed, source, tuple(items))
        if not passed or not hooks:
            return DeliveryReport(suppressed=tuple(suppressed))
        batch = tuple(passed)
        results = await asyncio.gather(*(self._deliver_to(h, batch) for h in hooks))
        delivered = {
            h.name: (len(batch) if dl is None else 0) for h, (dl, _) in zip(hooks, results)
        }
        attempts = {h.name: n for h, (_, n) in zip(hooks, results)}
        dead = tuple(dl for dl, _ in results if dl is not None)
        return DeliveryReport(
            delivered=delivered, dead_letters=dead, suppressed=tuple(suppressed), attempts=attempts
        )

    async def _deliver_to(
        self, hook: Hook, batch: tuple[Alert, ...]
    ) -> tuple[DeadLetter | None, int]:
        """Try one hook until it takes the batch or gives up: (dead letter or None, calls made)."""
        breaker = self.breaker(hook.name)
        n = len(batch)
        failures = 0
        while True:
            if not breaker.allow():
                self._outcome(hook.name, "breaker_open", n)
                detail = f"{breaker.consecutive_failures} consecutive failures"
                return await self._dead_letter(hook, batch, f"breaker_open: {detail}"), failures
            try:
                await hook.deliver(batch)
            except DeliveryError as err:
                failures += 1
                if not err.retryable:
                    self._success(hook, breaker)  # an answer: the receiver is up
                    self._outcome(hook.name, "failed", n)
                    return await self._dead_letter(hook, batch, f"rejected: {err}"), failures
                was = breaker.state
                breaker.record_failure()
                if breaker.state == "open" and was != "open":
                    log.warning("%r: circuit breaker open after %d consecutive failures (last: %s)",
                                hook, breaker.consecutive_failures, err)
                if failures >= self.max_attempts:
                    self._outcome(hook.name, "failed", n)
                    reason = f"attempts_exhausted: {failures} attempts, last: {err}"
                    return await self._dead_letter(hook, batch, reason), failures
                delay = backoff_delay(
                    failures,
                    base_delay=self.base_delay,
                    max_delay=self.max_delay,
                    jitter=self.jitter,
                    rng=self._rng,
                    retry_after=err.retry_after,
                    max_retry_after=self.max_retry_after,
                )
                self._outcome(hook.name, "retried", n)
                log.debug("%r failed (%s); retry %d in %.3g s", hook, err, failures, delay)
                await self._sleep(delay)
            except asyncio.CancelledError:
                breaker.abandon()
                raise
            except Exception as err:  # a hook's bug must not take the others down with it
                failures += 1
                breaker.abandon()
                self._outcome(hook.name, "failed", n)
                reason = f"error: {type(err).__name__}: {_mask_text(str(err))}"
                return await self._dead_letter(hook, batch, reason), failures
            else:
                self._success(hook, breaker)
                self.delivered[hook.name] += n
                self._outcome(hook.name, "delivered", n)
                return None, failures + 1

    @staticmethod
    def _success(hook: Hook, breaker: CircuitBreaker) -> None:
        if breaker.state != "closed":
            log.warning("%r: circuit breaker closed again", hook)
        breaker.record_success()

    async def _dead_letter(self, hook: Hook, batch: tuple[Alert, ...], reason: str) -> DeadLetter:
        # While a breaker is open every batch is dead-lettered: one line per
        # batch would flood the log, and the breaker's opening was logged.
        level = logging.DEBUG if reason.startswith("breaker_open") else logging.WARNING
        log.log(level, "%r: %d alert(s) dead-lettered: %s", hook, len(batch), reason)
        self.dead_lettered[hook.name] += len(batch)
        self._outcome(hook.name, "dead_lettered", len(batch))
        await self._call(self.on_dead_letter, hook.name, batch, reason)
        return DeadLetter(hook=hook.name, alerts=batch, reason=reason)

