"""Adds two numbers: {"a": 3, "b": 5} -> 8."""


def add(args):
    return args["a"] + args["b"]
