"""A tiny Open Inference Protocol client for the demo: readiness, one request, version waits."""

from __future__ import annotations

import sys
import time

import httpx

ROWS = {
    "tenure_months": [3.0, 60.0],
    "monthly_spend": [80.5, 20.0],
    "support_calls": [4.0, 0.0],
    "plan": ["basic", "pro"],
    "region": ["north", "west"],
}


def main() -> int:
    url, command = sys.argv[1], sys.argv[2]
    if command == "ready":
        try:
            return 0 if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200 else 1
        except httpx.HTTPError:
            return 1
    if command == "wait-version":
        want = sys.argv[3]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            versions = httpx.get(f"{url}/v2/models/churn", timeout=2).json().get("versions")
            if versions == [want]:
                print(f"agent now serves churn v{want}")
                return 0
            time.sleep(0.2)
        print(f"error: the agent did not switch to v{want} within 10 s", file=sys.stderr)
        return 1
    inputs = [
        {
            "name": name,
            "shape": [len(values), 1],
            "datatype": "BYTES" if isinstance(values[0], str) else "FP32",
            "data": values,
        }
        for name, values in ROWS.items()
    ]
    response = httpx.post(f"{url}/v2/models/churn/infer", json={"inputs": inputs}, timeout=5)
    response.raise_for_status()
    body = response.json()
    outputs = {o["name"]: o["data"] for o in body["outputs"]}
    for i, label in enumerate(outputs["label"]):
        p = outputs["probabilities"][2 * i + 1]
        print(f"  customer {i}: churn={label} (p={p:.2f})  [model v{body['model_version']}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
