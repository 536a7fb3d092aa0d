#!/usr/bin/env bash
# Prints the path of a Python 3.12 interpreter, or explains what is missing and exits 1.
# Megatron-Core 0.19 and Megatron-Bridge 0.6 need Python 3.12; on these machines `python3` is 3.11 and 3.12 comes
# from pyenv (whose `python3.12` shim only works when 3.12 is selected, so we look in pyenv's versions directly).
set -u
try() { "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' >/dev/null 2>&1 && { echo "$1"; exit 0; }; }
for cand in python3.12; do command -v "$cand" >/dev/null 2>&1 && try "$(command -v "$cand")"; done
root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
for cand in $(ls -d "$root"/versions/3.12*/bin/python3.12 2>/dev/null | sort -rV); do try "$cand"; done
for cand in /usr/bin/python3.12 /usr/local/bin/python3.12; do [ -x "$cand" ] && try "$cand"; done
echo "error: no Python 3.12 found (tried python3.12 on PATH, $root/versions/3.12*/bin, /usr/bin, /usr/local/bin)." >&2
echo "       Install one (e.g. 'pyenv install 3.12') and rerun." >&2
exit 1
