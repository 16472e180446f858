# Two commands set up and exercise everything on a fresh machine:
#   make demo   - install into .venv, then make data, train on 2 ranks, convert, generate
#   make test   - install into .venv, then run the whole test suite (all but the chaos soak)
#   make chaos  - the chaos soak on the local Slurm cluster (about 3 minutes; CI runs it after make test)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The torch to install when none is importable. On a CUDA cluster, bring your own torch
# (it is kept); on a machine without CUDA this pin resolves to the CPU build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test chaos bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) VENV=$(VENV) TORCH_SPEC='$(TORCH_SPEC)' bash scripts/install.sh
	touch $@

demo: install
	$(PY) -m launcher.demo

test: install
	$(PY) -m pytest -q -m "not chaos" tests

chaos: install
	$(PY) -m pytest -q -s -m chaos tests

bench: install
	$(PY) bench/data_throughput.py
	$(PY) bench/tp_step.py
	$(PY) bench/export_memory.py
	$(PY) bench/step.py
	$(PY) bench/t5_step_time.py
	$(PY) bench/prepare_throughput.py
	$(PY) bench/tar_reader.py
	$(PY) bench/packing_loss.py
	$(PY) bench/pack_attention_step.py
	$(PY) bench/precision.py
	$(PY) bench/inference.py

clean:
	rm -rf runs/demo
