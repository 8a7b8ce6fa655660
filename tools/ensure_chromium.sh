#!/usr/bin/env bash
# `make test` runs this before pytest: the report's browser test (tests/unicap/report/test_report.py) drives
# Debian's chromium at /usr/bin/chromium through playwright. Nothing to do when it is there; otherwise it is
# installed with apt-get (as root), and anything else fails here with one line saying what to do. The report
# shows Chinese captions: a CJK font (Debian's fonts-noto-cjk) comes with it, else they render as boxes.
set -u
CHROMIUM=/usr/bin/chromium
has_cjk_font() { command -v fc-list >/dev/null 2>&1 && [ -n "$(fc-list :lang=zh 2>/dev/null)" ]; }
[ -x "$CHROMIUM" ] && has_cjk_font && exit 0
fail() { echo "tools/ensure_chromium.sh: $CHROMIUM is missing and $1; install Debian's chromium package (apt-get install chromium) and re-run" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || fail "this is not root (apt-get needs it)"
command -v apt-get >/dev/null 2>&1 || fail "there is no apt-get here"
echo "tools/ensure_chromium.sh: installing chromium and a CJK font with apt-get (the report's browser test needs them)"
apt-get update -qq || fail "apt-get update failed"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-cjk fontconfig >/dev/null \
    || fail "apt-get install chromium fonts-noto-cjk failed"
[ -x "$CHROMIUM" ] || fail "the chromium package did not provide it"
has_cjk_font || fail "fonts-noto-cjk gave fontconfig no Chinese font"
