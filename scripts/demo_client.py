"""A tiny Open Inference Protocol client for the demo: readiness, requests, version waits, and
traffic (normal or shifted customers) so the device's drift detection has something to see."""

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
    if command == "traffic":
        return traffic(url, shifted=sys.argv[3] == "shifted", rows=int(sys.argv[4]))
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


def traffic(url: str, *, shifted: bool, rows: int, batch: int = 50) -> int:
    """Send ``rows`` customers in batches; ``shifted`` ones call support far more often."""
    import numpy as np
    import pandas as pd

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from train_demo import churn_data

    frame, _ = churn_data(rows=rows, seed=99)
    if shifted:  # a new product release: everybody calls support, and spends more
        frame["support_calls"] = frame["support_calls"] + 4
        frame["monthly_spend"] = frame["monthly_spend"] * 1.6
    with httpx.Client(timeout=10) as client:
        for start in range(0, rows, batch):
            part = frame.iloc[start : start + batch]
            inputs = []
            for name in part.columns:
                text = not pd.api.types.is_numeric_dtype(part[name])
                inputs.append(
                    {
                        "name": name,
                        "shape": [len(part), 1],
                        "datatype": "BYTES" if text else "FP32",
                        "data": [str(v) for v in part[name]]
                        if text
                        else part[name].to_numpy(np.float32).tolist(),
                    }
                )
            client.post(f"{url}/v2/models/churn/infer", json={"inputs": inputs}).raise_for_status()
    print(f"  sent {rows} {'shifted' if shifted else 'normal'} customers to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
