"""The test suite: one folder per package layer (see docs/testing.md); shared fixtures in conftest."""
