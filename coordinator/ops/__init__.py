"""Operator surfaces: the API, the status page, Prometheus metrics and the latency probe."""
