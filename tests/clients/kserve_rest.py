"""The KServe Python SDK's REST client against a server: run by the SDK's own interpreter
(.venv-kserve, see the Makefile), it prints what it saw as one JSON line.

`python kserve_rest.py http://127.0.0.1:PORT`
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import httpx
import numpy as np
from kserve import InferInput, InferRequest
from kserve.inference_client import InferenceRESTClient, RESTConfig
from kserve.protocol.infer_type import RequestedOutput


async def main(base: str) -> dict[str, Any]:
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))
    seen: dict[str, Any] = {
        "live": await client.is_server_live(base),
        "ready": await client.is_server_ready(base),
        "model_ready": await client.is_model_ready(base, "add_sub"),
    }
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    for binary in (False, True):
        first = InferInput("INPUT0", [2, 16], "FP32")
        first.set_data_from_numpy(a, binary_data=binary)
        second = InferInput("INPUT1", [2, 16], "FP32")
        second.set_data_from_numpy(np.ones_like(a), binary_data=binary)
        outputs = [RequestedOutput("OUTPUT0", parameters={"binary_data": binary})]
        request = InferRequest("add_sub", [first, second], "kserve-1", request_outputs=outputs)
        response = await client.infer(base, request, model_name="add_sub")
        seen[f"add_sub binary={binary}"] = {
            "id": response.id,
            "outputs": {out.name: out.as_numpy().tolist() for out in response.outputs},
        }
    text = InferInput("IN_BYTES", [1, 2], "BYTES")
    text.set_data_from_numpy(np.array([["héllo", "wörld"]], dtype=np.object_), binary_data=False)
    response = await client.infer(base, InferRequest("identity_bytes", [text]), "identity_bytes")
    seen["bytes"] = [_text(value) for value in response.outputs[0].as_numpy().reshape(-1)]
    try:
        await client.infer(base, InferRequest("no_such_model", [first]), "no_such_model")
    except httpx.HTTPStatusError as error:
        seen["unknown model"] = error.response.status_code
    await client.close()
    return seen


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1]))))
