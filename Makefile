# The two commands of the README: `make run` and `make test`. Both create .venv on first use.
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.llmpipe-installed
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: run chat test test-unit test-integration test-e2e lint lock clean chromium postgresql

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: an open range could pull a multi-GB CUDA build onto a CPU machine.
	$(BIN)/python -m pip install --quiet -c constraints.txt "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)  ## fine-tune the embedded default (or your params.yaml) end to end
	$(BIN)/llmpipe run

# The embedded chat example: SmolLM2-135M-Instruct with LoRA on questions about the standard library.
# Like every `llmpipe run -S`, it leaves params.yaml set to these values after a run that succeeds.
CHAT_EXAMPLE := -S prepare.data=data/raw/stdlib_qa.jsonl -S prepare.block_size=256 \
	-S prepare.test_fraction=0.05 -S train.method=lora -S train.learning_rate=1e-3 \
	-S train.max_steps=24
chat: $(STAMP)  ## fine-tune the embedded chat example with LoRA end to end
	$(BIN)/llmpipe run $(CHAT_EXAMPLE)

# Lint first (seconds); then every tier in a random order (pytest-randomly prints the seed:
# PYTEST_ARGS=--randomly-seed=N repeats an order, -p no:randomly keeps file order), on two
# pytest-xdist workers, each test file on one worker (--dist loadfile: the README walk's tests share
# its fixed ports and a module's tests share its fixtures), OMP_NUM_THREADS=1 (two workers of two
# threads each oversubscribed the 2 cores; the train stage honours it too). Measured on 2 cores:
# one process 1,552 s, two workers 895 s (1,045 s while the train stage still took every core;
# 1,251 s with loadgroup, whose groups pytest 9 ignores: the walk ran on both).
# TEST_WORKERS=0: one process.
# gpu tests run wherever CUDA is present.
TEST_WORKERS ?= 2
PYTEST_ARGS  ?=
test: $(STAMP) chromium postgresql lint  ## lint, then unit, integration, e2e (and gpu) tiers
	$(if $(filter 0,$(TEST_WORKERS)),,OMP_NUM_THREADS=1) $(BIN)/python -m pytest \
	  -m "unit or integration or e2e or gpu" -n $(TEST_WORKERS) --dist loadfile -v \
	  --durations=40 $(PYTEST_ARGS)

# The Prefect UI test drives Debian's chromium (playwright itself downloads nothing).
chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: install chromium (e.g. sudo apt-get install chromium) for the browser test"; fi; }

# The shared-servers test starts a PostgreSQL of its own (initdb in a temporary directory) from
# Debian's server programs, which live in /usr/lib/postgresql/<major>/bin.
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else echo "note: install PostgreSQL (e.g. sudo apt-get install postgresql) for the shared-servers test"; fi; }

test-unit: $(STAMP)
	$(BIN)/python -m pytest -m unit -q

test-integration: $(STAMP)
	$(BIN)/python -m pytest -m integration -v

test-e2e: $(STAMP)
	$(BIN)/python -m pytest -m e2e -v

lint: $(STAMP)  ## ruff check + ruff format --check, one line length (pyproject.toml)
	$(BIN)/ruff check steps flows tests benchmarks
	$(BIN)/ruff format --check steps flows tests benchmarks

lock: $(STAMP)  ## re-pin constraints.txt to what is installed now
	{ echo "# Versions the tests ran with (pip freeze). \`make\` installs with -c constraints.txt; refresh with \`make lock\`."; \
	  $(BIN)/python -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu/torch==\1/'; } > constraints.txt
	touch $(STAMP)  # the venv is what constraints.txt now says: nothing to reinstall

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
