#!/usr/bin/env bash
# The whole pipeline on one CUDA GPU, in under 5 minutes, every log in one folder:
#   the quick start (bundled sample, a short training run), a fine-tune, ChatAI with a seed (twice:
#   the replies must match) and with beam search, serve.py with 16 seeded clients and beam-search
#   clients, export.py --int8 and --onnx (and ChatAI on the int8 file), then the tests that run
#   models (engine, every precision, model, preference tuning) with LUMINA_TEST_DEVICE=cuda.
#
# Run from the repository root:  bash benchmarks/gpu_check.sh [LOG_DIR]
#   LOG_DIR defaults to $OUT (the device tool's output folder), else gpu_check_logs/.
#   DEVICE=cpu bash benchmarks/gpu_check.sh   runs the same steps on a CPU (how the script is checked
#   where there is no GPU).
# Packages the GPU machine lacks (fastapi, uvicorn... for serve.py; onnxscript for --onnx) are
# installed from wheels in ./wheels when that folder exists, made on a machine with the internet:
#   pip download --only-binary=:all: --no-deps -d wheels fastapi starlette pydantic pydantic_core \
#     annotated-types annotated-doc typing-inspection typing_extensions anyio sniffio uvicorn h11 \
#     click opentelemetry-api openai jiter distro onnxscript onnx_ir ml_dtypes
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${1:-${OUT:-gpu_check_logs}}
DEVICE=${DEVICE:-cuda}
mkdir -p "$LOGS"
LOGS=$(cd "$LOGS" && pwd)
WORK=$(mktemp -d)
: > "$LOGS/summary.txt"

step() {  # step NAME COMMAND...: run it, its output in NAME.log, its exit code and seconds in summary.txt
    local name=$1 start=$SECONDS
    shift
    "$@" > "$LOGS/$name.log" 2>&1
    local code=$?
    echo "$name: exit $code, $((SECONDS - start)) s" | tee -a "$LOGS/summary.txt"
    return $code
}

if [ -d wheels ]; then
    step wheels python3 -m pip install --no-index --no-deps --target "$WORK/site" wheels/*.whl
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))" \
    > "$LOGS/device.txt" 2>&1
nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1

# --- the quick start, then a fine-tune -------------------------------------------------------------------
step dataset python3 Dataset_download.py --source=sample --out_dir="$WORK/data"
step train python3 Train.py --data="$WORK/data" --out_dir="$WORK" --max_minutes=1 --device="$DEVICE"
step fine_tune python3 fine_tune.py --base_model="$WORK/Model.pth" --data="$WORK/data" \
    --output="$WORK/FineTuned_Model.pth" --max_minutes=0.5 --device="$DEVICE"

# --- ChatAI: seeded (twice, the same reply), beam search ---------------------------------------------------
for run in 1 2; do
    step "chat_seed_$run" python3 ChatAI.py "$WORK/FineTuned_Model.pth" --device="$DEVICE" --seed=7 \
        --max_new_chars=200 --prompt "Hello! What can you do?"
done
if cmp -s <(tail -n 1 "$LOGS/chat_seed_1.log") <(tail -n 1 "$LOGS/chat_seed_2.log"); then
    echo "chat_seed: the same reply twice" | tee -a "$LOGS/summary.txt"
else
    echo "chat_seed: FAILED, the replies differ" | tee -a "$LOGS/summary.txt"
fi
step chat_beam bash -c "printf 'beam 4\nHello! What can you do?\nquit\n' | python3 ChatAI.py \
    '$WORK/FineTuned_Model.pth' --device='$DEVICE' --max_new_chars=200"

# --- serve.py: 16 seeded clients (twice: the same replies), then beam-search clients beside sampled ones ---
PORT=8765
python3 serve.py "$WORK/FineTuned_Model.pth" --device="$DEVICE" --port=$PORT --max_batch=64 \
    > "$LOGS/serve.log" 2>&1 &
SERVER=$!
step serve_clients python3 - "$PORT" <<'EOF'
import concurrent.futures, sys, time
import httpx
url = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(600):
    try:
        if httpx.get(url + "/health").status_code == 200:
            break
    except httpx.TransportError:
        time.sleep(0.2)
print("health:", httpx.get(url + "/health").json())
model = httpx.get(url + "/v1/models").json()["data"][0]["id"]

def ask(i, **fields):
    body = {"model": model, "messages": [{"role": "user", "content": f"Question {i}: what is a cat?"}],
            "max_tokens": 300, **fields}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    response.raise_for_status()
    return [c["message"]["content"] for c in response.json()["choices"]]

start = time.time()
with concurrent.futures.ThreadPoolExecutor(16) as pool:
    first = list(pool.map(lambda i: ask(i, seed=i, temperature=0.9), range(16)))
    took = time.time() - start
    second = list(pool.map(lambda i: ask(i, seed=i, temperature=0.9), range(16)))
    print(f"16 seeded clients: {sum(len(r[0]) for r in first) / took:,.0f} chars/s; same replies twice: {first == second}")
    beams = [pool.submit(ask, i, num_beams=4, n=2) for i in range(4)]
    sampled = [pool.submit(ask, i, temperature=1.0) for i in range(8)]
    print("beam replies:", [b.result() for b in beams][:2])
    print("sampled beside them:", len([s.result() for s in sampled]), "replies")
assert first == second, "seeded replies differ"
EOF
kill -TERM $SERVER
wait $SERVER
echo "serve: exit $?" | tee -a "$LOGS/summary.txt"

# --- export: int8 (and ChatAI on it) and ONNX (and onnxruntime's reply) ------------------------------------
step export_int8 python3 export.py "$WORK/FineTuned_Model.pth" --int8
step chat_int8 python3 ChatAI.py "$WORK/FineTuned_Model.int8.pth" --device="$DEVICE" --seed=7 --prompt "Hello!"
step export_onnx python3 export.py "$WORK/FineTuned_Model.pth" --onnx
step onnx_chat python3 export.py "$WORK/FineTuned_Model.onnx" --prompt "Hello!"

# --- the tests that run models, on the device (TESTS=tests runs the whole suite: longer than 5 minutes) -----
step tests env LUMINA_TEST_DEVICE="$DEVICE" timeout 150 python3 -m pytest -q \
    ${TESTS:-tests/test_engine.py tests/test_precision.py tests/test_model.py tests/test_preference.py}

echo "logs in $LOGS; the models in $WORK"
grep -c "exit 0" "$LOGS/summary.txt" | xargs echo "steps that passed:"
