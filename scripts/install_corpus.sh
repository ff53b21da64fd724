#!/usr/bin/env bash
# Install the offline corpora of some.data from Debian/Ubuntu packages (idempotent).
#
#   fortunes-min, fortunes  -> source "fortunes" (in-domain): /usr/share/games/fortunes
#   sword-text-web          -> source "bible" (out-of-domain): the World English Bible module
#   diatheke                -> the command-line reader some.data uses for that module
#
# Usage: scripts/install_corpus.sh           install what is missing (apt-get; sudo if not root)
#        scripts/install_corpus.sh --check   only report; exit 1 if something is missing
set -euo pipefail

FORTUNES_DIR=/usr/share/games/fortunes
SWORD_CONF=/usr/share/sword/mods.d/engWEB2015eb.conf

# package -> a file it installs; a package counts as present when its file exists, so that the
# script does nothing (and needs no root) on a machine that already has the corpora.
declare -A MARKER=(
  [fortunes-min]="$FORTUNES_DIR/fortunes"
  [fortunes]="$FORTUNES_DIR/cookie"
  [sword-text-web]="$SWORD_CONF"
  [diatheke]=""  # a program: looked up on PATH below
)
PACKAGES=(fortunes-min fortunes sword-text-web diatheke)

missing_packages() {
  local pkg
  for pkg in "${PACKAGES[@]}"; do
    if [[ $pkg == diatheke ]]; then
      command -v diatheke >/dev/null 2>&1 || echo "$pkg"
    elif [[ ! -e ${MARKER[$pkg]} ]]; then
      echo "$pkg"
    fi
  done
}

mapfile -t MISSING < <(missing_packages)

if [[ ${1:-} == --check ]]; then
  if ((${#MISSING[@]})); then
    echo "missing corpus packages: ${MISSING[*]} (run $0 to install them)" >&2
    exit 1
  fi
  echo "corpus packages present: ${PACKAGES[*]}"
  exit 0
elif [[ $# -gt 0 ]]; then
  echo "usage: $0 [--check]" >&2
  exit 2
fi

if ((${#MISSING[@]})); then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: apt-get not found; install the Debian/Ubuntu packages ${MISSING[*]} by other means," >&2
    echo "       or use another source: 'files:PATH' (.txt/.jsonl) or 'synthetic'" >&2
    exit 1
  fi
  SUDO=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { echo "error: need root (or sudo) to apt-get install ${MISSING[*]}" >&2; exit 1; }
    SUDO=(sudo)
  fi
  echo "installing: ${MISSING[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # The package lists of a fresh container are empty; refresh them only when needed.
  n_known=$(apt-cache policy "${MISSING[@]}" 2>/dev/null | grep -c 'Candidate: [^(]' || true)
  if ((n_known < ${#MISSING[@]})); then
    "${SUDO[@]}" apt-get update -q
  fi
  "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${MISSING[@]}"
fi

# Verify what some.data will read, not just that the packages are there.
[[ -r $FORTUNES_DIR/fortunes ]] || { echo "error: $FORTUNES_DIR/fortunes is missing after install" >&2; exit 1; }
modules=$(diatheke -b system -k modulelist 2>/dev/null || true)  # (no grep -q in a pipe: SIGPIPE + pipefail)
if [[ $modules != *engWEB2015eb* ]]; then
  echo "error: diatheke does not list the module engWEB2015eb (package sword-text-web)" >&2
  exit 1
fi
n_fortune_files=$(find "$FORTUNES_DIR" -maxdepth 1 -type f ! -name '*.dat' | wc -l)
echo "ok: fortunes ($n_fortune_files files in $FORTUNES_DIR), bible (engWEB2015eb via $(command -v diatheke))"
