"""Load on a served model, in numbers: the SLO, goodput, saturation and the rate ladder (pure functions).

vLLM's `bench serve` client measures each run and saves it as JSON (with --save-detailed, every request's
TTFT, inter-token gaps, latency and send time); this module only reads that JSON. What the client does
not compute is computed here from its per-request lists:

- goodput under an SLO that includes inter-token latency: vLLM's own `--goodput` takes ttft, tpot and
  e2el only. A request is good when every SLO key holds for it: its TTFT, its own p99 inter-token gap,
  its TPOT or its end-to-end latency;
- the longest pause: the longest time no request got a token while one was waiting (longest_pause);
- saturation: the server keeps up when it makes output tokens as fast as the requests arriving owe them
  (keep_up). Tokens, not completions: a server that admits every request and slows down finishes them in a
  burst once sending stops, which completions counted over their own span read as keeping up (the rule
  through session 18 did: reports/h200/NOTES.md, "saturation read in tokens"). A run keeping up at under
  SUSTAINED is saturated.
"""
import json
import math
from collections import Counter

import numpy as np

from moeq.errors import UserError

# SLO keys: the run-level statistic each bounds (p99 over requests, or over every gap for itl) and how a
# single request is judged against it
SLO_KEYS = ("ttft", "itl", "tpot", "e2el")
DEFAULT_SLO = "ttft:2000,itl:100"
SUSTAINED = 0.9  # keep_up at or above which a rate is sustained


def parse_slo(text: str) -> dict[str, float]:
    """'ttft:2000,itl:100' (milliseconds, vLLM's --goodput notation) -> {key: seconds}."""
    slo = {}
    for part in str(text or "").replace(" ", ",").split(","):
        if not part:
            continue
        key, _, value = part.partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if key not in SLO_KEYS or not 0 < ms < math.inf:
            raise UserError(f"SLO {part!r}: expected KEY:MILLISECONDS with KEY one of {', '.join(SLO_KEYS)} and "
                            f"a positive number, e.g. {DEFAULT_SLO}")
        slo[key] = ms / 1000
    if not slo:
        raise UserError(f"SLO {text!r} is empty; e.g. {DEFAULT_SLO}")
    return slo


def slo_text(slo: dict[str, float]) -> str:
    """'TTFT p99 ≤ 2 s, ITL p99 ≤ 100 ms'."""
    def dur(s):
        return f"{s:g} s" if s >= 1 else f"{s * 1e3:g} ms"
    return ", ".join(f"{k.upper()} p99 ≤ {dur(v)}" for k, v in slo.items())


def _requests(run: dict) -> list[dict]:
    """The successful requests of a saved run, one dict each (vLLM keeps per-request lists)."""
    keys = ("ttfts", "itls", "start_times")
    if missing := [k for k in keys if k not in run]:
        raise ValueError(f"the saved run has no {missing[0]!r}: it must be saved with --save-detailed")
    n = len(run["ttfts"])
    errors = run.get("errors") or [""] * n
    # vLLM 0.26 saves no per-request latency (0.32 does): there it is the client's own sum, the first
    # token's time plus every later gap, i.e. the time of the last token
    latencies = run.get("latencies") or [run["ttfts"][i] + sum(run["itls"][i]) if run["ttfts"][i] else 0.0
                                         for i in range(n)]
    return [{"ttft": run["ttfts"][i], "itl": run["itls"][i], "latency": latencies[i],
             "start": run["start_times"][i], "output_len": (run.get("output_lens") or [0] * n)[i]}
            for i in range(n) if not errors[i] and latencies[i] > 0]


def failure_reasons(run: dict, most: int = 3) -> str:
    """The commonest error texts of a saved run's failed requests, with counts: '2x Bad Request: ...'."""
    texts = Counter(" ".join(str(e).split())[:200] for e in run.get("errors") or [] if e)
    return "; ".join(f"{n}x {text}" for text, n in texts.most_common(most)) or "no error text saved"


def samples(req: dict) -> dict[str, list[float]]:
    """One request's values of each SLO key: its TTFT, every inter-token gap, its TPOT, its latency."""
    tpot = (req["latency"] - req["ttft"]) / (req["output_len"] - 1) if req["output_len"] > 1 else 0.0
    return {"ttft": [req["ttft"]], "itl": req["itl"], "tpot": [tpot], "e2el": [req["latency"]]}


def request_meets(req: dict, slo: dict[str, float]) -> bool:
    """One request against the SLO: its TTFT, its own p99 inter-token gap, TPOT, end-to-end latency."""
    own = {k: float(np.percentile(v, 99)) if v else 0.0 for k, v in samples(req).items()}
    return all(own[k] <= bound for k, bound in slo.items())


