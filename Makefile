# `make demo` and `make test` work from a clean clone: each sets up what it needs first.
.PHONY: setup demo test lint stop clean

setup:
	scripts/setup.sh

demo: setup
	scripts/demo.sh

test:
	scripts/setup.sh --test
	.venv/bin/ruff check servetool handlers tests models benchmarks
	.venv/bin/python -m pytest -q -rs --durations=6

lint:
	.venv/bin/ruff check servetool handlers tests models benchmarks

stop:
	.venv/bin/servetool stop

clean: stop
	rm -rf .servetool model_store/*.mar
