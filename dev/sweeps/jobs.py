"""The jobs dev/sweeps/sweep_rl.py runs, each in its own process pinned to its cores, each printing
one RESULT line of JSON last:

    python -m dev.sweeps.jobs pretrain OUT SEED RECIPE_JSON      the quickstart's pretraining (2 threads), val accuracy
    python -m dev.sweeps.jobs control SPEC_JSON                  more supervised training for a GRPO run's time
    python -m dev.sweeps.jobs evaluate RECIPE_JSON SPLIT DIR...  greedy accuracy of checkpoints on one split

RECIPE_JSON holds Recipe fields (nanoseek.recipes.quickstart); SPEC_JSON the control's arguments plus
"threads".
"""

import json
import sys

import torch

from nanoseek.recipes.quickstart import Recipe, control_train, measure, pretrain_stage, task_spec
from nanoseek.tasks import get_task


def result(obj: dict) -> None:
    print("RESULT " + json.dumps(obj), flush=True)


def pretrain(out: str, seed: str, recipe_json: str) -> None:
    torch.set_num_threads(2)
    rc = Recipe(**json.loads(recipe_json))
    st = pretrain_stage(out, rc, 500, int(seed), progress=False, device="cpu")
    r = measure(st["pre_dir"], st["task"], st["task"].problems("val"), 0, rc.max_new_tokens, "cpu", rc.eval_context)
    result({"val": r["accuracy"], "val_strict": r["accuracy_strict"], "seconds": st["pre"]["seconds"]})


def control(spec_json: str) -> None:
    """The control for one seed: more supervised training from its pretrained model for its GRPO time."""
    spec = json.loads(spec_json)
    torch.set_num_threads(spec.pop("threads"))
    r = control_train(spec)
    result({"steps": r["step"], "seconds": r["seconds"]})


def evaluate(recipe_json: str, split: str, *dirs: str) -> None:
    torch.set_num_threads(1)
    rc = Recipe(**json.loads(recipe_json))
    task = get_task(task_spec(rc, 500))
    out = {}
    for d in dirs:
        r = measure(d, task, task.problems(split), 0, rc.max_new_tokens, "cpu", rc.eval_context)
        out[d] = {"accuracy": r["accuracy"], "accuracy_strict": r["accuracy_strict"]}
    result(out)


JOBS = {"pretrain": pretrain, "control": control, "evaluate": evaluate}


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in JOBS:
        raise SystemExit(__doc__)
    JOBS[sys.argv[1]](*sys.argv[2:])


if __name__ == "__main__":
    main()
