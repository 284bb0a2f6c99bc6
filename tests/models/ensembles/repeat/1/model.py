"""repeat: decoupled; streams COUNT responses OUT = IN * (i + 1)."""

import numpy as np


class Predictor:
    def __init__(self, config):
        pass

    def predict(self, inputs):
        for i in range(int(inputs["COUNT"][0])):
            yield {"OUT": inputs["IN"] * np.float32(i + 1)}
