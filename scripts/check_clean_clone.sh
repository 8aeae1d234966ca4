#!/usr/bin/env bash
# Check the newcomer path: does a fresh clone of this repository stand on its own?
#
#   scripts/check_clean_clone.sh              # the committed HEAD (what a user's `git clone` gets)
#   scripts/check_clean_clone.sh --worktree   # the working tree's tracked and new files, before committing
#
# The copy goes to a new temporary directory with nothing beside it, then:
#   1. the test suite collects there (`python -m pytest --collect-only -q`, with this environment's python:
#      $PYTHON, else the active venv's, else .venv/bin/python, else python3);
#   2. no tracked file names a path of the machine it was written on (a sibling "shared" checkout or the
#      development machine's work directory); README.md and docs/ may mention the by-hand conformance
#      harness kept outside the repository;
#   3. no tracked symbolic link points outside the repository.
# Prints each problem; exits non-zero if there is one.
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
MODE=head
case "${1:-}" in
  "") ;;
  --worktree) MODE=worktree ;;
  *) echo "usage: $0 [--worktree]" >&2; exit 2 ;;
esac

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ]; then PY=$VIRTUAL_ENV/bin/python
elif [ -x .venv/bin/python ]; then PY=$REPO/.venv/bin/python
else PY=python3
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
CLONE=$TMP/repo
problems=0
fail() { echo "check_clean_clone: $*" >&2; problems=$((problems + 1)); }

if [ "$MODE" = head ]; then
  git clone -q --no-hardlinks "$REPO" "$CLONE" || { echo "check_clean_clone: git clone failed" >&2; exit 1; }
else
  mkdir -p "$CLONE"
  # tracked files still present plus new files git does not ignore, as they are now
  git ls-files -z --cached --others --exclude-standard \
    | (while IFS= read -r -d '' f; do
         # files and links only: a tracked path that is now a directory (a link replaced by a venv) is skipped
         if [ -L "$f" ] || [ -f "$f" ]; then printf '%s\0' "$f"; fi
       done) \
    | tar --null -T - -cf - | tar -xf - -C "$CLONE" || { echo "check_clean_clone: copy failed" >&2; exit 1; }
  git -C "$CLONE" init -q && git -C "$CLONE" add -A || { echo "check_clean_clone: git init failed" >&2; exit 1; }
fi
echo "check_clean_clone: $MODE copy in $CLONE (nothing beside it: $(ls -A "$TMP" | tr '\n' ' '))"

# 1. the suite collects in the copy
if out=$(cd "$CLONE" && "$PY" -m pytest --collect-only -q -p no:cacheprovider 2>&1); then
  echo "check_clean_clone: tests collect: $(echo "$out" | tail -n 1)"
else
  fail "pytest --collect-only fails in the clean copy (with $PY):"
  echo "$out" | tail -n 40 >&2
fi

# 2. no machine paths in tracked files (the patterns are spelled so that this file does not match them)
dots='\.\.'
pattern="$dots/shared|/wor[k]/"
hits=$(cd "$CLONE" && git grep -n -I -E "$pattern" -- . ':(exclude)README.md' ':(exclude)docs/' 2>/dev/null)
if [ -n "$hits" ]; then
  fail "tracked files name paths outside the repository:"
  echo "$hits" >&2
fi

# 3. no symbolic links out of the repository
while IFS= read -r line; do
  path=${line#*$'\t'}
  target=$(cd "$CLONE" && git cat-file -p "$(echo "$line" | awk '{print $2}')")
  case "$target" in
    /*) resolved=$target ;;
    *) resolved=$(realpath -m "$CLONE/$(dirname "$path")/$target") ;;
  esac
  case "$resolved" in
    "$CLONE"/*) ;;
    *) fail "tracked symbolic link $path -> $target points outside the repository" ;;
  esac
done < <(cd "$CLONE" && git ls-files -s | awk '$1 == "120000"')

if [ "$problems" -gt 0 ]; then
  echo "check_clean_clone: $problems problem(s)" >&2
  exit 1
fi
echo "check_clean_clone: ok"
