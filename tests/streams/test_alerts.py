"""Alerts and their hooks, delivered to a real aiohttp receiver on 127.0.0.1.

The receiver runs in its own thread and event loop, so a receiver that hangs
or goes down is a real one: the client under test only sees the socket. Its
signature check and its Alertmanager v2 validation are written here, apart
from ``streams.alerts``, so that the two sides are not one piece of code
agreeing with itself. Retry delays are checked with an injected sleep and
clock, never with wall time.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from aiohttp import web
from pydantic import SecretStr

from detectors.records import DriftRecord, Neighbour, ScoreRecord
from streams.alerts import (
    ANOMALY_ALERTNAME,
    DRIFT_ALERTNAME,
    Alert,
    AlertmanagerHook,
    CircuitBreaker,
    Deliverer,
    DeliveryError,
    InvalidAlertRecord,
    WebhookHook,
    alertmanager_api_payload,
    backoff_delay,
    hooks_from_settings,
    mask_url,
    parse_retry_after,
    sign,
    verify,
    webhook_id,
    webhook_payload,
)
from streams.config import AlertsSettings

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- records


def anomaly(i: int = 1, source: str = "payments", **over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "id": f"tx-{i}",
        "source": source,
        "kind": "transaction",
        "ts": "2025-03-01T12:00:00.250Z",
        "score": 4.25 + i,
        "p_value": 0.0004,
        "is_anomaly": True,
        "warming_up": False,
        "neighbours": [{"id": f"tx-n{j}", "distance": 1.0 + j} for j in range(8)],
        "encoder": "tabular@1",
    }
    d.update(over)
    return d


def drift(source: str = "logs", **over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "source": source,
        "kind": "log",
        "ts": 1740830400.5,
        "detected_at": "log-4711",
        "events_seen": 4711,
        "statistic": 17.5,
        "threshold": 9.25,
        "reference_size": 1000,
        "window_size": 150,
        "explanation": {"exemplars": ["log-4700", "log-4705", "log-4709"], "top_dimensions": [3]},
        "encoder": "logs@2",
    }
    d.update(over)
    return d


def alerts_of(n: int, source: str = "payments") -> list[Alert]:
    return [Alert.from_anomaly(anomaly(i, source=source)) for i in range(n)]


# --------------------------------------------------------------------------- receiver


def receiver_signature_ok(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The receiver's own Standard Webhooks check (not ``streams.alerts.verify``)."""
    names = ("webhook-id", "webhook-timestamp", "webhook-signature")
    msg_id, ts, sigs = (headers.get(h) for h in names)
    tolerance = 300
    if not (msg_id and ts and sigs) or abs(time.time() - int(ts)) > tolerance:
        return False
    key = base64.b64decode(secret[6:]) if secret.startswith("whsec_") else secret.encode()
    signed = msg_id.encode() + b"." + ts.encode() + b"." + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    want = "v1," + base64.b64encode(digest).decode()
    return any(hmac.compare_digest(s, want) for s in sigs.split(" "))


_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def am_v2_errors(data: Any) -> list[str]:
    """What Alertmanager's ``POST /api/v2/alerts`` objects to (postableAlerts schema, Validate)."""
    if not isinstance(data, list):
        return ["body is not an array"]
    errs: list[str] = []

    def when(a: dict, key: str) -> datetime | None:
        v = a.get(key)
        if v is None:
            return None
        if not isinstance(v, str) or not _RFC3339.match(v):
            errs.append(f"{key} {v!r} is not RFC 3339")
            return None
        return datetime.fromisoformat(v.replace("Z", "+00:00"))

    for a in data:
        if not isinstance(a, dict):
            errs.append("alert is not an object")
            continue
        extra = set(a) - {"labels", "annotations", "startsAt", "endsAt", "generatorURL"}
        if extra:
            errs.append(f"unknown fields {sorted(extra)}")
        labels = a.get("labels")
        if not isinstance(labels, dict) or not labels:
            errs.append("labels missing or empty")
            labels = {}
        for name in ("annotations",):
            if name in a and not isinstance(a[name], dict):
                errs.append(f"{name} is not an object")
        for k, v in [*labels.items(), *(a.get("annotations") or {}).items()]:
            if not _LABEL_NAME.match(k) or not isinstance(v, str):
                errs.append(f"bad label/annotation {k!r}={v!r}")
        for k, v in labels.items():
            if v == "":
                errs.append(f"label {k} is empty")
        start, end = when(a, "startsAt"), when(a, "endsAt")
        if start and end and end < start:
            errs.append("endsAt before startsAt")
        if "generatorURL" in a:
            u = urlsplit(str(a["generatorURL"]))
            if not (u.scheme and u.netloc):
                errs.append("generatorURL is not an absolute URI")
    return errs


@dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 0


