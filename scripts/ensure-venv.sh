#!/usr/bin/env bash
# Debian and Ubuntu ship python3 without ensurepip, which `python3 -m venv` needs: install
# python3-venv when we can (root or sudo), else say so. Run by the Makefile only when missing.
set -u
PYTHON=${PYTHON:-python3}
if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
  echo "crystalc: $PYTHON cannot make a virtual environment (no ensurepip); install python3-venv" \
       "(apt-get install -y python3-venv) or give make PYTHON=<a python that can>" >&2
  exit 1
fi
echo "crystalc: installing python3-venv ($PYTHON lacks ensurepip)" >&2
$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
"$PYTHON" -c 'import ensurepip' 2>/dev/null && exit 0
echo "crystalc: $PYTHON still lacks ensurepip after installing python3-venv (not Debian's python?):" \
     "give make PYTHON=<a python that can make a venv>" >&2
exit 1
