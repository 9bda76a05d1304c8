#!/usr/bin/env bash
# The main job, end to end on this machine:
#   train a model → build signed bundles for every profile → serve them over HTTP → start a
#   broker (mosquitto, or an embedded one when mosquitto is missing), a collector and three
#   device agents → deploy v1 to the group → ask a device for predictions → build and deploy v2
#   → roll one device back → print the fleet → drift, telemetry, the fleet report → a staged
#   rollout of a bad v3 that stops and rolls itself back → the model index and the audit trail.
# Everything it writes goes to ./demo (remove it to start over). Exits non-zero if any step
# fails, and stops every process it started.
# --console: at the end, keep the fleet running and serve the live console until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
keep_console=false
[ "${1:-}" = --console ] && keep_console=true
bash scripts/setup.sh all
export PATH="$PWD/.venv/bin:$PATH"
out=demo
rm -rf "$out/devices" "$out/dist" "$out/fleet.db"* "$out/logs"  # every run builds its bundles anew
mkdir -p "$out/logs"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do python -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null && return 0; sleep 0.1; done; echo "error: nothing listens on port $1" >&2; return 1; }

echo "== 1. train a small churn model (scikit-learn pipeline with string columns and an MLP)"
python scripts/train_demo.py --out "$out"

echo "== 2. keys: the build server signs bundles, the operator signs fleet commands"
[ -f "$out/keys/signing.key" ] || edgepack keygen --out "$out/keys"
[ -f "$out/keys/ops.key" ] || edgepack keygen --out "$out/keys" --name ops > /dev/null

echo "== 3. build v1: one signed bundle per device profile"
edgepack build "$out/churn.joblib" --trust-pickle --name churn --version 1 \
    --profile x86_64-cpu --profile x86_64-vnni-cpu --profile arm64-cpu --profile nvidia-gpu \
    --reference "$out/reference.csv" --key "$out/keys/signing.key" --out "$out/dist"
edgepack verify "$out/dist/churn-1-arm64-cpu.edgepack" --pub "$out/keys/signing.pub"

echo "== 4. broker, bundle server, collector"
mqtt_port=$(port); http_port=$(port)
if [ "${EDGEPACK_DEMO_BROKER:-}" != embedded ] && { command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; }; then
    mosquitto_bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)
    printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$mqtt_port" > "$out/logs/mosquitto.conf"
    "$mosquitto_bin" -c "$out/logs/mosquitto.conf" > "$out/logs/broker.log" 2>&1 &
    protocol=5; echo "broker: mosquitto on 127.0.0.1:$mqtt_port"
else
    python scripts/embedded_broker.py "$mqtt_port" > "$out/logs/broker.log" 2>&1 &
    protocol=3.1.1; echo "broker: embedded amqtt (MQTT 3.1.1) on 127.0.0.1:$mqtt_port (mosquitto not installed)"
fi
pids+=($!)
wait_port "$mqtt_port"
export EDGEPACK_BROKER="127.0.0.1:$mqtt_port" EDGEPACK_STORE="$out/fleet.db"
fleet="edgepack-fleet --protocol $protocol"
$fleet serve "$out/dist" --port "$http_port" > "$out/logs/bundles.log" 2>&1 &
pids+=($!)
# the collector evaluates a policy every 2 s: a version drifting on more than 30% of its
# devices is flagged, with its figures, in the audit trail
printf '[[rule]]\nname = "drifting"\nmodel = "churn"\ndrift_share = 0.3\n' > "$out/policies.toml"
$fleet collector --policies "$out/policies.toml" --policy-interval 2 > "$out/logs/collector.log" 2>&1 &
pids+=($!)
wait_port "$http_port"

