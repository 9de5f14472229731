# Two commands: `make demo` and `make test`. Both set everything up from a fresh machine:
# uv (bootstrapped with pip when missing), .venv from uv.lock, then the job.
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo
JOBS ?= 2

.PHONY: setup demo test clean bench

$(BIN)/.synced: pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) sync --frozen
	@touch $@

setup: $(BIN)/.synced

demo: setup
	rm -rf $(DEMO)
	$(BIN)/dataprep sample --out $(DEMO)/raw
	$(BIN)/dataprep build --dataset 300w_lp  --protocol 1 --root $(DEMO)/raw/300W_LP  --out $(DEMO)/shards/300w_lp-p1  --jobs $(JOBS) --no-progress
	$(BIN)/dataprep build --dataset aflw2000 --protocol 1 --root $(DEMO)/raw/AFLW2000 --out $(DEMO)/shards/aflw2000-p1 --jobs $(JOBS) --no-progress
	$(BIN)/dataprep build --dataset biwi     --protocol 2 --root $(DEMO)/raw/hpdb     --out $(DEMO)/shards/biwi-p2     --jobs $(JOBS) --device cpu --no-progress
	$(BIN)/dataprep verify $(DEMO)/shards/300w_lp-p1
	$(BIN)/dataprep verify $(DEMO)/shards/aflw2000-p1
	$(BIN)/dataprep verify $(DEMO)/shards/biwi-p2
	$(BIN)/dataprep audit $(DEMO)/shards/aflw2000-p1 --report $(DEMO)/audit-aflw2000
	@echo "demo shards in $(DEMO)/shards/, audit report in $(DEMO)/audit-aflw2000/report.html"

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

bench: setup
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(DEMO) .pytest_cache