@dataclass
class Receiver:
    """An aiohttp web server on 127.0.0.1 (port 0), in its own thread and loop.

    ``script`` holds actions for the next calls, one each: an int (answer that
    status), ``(status, headers)``, ``"hang"`` (never answer), ``"accept_then_503"``
    (take the alerts, then answer 503 as if the response was lost).
    """

    secret: str | None = None
    basic_auth: str | None = None  # "user:password" the receiver requires
    port: int = 0
    script: deque = field(default_factory=deque)
    calls: list[Call] = field(default_factory=list)
    seen_ids: set[str] = field(default_factory=set)
    duplicates: int = 0
    alerts: dict[str, dict] = field(default_factory=dict)  # webhook: fingerprint -> alert
    am_alerts: list[dict] = field(default_factory=list)

    def start(self) -> Receiver:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.up()
        return self

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def up(self) -> None:
        self._run(self._up())

    def down(self) -> None:
        self._run(self._down())

    def stop(self) -> None:
        if self._runner is not None:
            self.down()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    _runner: web.AppRunner | None = None

    async def _up(self) -> None:
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        app.router.add_post("/api/v2/alerts", self._am)
        # handler_cancellation: a handler whose client went away (timed out) stops;
        # shutdown_timeout: `down` must not wait a minute for hanging handlers.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _down(self) -> None:
        self._release.set()
        assert self._runner is not None
        await self._runner.cleanup()
        self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _scripted(self) -> web.Response | str | None:
        action = self.script.popleft() if self.script else None
        if action == "hang":
            await self._release.wait()
            return web.Response(status=200)
        if isinstance(action, int):
            return web.Response(status=action, text=f"scripted {action}")
        if isinstance(action, tuple):
            return web.Response(status=action[0], headers=action[1])
        return action

    def _auth_ok(self, request: web.Request) -> bool:
        if self.basic_auth is None:
            return True
        want = "Basic " + base64.b64encode(self.basic_auth.encode()).decode()
        return request.headers.get("Authorization") == want

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        call = Call("/hook", {k.lower(): v for k, v in request.headers.items()}, body)
        self.calls.append(call)
        if self.secret is not None and not receiver_signature_ok(self.secret, call.headers, body):
            call.status = 401
            return web.Response(status=401, text="bad signature")
        scripted = await self._scripted()
        if isinstance(scripted, web.Response):
            call.status = scripted.status
            return scripted
        msg_id = call.headers["webhook-id"]
        if msg_id in self.seen_ids:
            self.duplicates += 1
        else:
            self.seen_ids.add(msg_id)
            for a in orjson.loads(body)["alerts"]:
                self.alerts[a["fingerprint"]] = a
        call.status = 503 if scripted == "accept_then_503" else 200
        return web.Response(status=call.status)

    async def _am(self, request: web.Request) -> web.Response:
        body = await request.read()
        call = Call("/api/v2/alerts", {k.lower(): v for k, v in request.headers.items()}, body)
        self.calls.append(call)
        if not self._auth_ok(request):
            call.status = 401
            return web.Response(status=401)
        scripted = await self._scripted()
        if isinstance(scripted, web.Response):
            call.status = scripted.status
            return scripted
        data = orjson.loads(body)
        errs = am_v2_errors(data)
        if errs:
            call.status = 400
            return web.json_response({"code": 400, "message": "; ".join(errs)}, status=400)
        self.am_alerts.extend(data)
        call.status = 200
        return web.Response(status=200)


@pytest.fixture
def make_receiver():
    started: list[Receiver] = []

    def make(**kw: Any) -> Receiver:
        r = Receiver(**kw).start()
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()


@pytest.fixture
def receiver(make_receiver) -> Receiver:
    return make_receiver()


class FakeTime:
    """An injected clock and sleep: sleeping advances the clock at once and is recorded."""

    def __init__(self, on_sleep: Callable[[int], None] | None = None) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.on_sleep = on_sleep

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep(len(self.sleeps))
        await asyncio.sleep(0)


def deliverer(hooks: list, t: FakeTime, **kw: Any) -> Deliverer:
    params: dict[str, Any] = dict(
        max_attempts=5, base_delay=0.1, max_delay=1.0, jitter=False, breaker_failures=100,
        breaker_reset=30.0, rate_limit_per_source=None, sleep=t.sleep, clock=t.clock,
    )
    params.update(kw)
    return Deliverer(hooks=hooks, **params)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --------------------------------------------------------------------------- alerts (pure)


