"""int_identity: OUT = IN (INT32), for a datatype mismatch."""


class Predictor:
    def __init__(self, config):
        pass

    def predict(self, inputs):
        return {"OUT": inputs["IN"]}
