# gemma4vl: the two commands a newcomer needs are `make demo` and `make test`.
# Both create .venv (Python 3.12) on first use and install the pinned dependency set; the install is recorded in a
# stamp file that depends on the requirement files, so a second run installs nothing.

VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.gemma4vl-installed
REQS      := requirements/torch.txt requirements/base.txt requirements/no-deps.txt pyproject.toml
PIP       := $(PY) -m pip --disable-pip-version-check
# --durations: the CI log names the 20 slowest tests, to keep the default run well under 30 minutes.
PYTEST_ARGS ?= --durations=20

.PHONY: demo test test-slow test-all env clean-venv

env: $(STAMP)

$(PY):
	@py312=$$(tools/find-python312.sh) && echo "creating $(VENV) with $$py312" && "$$py312" -m venv $(VENV)

$(STAMP): $(PY) $(REQS)
	$(PIP) install -q -r requirements/torch.txt
	$(PIP) install -q -r requirements/base.txt
	$(PIP) install -q --no-deps -r requirements/no-deps.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) -m gemma4vl.runtime.check_env
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m recipes.demo

# Default run: everything but `slow` and `gpu` tests (CI runs this).
test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

# On a GPU machine: everything, the CUDA paths included.
test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