def test_fingerprint_is_stable_for_a_replayed_record():
    first = Alert.from_anomaly(anomaly(7))
    # The same event replayed: scored again with other numbers and neighbours, same id and source.
    replayed = Alert.from_anomaly(anomaly(7, score=1.5, p_value=0.009, neighbours=[]))
    assert replayed.fingerprint == first.fingerprint
    assert len({first.fingerprint, Alert.from_anomaly(anomaly(8)).fingerprint,
                Alert.from_anomaly(anomaly(7, source="cards")).fingerprint}) == 3
    d1, d2 = Alert.from_drift(drift()), Alert.from_drift(drift(statistic=99.0, ts=0))
    assert d1.fingerprint == d2.fingerprint
    assert Alert.from_drift(drift(detected_at="log-9")).fingerprint != d1.fingerprint
    # An anomaly and a drift alarm named by the same strings are still different alerts.
    same = Alert.from_anomaly(anomaly(source="s", id="x"))
    assert same.fingerprint != Alert.from_drift(drift(source="s", detected_at="x")).fingerprint
    assert re.fullmatch(r"[0-9a-f]{64}", first.fingerprint)
    assert hash(first) == hash(replayed) and first in {Alert.from_anomaly(anomaly(7))}


def test_alert_from_records_of_the_pipeline_dataclasses():
    rec = ScoreRecord(id="e9", source="pay", kind="transaction", ts="2025-01-02T03:04:05.678+02:00",
                      score=3.5, p_value=0.002, is_anomaly=True, warming_up=False,
                      neighbours=(Neighbour("e1", 0.5), Neighbour("e2", 0.75)), encoder="tab@1")
    a = Alert.from_anomaly(rec.to_dict(), generator_url="http://nwatch.local/events/e9")
    assert a.alertname == ANOMALY_ALERTNAME and a.kind == "transaction" and a.source == "pay"
    assert a.labels == {"alertname": ANOMALY_ALERTNAME, "source": "pay", "kind": "transaction",
                        "severity": "warning", "event_id": "e9"}
    assert a.starts_at == "2025-01-02T01:04:05.678Z"  # normalised to UTC
    assert "3.5" in a.annotations["description"] and "0.002" in a.annotations["description"]
    assert a.annotations["neighbours"] == "e1 (0.5), e2 (0.75)"
    assert a.annotations["encoder"] == "tab@1"
    assert a.generator_url == "http://nwatch.local/events/e9" and a.ends_at is None

    dr = DriftRecord(source="logs", kind="log", ts="2025-01-02T00:00:00Z", detected_at="l-77",
                     events_seen=77, statistic=12.0, threshold=8.0, reference_size=50,
                     window_size=20, encoder="logs@2", explanation={"exemplars": ["l-70", "l-75"]})
    d = Alert.from_drift(dr.to_dict(), severity="critical")
    assert d.alertname == DRIFT_ALERTNAME and d.severity == "critical" == d.labels["severity"]
    assert d.labels["detected_at"] == "l-77" and d.starts_at == "2025-01-02T00:00:00.000Z"
    assert "12" in d.annotations["description"] and "8" in d.annotations["description"]
    assert d.annotations["exemplars"] == "l-70, l-75"
    assert all(isinstance(v, str) for v in {**d.annotations, **d.labels}.values())


def test_anomaly_annotations_list_at_most_five_neighbours_and_epoch_ts_converts():
    a = Alert.from_anomaly(anomaly(ts=0))
    assert a.annotations["neighbours"].count("tx-n") == 5
    assert a.starts_at == "1970-01-01T00:00:00.000Z"


def test_json_round_trip():
    ended = Alert.from_drift(drift(), ends_at="2026-01-01T00:00:00Z")
    for a in (Alert.from_anomaly(anomaly(3)), ended):
        back = Alert.from_json(a.to_json())
        assert back == a and back.to_dict() == a.to_dict()
    assert Alert.from_json(a.to_json().decode()) == a
    newer = orjson.loads(a.to_json()) | {"added_later": 1}  # a newer writer's field is ignored
    assert Alert.from_json(orjson.dumps(newer)) == a


@pytest.mark.parametrize(
    "build",
    [
        lambda: Alert.from_anomaly({k: v for k, v in anomaly().items() if k != "id"}),
        lambda: Alert.from_anomaly(anomaly(ts="yesterday")),
        lambda: Alert.from_anomaly(anomaly(score="high")),
        lambda: Alert.from_anomaly(anomaly(is_anomaly=False)),
        lambda: Alert.from_anomaly(["not", "a", "dict"]),
        lambda: Alert.from_drift({k: v for k, v in drift().items() if k != "detected_at"}),
        lambda: Alert.from_json(b"{not json"),
        lambda: Alert.from_json(b'{"fingerprint": "f"}'),
        lambda: Alert.from_json(
            orjson.dumps({**Alert.from_anomaly(anomaly()).to_dict(), "labels": {"a": 1}})
        ),
    ],
)
def test_bad_records_raise_the_declared_error(build):
    with pytest.raises(InvalidAlertRecord):
        build()


# --------------------------------------------------------------------------- payloads (pure)


