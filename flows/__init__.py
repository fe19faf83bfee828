"""Orchestration: Prefect flows that run the DVC stages in steps/ as separately retried tasks."""
