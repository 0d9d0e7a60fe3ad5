# Developer shortcuts; scripts/test.sh is the full check.
PYTHON ?= python3
SECONDS ?= 60
RSS_LIMIT_MB ?= 2048

.PHONY: test fuzz fuzz-smoke fuzz-seeds

test:
	bash scripts/test.sh

# Every atheris harness for $(SECONDS) s each: make fuzz SECONDS=600
fuzz:
	SECONDS_PER_HARNESS=$(SECONDS) RSS_LIMIT_MB=$(RSS_LIMIT_MB) PYTHON=$(PYTHON) fuzz/run.sh

# The bounded run CI does (a few seconds per harness).
fuzz-smoke:
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/test_fuzz_smoke.py

# Rebuild corpus/fuzz_*/ with qemu-img.
fuzz-seeds:
	$(PYTHON) fuzz/make_seeds.py
