"""Orchestration: options checked before work (preflight, dry run), the runner of each trainer kind, the steps they share."""
