# reflow developer tasks.  `make test` is the README's test command.
PYTHON ?= python3

.PHONY: test lint example bench ci schedulers

test:
	$(PYTHON) test_reflow.py

lint:
	ruff check reflow.py test_reflow.py ci bench examples
	vermin --target=3.9- --no-tips --violations --eval-annotations reflow.py
	$(PYTHON) -m mypy --python-version 3.9 --ignore-missing-imports reflow.py

example:
	PYTHONPATH=$(CURDIR) $(PYTHON) examples/fanout.py submit --executor local --run-dir /tmp/reflow-demo --n 20 --wait

bench:
	bench/run

schedulers:
	bash ci/schedulers-up.sh

ci:
	bash .ci/run