def test_webhook_payload_has_alertmanagers_shape():
    alerts = alerts_of(3)
    p = webhook_payload(alerts, receiver="team-x", external_url="http://nwatch:9650")
    assert p["version"] == "4" and p["status"] == "firing" and p["receiver"] == "team-x"
    assert p["externalURL"] == "http://nwatch:9650"
    assert p["groupLabels"] == {"alertname": ANOMALY_ALERTNAME, "source": "payments"}
    assert p["groupKey"] == '{}:{alertname="NeighbourwatchAnomaly", source="payments"}'
    assert p["commonLabels"] == {"alertname": ANOMALY_ALERTNAME, "source": "payments",
                                 "kind": "transaction", "severity": "warning"}  # event_id differs
    assert "summary" not in p["commonAnnotations"] and p["commonAnnotations"]["p_value"] == "0.0004"
    assert [a["fingerprint"] for a in p["alerts"]] == [a.fingerprint for a in alerts]
    for item, a in zip(p["alerts"], alerts):
        assert item.keys() == {"status", "labels", "annotations", "startsAt", "endsAt",
                               "generatorURL", "fingerprint"}
        assert item["status"] == "firing" and item["labels"] == a.labels
        assert item["startsAt"] == a.starts_at and item["endsAt"] == "0001-01-01T00:00:00Z"
    mixed = webhook_payload([alerts[0], Alert.from_drift(drift())])
    assert mixed["groupLabels"] == {} and mixed["commonLabels"] == {"severity": "warning"}


def test_webhook_id_is_the_fingerprint_or_a_stable_batch_id():
    alerts = alerts_of(3)
    assert webhook_id(alerts[:1]) == alerts[0].fingerprint
    batch = webhook_id(alerts)
    assert batch.startswith("batch_") and batch == webhook_id(alerts_of(3))
    assert batch != webhook_id(alerts[:2]) and batch != webhook_id(alerts[::-1])


def test_alertmanager_payload_fields_and_the_validator_can_fail():
    a = Alert.from_anomaly(
        anomaly(), generator_url="http://nwatch.local/e", ends_at="2030-01-01T00:00:00Z"
    )
    body = alertmanager_api_payload([a, Alert.from_drift(drift())])
    assert body[0] == {"labels": a.labels, "annotations": a.annotations, "startsAt": a.starts_at,
                       "endsAt": "2030-01-01T00:00:00Z", "generatorURL": "http://nwatch.local/e"}
    assert "endsAt" not in body[1] and "generatorURL" not in body[1]
    assert am_v2_errors(body) == []
    # The receiver's validator is not a rubber stamp.
    assert am_v2_errors([{"labels": {}}])
    assert am_v2_errors([{"labels": {"bad-name": "x"}, "startsAt": "2025-01-01 00:00"}])
    assert am_v2_errors([{**body[0], "endsAt": "2000-01-01T00:00:00Z"}])


# --------------------------------------------------------------------------- signing


def test_sign_reproduces_the_standard_webhooks_test_vector():
    # The vector published with the Standard Webhooks specification.
    sig = sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek",
               1614265330, b'{"test": 2432232314}')
    assert sig == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    headers = {"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "webhook-timestamp": "1614265330",
               "webhook-signature": sig}
    assert verify("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", headers, b'{"test": 2432232314}',
                  now=1614265330 + 10)
    assert not verify("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", headers, b'{"test": 2432232314}',
                      now=1614265330 + 301)  # outside the 5 minute tolerance
    assert verify("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                  # key rotation: one valid signature of several is enough
                  {**headers, "webhook-signature": "v1,b3RoZXI= " + sig},
                  b'{"test": 2432232314}', now=1614265330)
    with pytest.raises(ValueError):
        sign("whsec_not*base64", "id", 1, b"")


@pytest.mark.parametrize(
    "secret", ["plain shared secret ü", "whsec_" + base64.b64encode(os.urandom(32)).decode()]
)
def test_signed_webhook_verifies_at_the_receiver(make_receiver, secret):
    rec = make_receiver(secret=secret)
    hook = WebhookHook(url=rec.url + "/hook", secret=SecretStr(secret), timeout=5)
    alerts = alerts_of(2)

    async def go():
        try:
            await hook.deliver(alerts)
        finally:
            await hook.aclose()

    run(go())
    (call,) = rec.calls
    assert call.status == 200  # the receiver's own check passed
    assert set(rec.alerts) == {a.fingerprint for a in alerts}
    assert call.headers["webhook-id"] == webhook_id(alerts)
    assert abs(int(call.headers["webhook-timestamp"]) - time.time()) < 60
    assert verify(secret, call.headers, call.body)
    # Tampered body, wrong secret: both checks refuse.
    tampered = call.body.replace(b"payments", b"paymentz")
    assert tampered != call.body
    assert not verify(secret, call.headers, tampered)
    assert not receiver_signature_ok(secret, call.headers, tampered)
    assert not verify("another secret", call.headers, call.body)
    other = "whsec_" + base64.b64encode(b"k" * 32).decode()
    assert not receiver_signature_ok(other, call.headers, call.body)
    stale = {**call.headers, "webhook-timestamp": str(int(time.time()) - 3600)}
    assert not verify(secret, stale, call.body)  # the signature no longer matches, and it is stale


