"""Predicts petal width from petal length: {"petal_length": 4.0} -> {"petal_width": ...}."""

import pickle

# The working directory is the model directory, so the fitted model is found by relative path.
with open("model.pkl", "rb") as f:
    model = pickle.load(f)


def predict(args):
    length = float(args["petal_length"])
    width = model.predict([[length]])[0]
    return {"petal_width": round(float(width), 4)}
