# Set-up is two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HQ := $(VENV)/bin/hybridq
DEMO := examples/demo

.PHONY: install demo test test-slow bench bench-quick clean

# PYTHONWARNINGS hides setuptools' 10-line "Editable installation" notice, printed on every editable install; it needs no action.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet -e '.[test,ray]'
	# bytecode for the editable sources, as pip writes for an installed wheel (PYTHONDONTWRITEBYTECODE=1 never
	# writes it): compiling them on every `hybridq` run cost step1 0.1-0.4 s
	$(PY) -m compileall -q hybridq
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) examples/build_demo.py $(DEMO)
	$(HQ) step1 $(DEMO)/demo_cnn.onnx --dataset $(DEMO)/dataset.txt --mean 127.5 --std 127.5 --out $(DEMO)/out
	$(HQ) step2 $(DEMO)/out/demo_cnn.model $(DEMO)/out/demo_cnn.data $(DEMO)/out/demo_cnn.quantization.cfg -o $(DEMO)/out/demo_cnn.q.onnx
	$(HQ) analyze $(DEMO)/demo_cnn.onnx $(DEMO)/out/demo_cnn.q.onnx --dataset $(DEMO)/eval.txt --dump $(DEMO)/out/snapshot

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	$(PY) bench/run.py
	$(PY) bench/plain_cnn.py
	$(PY) bench/int4.py
	$(PY) bench/recurrent.py
	$(PY) bench/cost.py
	$(PY) bench/npu.py
	$(PY) bench/task_metric.py
	$(PY) bench/scale.py
	$(PY) bench/bench_analyze.py --models cls,rec,det --rounds 5

bench-quick: $(VENV)/.installed
	$(PY) bench/run.py --quick

clean:
	rm -rf $(VENV) $(DEMO)/out .pytest_cache