def test_whsec_secret_is_the_decoded_key_not_the_string():
    secret = "whsec_" + base64.b64encode(b"sixteen byte key").decode()
    body = b'{"x": 1}'
    assert sign(secret, "m", 5, body) != sign(secret[6:], "m", 5, body)
    mac = hmac.new(b"sixteen byte key", b"m.5." + body, hashlib.sha256)
    expected = base64.b64encode(mac.digest())
    assert sign(secret, "m", 5, body) == "v1," + expected.decode()


def test_wrong_secret_is_rejected_and_not_retried(make_receiver, caplog):
    rec = make_receiver(secret="the receiver's secret")
    t = FakeTime()
    dead: list[tuple] = []
    d = deliverer([WebhookHook(url=rec.url + "/hook", secret="not the secret", timeout=5)], t,
                  on_dead_letter=lambda *args: dead.append(args))

    async def go():
        async with d:
            return await d.deliver(alerts_of(1))

    report = run(go())
    assert [c.status for c in rec.calls] == [401] and t.sleeps == []
    assert report.delivered == {"webhook": 0} and report.dead_letters[0].code == "rejected"
    assert "401" in report.dead_letters[0].reason
    assert dead == [("webhook", report.dead_letters[0].alerts, report.dead_letters[0].reason)]


# --------------------------------------------------------------------------- Alertmanager


def test_alertmanager_accepts_the_v2_payload_with_basic_auth_from_the_url(make_receiver):
    rec = make_receiver(basic_auth="am-user:am p@ss")
    url = f"http://am-user:am%20p%40ss@127.0.0.1:{rec.port}/"
    hook = AlertmanagerHook(base_url=SecretStr(url), timeout=5)
    alerts = [*alerts_of(2), Alert.from_drift(drift(), generator_url="http://nwatch.local/drift")]
    t = FakeTime()
    d = deliverer([hook], t)

    async def go():
        async with d:
            return await d.deliver(alerts)

    report = run(go())
    assert report.is_complete and report.delivered == {"alertmanager": 3}
    assert [c.status for c in rec.calls] == [200] and rec.calls[0].path == "/api/v2/alerts"
    assert rec.am_alerts == alertmanager_api_payload(alerts)
    assert {a["labels"]["alertname"] for a in rec.am_alerts} == {ANOMALY_ALERTNAME, DRIFT_ALERTNAME}
    assert "am p@ss" not in repr(hook) and "am%20p%40ss" not in repr(hook)


def test_alertmanager_400_is_dead_lettered_with_its_message(make_receiver):
    rec = make_receiver()
    bad = Alert.from_anomaly(anomaly())
    bad = Alert(**{**bad.to_dict(), "labels": {**bad.labels, "bad-label": "x"}})
    t = FakeTime()
    d = deliverer([AlertmanagerHook(base_url=rec.url, timeout=5)], t)

    async def go():
        async with d:
            return await d.deliver([bad])

    report = run(go())
    assert len(rec.calls) == 1 and t.sleeps == []  # a 400 is not retried
    (dl,) = report.dead_letters
    assert dl.code == "rejected" and "HTTP 400" in dl.reason and "bad-label" in dl.reason


# --------------------------------------------------------------------------- retries


def test_5xx_is_retried_on_the_backoff_schedule(receiver):
    receiver.script.extend([500, 502, 503])
    t = FakeTime()
    outcomes: list[tuple] = []
    d = deliverer([WebhookHook(url=receiver.url + "/hook", timeout=5)], t,
                  on_outcome=lambda *a: outcomes.append(a))

    async def go():
        async with d:
            return await d.deliver(alerts_of(2))

    report = run(go())
    assert [c.status for c in receiver.calls] == [500, 502, 503, 200]
    assert t.sleeps == pytest.approx([0.1, 0.2, 0.4])  # base 0.1, doubling, no jitter
    assert report.is_complete and report.attempts == {"webhook": 4}
    assert outcomes == [("webhook", "retried", 2)] * 3 + [("webhook", "delivered", 2)]
    assert len(receiver.alerts) == 2


def test_backoff_is_capped(receiver):
    receiver.script.extend([503] * 5)
    t = FakeTime()
    d = deliverer([WebhookHook(url=receiver.url + "/hook", timeout=5)], t, max_attempts=6,
                  base_delay=0.25, max_delay=1.0)

    async def go():
        async with d:
            return await d.deliver(alerts_of(1))

    assert run(go()).is_complete
    assert t.sleeps == pytest.approx([0.25, 0.5, 1.0, 1.0, 1.0])


