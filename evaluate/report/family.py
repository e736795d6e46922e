"""A claim about a whole family of variants (claims.yaml `family:`), e.g. "8-32 experts for optimal
throughput/memory": among groups that differ only in one coordinate (plan-experts-qwen3.yaml: Qwen3-30B-A3B's
shape at top-2 with 8 to 128 experts), the member with the most throughput per GB of weights, per cell.
Members pair as compare.py pairs a variant with its reference (same base model, scheme, engine settings and
every other coordinate); the interval resamples every member's timed repeats and gives the range of
members that came out best (bootstrap)."""
import numpy as np
import pandas as pd

from moeq.evaluate import kernels
from moeq.evaluate.report import compare, verdicts
from moeq.evaluate.report.verdicts import GROUP, N_BOOT, SEED


# what the measure can and cannot say, beside every value
CAVEAT = ("weights grow with every expert while a step reads only the top-k, so this measure favours the fewest "
          "experts unless throughput falls faster; quality, the other side of 'optimal', needs real weights")


def families(groups: pd.DataFrame, claim: dict) -> list[pd.DataFrame]:
    """Sets of three or more groups of one model that differ only on the claim's axis."""
    axis = claim["family"]["axis"]
    others = [c for c in compare.COORDINATES if c not in (axis, compare.LINKED.get(axis))]
    picked = groups[pd.Series([(not claim.get("models") or g.base in claim["models"])
                               and all(compare.matches(g[c], x) for c, x in (claim.get("where") or {}).items())
                               for _, g in groups.iterrows()], index=groups.index, dtype=bool)]
    share = ["model", "checkpoint", "scheme", "provenance", "backend", "device", "rest", *others]
    return [f for _, f in picked.groupby(share, dropna=False) if f[axis].nunique() >= 3]


def by_config(members: list, axis: str) -> list[tuple[list, str]]:
    """Members that repeat an axis value (one shape run on vLLM's default Triton config and again on a tuned
    file supplied to it, device.sh borrow=) make one family per config kind, each with the members that do
    not repeat, labelled by that kind: a family compares each value of the axis once."""
    values = [g[axis] for g, *_ in members]
    if len(set(values)) == len(values):
        return [(members, "")]
    repeated = [m for m, v in zip(members, values) if values.count(v) > 1]
    single = [m for m, v in zip(members, values) if values.count(v) == 1]
    kinds = dict.fromkeys(m[3] for m in repeated)
    return [(sorted(single + [m for m in repeated if m[3] == k], key=lambda m: m[0][axis]), f" ({k or 'unlogged'} Triton configs)")
            for k in kinds]


def family_rows(claim: dict, groups: pd.DataFrame, perf: pd.DataFrame, mem: pd.DataFrame) -> list[dict]:
    axis = claim["family"]["axis"]
    out = []
    for fam in families(groups, claim):
        members = []
        for _, g in fam.sort_values(axis).iterrows():
            weights = compare.select(mem, g).weights_bytes.dropna()
            timed = compare.select(perf, g).set_index("cell")
            if len(weights):
                kind = kernels.config_kind(timed.moe_config.iloc[0]) if "moe_config" in timed and len(timed) else None
                members.append((g, timed, weights.iloc[0] / 1e9, kind))
        for subset, label in by_config(members, axis):
            out += member_rows(subset, axis, label)
    return out


def member_rows(members: list, axis: str, label: str = "") -> list[dict]:
    """Per cell all members share: the member with the most throughput per GB of weights."""
    out = []
    if len({g[axis] for g, *_ in members}) < 3:
        return out
    cells = set.intersection(*(set(p.index) for _, p, *_ in members))
    values = np.array([g[axis] for g, *_ in members])
    for cell in sorted(cells, key=lambda c: members[0][1].loc[c, "batch"]):
        rows = [p.loc[cell] for _, p, *_ in members]
        reps = [np.asarray(verdicts.repeats_of(r.repeats, r.throughput), float) / gb
                for r, (_, _, gb, _) in zip(rows, members)]
        best = values[np.argmax([np.median(x) for x in reps])]
        rng = np.random.default_rng(SEED)
        boots = [values[np.argmax([np.median(rng.choice(x, len(x))) for x in reps])] for _ in range(N_BOOT // 4)]
        flag = next((f for f in map(compare.cell_flag, rows) if f), None)
        configs = [kernels.config_kind(getattr(r, "moe_config", None)) for r in rows]
        # part of the differences is then the kernel's tiles, as compare._kernel_difference says of a pair
        differ = ("; MoE Triton configs differ: " + ", ".join(f"{v:g} {c or 'not logged'}" for v, c in zip(values, configs))
                  if len(set(configs) - {None}) > 1 else "")
        note = f"tok/s per GB of weights by {axis}: " + "; ".join(
            f"{v:g}: {np.median(x):,.0f}" for v, x in zip(values, reps)) + differ + "; " + CAVEAT
        winner = members[int(np.flatnonzero(values == best)[0])][0]
        out.append({**{c: winner[c] for c in GROUP}, "scheme": winner.scheme, "cell": cell,
                    "variant": f"{axis} family: " + ", ".join(f"{v:g}" for v in values) + label,
                    "value": float(best), "lo": float(np.percentile(boots, 2.5, method="lower")),
                    "hi": float(np.percentile(boots, 97.5, method="higher")),
                    "note": f"{flag}; {note}" if flag else note} | ({"flag": flag} if flag else {}))
    return out
