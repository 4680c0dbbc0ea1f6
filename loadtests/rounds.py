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


def p50_by_size(path):
    """{(size, who): [p50 of each round]} from lines "WHO<TAB>SIZE<TAB>report", as the body-size
    scripts write them; a run with an error fails."""
    runs = {}
    for line in open(path):
        who, n, j = line.rstrip("\n").split("\t", 2)
        r = json.loads(j)
        assert r["error_total"] == 0, line
        runs.setdefault((int(n), who), []).append(r["latency_us"]["p50"])
    return runs