def test_retry_after_is_honoured_in_seconds_and_as_a_date_and_capped(receiver):
    soon = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=5), usegmt=True)
    receiver.script.extend([(429, {"Retry-After": "3"}), (503, {"Retry-After": soon}),
                            (429, {"Retry-After": "86400"}), 408])
    t = FakeTime()
    d = deliverer([WebhookHook(url=receiver.url + "/hook", timeout=5)], t, max_retry_after=20.0)

    async def go():
        async with d:
            return await d.deliver(alerts_of(1))

    assert run(go()).is_complete
    assert [c.status for c in receiver.calls] == [429, 503, 429, 408, 200]
    assert t.sleeps[0] == 3.0
    assert 3.0 <= t.sleeps[1] <= 5.5  # an HTTP date has 1 s resolution, and time passed
    assert t.sleeps[2] == 20.0  # a day, capped
    assert t.sleeps[3] == pytest.approx(0.8)  # 408 without Retry-After: plain backoff


def test_4xx_is_not_retried(receiver):
    receiver.script.extend([400])
    t = FakeTime()
    d = deliverer([WebhookHook(url=receiver.url + "/hook", timeout=5)], t)

    async def go():
        async with d:
            return await d.deliver(alerts_of(1))

    report = run(go())
    assert len(receiver.calls) == 1 and t.sleeps == []
    assert report.dead_letters[0].code == "rejected" and receiver.alerts == {}


def test_attempts_exhausted_are_dead_lettered_not_dropped(receiver):
    receiver.script.extend([503] * 10)
    t = FakeTime()
    dead: list[tuple] = []

    async def on_dead(hook, alerts, reason):  # an async callback is awaited
        await asyncio.sleep(0)
        dead.append((hook, alerts, reason))

    d = deliverer([WebhookHook(url=receiver.url + "/hook", timeout=5)], t, max_attempts=3,
                  on_dead_letter=on_dead)
    alerts = alerts_of(4)

    async def go():
        async with d:
            return await d.deliver(alerts)

    report = run(go())
    assert len(receiver.calls) == 3 and len(t.sleeps) == 2
    ((hook, got, reason),) = dead
    assert hook == "webhook" and got == tuple(alerts) and reason.startswith("attempts_exhausted")
    assert "HTTP 503" in reason and report.dead_letters[0].alerts == tuple(alerts)
    assert d.dead_lettered == {"webhook": 4}


def test_full_jitter_stays_below_the_capped_backoff():
    import random

    rng = random.Random(7)
    for failures in range(1, 9):
        cap = min(2.0, 0.1 * 2 ** (failures - 1))
        draws = [backoff_delay(failures, base_delay=0.1, max_delay=2.0, jitter=True, rng=rng)
                 for _ in range(400)]
        assert all(0.0 <= x <= cap for x in draws)
        assert 0.35 * cap < sum(draws) / len(draws) < 0.65 * cap  # uniform: mean cap/2
    floor = backoff_delay(1, base_delay=0.1, max_delay=2.0, jitter=True, rng=rng, retry_after=5.0)
    assert floor == 5.0


def test_parse_retry_after():
    assert parse_retry_after("120", now=0) == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 - 10) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 + 99) == 0.0
    assert parse_retry_after("soon", now=0) is None and parse_retry_after(None, now=0) is None
    assert parse_retry_after("-5", now=0) is None


def test_slow_receiver_times_out_and_is_retried(receiver):
    receiver.script.extend(["hang"])
    t = FakeTime()
    outcomes: list[tuple] = []
    # 0.5 s: long enough for a loopback answer on a loaded 2-core machine, short for the test.
    d = deliverer([WebhookHook(url=receiver.url + "/hook", timeout=0.5)], t,
                  on_outcome=lambda *a: outcomes.append(a))

    async def go():
        async with d:
            return await d.deliver(alerts_of(1))

    report = run(go())
    assert report.is_complete and report.attempts == {"webhook": 2}
    assert len(receiver.calls) == 2 and receiver.calls[1].status == 200
    assert outcomes == [("webhook", "retried", 1), ("webhook", "delivered", 1)]


# --------------------------------------------------------------------------- outages


