"""Pool the rows of several ``plugin_variants.py --out`` files (one per fine-tuned model).

    python research/pool_variants.py runs/causes/count_r0_seed0-ablations.json \\
        runs/causes/count_r0_seed1-ablations.json

Every file must compare the same plugins at the same (source, target). Per plugin: the mean top-1
over the models, its gain over each model without a plugin, and its difference from the first
plugin named, each with a paired bootstrap 95% CI over the (model, image) cells. With a handful of
models the interval says how sure the test images make us, not how another fine-tuning seed would
behave.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from plugin_variants import table  # this folder: python puts the script's folder on the path


def pooled_correct(runs: list[dict]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Correctness without a plugin ``(M * N,)`` and per plugin ``(M * N,)``, M models of N images."""
    names, pair = list(runs[0]["plugins"]), (runs[0]["source"], runs[0]["target"])
    for run in runs[1:]:
        if list(run["plugins"]) != names or (run["source"], run["target"]) != pair:
            raise ValueError(f"{run['checkpoint']} compares other plugins or another (source, target) than "
                             f"{runs[0]['checkpoint']}: pool only runs of one plugin_variants.py command")
    checkpoints = [run["checkpoint"] for run in runs]
    if len(set(checkpoints)) < len(checkpoints):
        raise ValueError(f"a model appears twice in {checkpoints}: its images would count twice")
    labels = [np.asarray(run["labels"]) for run in runs]
    none = np.concatenate([np.asarray(run["without"]) == y for run, y in zip(runs, labels)])
    right = {name: np.concatenate([np.asarray(run["plugins"][name]["predictions"]) == y
                                   for run, y in zip(runs, labels)]) for name in names}
    return none, right


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="JSON files written by plugin_variants.py --out")
    args = p.parse_args()
    runs = [json.loads(Path(f).read_text()) for f in args.runs]
    none, right = pooled_correct(runs)
    print(f"{len(runs)} models, {runs[0]['source']} -> {runs[0]['target']}, {none.size} (model, image) "
          f"cells; without a plugin {100 * none.mean():.2f}%")
    scales = {name: ", ".join(f"{run['plugins'][name]['scale']:g}" for run in runs) for name in right}
    table(none, right, scales)


if __name__ == "__main__":
    main()
