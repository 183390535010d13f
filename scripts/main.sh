#!/usr/bin/env bash
# The main job on a fresh machine: set up, fetch the offline model and corpora, quantize SmolLM2-135M
# with LNQ + GuidedQuant (g=4), measure it against fp16 (perplexity, decode speed, size), serve it
# with the embedded engine, ask it one chat question through the OpenAI-compatible API, and end
# with a report of all of it.
#   bash scripts/main.sh [OUT_DIR]        (default OUT_DIR: ./runs/smollm2-lnq-gq4-${GQ_BITS}bit)
# GQ_BITS (default 4; README, "Two commands", says why) picks the bit width.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
set -euo pipefail
BITS="${GQ_BITS:-4}"
OUT="${1:-runs/smollm2-lnq-gq4-${BITS}bit}"
PORT="${GQ_PORT:-8321}"
QUESTION="What is the capital of France?"

gq prepare
FP16="$(python -c 'from gq_serve.util import cache_root; print(cache_root() / "models/SmolLM2-135M-Instruct")')"
if [ ! -f "$OUT/config.json" ]; then
    gq quantize smollm2 --method lnq --guided --groups 4 --bits "$BITS" --calib sotu:calib --out "$OUT"
fi
gq eval smollm2 --data sotu:heldout brown:heldout --json "$OUT/eval_fp16.json" --quiet >/dev/null
gq eval "$OUT" --data sotu:heldout brown:heldout --json "$OUT/eval.json" --quiet >/dev/null
gq bench offline "fp16=$FP16" "quantized=$OUT" --threads 2 -o "$OUT/bench.json"

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
  "messages": [{"role": "user", "content": "'"$QUESTION"'"}],
  "max_tokens": 32, "temperature": 0}' > "$OUT/chat_response.json"
python - "$OUT" "$QUESTION" <<'EOF'
import json, sys
out, question = sys.argv[1], sys.argv[2]
answer = json.load(open(f"{out}/chat_response.json"))["choices"][0]["message"]["content"]
json.dump({"question": question, "answer": answer}, open(f"{out}/chat.json", "w"), indent=1)
EOF
# one SIGTERM, then wait: the server drains and exits 0 (a second signal would force it down)
kill $SERVER 2>/dev/null || true
wait $SERVER 2>/dev/null || true
trap - EXIT
echo
python scripts/main_report.py "$OUT" --fp16 "$FP16"