def test_receiver_down_then_back_gets_every_alert_once(receiver):
    url = receiver.url + "/hook"
    receiver.down()  # port closed: connection refused

    def on_sleep(n: int) -> None:
        if n == 3:  # back after the third backoff
            receiver.up()
            # Two calls whose response is lost after the receiver took the alerts:
            # the client sends them again, the receiver must de-duplicate.
            receiver.script.extend(["accept_then_503", None, "accept_then_503"])

    t = FakeTime(on_sleep)
    d = deliverer([WebhookHook(url=url, secret="s3", timeout=5)], t, max_attempts=8)
    alerts = alerts_of(30)
    batches = [alerts[i : i + 3] for i in range(0, 30, 3)]

    async def go():
        async with d:
            return [await d.deliver(b) for b in batches]

    reports = run(go())
    assert all(r.is_complete for r in reports)
    assert set(receiver.alerts) == {a.fingerprint for a in alerts}  # every alert arrived
    assert receiver.duplicates == 2  # the two lost responses, sent again, recognised by webhook-id
    assert len(receiver.seen_ids) == len(batches)
    assert t.sleeps[:3] == pytest.approx([0.1, 0.2, 0.4])  # the refusals were retried
    assert d.delivered == {"webhook": 30}


def test_dead_letters_from_an_outage_are_all_delivered_when_resent(receiver):
    """Breaker open during the outage: alerts go to dead letters; re-sent later, none is lost."""
    url = receiver.url + "/hook"
    receiver.down()
    t = FakeTime()
    d = deliverer([WebhookHook(url=url, timeout=5)], t, max_attempts=2, breaker_failures=3,
                  breaker_reset=10.0)
    alerts = alerts_of(20)

    async def go():
        async with d:
            reports = [await d.deliver(alerts[i : i + 2]) for i in range(0, 20, 2)]
            receiver.up()
            t.now += 10.0  # breaker half-opens
            dead = [dl for r in reports for dl in r.dead_letters]
            resent = [await d.deliver(dl.alerts, only={dl.hook}, rate_limit=False) for dl in dead]
            return reports, dead, resent

    reports, dead, resent = run(go())
    codes = [dl.code for dl in dead]
    assert codes[:2] == ["attempts_exhausted", "breaker_open"]
    assert set(codes[2:]) == {"breaker_open"}
    assert sum(len(dl.alerts) for dl in dead) == 20  # nothing delivered, nothing dropped
    assert all(r.is_complete for r in resent)
    assert set(receiver.alerts) == {a.fingerprint for a in alerts}
    assert d.breaker("webhook").state == "closed"


def test_circuit_breaker_opens_and_half_opens(receiver):
    receiver.script.extend([503, 503, 503, 503])
    t = FakeTime()
    outcomes: list[tuple] = []
    d = deliverer([WebhookHook(url=receiver.url + "/hook", timeout=5)], t, max_attempts=1,
                  breaker_failures=3, breaker_reset=30.0, on_outcome=lambda *a: outcomes.append(a))
    b = d.breaker("webhook")

    async def go():
        async with d:
            codes = []
            for _ in range(4):
                codes.append((await d.deliver(alerts_of(1))).dead_letters[0].code)
            assert codes == ["attempts_exhausted"] * 3 + ["breaker_open"]
            assert len(receiver.calls) == 3 and b.state == "open"  # 4th call never left
            t.now += 29.0
            assert b.state == "open"
            t.now += 1.0
            assert b.state == "half_open"
            # The trial fails (4th scripted 503): open again for another 30 s.
            assert (await d.deliver(alerts_of(1))).dead_letters[0].code == "attempts_exhausted"
            assert len(receiver.calls) == 4 and b.state == "open"
            assert (await d.deliver(alerts_of(1))).dead_letters[0].code == "breaker_open"
            t.now += 30.0
            assert (await d.deliver(alerts_of(1))).is_complete  # the trial succeeds: closed
            assert b.state == "closed" and b.consecutive_failures == 0
            assert (await d.deliver(alerts_of(1))).is_complete

    run(go())
    assert len(receiver.calls) == 6
    assert ("webhook", "breaker_open", 1) in outcomes


def test_half_open_breaker_lets_one_trial_through():
    now = [0.0]
    b = CircuitBreaker(failures=2, reset=5.0, clock=lambda: now[0])
    assert b.allow() and b.state == "closed"
    b.record_failure()
    assert b.state == "closed"
    b.record_failure()
    assert b.state == "open" and not b.allow()
    now[0] = 5.0
    assert b.allow() and not b.allow()  # one trial at a time
    b.abandon()
    assert b.allow()
    b.record_success()
    assert b.state == "closed" and b.allow() and b.allow()


def test_a_cancelled_trial_frees_the_half_open_breaker():
    class Stuck:
        name = "stuck"
        calls = 0
        up = False

        async def deliver(self, alerts):
            self.calls += 1
            if not self.up:
                raise DeliveryError("down", retryable=True)
            await asyncio.Event().wait()  # up, but never answers

    hook, t = Stuck(), FakeTime()
    d = deliverer([hook], t, max_attempts=1, breaker_failures=1, breaker_reset=5.0)
    breaker = d.breaker("stuck")

    async def go():
        await d.deliver(alerts_of(1))
        assert breaker.state == "open"
        t.now += 5.0
        hook.up = True
        trial = asyncio.create_task(d.deliver(alerts_of(1)))
        while hook.calls < 2:
            await asyncio.sleep(0)
        # While the trial is out, other batches are refused, not sent.
        assert (await d.deliver(alerts_of(1))).dead_letters[0].code == "breaker_open"
        assert hook.calls == 2
        trial.cancel()
        with pytest.raises(asyncio.CancelledError):
            await trial
        assert breaker.state == "half_open" and breaker.allow()

    run(go())