echo "== 5. three devices (their own state directories), group store-42"
profile=$(python -c 'import platform, pathlib
m = platform.machine().lower()
flags = pathlib.Path("/proc/cpuinfo").read_text().split() if pathlib.Path("/proc/cpuinfo").exists() else []
print("arm64-cpu" if m in ("aarch64", "arm64") else "x86_64-vnni-cpu" if ("avx512_vnni" in flags or "avx_vnni" in flags) else "x86_64-cpu")')
api_ports=()
for i in 1 2 3; do
    dir="$out/devices/cam-$i"; mkdir -p "$dir"
    api_ports+=("$(port)")
    cat > "$dir/agent.toml" <<TOML
device_id = "cam-$i"
profile = "$profile"
groups = ["store-42"]
state_dir = "state"
trusted_keys = ["../../keys/signing.pub"]
[server]
port = ${api_ports[-1]}
[drift]
window = 250
min_rows = 100
[telemetry]
interval = 3
[mqtt]
port = $mqtt_port
protocol = "$protocol"
command_keys = ["../../keys/ops.pub"]
TOML
    edgepack-agent --config "$dir/agent.toml" run > "$out/logs/cam-$i.log" 2>&1 &
    pids+=($!)
done
for p in "${api_ports[@]}"; do wait_port "$p"; done
# Group membership is the operator's record, not what a device says about itself: the collector
# answers pending work, and `edgepack-fleet acl` writes the broker's ACL, from these records.
for i in 1 2 3; do $fleet devices assign "cam-$i" --group store-42 > /dev/null; done
sleep 1

echo "== 6. deploy churn v1 to group store-42"
sent=$($fleet deploy churn --version 1 --group store-42 --bundles "http://127.0.0.1:$http_port/" \
    --key "$out/keys/ops.key")
echo "$sent"
job=$(echo "$sent" | sed -n 's/.*job \([^ ]*\)$/\1/p' | head -1)
$fleet status "$job" --wait --timeout 120

echo "== 7. predictions from cam-1 over HTTP (Open Inference Protocol)"
python scripts/demo_client.py "http://127.0.0.1:${api_ports[0]}" infer

echo "== 8. build v2 and deploy it to the group"
edgepack build "$out/churn.joblib" --trust-pickle --name churn --version 2 \
    --profile x86_64-cpu --profile x86_64-vnni-cpu --profile arm64-cpu --profile nvidia-gpu \
    --reference "$out/reference.csv" --key "$out/keys/signing.key" --out "$out/dist" > /dev/null
# v3 (for step 13) builds in the background meanwhile; its reference data is last year's
python - "$out" <<'PY'
import sys, pandas as pd
frame = pd.read_csv(f"{sys.argv[1]}/reference.csv")
frame["support_calls"] += 4
frame["monthly_spend"] *= 1.6
frame.to_csv(f"{sys.argv[1]}/reference-last-year.csv", index=False)
PY
edgepack build "$out/churn.joblib" --trust-pickle --name churn --version 3 --profile "$profile" \
    --reference "$out/reference-last-year.csv" --key "$out/keys/signing.key" --out "$out/dist" \
    > "$out/logs/build-v3.log" 2>&1 &
v3_build=$!
pids+=($v3_build)
job=$($fleet deploy churn --version 2 --group store-42 --bundles "http://127.0.0.1:$http_port/" \
    --key "$out/keys/ops.key" | sed -n 's/.*job \([^ ]*\)$/\1/p' | head -1)
$fleet status "$job" --wait --timeout 120

echo "== 9. roll cam-2 back to v1"
job=$($fleet rollback churn --device cam-2 --key "$out/keys/ops.key" | sed -n 's/.*job \([^ ]*\)$/\1/p' | head -1)
$fleet status "$job" --wait --timeout 60
python scripts/demo_client.py "http://127.0.0.1:${api_ports[1]}" wait-version 1

echo "== 10. the fleet"
sleep 1
$fleet devices

echo "== 11. live traffic: normal customers on cam-1, shifted ones on cam-3"
python scripts/demo_client.py "http://127.0.0.1:${api_ports[0]}" traffic normal 1000
python scripts/demo_client.py "http://127.0.0.1:${api_ports[2]}" traffic shifted 1000
sleep 5  # a drift window closes every 250 rows; telemetry every 3 s; the outbox delivers
$fleet drift --model churn
$fleet telemetry --model churn

echo "== 12. the fleet report"
$fleet report --model churn --out "$out/report-churn.html"
echo "== 13. a staged rollout that stops by itself: v3 was built against last year's customers"
# Its reference data (the drift baseline) is last year's: more support calls, higher spend. The
# canary serves today's customers, its drift windows say so, and the rollout aborts and rolls
# the canary back before the rest of the group ever sees v3.
wait "$v3_build" || { echo "error: building v3 failed (see $out/logs/build-v3.log)" >&2; exit 1; }
$fleet rollout start churn --version 3 --group store-42 --stages 33%,100% --soak 30s \
    --abort-on 'failed>0%' --abort-on 'error_rate>1%' --abort-on 'drift_share>0.3' \
    --bundles "http://127.0.0.1:$http_port/" --key "$out/keys/ops.key" --poll 0.5 \
    > "$out/logs/rollout.log" 2>&1 &
rollout_pid=$!
pids+=($rollout_pid)
# today's customers on every device while the rollout runs (at most 40 s)
python - "$rollout_pid" "${api_ports[@]}" > /dev/null <<'PY'
import os, sys, time
sys.path.insert(0, "scripts")
from demo_client import traffic
pid, ports = int(sys.argv[1]), sys.argv[2:]
deadline = time.monotonic() + 40
def running(pid):  # an exited child stays a zombie ("Z") until the shell reaps it
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
while time.monotonic() < deadline and running(pid):
    for port in ports:
        try:
            traffic(f"http://127.0.0.1:{port}", shifted=False, rows=250)
        except Exception:  # a device swapping versions may refuse a request: keep going
            pass
PY
if wait "$rollout_pid"; then echo "error: the rollout of the bad v3 did not abort" >&2; exit 1; fi
cat "$out/logs/rollout.log"
rollout_id=$($fleet rollout list --json | python -c 'import json, sys; print(json.load(sys.stdin)[0]["rollout_id"])')
$fleet rollout status "$rollout_id"

echo "== 14. governance: every model version, and the audit trail of what this demo did"
$fleet models
$fleet audit --model churn
$fleet audit verify --key-file "$out/keys/ops.pub"
echo "== 15. what the policy flagged ($out/policies.toml)"
$fleet policy list

echo
echo "demo finished: bundles in $out/dist/, device states in $out/devices/, logs in $out/logs/,"
echo "report in $out/report-churn.html, the rollout's decisions: edgepack-fleet rollout status $rollout_id"
console_port=${EDGEPACK_CONSOLE_PORT:-8080}
echo "live console: edgepack-fleet --store $out/fleet.db console --port $console_port   → http://127.0.0.1:$console_port/"
if $keep_console; then
    echo "serving it now, the fleet still running (Ctrl-C stops everything)"
    $fleet console --port "$console_port"
else
    echo "  (bash scripts/demo.sh --console serves it at the end, with the fleet still running)"
fi
