# One place for the commands people and CI run (CI: .ci/run -> make test).
.PHONY: setup test check faults soak demo bench clean

setup:
	@scripts/bootstrap

check: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

test: check
	.venv/bin/pytest

soak: setup
	.venv/bin/pytest -m soak

faults: setup
	.venv/bin/pytest -m faults

demo: setup
	.venv/bin/python -m tools.demo

bench: setup
	.venv/bin/python -m bench

clean:
	rm -rf .venv var .pytest_cache .mypy_cache .ruff_cache
