#!/usr/bin/env bash
# Print the path of a Python >= 3.12 to build .venv with, or explain how to get one.
# Order: $PYTHON; python3.13 / python3.12 / python3 on PATH (if they run and are new
# enough); $(pyenv root)/versions/3.1[2-9]*/bin/python3 (probed directly: pyenv shims
# fail in non-interactive shells; the oldest supported first, 3.12 being the release
# the whole stack is checked on); else a message pointing to conda.
set -u
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
if [ -n "${PYTHON:-}" ]; then
  if ok "$PYTHON"; then command -v "$PYTHON" || echo "$PYTHON"; exit 0; fi
  echo "PYTHON=$PYTHON is not a working Python >= 3.12" >&2; exit 1
fi
for cand in python3.13 python3.12 python3; do
  if command -v "$cand" >/dev/null 2>&1 && ok "$cand"; then command -v "$cand"; exit 0; fi
done
root=$( (pyenv root) 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
for cand in $(ls -d "$root"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -V); do
  if ok "$cand"; then echo "$cand"; exit 0; fi
done
cat >&2 <<'MSG'
flowmodel needs Python >= 3.12 and none was found.
Either run `make PYTHON=/path/to/python3.12 test`, or use conda:
    conda env create -f environment.yml && conda activate flowmodel && pip install -e '.[test]' --no-deps
MSG
exit 1
