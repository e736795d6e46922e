"""Accuracy through lm-evaluation-harness, on an LM object the caller built (vLLM or HF backend).

moeq's own tasks are lm-eval task YAMLs in tasks/ (found through TaskManager's include_path); any
standard task name (hellaswag, arc_easy, ...) takes the same path. Besides lm-eval's aggregate metrics
with their stderr, the per-document values are kept, keyed by doc_id, so that a report can compare two
schemes item by item (paired) rather than only by their means.
"""
import math
import time
from pathlib import Path

TASKS_DIR = Path(__file__).with_name("tasks")
DEFAULT_TASKS = ["moeq_ppl", "moeq_mc4", "moeq_nextline"]
UNITS = {"bits_per_byte": "bits/byte"}
# lm-eval logs these per document as (loglikelihood, words or bytes); the report re-aggregates them
PPL_COUNTS = {"word_perplexity": "words", "byte_perplexity": "bytes", "bits_per_byte": "bytes"}


def _name(metric: str, filt: str) -> str:
    # "acc" for the usual unfiltered metric; tasks with several filters (gsm8k...) keep them apart
    return metric if filt == "none" else f"{metric}/{filt}"


def _number(x):
    return float(x) if isinstance(x, (bool, int, float)) and math.isfinite(float(x)) else None


def _metrics(res: dict, n: int, higher: dict) -> list[dict]:
    out = []
    for key, value in res.items():
        if "," not in key or "_stderr," in key or _number(value) is None:
            continue
        metric, filt = key.split(",", 1)
        spread = _number(res.get(f"{metric}_stderr,{filt}"))
        out.append({"metric": _name(metric, filt), "value": float(value), "spread": spread,
                    "spread_kind": "stderr" if spread is not None else None, "n": n,
                    "unit": UNITS.get(metric, ""), "higher_is_better": higher.get(metric)})
    return out


def _items(task: str, samples: list[dict]) -> list[tuple]:
    items = {}
    for s in samples:
        for metric in s["metrics"]:
            value, doc = s[metric], s["doc_id"]
            if metric in PPL_COUNTS and isinstance(value, (list, tuple)):
                items[(task, "loglikelihood", doc)] = float(value[0])
                items[(task, _name(PPL_COUNTS[metric], s["filter"]), doc)] = float(value[1])
            elif _number(value) is not None:
                items[(task, _name(metric, s["filter"]), doc)] = float(value)
    return sorted((t, m, d, v) for (t, m, d), v in items.items())


def task_manager(tasks: list[str]):
    """lm-eval's TaskManager for these names: moeq's tasks/ alone when every name is one of its tasks or groups
    (indexing lm-eval's ~15,000 built-in tasks took 21 s here, on every `moeq eval` and every scheme it scored),
    lm-eval's registry beside them otherwise."""
    from lm_eval.tasks import TaskManager
    own = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    return own if set(tasks) <= set(own.all_tasks) else TaskManager(include_path=str(TASKS_DIR))


def check_tasks(tasks: list[str]):
    """Every task name must be known to lm-eval (its registry plus moeq's tasks/), before any engine starts."""
    known = set(task_manager(tasks).all_tasks)
    if bad := [t for t in tasks if t not in known]:
        from moeq.errors import UserError
        raise UserError(f"unknown task {bad[0]!r}; moeq's tasks: {', '.join(DEFAULT_TASKS)} (group: moeq), or any "
                        "task `lm-eval ls tasks` lists (TASKS=none: no accuracy)")


def score(lm, tasks: list[str], limit: int | None = None, log=print) -> dict[str, dict]:
    """Run lm-eval on `lm`; per task {"metrics": [{metric, value, spread, spread_kind, n, unit, ...}],
    "items": [(task, metric, doc_id, value), ...]}. Groups (e.g. `moeq`) expand into their tasks."""
    import lm_eval

    t0 = time.perf_counter()
    # bootstrap only serves metrics without a closed-form stderr (bleu...); lm-eval's 100,000 draws take minutes
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager(tasks),
                                  log_samples=True, limit=limit, bootstrap_iters=1000)
    log(f"lm-eval {', '.join(tasks)}: {time.perf_counter() - t0:.1f} s")
    scores = {}
    for task, res in out["results"].items():  # leaf tasks, and groups that aggregate (mmlu...)
        n = out["n-samples"].get(task, {}).get("effective", res.get("sample_len"))
        entry = {"metrics": _metrics(res, n, out["higher_is_better"].get(task, {})),
                 "items": _items(task, out["samples"].get(task, []))}
        if entry["metrics"] or entry["items"]:  # a group without aggregate (moeq) only lists its tasks
            scores[task] = entry
            log(f"  {task}: " + ", ".join(f"{m['metric']}={m['value']:.4g}" for m in entry["metrics"]))
    return scores
