"""Test-only helpers (tiny problem objects, train-step setups); never imported by the package."""
