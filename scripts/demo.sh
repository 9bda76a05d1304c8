#!/usr/bin/env bash
# The main job, end to end on this machine: set up, train a small churn model, make a signing
# key, build signed bundles for every device profile, verify and inspect one.
# Everything it writes goes to ./demo (remove it to start over). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh all
export PATH="$PWD/.venv/bin:$PATH"
out=demo
mkdir -p "$out"

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
echo
echo "demo finished: bundles in $out/dist/"
