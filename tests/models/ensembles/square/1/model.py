"""square: OUT = IN * IN."""


class Predictor:
    def __init__(self, config):
        pass

    def predict(self, inputs):
        return {"OUT": inputs["IN"] * inputs["IN"]}
