"""Helpers for the tests: fake upstreams, clocks, stores, the CLI harness, the config builder."""