# --------------------------------------------------------------------------- rate limit, isolation


def test_rate_limit_per_source_suppresses_and_counts(receiver):
    t = FakeTime()
    suppressed: list[tuple] = []
    outcomes: list[tuple] = []
    d = deliverer([WebhookHook(url=receiver.url + "/hook", timeout=5)], t, rate_limit_per_source=6,
                  on_suppressed=lambda s, a: suppressed.append((s, a)),
                  on_outcome=lambda *a: outcomes.append(a))
    pay, logs = alerts_of(10, "payments"), alerts_of(3, "logs")

    async def go():
        async with d:
            first = await d.deliver(pay + logs)
            t.now += 20.0  # 6 per minute: two tokens back
            second = await d.deliver(alerts_of(13, "payments")[10:])
            return first, second

    first, second = run(go())
    assert first.delivered == {"webhook": 9}  # 6 of payments (the burst) + all 3 of logs
    assert first.suppressed == tuple(pay[6:])
    assert suppressed[0] == ("payments", tuple(pay[6:]))
    assert second.delivered == {"webhook": 2} and len(second.suppressed) == 1
    assert d.suppressed == {"payments": 5}
    assert ("webhook", "suppressed", 4) in outcomes
    assert len(receiver.alerts) == 11


def test_a_broken_hook_does_not_stop_the_others(receiver):
    class Broken:
        name = "broken"

        async def deliver(self, alerts):
            raise RuntimeError("bug in a hook")

    class Down:
        name = "down"

        async def deliver(self, alerts):
            raise DeliveryError("refused", retryable=True)

    t = FakeTime()
    d = deliverer([Broken(), Down(), WebhookHook(url=receiver.url + "/hook", timeout=5)], t,
                  max_attempts=2)

    async def go():
        async with d:
            return await d.deliver(alerts_of(2))

    report = run(go())
    assert report.delivered == {"broken": 0, "down": 0, "webhook": 2}
    codes = {dl.hook: dl.code for dl in report.dead_letters}
    assert codes == {"broken": "error", "down": "attempts_exhausted"}
    with pytest.raises(ValueError):
        Deliverer(hooks=[Broken(), Broken()])


# --------------------------------------------------------------------------- secrets


def test_credentials_are_masked(caplog):
    url = "http://nw-user:s3cr3t-pw@127.0.0.1:9/hook?token=t0k3n-value"
    hook = WebhookHook(url=url, secret="whsec_" + base64.b64encode(b"topsecretkey").decode())
    am = AlertmanagerHook(base_url="https://am:am-pw-42@127.0.0.1:9")
    secrets = ("s3cr3t-pw", "nw-user", "t0k3n-value", "am-pw-42", "dG9wc2VjcmV0a2V5")
    t = FakeTime()
    d = deliverer([hook, am], t, max_attempts=2)
    shown = [repr(hook), str(hook), repr(am), str(am), repr(d), hook.display_url]
    assert mask_url(url) == "http://***@127.0.0.1:9/hook?token=***"

    async def go():  # port 9 is closed: connection refused, retried, dead-lettered
        async with d:
            return await d.deliver(alerts_of(1))

    with caplog.at_level(logging.DEBUG, logger="streams.alerts"):
        report = run(go())
    assert {dl.code for dl in report.dead_letters} == {"attempts_exhausted"}
    shown += [dl.reason for dl in report.dead_letters] + [caplog.text]
    assert "127.0.0.1:9" in caplog.text  # the log does name the target...
    for text in shown:
        for s in secrets:
            assert s not in text, (s, text)  # ...but none of its secrets


def test_hooks_from_settings():
    assert hooks_from_settings(AlertsSettings()) == []
    hooks = hooks_from_settings(AlertsSettings(
        webhook_url="http://u:pw@127.0.0.1:1/h",
        webhook_secret="k",
        alertmanager_url="http://127.0.0.1:2/am/",
    ))
    assert [h.name for h in hooks] == ["webhook", "alertmanager"]
    assert hooks[0].is_signed and "pw" not in repr(hooks[0])
    assert hooks[1].display_url == "http://127.0.0.1:2/am/api/v2/alerts"
    with pytest.raises(ValueError):
        hooks_from_settings(
            AlertsSettings(webhook_url="http://127.0.0.1:1/h", webhook_secret="whsec_@@")
        )
