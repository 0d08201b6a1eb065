"""Retryable Prefect tasks, thin, grouped by the system they touch."""
