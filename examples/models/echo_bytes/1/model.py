"""echo_bytes: OUTPUT0 is INPUT0, element for element.

INPUT0 is a BYTES (TYPE_STRING) tensor of shape [-1], which reaches the
predictor as a numpy object array of ``bytes``. The reply is a new object
array of the same shape holding the same byte strings, so the round trip
exercises the BYTES codec both ways (empty strings, NUL bytes and non-UTF-8
data included).
"""

from __future__ import annotations

import numpy as np


class Predictor:
    def __init__(self, config: dict):
        self.name = config.get("name", "echo_bytes")

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        data = np.asarray(inputs["INPUT0"], dtype=object)
        out = np.empty(data.shape, dtype=object)
        for index, item in np.ndenumerate(data):
            if isinstance(item, str):  # tolerate str from in-process callers
                item = item.encode("utf-8")
            elif not isinstance(item, bytes):
                item = bytes(item)
            out[index] = item
        return {"OUTPUT0": out}
