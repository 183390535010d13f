#!/usr/bin/env bash
# The main job on a fresh machine: set up, fetch the offline model and corpora, quantize SmolLM2-135M
# with LNQ + GuidedQuant (g=4, 3 bits), measure its perplexity, then serve it with the embedded
# engine and answer one chat request through the OpenAI-compatible API.
#   bash scripts/main.sh [OUT_DIR]        (default OUT_DIR: ./runs/smollm2-lnq-gq4-3bit)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
set -euo pipefail
OUT="${1:-runs/smollm2-lnq-gq4-3bit}"
PORT="${GQ_PORT:-8321}"

gq prepare
if [ ! -f "$OUT/config.json" ]; then
    gq quantize smollm2 --method lnq --guided --groups 4 --bits 3 --calib sotu:calib --out "$OUT"
fi
gq eval "$OUT" --data sotu:heldout brown:heldout --json "$OUT/eval.json"

gq serve "$OUT" --engine hf --host 127.0.0.1 --port "$PORT" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    kill -0 $SERVER 2>/dev/null || { echo "server exited" >&2; exit 1; }
    sleep 1
done
curl -sf "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "model": "'"$(basename "$OUT")"'",
  "messages": [{"role": "user", "content": "What is the capital of France?"}],
  "max_tokens": 32, "temperature": 0}'
echo
