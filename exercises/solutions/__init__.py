"""Reference solutions of the exercises, written naively for reading; CI checks them with tests/test_exercises.py."""