def goodput(run: dict, slo: dict[str, float]) -> tuple[int, float]:
    """(good requests, good requests per second of the run's duration)."""
    good = sum(request_meets(r, slo) for r in _requests(run))
    return good, good / run["duration"]


def arrival_rate(run: dict) -> float:
    """Requests per second over the span of send times."""
    starts = sorted(r["start"] for r in _requests(run))
    if len(starts) < 2:
        return math.nan
    return (len(starts) - 1) / (starts[-1] - starts[0]) if starts[-1] > starts[0] else math.inf


def keep_up(run: dict) -> float:
    """Output tokens the server made during the send window over the tokens owed by the requests sent in it,
    plus an allowance: about 1 when it keeps up. The window opens when the first requests were done (the median
    latency of the first tenth: the ramp, after which a server keeping up owes as much at the window's end as at
    its start) and closes at the last send. The allowance is that balance's noise: the request just sent and two
    standard deviations of the difference of two Poisson counts of λ·L requests in flight (Little's law at the
    first requests' latency), each owing the mean output. 0 when the first requests outlived the whole send
    window, or left so little of it that the allowance outweighs the tokens owed (tiny at 32 req/s on two cores,
    2 s of sends: 0 in one run, 8.6 in the next): such a run cannot show that the server kept up, and a run sized
    as serve-bench sizes them (tens of seconds on the H200, seconds against sub-second latencies on a CPU) is
    that short only under overload."""
    reqs = sorted(_requests(run), key=lambda r: r["start"])
    if len(reqs) < 2:
        return math.nan
    starts = np.array([r["start"] for r in reqs])
    ramp = float(np.median([r["latency"] for r in reqs[:max(3, len(reqs) // 10)]]))
    t0, t1 = starts[0] + ramp, starts[-1]
    if t1 <= t0:
        return 0.0
    outs = np.array([r["output_len"] or 1 + len(r["itl"]) for r in reqs], dtype=float)
    owed = outs[(starts > t0) & (starts <= t1)].sum()
    # a streamed chunk may carry several tokens: each chunk counts its request's share of its output
    made = sum(((t > t0) & (t <= t1)).sum() * out / len(t) for t, out in zip(_token_times(reqs), outs))
    in_flight = arrival_rate(run) * ramp
    allowance = outs.mean() * (1 + 2 * math.sqrt(2 * in_flight))
    return 0.0 if allowance > owed else (made + allowance) / owed


def _token_times(reqs: list[dict]) -> list[np.ndarray]:
    """Each request's token times: send + TTFT, then the running sum of its gaps."""
    return [r["start"] + r["ttft"] + np.cumsum([0.0, *r["itl"]]) for r in reqs]


def saturated(keeping_up: float) -> bool:
    return keeping_up < SUSTAINED


def longest_pause(run: dict) -> float:
    """The longest time no request got a token while some request was waiting for one, in seconds: about one
    decode step or prefill chunk on a healthy server, seconds when the engine stalls (session 17's fresh bf16
    servers, likely compiling kernels). Events are the requests' send times and token times (send + TTFT + the
    running sum of its gaps); a gap between two consecutive events counts when a request sent at or before its
    start had not received its last token by then."""
    reqs = _requests(run)
    if not reqs:
        return math.nan
    starts = np.sort([r["start"] for r in reqs])
    tokens = _token_times(reqs)
    lasts = np.sort([t[-1] for t in tokens])
    events = np.unique(np.concatenate([starts, *tokens]))
    gaps = np.diff(events)
    waiting = np.searchsorted(starts, events[:-1], "right") - np.searchsorted(lasts, events[:-1], "right") > 0
    return float(gaps[waiting].max()) if waiting.any() else 0.0


def itl_over(run: dict, bound: float) -> float | None:
    """The share of a run's inter-token gaps longer than `bound`: a p99 bound holds while it stays at most 1%, and
    it says how many of the slowest steps lie past the bound (Qwen3's capacities turned on them, NOTES.md,
    sessions 21-23). None for a run without gaps."""
    gaps = [g for r in _requests(run) for g in r["itl"]]
    return float(np.mean(np.asarray(gaps) > bound)) if gaps else None


def p99_intervals(run: dict, keys, resamples: int = 200, seed: int = 0) -> dict[str, tuple[float, float]]:
    """95% intervals of each key's p99 over a run's requests (a bootstrap that resamples whole requests, so one
    request's gaps stay together): a run's p99 is one draw, and a capacity read from one run per rate moved by a
    rate between sessions where the p99 sat 12% from its bound (NOTES.md, session 18)."""
    reqs = _requests(run)
    if len(reqs) < 2:
        return {}
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(reqs), (resamples, len(reqs)))
    out = {}
    for key in keys:
        per = [np.asarray(samples(r)[key], dtype=float) for r in reqs]
        if not any(len(a) for a in per):
            continue
        p99 = [np.percentile(np.concatenate([per[i] for i in pick]), 99) for pick in picks]
        out[key] = (float(np.percentile(p99, 2.5)), float(np.percentile(p99, 97.5)))
    return out


def run_metrics(run: dict, slo: dict[str, float]) -> dict[str, float]:
    """The ledger's metrics of one saved run: vLLM's own statistics (ms converted to seconds) and what
    this module adds (goodput under the SLO with ITL, arrival rate, keep-up and saturation, p99 intervals)."""
    out = {"request_throughput": run["request_throughput"], "output_throughput": run["output_throughput"],
           "throughput": run["total_token_throughput"], "completed": run["completed"], "failed": run["failed"],
           "duration": run["duration"], "input_tokens": run["total_input_tokens"],
           "max_concurrent_requests": run.get("max_concurrent_requests")}
    for metric in ("ttft", "itl", "tpot", "e2el"):
        for q in ("mean", "p50", "p99"):
            if (value := run.get(f"{q}_{metric}_ms")) is not None:
                out[f"{metric}_{q}"] = value / 1000
    good, per_s = goodput(run, slo)
    kept = keep_up(run)
    out |= {"goodput": per_s, "good_requests": good, "arrival_rate": arrival_rate(run), "keep_up": kept,
            "pause_max": longest_pause(run), "itl_over_slo": itl_over(run, slo["itl"]) if "itl" in slo else None,
            # serve_bench's counts (absent from a run it did not send): kernels the server compiled during the run
            "jit_compiles": float(len(run["jit_kernels"])) if "jit_kernels" in run else None,
            "jit_reruns": float(run["jit_reruns"]) if "jit_reruns" in run else None}
    for key, (low, high) in p99_intervals(run, slo).items():
        out |= {f"{key}_p99_low": low, f"{key}_p99_high": high}
    return out | run_flags(out, slo)


def run_flags(metrics: dict[str, float], slo: dict[str, float]) -> dict[str, float]:
    """One run's judgements from its metrics: saturated (keep-up), SLO met (p99s), and at the SLO's bound (some
    key's p99 interval holds its bound, so another run of this rate could flip "met")."""
    return {"saturated": float(saturated(metrics["keep_up"])),
            "slo_met": float(all(metrics.get(f"{k}_p99", math.inf) <= bound for k, bound in slo.items())),
            "slo_at_bound": float(any(metrics.get(f"{k}_p99_low", math.inf) <= bound < metrics.get(f"{k}_p99_high", 0)
                                      for k, bound in slo.items()))}


def runs_from_rows(rows: list[dict], slo: dict[str, float], prompts: int) -> list[dict] | None:
    """A rate's runs rebuilt from its ledger rows (each metric's `repeats`), with their per-run flags worked out
    again, so that a later call can add runs to a knee it did not measure. None when the rows cannot pool with new
    runs: recorded before keep-up was (no flag to judge saturation by), or under another SLO or prompt count."""
    spec = next((json.loads(r["note"]) for r in rows if r["metric"] == "load" and r.get("note")), {})
    per = {r["metric"]: json.loads(r["repeats"]) for r in rows if r.get("repeats")}
    if "keep_up" not in per or spec.get("slo_s") != slo or spec.get("prompts") != prompts:
        return None
    runs = [{k: v[i] for k, v in per.items() if i < len(v)} for i in range(len(per["keep_up"]))]
    return [run | run_flags(run, slo) for run in runs]


def repeat_knee(points: dict[float, tuple[float, bool, bool]], repeat, repeated: list | None = None) -> list[float]:
    """Repeats the two rates around the crossing (repeat(rate) -> (saturated, slo_met) of its runs' medians) until
    the crossing stops moving, and returns the rates repeated in order. A repeat can move a median across the SLO
    or into saturation (Mixtral fp8, session 20: 32 req/s back inside; CI on two cores: 64 req/s keeping up 1.08,
    then 0.00), and the crossing's new neighbour needs its runs too. points: rate -> (rate, saturated, slo_met),
    updated in place; repeated: rates already repeated (skipped), extended in place."""
    repeated = [] if repeated is None else repeated
    while todo := sorted(set(knee(list(points.values()))) - set(repeated)):
        for rate in todo:
            repeated.append(rate)
            points[rate] = (rate, *repeat(rate))
    return repeated


def back_inside(points: list[tuple[float, bool | None, bool]]) -> list[float]:
    """A ladder that left the SLO (saturated or a bound missed) and came back inside at a higher rate: the first
    rate outside and the rates inside above it; [] for a ladder that leaves once. Such a ladder places no capacity
    (report.serving.capacity): its medians are noise at this many runs (CI on two cores, two runs each: 64 req/s
    kept up 0.82, 128 req/s 1.21, 256 req/s 0.00)."""
    points = sorted(points, key=lambda p: p[0])
    out = first_outside(points)
    back = [r for r, sat, met in points[out + 1:] if met and not sat] if out is not None else []
    return [points[out][0], *back] if back else []


def walk_ladder(ladder: list[float], first, repeat=None, settle=None) -> dict[float, tuple[float, bool, bool]]:
    """The rates measured, rate -> (rate, saturated, slo_met): the ladder climbed until a rate's first run
    saturates (first(rate) -> (saturated, slo_met)), then, with repeat (a knee's runs, as repeat_knee), the knee
    repeated; a repeat that brings the top rate back from saturated resumes the climb, since only that rate's
    first run had stopped it (CI, two cores: 32 req/s saturated in its first run, kept up 0.91 over two). With
    repeat and settle (more runs than a knee's, an odd count: a true median), a ladder back inside after leaving has each
    disputed rate (back_inside) settled once, and the knee repeated where it then lies."""
    points, i, repeated, settled = {}, 0, [], []
    while True:
        while i < len(ladder):
            rate, i = ladder[i], i + 1
            points[rate] = (rate, *first(rate))
            if points[rate][1]:
                break
        if repeat is not None:
            repeat_knee(points, repeat, repeated)
            while settle is not None and (todo := sorted(set(back_inside(list(points.values()))) - set(settled))):
                for rate in todo:
                    settled.append(rate)
                    points[rate] = (rate, *settle(rate))
                repeat_knee(points, repeat, repeated)
        if i == len(ladder) or points[ladder[i - 1]][1]:
            return points


def auto_ladder(start: float, factor: float, steps: int) -> list[float]:
    """start, start x factor, ... : the rates tried in order until one saturates."""
    if not start > 0 or not factor > 1 or steps < 1:
        raise UserError(f"rate ladder: start {start} must be > 0, factor {factor} > 1, steps {steps} >= 1")
    return [round(start * factor ** i, 6) for i in range(steps)]


def knee(points: list[tuple[float, bool | None, bool]]) -> list[float]:
    """The two rates either side of the ladder's first step out of the SLO (the last inside, the first outside),
    between which the capacity is interpolated: repeats there move its interval most. None when the ladder never
    left the SLO or was outside from its first rate (a bound, not a crossing)."""
    points = sorted(points, key=lambda p: p[0])
    out = first_outside(points)
    return [points[out - 1][0], points[out][0]] if out else []


def first_outside(points: list[tuple[float, bool | None, bool]]) -> int | None:
    """The index of the first (rate, saturated, slo_met) in rate order that is saturated or misses the SLO."""
    return next((i for i, (_, sat, met) in enumerate(points) if sat or not met), None)


def ladder_outcome(points: list[tuple[float, bool | None, bool]]) -> dict:
    """From (offered rate, saturated, SLO met) per rate tried, in increasing order: the highest rate
    sustained under the SLO (None if none), and whether the ladder ever saturated. A ladder that never
    saturated gives a lower bound only; the statement says so instead of inventing a maximum. Saturated None:
    not judged (runs recorded under the completion-span rule, through session 18): the text says so."""
    points = sorted(points, key=lambda p: p[0])
    first_sat = next((r for r, sat, _ in points if sat), None)
    # a rate above the first saturated one is an earlier ladder's (re-measured with --force, stopping sooner)
    points = [p for p in points if first_sat is None or p[0] <= first_sat]
    ok = [r for r, sat, met in points if met and not sat]
    top = points[-1][0] if points else None
    best = max(ok) if ok else None
    judged = all(sat is not None for _, sat, _ in points)
    under = f"{best:g} req/s is the highest under the SLO" if best else "no rate met the SLO"
    if not points:
        text = "not measured"
    elif not judged:
        text = f"saturation not judged (runs recorded before keep-up was measured); {under}"
    elif first_sat is None:
        text = (f"never saturated: the server kept up at every rate up to {top:g} req/s, the ladder's top; "
                + (f"≥ {best:g} req/s under the SLO (a lower bound)" if best == top else under))
    else:
        text = (f"saturated at {first_sat:g} req/s; "
                + (f"{best:g} req/s is the highest sustained under the SLO" if best else "no rate met the SLO"))
    missed = [r for r, sat, met in points if not (met and not sat) and best is not None and r < best]
    if missed:  # outside below a rate inside: one run per rate is noise there (session 8, Qwen3 on the H200)
        text += f" (but not at {', '.join(f'{r:g}' for r in missed)} req/s below it)"
    return {"max_rate_under_slo": best, "saturated_at": first_sat, "top_rate": top,
            "lower_bound": judged and first_sat is None and best is not None and best == top, "text": text}
