# Two commands do everything (see README):
#   make lab    set up .venv if needed, then open the course in JupyterLab
#   make test   set up .venv if needed, then run every test and every notebook (twice: the second
#               time on PyTorch's portable kernels), and the browser test when Chromium is present
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.llmlab-installed

.PHONY: lab test test-portable test-ui setup notebooks bench clean

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

# 1. unit tests and every notebook under nbval (fast mode under CI=true);
# 2. every notebook again, whole, on PyTorch's portable kernels with one thread, as another CPU would
#    compute — with each exercise's solution and a wrong answer run after its cell (tests/test_exercises.py);
# 3. the widgets in a real browser, or a clear line saying why not.
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile --nbval-lax --ignore=tests/ui -m "not notebook_run" tests course
	@$(MAKE) --no-print-directory test-portable
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory test-ui; \
	else \
		echo "make test: SKIPPED the browser test (tests/ui): chromium and chromedriver are not installed."; \
		echo "           Install them (Debian/Ubuntu: apt-get install chromium chromium-driver), then: make test-ui"; \
	fi

test-portable: $(STAMP)
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist load -p no:cacheprovider \
		-m notebook_run tests/test_exercises.py

test-ui: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider tests/ui

# Re-execute every notebook in place (full mode) so that the committed outputs are fresh,
# then merge the many small outputs that streamed prints leave behind, and drop live widgets that
# cannot run unexecuted (the explorers leave a static preview beside them).
notebooks: $(STAMP)
	LLMLAB_FAST=0 $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=1800 course/*.ipynb
	$(VENV)/bin/jupyter nbconvert --to notebook --inplace --coalesce-streams course/*.ipynb
	$(PY) -m llmlab.strip_widgets course/*.ipynb

bench: $(STAMP)
	$(PY) -m llmlab.bench all

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
