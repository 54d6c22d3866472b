"""The coordinator as a long-lived service: SuperLink supervision, enrollment, jobs.

Reading order: `config` (coordinator.toml) -> `service` (starts and watches
flower-superlink) -> `gatekeeper` (what the SuperLink lets through, and the
audit trail of node connections) -> `enrollment` (which node keys may join)
-> `jobs` (runs submitted through Flower's Control API).
"""
