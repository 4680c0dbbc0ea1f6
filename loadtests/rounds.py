"""What the round-by-round scripts share (imported by their report code, run from the
repository root): the loadgen reports a run left in a directory, as NAME-rROUND.json."""

import json
import os
import re


def load(directory):
    """{name: {round: report}} for every NAME-rROUND.json in directory."""
    runs = {}
    for n in os.listdir(directory):
        m = re.fullmatch(r"(.*)-r(\d+)\.json", n)
        if m:
            with open(os.path.join(directory, n)) as f:
                runs.setdefault(m.group(1), {})[int(m.group(2))] = json.load(f)
    return runs
