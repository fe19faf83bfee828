"""Orchestration: Prefect flows that run the DVC stages in steps/ as separately retried tasks."""

import steps  # noqa: F401  (first: starts the LLMPIPE_PROFILE_DIR sampler before Prefect loads)
