from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from detectors.monitor import SourceMonitor
from streams.config import Settings, load_settings


def test_defaults_match_the_design_contract(monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith("NWATCH_"):
            monkeypatch.delenv(name)
    s = Settings()
    assert s.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert (s.metrics.host, s.metrics.port) == ("127.0.0.1", 9650)
    assert s.kafka.input_topics == ("nwatch.events",)
    assert (s.kafka.scores_topic, s.kafka.anomalies_topic, s.kafka.drift_topic, s.kafka.alerts_topic,
            s.kafka.dlq_topic) == ("nwatch.scores", "nwatch.anomalies", "nwatch.drift", "nwatch.alerts", "nwatch.dlq")
    assert s.alerts.webhook_url is None and s.alerts.alertmanager_url is None


def test_environment_overrides_the_config_file_and_sources_inherit_defaults(tmp_path, monkeypatch):
    conf = tmp_path / "nwatch.toml"
    conf.write_text(
        'batch_size = 64\n[defaults]\nk = 7\nalpha = 0.02\n[sources.cards]\nkind = "transaction"\nalpha = 0.005\n'
        '[kafka]\nbootstrap_servers = "file:1"\n'
    )
    monkeypatch.setenv("NWATCH_KAFKA__BOOTSTRAP_SERVERS", "env:9")
    monkeypatch.setenv("NWATCH_DEFAULTS__K", "5")
    s = load_settings(conf)
    assert s.kafka.bootstrap_servers == "env:9"  # environment over file
    assert s.batch_size == 64 and s.defaults.alpha == 0.02
    cards = s.source("cards", "transaction")
    assert (cards.kind, cards.alpha, cards.k) == ("transaction", 0.005, 5)
    assert s.source("other", "log") == s.defaults
    with pytest.raises(ValidationError):
        Settings(defaults={"alpha": 1.5})
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.toml")


def test_secrets_are_masked_wherever_settings_are_printed(monkeypatch):
    monkeypatch.setenv("NWATCH_ALERTS__WEBHOOK_SECRET", "whsec_c2VjcmV0LWtleQ==")
    monkeypatch.setenv("NWATCH_ALERTS__WEBHOOK_URL", "https://user:hunter2@hooks.example/x")
    monkeypatch.setenv("NWATCH_KAFKA__SASL_PASSWORD", "kafka-pass")
    s = Settings()
    for text in (repr(s), str(s), json.dumps(s.masked())):
        assert "hunter2" not in text and "kafka-pass" not in text and "c2VjcmV0" not in text
    out = subprocess.run([sys.executable, "-m", "streams.cli", "config"], capture_output=True, text=True,
                         timeout=60, env={**__import__("os").environ})
    assert out.returncode == 0
    assert "hunter2" not in out.stdout and "kafka-pass" not in out.stdout and "**********" in out.stdout
    assert s.alerts.webhook_secret.get_secret_value() == "whsec_c2VjcmV0LWtleQ=="


def test_admit_repeats_defaults_by_kind_and_a_setting_overrides_it():
    s = Settings(sources={"fw": {"admit_repeats": 0}, "cards": {"admit_repeats": 4}})
    assert s.source("syslog", "log").monitor_kwargs("log")["admit_repeats"] == 3
    assert s.source("tx", "transaction").monitor_kwargs("transaction")["admit_repeats"] == 0
    assert s.source("fw", "log").monitor_kwargs("log")["admit_repeats"] == 0
    assert s.source("cards", "transaction").monitor_kwargs("transaction")["admit_repeats"] == 4
    with pytest.raises(ValidationError):
        Settings(defaults={"admit_repeats": -1})


def test_forest_is_the_transaction_default_a_setting_overrides_it_and_it_reaches_the_monitor():
    s = Settings(sources={"cards": {"forest_trees": 100}, "plain": {"forest_trees": 0}})
    assert s.source("tx", "transaction").monitor_kwargs("transaction")["forest_trees"] == 50
    for kind in ("log", "text", "audio", "vector"):
        assert s.source("tx", kind).monitor_kwargs(kind)["forest_trees"] == 0
    kwargs = s.source("cards", "transaction").monitor_kwargs("transaction")
    assert kwargs["forest_trees"] == 100
    assert SourceMonitor(**kwargs).forest.trees == 100
    assert SourceMonitor(**s.source("plain", "transaction").monitor_kwargs("transaction")).forest is None
    with pytest.raises(ValidationError):
        Settings(defaults={"forest_trees": -1})


def test_a_mahalanobis_source_drops_its_kinds_trees_and_repeats_and_conflicts_fail_when_read():
    s = Settings(sources={"bert": {"scorer": "mahalanobis"}})
    for kind in ("transaction", "log", "vector"):  # trees by default for transactions, repeats for logs
        kw = s.source("bert", kind).monitor_kwargs(kind)
        assert (kw["scorer"], kw["forest_trees"], kw["admit_repeats"]) == ("mahalanobis", 0, 0)
    assert Settings().source("x", "log").monitor_kwargs("log")["admit_repeats"] > 0  # the kind's default stays
    with pytest.raises(ValidationError, match="neither forest_trees"):
        Settings(sources={"bert": {"scorer": "mahalanobis", "forest_trees": 5}})
    with pytest.raises(ValidationError, match="source 'bert' over the defaults"):
        Settings(defaults={"admit_repeats": 3}, sources={"bert": {"scorer": "mahalanobis"}})
