#!/usr/bin/env bash
# Run HERE (the CPU machine) before a GPU session: packs what the GPU machine lacks into .gpu/
# (git-ignored through .git/info/exclude; about 40 MB, under the device tool's 64 MiB):
#   .gpu/whl/        Python 3.12 wheels of the versions this project pins that the GPU image lacks
#                    or holds too old (transformers, huggingface_hub and its httpx2, trl, datasets, peft, gguf, ...)
#   .gpu/tokenizer/  the embedded model's tokenizer + chat template (the random-init shapes use it)
#   .gpu/data/       the shared data folder (prompts for the benchmarks; ~11 MB)
# Then one device call:  run(command="bash benchmarks/gpu/check.sh", carry=[".gpu"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
KIT=.gpu
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf "$KIT" && mkdir -p "$KIT/whl"
# the versions installed here (the ones the tests pass with); the GPU image keeps its own torch
pins=$("$PY" -m pip freeze | grep -iE '^(transformers|huggingface[-_]hub|trl|datasets|peft|gguf|dill|multiprocess|tokenizers|httpx2|httpcore2|truststore|click)==')
plats=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plats[@]}" \
  -d "$KIT/whl" $pins
"$PY" - <<'PYEOF'
from latentguard.models import load_model
load_model("embedded").tokenizer.save_pretrained(".gpu/tokenizer")
PYEOF
data=${LATENTGUARD_SHARED_DATA:-../shared/data}
cp -r "$data" "$KIT/data"
du -sh "$KIT" "$KIT"/*
