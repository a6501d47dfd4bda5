"""Fuzzing harnesses: schemathesis hooks for the HTTP API, atheris targets for the parsers."""
