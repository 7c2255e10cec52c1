#!/usr/bin/env bash
# Installs headless Chromium where it is missing: tests/test_eval_html.py renders eval's index.html in it.
# Only that test needs it, so a machine without apt gets a warning (the test then skips), not a failure.
set -euo pipefail
for bin in chromium chromium-browser google-chrome; do
  command -v "$bin" >/dev/null 2>&1 && exit 0
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "damvla: chromium missing and no apt-get: install Chromium by hand to run tests/test_eval_html.py" >&2
  exit 0
fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "damvla: installing chromium for the HTML report test"
$SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
