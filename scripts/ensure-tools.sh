#!/usr/bin/env bash
# Install the external tools the tests drive, when missing and when we can (root
# or sudo). Otherwise say what to install; the tests then skip (or fail, in CI).
set -u
need_cmds=(cc make clang g++ iverilog yosys verilator ngspice)
need_pkgs=(gcc make "clang libclang-rt-dev" g++ iverilog yosys verilator ngspice)  # clang + its runtimes: libFuzzer for fuzz/ (tests/fuzz); g++: the CUDA kernels on the CPU (tests/backends/cuda_on_cpu.h); then the Verilog and SPICE backends
missing=()
# Debian and Ubuntu split ensurepip, which `python3 -m venv` needs, into python3.X-venv, one for each Python
# (python3-venv is the default Python's only)
py="${PYTHON:-python3}"
venv_pkg="python$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)-venv"
[ "$venv_pkg" = python-venv ] && venv_pkg=python3-venv  # no such Python: the Makefile's check says so
"$py" -c 'import ensurepip' 2>/dev/null || missing+=("$venv_pkg")
for i in "${!need_cmds[@]}"; do
  command -v "${need_cmds[$i]}" >/dev/null 2>&1 || missing+=(${need_pkgs[$i]})  # unquoted: one tool may need several packages
done
# clang without its runtimes compiles but cannot link -fsanitize=fuzzer (Debian ships them apart)
if command -v clang >/dev/null 2>&1 && ! printf 'int LLVMFuzzerTestOneInput(const char *d, long n) { return 0; }\n' |
    clang -x c -fsanitize=fuzzer -o /dev/null - >/dev/null 2>&1; then
  missing+=(libclang-rt-dev)
fi
# nvcc comes with NVIDIA's CUDA toolkit, not with the distribution: say so, install nothing
command -v nvcc >/dev/null 2>&1 || echo "crystalc: nvcc is missing: the CUDA backend's tests need NVIDIA's CUDA toolkit" >&2
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
  echo "crystalc: missing tools; install them with: apt-get install -y ${missing[*]}" >&2
  exit 0
fi
echo "crystalc: installing ${missing[*]}" >&2
# a failed install (no network, no apt) is said and left to the tests: they skip, or fail in CI
$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null ||
  echo "crystalc: could not install ${missing[*]}; install them with: apt-get install -y ${missing[*]}" >&2
