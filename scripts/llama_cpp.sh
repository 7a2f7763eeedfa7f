#!/usr/bin/env bash
# llama.cpp for `llmprune export --format gguf` (K-quants, and the check that a file runs in
# llama.cpp), installed into .venv as llama-cpp-python. llama-cpp-python compiles llama.cpp and
# all its tools on install (over an hour on 2 busy cores); here only the libraries the binding
# loads are built, once per llama-cpp-python version and CPU, into a cache outside the repository
# (~/.cache/llmprune; LLMPRUNE_CACHE overrides), and the binding is installed without a build.
# A first run takes ~10 minutes on 2 cores; later runs ~10 s.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
VPY=${VPY:-.venv/bin/python}
cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
# x86: the instruction sets named one by one from /proc/cpuinfo, never AMX: some virtual machines list
# amx_tile but trap its instructions (SIGILL in libggml-cpu), and -march=native would turn it on.
isa=(-DGGML_NATIVE=ON)
if [ "$(uname -m)" = x86_64 ] && [ -n "$cpu_flags" ]; then
  has() { for f in "$@"; do [[ " $cpu_flags " == *" $f "* ]] || return 1; done; }
  isa=(-DGGML_NATIVE=OFF)
  for pair in sse4_2:SSE42 f16c:F16C fma:FMA bmi2:BMI2 avx:AVX avx2:AVX2 avx_vnni:AVX_VNNI \
              avx512f,avx512cd,avx512vl,avx512dq,avx512bw:AVX512 avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI \
              avx512_bf16:AVX512_BF16; do
    IFS=, read -r -a need <<< "${pair%%:*}"
    if has "${need[@]}"; then isa+=("-DGGML_${pair##*:}=ON"); else isa+=("-DGGML_${pair##*:}=OFF"); fi
  done
fi
cpu=$( (echo "$cpu_flags ${isa[*]}"; uname -m) | sha256sum | cut -c1-12)
cache=${LLMPRUNE_CACHE:-$HOME/.cache/llmprune}/llama-cpp-python-$VERSION-$cpu
sdist=$cache/llama_cpp_python-$VERSION.tar.gz
if [ ! -f "$cache/lib/.complete" ]; then
  mkdir -p "$cache"
  [ -f "$sdist" ] || "$VPY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$cache" >&2
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  tar xzf "$sdist" -C "$work"
  src=$work/llama_cpp_python-$VERSION/vendor/llama.cpp
  echo "building llama.cpp's libraries (llama-cpp-python $VERSION) into $cache/lib ..." >&2
  # $ORIGIN: each library finds the others beside it wherever the folder is copied (not in the build tree).
  cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release "${isa[@]}" -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON -DCMAKE_BUILD_RPATH='$ORIGIN' \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
  cmake --build "$work/build" -j"$(nproc)" --target llama >/dev/null
  rm -rf "$cache/lib" && mkdir -p "$cache/lib"
  cp -P "$work/build/bin/"*.so* "$cache/lib/"
  touch "$cache/lib/.complete"
  rm -rf "$work"
fi
if ! "$VPY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
  # The binding alone (LLAMA_BUILD=OFF); its runtime needs (numpy, diskcache, jinja2) from the registry.
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$VPY" -m pip install -q "$sdist" >&2
fi
site=$("$VPY" -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('llama_cpp').origin))")
mkdir -p "$site/lib" && cp -P "$cache/lib/"*.so* "$site/lib/"
rm -f "$site/lib/"libllama-common*  # a library of llama.cpp's tools, not the binding's
"$VPY" -c "import llama_cpp; print('llama.cpp ready: llama-cpp-python', llama_cpp.__version__)" >&2
