"""Routed expert load (issue 9): the `moeq routing` probes beside the ledger (routing/*.json), and the flag
on perf rows measured on dummy weights' own routers where that router's probe degenerated: such rows time
the few experts the router picks, not the model.
"""
import json
from pathlib import Path

import pandas as pd

from moeq.errors import UserError
from moeq.evaluate.routing import OWN_ROUTER, degenerate
from moeq.evaluate.settings import MODEL_ROUTING

DUMMY_ROUTER = "dummy router"  # a probe of dummy weights routed by their own (random) routers
STATS = ["max_over_mean", "min_over_mean", "entropy", "cv"]
COLUMNS = ["model", "scheme", "weights", "routing", "num_experts", "layers", "tokens", *STATS, "verdict", "file"]
FLAG_HEAD = "dummy routers degenerate"


def read_probes(folder: Path) -> pd.DataFrame:
    """One row per probe record (the median layer's load); empty where the folder is missing or holds none.
    The checkpoint path names model and scheme: .../<model>/<scheme>."""
    rows = []
    for f in sorted(Path(folder).glob("*.json")):
        try:
            records = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"routing probe file {f} is not readable JSON ({e}): "
                            "rerun the `moeq routing` that wrote it") from e
        for r in records:
            ckpt = Path(r["checkpoint"])
            own = r["weights"] == "dummy" and r["routing"] == OWN_ROUTER
            rows.append({"model": ckpt.parent.name, "scheme": ckpt.name, "weights": r["weights"],
                         "routing": DUMMY_ROUTER if own else r["routing"], "num_experts": r["num_experts"],
                         "layers": r["layers"], "tokens": r["tokens"], **{k: r["median"][k] for k in STATS},
                         "verdict": "degenerate" if degenerate(r["median"]) else "balanced", "file": f.name})
    return pd.DataFrame(rows, columns=COLUMNS)


def on_dummy_routers(provenance: str, routing: str) -> bool:
    """Rows whose experts the dummy weights' own routers picked: shape-only weights at the model's routing
    (legacy-v1's shape-only rows). Simulated routings (uniform_random, zipf; older rows say shape-only-zipf1.0
    in their provenance) and real weights' trained routers are not these."""
    return provenance == "shape-only" and routing == MODEL_ROUTING


def flag(model: str, scheme: str, provenance: str, routing: str, probes: pd.DataFrame) -> str | None:
    """The flag of one perf row: its model's dummy-router probe (of its own scheme where probed, else the
    model's first) degenerated. An unprobed scheme takes another's probe: vLLM draws every dummy tensor from
    one seed, so a router the recipe leaves in bf16 holds the same values in every scheme."""
    mine = probes[(probes.model == model) & (probes.routing == DUMMY_ROUTER)] if len(probes) else probes
    if not on_dummy_routers(provenance, routing) or mine.empty:
        return None
    p = (mine[mine.scheme == scheme] if (mine.scheme == scheme).any() else mine).iloc[0]
    if p.verdict != "degenerate":
        return None
    # the words before the colon are the flag's short form in the grid and sentences (headline.short_flag)
    return (f"{FLAG_HEAD} (busiest expert {p.max_over_mean:.1f}× mean; {p.scheme} probe, {p.file}): normalized "
            f"entropy {p.entropy:.2f}, so these rows measure the few experts that router picks, not the model")


def routing_used(record: dict) -> str:
    """The routing a settings group's rows ran with, in words (legacy-v1 records describe it themselves)."""
    if "llm" not in record:
        return "not recorded"
    routing = record.get("non_default", {}).get("routing") or record.get("routing", MODEL_ROUTING)
    return {MODEL_ROUTING: "the checkpoint's own routers",
            "uniform_random": "uniform_random (vLLM's simulation, balanced)"}.get(routing, routing)
