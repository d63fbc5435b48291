# The two commands in the README are `make demo` (the whole loop once) and `make test` (every test).
# Both do all set-up first: a virtual environment with plain pip (see README "Set-up" for why pip).

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[all]'
	touch $(STAMP)

setup: $(STAMP)

## The whole loop once, on the embedded default: ingest a labeled folder, hold out some of its items as new
## photos, train on the rest, deploy, sort the new photos (NEW = LABELED) or NEW, start the local Label Studio
## and push the flagged photos; then print the next steps. A second run trains nothing new. Point it at your
## own folders with LABELED=... NEW=... DEST=...; add SIMULATE=40 to play the reviewer and retrain.
LABELED ?= ../shared/data/ikea_products
NEW     ?= ../shared/data/ikea_products
DEST    ?= data/sorted
SIMULATE ?= 0
demo: $(STAMP)
	$(BIN)/sortloop demo --labeled $(LABELED) --new $(NEW) --dest $(DEST) --simulate-review $(SIMULATE)

test: $(STAMP)
	bash tests/run.sh

lint: $(STAMP)
	$(BIN)/ruff check loop labeling sortloop tests bench

clean:
	rm -rf $(VENV) .cache tests/browser/node_modules test-artifacts
