"""Classroom exercises: stubs to fill in (ex*.py), checks against the project's code (checks.py). See README.md."""
