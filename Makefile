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

## The whole loop once, on the embedded default: ingest a labeled folder, train, deploy, sort a new folder,
## start the local Label Studio and push the flagged photos. Point it at your own folders with
## LABELED=... NEW=... DEST=...
LABELED ?= ../shared/data/ikea_products
NEW     ?= ../shared/data/ikea_products
DEST    ?= data/sorted
demo: $(STAMP)
	$(BIN)/sortloop demo --labeled $(LABELED) --new $(NEW) --dest $(DEST)

test: $(STAMP)
	bash tests/run.sh

lint: $(STAMP)
	$(BIN)/ruff check loop labeling tests bench

clean:
	rm -rf $(VENV) .cache tests/browser/node_modules test-artifacts
