"""env_echo: VALUE[i] is the replica process's os.environ[NAME[i]], or b"<unset>"."""

import os

import numpy as np


class Predictor:
    def __init__(self, config: dict):
        pass

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = inputs["NAME"]
        out = np.empty(names.shape, dtype=object)
        for index, name in np.ndenumerate(names):
            key = name.decode() if isinstance(name, bytes) else str(name)
            out[index] = os.environ.get(key, "<unset>").encode()
        return {"VALUE": out}
