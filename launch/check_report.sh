#!/usr/bin/env bash
# Check in headless Chromium that a report page renders every figure.
# The page's own script writes "<decoded>/<total>" images into the body's
# data-images-loaded attribute; this prints it and fails unless all
# images decoded. Install Chromium on Debian with: apt-get install chromium
#
#   bash launch/check_report.sh results/report/index.html
set -euo pipefail
page="$(realpath "$1")"
browser="$(command -v chromium || command -v chromium-browser || true)"
if [[ -z "$browser" ]]; then
  echo "Chromium is not installed (apt-get install chromium)." >&2
  exit 2
fi
# --no-sandbox: Chromium refuses to start as root with its sandbox on.
dom="$("$browser" --headless --no-sandbox --disable-gpu \
  --virtual-time-budget=10000 --dump-dom "file://${page}" 2>/dev/null)"
loaded="$(grep -o 'data-images-loaded="[0-9]*/[0-9]*"' <<<"$dom" \
  | cut -d'"' -f2)"
if [[ -z "$loaded" ]]; then
  echo "The page's image check did not run in ${page}." >&2
  exit 1
fi
echo "Images decoded: ${loaded}"
[[ "${loaded%/*}" == "${loaded#*/}" ]]
