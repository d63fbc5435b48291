#!/usr/bin/env bash
# Every test, in CI's order: lint, unit tests, then integration tests against a real Label Studio server
# (a migrated template data dir is prepared once, in the background while unit tests run; each test module
# copies it and starts its own server in seconds). Called by `make test`, which installs everything first.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
mkdir -p .cache test-artifacts

echo "== lint"
$BIN/ruff check loop labeling sortloop tests bench

echo "== browser tooling (Debian chromium + playwright-core from npm)"
if ! command -v chromium >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get install -y chromium >/dev/null 2>&1 || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y chromium >/dev/null; }
fi
(cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund --loglevel=error)

echo "== Label Studio template data dir (background)"
$BIN/python tests/prepare_labelstudio.py > .cache/ls-template.path 2> .cache/ls-template.log &
prepare_pid=$!

echo "== unit tests"
$BIN/pytest tests/unit -q

echo "== integration tests (real Label Studio)"
if ! wait $prepare_pid; then cat .cache/ls-template.log; echo "could not prepare Label Studio"; exit 1; fi
SORTLOOP_TEST_LS_TEMPLATE="$(tail -n 1 .cache/ls-template.path)" $BIN/pytest tests/integration -q
