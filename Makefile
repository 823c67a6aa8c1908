# `make test` and `make experiment` work on a fresh clone: both install into .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install test test-slow experiment experiment-remote clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q "setuptools<81" wheel
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

test-slow: $(STAMP)
	$(BIN)/pip install -q -e ".[test,browser]"
	$(BIN)/python -m pytest -q -m slow tests

# The main job. Overrides, none required: WEIGHTS, DATA, IMGSZ, BUDGET ("--set key=value ..."), PORT, and PRIOR (a
# `python -m compression history` file: earlier trials the tuner knows before its first draw).
PORT    ?= 8080
experiment: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" \
	$(if $(WEIGHTS),YC_WEIGHTS="$(abspath $(WEIGHTS))") $(if $(DATA),YC_DATA="$(abspath $(DATA))") \
	$(if $(IMGSZ),YC_IMGSZ="$(IMGSZ)") $(if $(BUDGET),YC_BUDGET="$(BUDGET)") $(if $(PRIOR),YC_PRIOR="$(abspath $(PRIOR))") \
	$(BIN)/nnictl create --config experiment.yml --port $(PORT)
	@echo "dashboard: http://localhost:$(PORT)   best model: $(BIN)/python -m compression best --experiment <ID> --out best.onnx"

# The same search on other machines over SSH (experiment.remote.yml says what each worker needs). Required: SHARED,
# a folder every machine mounts at the same path; HOSTS="user@host[:port] ..." unless experiment.remote.yml lists
# them. Optional: MANAGER_IP, KEY, WORKER_PYTHON, PORT, WEIGHTS/DATA/IMGSZ/BUDGET as above, and CHECK=1 (check the
# workers, start nothing).
experiment-remote: $(STAMP)
	@test -n "$(SHARED)" || { echo "error: SHARED=/path/mounted/on/every/machine is required" >&2; exit 2; }
	PATH="$(CURDIR)/$(BIN):$$PATH" \
	$(if $(WEIGHTS),YC_WEIGHTS="$(abspath $(WEIGHTS))") $(if $(DATA),YC_DATA="$(abspath $(DATA))") \
	$(if $(IMGSZ),YC_IMGSZ="$(IMGSZ)") $(if $(BUDGET),YC_BUDGET="$(BUDGET)") \
	$(BIN)/python -m compression remote --shared "$(SHARED)" --port $(PORT) $(if $(HOSTS),--hosts "$(HOSTS)") \
	$(if $(MANAGER_IP),--manager-ip "$(MANAGER_IP)") $(if $(KEY),--key "$(KEY)") \
	$(if $(WORKER_PYTHON),--python "$(WORKER_PYTHON)") $(if $(CHECK),--check)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
