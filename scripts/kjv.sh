#!/usr/bin/env bash
# Writes the King James Bible as plain text, one verse per line, to OUT.txt (the demo's training corpus).
# `bible -f` prints every verse on one line as "Ge1:1 In the beginning ..." (book abbreviation, chapter:verse,
# one space), with no book headers; we strip that reference. Installs Debian's bible-kjv when `bible` is
# missing (needs root). Idempotent: the same OUT.txt every run, written atomically.
set -euo pipefail
[[ $# -eq 1 ]] || { echo "usage: $0 OUT.txt" >&2; exit 2; }
out=$1
if ! command -v bible >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q bible-kjv >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q bible-kjv >/dev/null; }
fi
tmp=$(mktemp "$out.tmp.XXXXXX")
trap 'rm -f "$tmp"' EXIT
# Every line must be a reference and a verse; anything else means the format changed: stop rather than guess.
bible -f "Genesis 1:1-Revelation 22:21" |
  awk '!/^[1-3]?[A-Za-z]+[0-9]+:[0-9]+ / { print "kjv.sh: unexpected line " NR " from bible: " $0 > "/dev/stderr"; exit 1 }
       { sub(/^[^ ]+ /, ""); print }' >"$tmp"
lines=$(wc -l <"$tmp")
[[ $lines -eq 31102 ]] || { echo "kjv.sh: expected 31102 verses, got $lines" >&2; exit 1; }
chmod 644 "$tmp"
mv "$tmp" "$out"
trap - EXIT
echo "$out: $(wc -c <"$out") bytes, $lines verses"
