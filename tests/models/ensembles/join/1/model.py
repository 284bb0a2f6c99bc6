"""join: SUM = A + B, DIFF = A - B."""


class Predictor:
    def __init__(self, config):
        pass

    def predict(self, inputs):
        return {"SUM": inputs["A"] + inputs["B"], "DIFF": inputs["A"] - inputs["B"]}
