"""Captioning-preparation tools: WD14 tagging, metadata JSON merge/clean (spec utilities §2-§5)."""
