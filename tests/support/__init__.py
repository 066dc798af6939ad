"""Helpers the tests run or import: the fork server for crash tests and what its children run."""
