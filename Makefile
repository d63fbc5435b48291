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

## The whole loop once, on the embedded default: ingest a labeled folder (ikea_products' studio shots), train,
## deploy, sort NEW as "your new photos" (rooms: web photos in rooms, unlike the labeled set; NEW = LABELED holds
## out some of its items instead), start the local Label Studio and push the flagged photos; then print the next
## steps. A second run trains nothing new. Point it at your own folders with LABELED=... NEW=... DEST=...; add
## SIMULATE=40 to play the reviewer, retrain, gate and re-sort.
LABELED ?= ../shared/data/ikea_products
NEW     ?= ../shared/data/rooms
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
