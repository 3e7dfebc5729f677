# Two commands a new user needs; each sets up what it uses (idempotent).
#   make demo   the whole method on scikit-learn's digits, on this machine
#   make test   the test suite (starts a real local Slurm cluster; needs root for apt-get)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.msscale-installed
DEMO_OUT ?= runs/demo

.PHONY: demo test lint venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/msscale demo --out $(DEMO_OUT) $(if $(DEMO_QUICK),--quick)

lint: $(STAMP)
	$(VENV)/bin/ruff check msscale tools tests

test: $(STAMP)
	bash scripts/install_slurm.sh
	$(VENV)/bin/ruff check msscale tools tests
	$(VENV)/bin/pytest -q -p no:cacheprovider
