# Two commands do everything (see README):
#   make lab    set up .venv if needed, then open the course in JupyterLab
#   make test   set up .venv if needed, then run every test and every notebook
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.llmlab-installed

.PHONY: lab test setup notebooks bench clean

setup: $(STAMP)

# torch is installed first and pinned, so that nothing later pulls a CUDA build.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[lab,test]'
	@touch $(STAMP)

# Jupyter refuses to run as root unless told; containers often run as root.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab $(ROOT_FLAG) course/

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile --nbval-lax tests course

# Re-execute every notebook in place (full mode) so that the committed outputs are fresh,
# then merge the many small outputs that streamed prints leave behind.
notebooks: $(STAMP)
	LLMLAB_FAST=0 $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=1800 course/*.ipynb
	$(VENV)/bin/jupyter nbconvert --to notebook --inplace --coalesce-streams course/*.ipynb

bench: $(STAMP)
	$(PY) -m llmlab.bench all

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
