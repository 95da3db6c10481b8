"""The shell: CLI, replay, Kafka, metrics, alert hooks. Everything with a side effect lives here."""
