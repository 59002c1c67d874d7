#!/usr/bin/env bash
# Run THERE (the GPU machine, repo root, .gpu/ carried; see kit.sh): the GPU path of issue 12 in one call.
# Installs the carried wheels beside the image's torch, then runs the benchmarks the GPU path names on a
# random-init Llama-3-8B-shaped model (MODEL_CONFIG) on cuda: steered ÷ plain (batch 32), capture ÷
# forward, eval harness ÷ raw generate, ProCon / ML-LR ÷ SFT step; run_all --collect tabulates them. Writes $OUT/results-gpu.json, $OUT/run.log
# and $OUT/records.tgz (each script's JSON record and log).
# Rehearsal on a CPU: DEVICE=cpu MODEL_CONFIG=llama-tiny SKIP_WHEELS=1 OUT=/tmp/o bash benchmarks/gpu/check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
DEVICE=${DEVICE:-cuda}
MODEL_CONFIG=${MODEL_CONFIG:-llama3-8b}
PY=${PY:-python3}
OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"
if [ -z "${SKIP_WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export LATENTGUARD_SHARED_DATA=$PWD/.gpu/data LATENTGUARD_BENCH_TOKENIZER=$PWD/.gpu/tokenizer
export LATENTGUARD_BENCH_RESULTS=$OUT/records
{
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  "$PY" -c "import torch, transformers, trl, peft, latentguard.training, latentguard.eval.runner, latentguard.hooks; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| transformers', transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__)" || exit 1
  # Each script with the GPU path's sizes (steered ÷ plain at batch 32), under its own time limit so
  # one slow script cannot eat the call; then run_all --collect builds the table from their records.
  dev=(--device "$DEVICE" --model-config "$MODEL_CONFIG")
  lim=${SCRIPT_TIMEOUT:-150}
  timeout "$lim" "$PY" benchmarks/bench_steer.py --rounds 3 --batch 32 --new-tokens 32 "${dev[@]}"
  timeout "$lim" "$PY" benchmarks/bench_taps.py --rounds 3 --batch 32 "${dev[@]}"
  timeout "$lim" "$PY" benchmarks/bench_eval.py --rounds 2 --batch 32 --prompts 32 --max-new-tokens 32 "${dev[@]}"
  timeout "$((lim * 2))" "$PY" benchmarks/bench_train.py --rounds 1 --steps 4 --batch 4 "${dev[@]}"
  "$PY" benchmarks/run_all.py --collect "${dev[@]}" --out "$OUT/results-gpu.json" --markdown
} 2>&1 | tee "$OUT/run.log"
rc=${PIPESTATUS[0]}
tar czf "$OUT/records.tgz" -C "$OUT" records && rm -rf "$OUT/records"
[ -f "$OUT/results-gpu.json" ] || rc=1
exit "$rc"
