#!/usr/bin/env bash
# Rebuild dashboard/assets/plotly-dashboard.min.js: plotly.js with only the traces the dashboard
# draws (entry.js). Needs node >= 22 and the npm registry; run it when the Python plotly package
# (whose plotly.js version the bundle must match: tests/test_plotly_bundle.py) or entry.js changes.
# The built file is committed: nothing is downloaded when the dashboard runs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# A fixed folder, not mktemp: plotly's inline-CSS step names a style element by a hash of the CSS file's
# absolute path, so the same folder gives the same bytes on every build.
work=/tmp/thinking-pixel-plotly-bundle
rm -rf "$work" && mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
cp "$here/package.json" "$here/package-lock.json" "$here/entry.js" "$here/build.js" "$work/"
(cd "$work" && npm ci --no-audit --no-fund --loglevel=error && node build.js "$here/../../dashboard/assets/plotly-dashboard.min.js")
