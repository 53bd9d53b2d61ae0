#!/usr/bin/env bash
# Rebuild the bundled models src/ernie45/models/ernie-tiny and ernie-tiny-moe from scratch, on CPU.
#
#   scripts/build_bundled_models.sh [WORK_DIR]        (default: build/bundled, ignored by git)
#
# Steps: fetch Debian's fortunes-zh with apt-get download → split poems / held-out poems / other text →
# train a 4096-piece ERNIE tokenizer → `ernie45 preprocess` (seq 256) → `ernie45 pretrain` the dense and the
# MoE model in parallel (one CPU thread each) → SFT on "write a poem titled X" / "about X" → bf16 model dirs
# with a model card holding the measured numbers → the MoE model's MTP head (`pretrain --mtp distill`, its
# acceptance on held-out poems in the card). About an hour and a half on two CPU cores.
# Environment: PYTHON (default python3), DENSE_STEPS (320) and MOE_STEPS (270) pre-training steps,
# SFT_STEPS (150), MTP_STEPS (600), POEM_WEIGHT (12).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$ROOT/build/bundled}"
PY="${PYTHON:-python3}"
DENSE_STEPS="${DENSE_STEPS:-320}"
MOE_STEPS="${MOE_STEPS:-270}"
SFT_STEPS="${SFT_STEPS:-150}"
MTP_STEPS="${MTP_STEPS:-600}"
POEM_WEIGHT="${POEM_WEIGHT:-12}"
export OMP_NUM_THREADS=1
mkdir -p "$WORK/cfg"

"$PY" "$ROOT/scripts/fetch_corpus.py" --out "$WORK/corpus" --packages fortunes-zh
"$PY" "$ROOT/scripts/bundled_data.py" split "$WORK/corpus/corpus.jsonl" "$WORK"
"$PY" "$ROOT/scripts/bundled_data.py" tokenizer "$WORK" --vocab-size 4096
"$PY" "$ROOT/scripts/bundled_data.py" sft "$WORK"
for part in poems_train poems_heldout other; do
  val=0
  [ "$part" = other ] && val=0.02
  "$PY" -m ernie45 preprocess --input "$WORK/$part.jsonl" --tokenizer "$WORK/tokenizer" \
    --out "$WORK/data-$part" --seq-len 256 --val-fraction "$val" --overwrite
done

cat > "$WORK/cfg/dense.json" <<'JSON'
{"preset": "tiny", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 2048}
JSON
cat > "$WORK/cfg/moe.json" <<'JSON'
{"preset": "tiny-moe", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 2048,
 "moe_num_experts": 8, "moe_k": 2, "moe_intermediate_size": 128, "moe_num_shared_experts": 1,
 "moe_layer_start_index": 1, "router_aux_loss_coef": 0.01}
JSON

pids=()
for m in dense moe; do
  steps="$DENSE_STEPS"
  [ "$m" = moe ] && steps="$MOE_STEPS"
  "$PY" -m ernie45 pretrain --data "$WORK/data-poems_train" "$WORK/data-other" --data-weights "$POEM_WEIGHT" 1 \
    --eval-data "$WORK/data-poems_heldout" --out "$WORK/run-$m" --config "$WORK/cfg/$m.json" \
    --tokenizer "$WORK/tokenizer" --steps "$steps" --batch-size 16 --lr 2e-3 --min-lr 1e-4 --warmup 30 \
    --schedule wsd --eval-every 50 --save-every 25 --overwrite --no-progress > "$WORK/run-$m.out" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done

for m in dense moe; do
  name=ernie-tiny
  [ "$m" = moe ] && name=ernie-tiny-moe
  "$PY" "$ROOT/scripts/package_bundled.py" --pretrained "$WORK/run-$m" --work "$WORK" \
    --sources "$WORK/corpus/SOURCES.json" --name "$name" --out "$ROOT/src/ernie45/models/$name" \
    --poem-weight "$POEM_WEIGHT" --sft-steps "$SFT_STEPS" &
done
wait

# The MoE model's MTP head (speculative decoding): trained on the frozen, packaged model against its own next-token
# distribution (`--mtp distill`), mostly on the model's own continuations (`selfgen`: the contexts a draft meets
# while the model decodes), then written into the bundle with its measured acceptance on held-out poems.
MOE_DIR="$ROOT/src/ernie45/models/ernie-tiny-moe"
"$PY" "$ROOT/scripts/bundled_mtp.py" prepare "$MOE_DIR" "$WORK" --variant pre_norm
"$PY" "$ROOT/scripts/bundled_mtp.py" selfgen "$MOE_DIR" "$WORK"
"$PY" -m ernie45 pretrain --model "$WORK/moe-mtp" --mtp distill --data "$WORK/data-selfgen" "$WORK/data-poems_train" \
  "$WORK/data-other" --data-weights 4 2 1 --out "$WORK/run-mtp" --steps "$MTP_STEPS" --batch-size 16 --lr 2e-3 --min-lr 1e-4 --warmup 30 \
  --schedule wsd --eval-every 0 --save-every 100 --overwrite --no-progress > "$WORK/run-mtp.out" 2>&1
"$PY" "$ROOT/scripts/bundled_mtp.py" ship "$WORK/run-mtp/final" "$MOE_DIR" "$WORK/poems_heldout.jsonl"
chmod -R a+rX "$ROOT/src/ernie45/models"
