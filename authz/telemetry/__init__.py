"""Metrics (Prometheus text on /metrics) and logging set-up."""
