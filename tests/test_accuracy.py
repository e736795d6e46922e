"""Accuracy: moeq's own lm-eval tasks (data from the held-out corpus only, deterministic, of the promised
sizes), their loading through lm-eval's TaskManager, and score() on the trained tiny model with vLLM."""
import importlib.util
import json
import math
import os

import pytest

from moeq.errors import UserError

from moeq.evaluate import accuracy
from moeq import corpus

LIMIT = 16


@pytest.fixture(scope="module")
def task_manager():
    return accuracy.task_manager(["moeq"])  # moeq's tasks alone: lm-eval's registry is not indexed for them


@pytest.fixture(scope="module")
def tasks(task_manager):
    loaded = task_manager.load(["moeq"])  # the group expands into its tasks
    assert loaded["group_map"] == {"moeq": accuracy.DEFAULT_TASKS}
    return loaded["tasks"]


def docs(task) -> list[dict]:
    return [dict(d) for d in task.test_docs()]


def data_module():
    # the way lm-eval's `!function` imports it: by file path, not as a package
    spec = importlib.util.spec_from_file_location("moeq_data", accuracy.TASKS_DIR / "moeq_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_group_and_standard_tasks_resolve(task_manager, tasks):
    assert sorted(tasks) == sorted(accuracy.DEFAULT_TASKS)
    assert all(t.startswith("moeq") for t in task_manager.all_tasks)
    accuracy.check_tasks(["moeq", "moeq_mc4", "hellaswag"])  # moeq's tasks beside lm-eval's own
    with pytest.raises(UserError, match="unknown task 'moeq_mc5'"):
        accuracy.check_tasks(["moeq_mc4", "moeq_mc5"])
    assert len(docs(tasks["moeq_ppl"])) >= 200 and 300 <= len(docs(tasks["moeq_nextline"])) <= 1000


def test_mc4_items(tasks):
    items = docs(tasks["moeq_mc4"])
    assert len(items) >= 2000
    for d in items:
        assert len(d["choices"]) == 4 and len({c.strip() for c in d["choices"]}) == 4
        assert 0 <= d["label"] < 4
    counts = [sum(d["label"] == k for d in items) for k in range(4)]
    assert min(counts) > 0.2 * len(items), counts  # seeded order: the answer is not always first


def test_items_come_from_heldout_files_only(tasks):
    train = {p.relative_to(corpus.stdlib_root()).as_posix() for p in corpus.files("train")}
    lines = {}
    for name, task in tasks.items():
        for d in docs(task):
            assert corpus.split_of(d["source"]) == "heldout" and d["source"] not in train
            if d["source"] not in lines:
                text = (corpus.stdlib_root() / d["source"]).read_text(encoding="utf-8", errors="replace")
                lines[d["source"]] = [ln.rstrip() for ln in text.splitlines()]
            src = lines[d["source"]]
            if name == "moeq_ppl":  # a chunk of whole lines starting at `line`
                assert d["text"].splitlines() == src[d["line"]:d["line"] + len(d["text"].splitlines())]
                continue
            answer = d["choices"][d["label"]] if "choices" in d else d["target"]
            *context, start = d["context"].split("\n")
            assert start + answer == src[d["line"]]  # the prompt's last words + the answer = that line
            assert context == src[d["line"] - len(context):d["line"]]


def test_data_is_deterministic_and_written_atomically(tasks, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEQ_CACHE", str(tmp_path))  # built again from scratch, in a fresh folder
    data = data_module()
    for name, task in tasks.items():
        kwargs = task.config.dataset_kwargs
        rebuilt = [dict(d) for d in data.load(**kwargs, version=1.0)["test"]]  # metadata kwargs are ignored
        assert rebuilt == docs(task), name
        path = data.data_path(kwargs["file"], kwargs["build"])
        assert path.is_relative_to(tmp_path / "tasks" / corpus.fingerprint("heldout"))
        assert path.read_text() == "".join(json.dumps(r, sort_keys=True) + "\n" for r in rebuilt)
        assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]


def test_score_with_vllm(tiny_model):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine, as moeq runs it
    from lm_eval.models.vllm_causallms import VLLM
    lm = VLLM(pretrained=str(tiny_model), dtype="bfloat16", max_model_len=2048, enable_prefix_caching=False,
              seed=0, kv_cache_memory_bytes=2**30)
    logged = []
    scores = accuracy.score(lm, accuracy.DEFAULT_TASKS, limit=LIMIT, log=logged.append)
    assert sorted(scores) == sorted(accuracy.DEFAULT_TASKS) and logged
    for task, result in scores.items():
        metrics = {m["metric"]: m for m in result["metrics"]}
        for m in metrics.values():
            assert math.isfinite(m["value"]) and m["n"] == LIMIT
        by_metric = {}
        for t, metric, item, value in result["items"]:
            assert t == task and math.isfinite(value)
            by_metric.setdefault(metric, {})[item] = value
        for metric, values in by_metric.items():  # every metric has every doc, keyed by its doc_id
            assert sorted(values) == list(range(LIMIT)), (task, metric)
        for name in ("acc", "acc_norm", "exact_match"):
            if name in metrics:
                m = metrics[name]
                assert m["spread_kind"] == "stderr" and m["spread"] > 0
                assert m["value"] == pytest.approx(sum(by_metric[name].values()) / LIMIT)
    ppl = scores["moeq_ppl"]
    assert {m["metric"] for m in ppl["metrics"]} == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    ll, nbytes = (sum(v for _, m, _, v in ppl["items"] if m == k) for k in ("loglikelihood", "bytes"))
    bpb = next(m["value"] for m in ppl["metrics"] if m["metric"] == "bits_per_byte")
    assert bpb == pytest.approx(-ll / nbytes / math.log(2))  # a report can recompute it from the items
    assert set(next(iter(scores.values()))["metrics"][0]) >= {"metric", "value", "spread", "spread_kind", "n", "unit"}
    # the promise that makes moeq_mc4 useful: the BF16 tiny model is well above chance (0.25); 500 items
    # (stderr about 0.022) keep this quick, where all 2,000 score about 0.51
    acc = next(m for m in accuracy.score(lm, ["moeq_mc4"], limit=500)["moeq_mc4"]["metrics"] if m["metric"] == "acc")
    assert acc["value"] >= 0.4, acc
