"""Keeping Spaces running: reconcile, health, sleep/wake, updates, housekeeping, scheduler."""
