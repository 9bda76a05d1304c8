#!/usr/bin/env bash
# The main job, end to end on this machine: set up, train a small churn model, make a signing
# key, build signed bundles for every device profile, verify and inspect one, then play the
# device: install the bundle for this machine into a local agent, serve it over the Open
# Inference Protocol, upgrade it under traffic, roll it back.
# Everything it writes goes to ./demo (remove it to start over). Exits non-zero on any failure
# and stops every process it started.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh all
export PATH="$PWD/.venv/bin:$PATH"
out=demo
rm -rf "$out/device"
mkdir -p "$out"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

echo "== 1. train a small churn model (scikit-learn pipeline with string columns and an MLP)"
python scripts/train_demo.py --out "$out"

echo "== 2. device profiles"
edgepack profiles

echo "== 3. signing key"
[ -f "$out/keys/signing.key" ] || edgepack keygen --out "$out/keys"

echo "== 4. build one signed bundle per profile"
edgepack build "$out/churn.joblib" --trust-pickle --name churn --version 1 \
    --profile x86_64-cpu --profile x86_64-vnni-cpu --profile arm64-cpu --profile nvidia-gpu \
    --reference "$out/reference.csv" --key "$out/keys/signing.key" --out "$out/dist"

echo "== 5. verify and inspect the Raspberry Pi bundle"
edgepack verify "$out/dist/churn-1-arm64-cpu.edgepack" --pub "$out/keys/signing.pub"
edgepack inspect "$out/dist/churn-1-arm64-cpu.edgepack"

echo "== 6. the device: an agent for this machine's profile"
profile=$(python -c 'import platform, pathlib
m = platform.machine().lower()
flags = pathlib.Path("/proc/cpuinfo").read_text().split() if pathlib.Path("/proc/cpuinfo").exists() else []
print("arm64-cpu" if m in ("aarch64", "arm64") else "x86_64-vnni-cpu" if ("avx512_vnni" in flags or "avx_vnni" in flags) else "x86_64-cpu")')
mkdir -p "$out/device"
cat > "$out/device/agent.toml" <<TOML
device_id = "demo-device"
profile = "$profile"
state_dir = "state"
trusted_keys = ["../keys/signing.pub"]
[server]
port = ${EDGEPACK_DEMO_PORT:-18080}
TOML
agent="edgepack-agent --config $out/device/agent.toml"
$agent install "$out/dist/churn-1-$profile.edgepack"
$agent run > "$out/device/agent.log" 2>&1 &
pids+=($!)
url="http://127.0.0.1:${EDGEPACK_DEMO_PORT:-18080}"
for _ in $(seq 1 50); do python scripts/demo_client.py "$url" ready && break; sleep 0.2; done

echo "== 7. inference over HTTP (Open Inference Protocol)"
python scripts/demo_client.py "$url" infer

echo "== 8. build v2 and upgrade the running agent (hot swap, no request dropped)"
edgepack build "$out/churn.joblib" --trust-pickle --name churn --version 2 --profile "$profile" \
    --reference "$out/reference.csv" --key "$out/keys/signing.key" --out "$out/dist" > /dev/null
$agent install "$out/dist/churn-2-$profile.edgepack"
python scripts/demo_client.py "$url" wait-version 2
python scripts/demo_client.py "$url" infer

echo "== 9. roll back to v1"
$agent rollback churn
python scripts/demo_client.py "$url" wait-version 1
$agent status
echo
echo "demo finished: bundles in $out/dist/, device state in $out/device/state, agent log $out/device/agent.log"
