# `make demo` and `make test` each do everything on a fresh machine:
# create .venv if missing, install, run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
AZURITE := .tools/node_modules/.bin/azurite-blob
AZURITE_VERSION := 3.35.0
S3RVER := .tools/node_modules/.bin/s3rver
S3RVER_VERSION := 3.7.1

.PHONY: demo test lint install clean bench

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

# Azurite, the Azure Blob emulator the tests start, and s3rver, an S3 endpoint that ignores
# If-None-Match (which ckpt must refuse): npm; the GCS emulators come with pip
$(AZURITE):
	npm install --silent --no-audit --no-fund --prefix .tools azurite@$(AZURITE_VERSION)

$(S3RVER):
	npm install --silent --no-audit --no-fund --prefix .tools s3rver@$(S3RVER_VERSION)

install: $(STAMP) $(AZURITE) $(S3RVER)

demo: $(STAMP)
	$(BIN)/python examples/ray_demo.py

test: $(STAMP) $(AZURITE) $(S3RVER)
	$(BIN)/ruff check ckpt tests examples benchmarks fuzz
	$(BIN)/mypy
	CKPT_REQUIRE_EMULATORS=1 $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check ckpt tests examples benchmarks fuzz
	$(BIN)/ruff format --check ckpt tests examples benchmarks
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache
