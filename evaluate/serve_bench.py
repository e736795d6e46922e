"""`moeq serve-bench`: each checkpoint served as users serve it, under load, into the ledger (kind "serve").

Per (model, scheme): vLLM's OpenAI-compatible server (`vllm serve`, server.py) on the checkpoint, with the
engine settings `moeq eval` would use (settings.build: same settings id, so serve rows share a group with
the scheme's offline rows and with its bf16 baseline); then vLLM's own load generator (`vllm bench serve`,
run in this process with the arguments a user would type, saving its JSON with every request's timings)
at a ladder of Poisson request rates, stopping at the first rate the server cannot keep up with, and at a
sweep of fixed concurrencies. Prompts: real weights get windows of the held-out corpus split (text the
model never trained or calibrated on) of mixed token lengths; shape-only weights get vLLM's random-token
prompts. Output lengths are fixed (EOS ignored). Each rate's metrics are one ledger transaction. Before a
server's first timed rate, one unrecorded run at the sweep's highest concurrency warms it: fresh bf16 servers
stalled for seconds at their first rates on the H200 (fp8's CUTLASS kernels did not), and warmed ones still paused
1.6 s at a higher rate (session 18). The suspect is Triton compiling a kernel variant (fused-MoE tile configs are
chosen by token count) that neither the engine's start nor the warm-up ran: each server gets compile caches of
its own (unless the user set them), every timed run counts the kernels compiled while it ran (`jit_compiles`),
and a run that compiled any is run again, up to JIT_RERUNS times, so that the rates compare steady states; the
ledger keeps the count of the kept run and of the runs redone (`jit_reruns`), and the log names the kernels.
"""
import contextlib
import json
import math
import os
import shlex
import statistics
import time
import zlib
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from moeq import registry
from moeq.errors import UserError
from moeq.evaluate import kernels, parallel, perf, run, serve_load, settings as engine_settings
from moeq.evaluate.ledger import Ledger, lock
from moeq.evaluate.server import Server, ServerFailed, server_flags, sigterm_as_interrupt

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
DEFAULT_WARMUP = 16  # requests in flight in a server's warm-up run when the load has no concurrency sweep
JIT_RERUNS = 2  # a timed run during which the server compiled kernels is run again at most this often


def compiled_kernels(roots: list[Path]) -> set[Path]:
    """The kernels compiled into these caches so far: Triton writes one `__grp__<kernel>.json` per compiled
    variant (vLLM points Triton into its own cache root, under torch_compile_cache); a cache hit writes none."""
    return {f for root in roots if root.is_dir() for f in root.rglob("__grp__*.json")}


def kernel_names(files: set[Path]) -> str:
    """'fused_moe_kernel x2, triton_poi_fused_mul_0' from the group files of compiled variants."""
    names = sorted(f.name.removeprefix("__grp__").removesuffix(".json").split(".")[0] for f in files)
    return ", ".join(f"{n} x{names.count(n)}" if names.count(n) > 1 else n for n in dict.fromkeys(names))


@dataclass
class Load:
    """What each run sends: prompt lengths, rates or concurrencies, and how long each runs."""
    input_len: int = 512
    input_spread: float = 0.5  # input lengths uniform in input_len x [1 - spread, 1 + spread]
    output_len: int = 128
    rates: list[float] | None = None  # None: the automatic ladder
    rate_start: float = 1.0
    rate_factor: float = 2.0
    max_rates: int = 8
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    seconds: float = 30.0  # per rate: prompts = rate x seconds, within [min_prompts, max_prompts]
    min_prompts: int = 32
    max_prompts: int = 2000
    repeats: int = 1
    knee_repeats: int = 1  # runs at the two rates around the SLO crossing (serve_load.knee)
    slo: dict = field(default_factory=lambda: serve_load.parse_slo(serve_load.DEFAULT_SLO))
    warmups: int = 2

    @property
    def longest_input(self) -> int:
        return math.ceil(self.input_len * (1 + self.input_spread))

    def ladder(self) -> list[float]:
        return sorted(self.rates) if self.rates else serve_load.auto_ladder(self.rate_start, self.rate_factor,
                                                                           self.max_rates)

    def cell(self, rate: float | None = None, concurrency: int | None = None) -> str:
        shape = f"serve-i{self.input_len}~{round(100 * self.input_spread)}-o{self.output_len}"
        return f"{shape}-r{rate:g}" if rate is not None else f"{shape}-c{concurrency}"

    def prompts(self, rate: float | None = None, concurrency: int | None = None) -> int:
        want = rate * self.seconds if rate is not None else 8 * concurrency
        return int(min(self.max_prompts, max(self.min_prompts, math.ceil(want))))


def tokenizer_for(target: run.Target, shape_tokenizer: str | None = None) -> str:
    """A folder with the model's tokenizer: the checkpoint's own, else (shape-only) the one given, the registry
    model's built folder or its hub snapshot's tokenizer files. The server detokenizes like any deployment;
    shape-only prompts are random tokens, so any tokenizer whose vocabulary fits the model's will do."""
    candidates = [Path(target.path)]
    if target.provenance.startswith("shape-only"):
        candidates += [Path(shape_tokenizer)] if shape_tokenizer else []
        model = registry.resolve(target.model, need_weights=False)
        if model.path:
            candidates.append(Path(model.path))
        if hub := model.spec.get("hub_id"):
            with contextlib.suppress(Exception):
                from huggingface_hub import snapshot_download
                candidates.append(Path(snapshot_download(hub, local_files_only=True)))
    for folder in candidates:
        if any((folder / f).is_file() for f in TOKENIZER_FILES):
            return str(folder)
    hub = registry.registry().get(target.model, {}).get("hub_id", "<hub id>")
    raise UserError(f"no tokenizer for {target.model} (looked in {', '.join(map(str, candidates))}): the server needs "
                    f"one. Shape-only runs need only its files (a few MB): hf download {hub} --include 'tokenizer*' "
                    "'*.json' '*.txt' '*.model' --exclude '*.safetensors*'")


@lru_cache(maxsize=4)
def heldout_ids(tokenizer: str) -> tuple:
    """The tokenizer and the held-out split as one token stream, as perf cells read it."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer)
    return tok, tuple(perf.heldout_stream(tok))


def write_corpus_prompts(path: Path, tokenizer: str, n: int, load: Load, seed: str):
    """n windows of held-out text, token lengths uniform in the load's range, at random offsets (so no two
    runs share a prefix the server's prefix cache could serve)."""
    import numpy as np
    tok, ids = heldout_ids(tokenizer)
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    low = max(1, math.floor(load.input_len * (1 - load.input_spread)))
    lengths = rng.integers(low, load.longest_input + 1, n)
    with open(path, "w") as f:
        for length in lengths:
            start = int(rng.integers(0, len(ids) - length))
            # the stream's file separators (EOS) are not sent as text
            f.write(json.dumps({"prompt": tok.decode(ids[start:start + int(length)], skip_special_tokens=True)}) + "\n")


def client_args(server: Server, model_path: str, tokenizer: str, load: Load, rate, concurrency, n: int, seed: int,
                dataset: Path | None, out: Path) -> list[str]:
    """`vllm bench serve` arguments, as a user would type them."""
    args = ["--backend", "openai", "--host", "127.0.0.1", "--port", str(server.port), "--model", str(model_path),
            "--tokenizer", tokenizer, "--num-prompts", str(n), "--seed", str(seed), "--temperature", "0",
            "--ignore-eos", "--num-warmups", str(load.warmups), "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,99", "--save-result", "--save-detailed", "--disable-tqdm",
            "--result-dir", str(out.parent), "--result-filename", out.name,
            "--request-rate", "inf" if rate is None else f"{rate:g}"]
    if concurrency is not None:
        args += ["--max-concurrency", str(concurrency)]
    if dataset is not None:  # held-out text, sent as is (completions, no chat template)
        return args + ["--dataset-name", "custom", "--dataset-path", str(dataset), "--skip-chat-template",
                       "--custom-output-len", str(load.output_len)]
    return args + ["--dataset-name", "random", "--random-input-len", str(load.input_len), "--random-output-len",
                   str(load.output_len), "--random-range-ratio", json.dumps({"input": load.input_spread, "output": 0})]


def bench(argv: list[str], log_file: Path) -> dict:
    """One run of vLLM's client, in this process (vLLM imported once for every run); its JSON, as saved."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(argv)
    with open(log_file, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        print(f"$ vllm bench serve {shlex.join(argv)}", flush=True)
        main(args)
    return json.loads((Path(args.result_dir) / args.result_filename).read_text())


def steady(send, run_name: str, label: str, log=print) -> dict:
    """One timed run (send(run_name) returns its saved JSON and the kernels compiled during it), run again
    under a new name while the server compiled kernels during it, JIT_RERUNS times at most."""
    for again in range(JIT_RERUNS + 1):
        name = run_name + (f"-again{again}" if again else "")
        run = send(name)
        run["jit_reruns"] = again
        if not run["jit_kernels"] or again == JIT_RERUNS:
            return run
        log(f"[serve]  {label}: the server compiled {len(run['jit_kernels'])} kernels during the run "
            f"({kernel_names(run['jit_kernels'])}; {name}.json kept): run again")


def measure(run_once, load: Load, label: str, closed_loop: bool, log=print, runs: list[dict] = (),
            repeats: int | None = None) -> tuple[list[dict], dict, list[dict]]:
    """`repeats` runs of one rate or concurrency, counting those given (a knee's earlier runs): ledger metrics
    (median over runs, the runs kept), the medians used for the ladder, and every run's metrics."""
    runs = list(runs)
    for rep in range(len(runs), repeats or load.repeats):
        run = run_once(rep)
        runs.append(serve_load.run_metrics(run, load.slo))
        m = runs[-1]
        log(f"[serve]  {label}: {m['request_throughput']:.3g} req/s done, TTFT p99 {1e3 * m['ttft_p99']:.0f} ms, "
            f"ITL p99 {1e3 * m['itl_p99']:.1f} ms"
            + (f" ({100 * m['itl_over_slo']:.2f}% of gaps over its bound)" if m.get("itl_over_slo") is not None else "")
            + f", longest pause {1e3 * m['pause_max']:.0f} ms, goodput {m['goodput']:.3g} req/s"
            + ("" if closed_loop else f", arrivals {m['arrival_rate']:.3g}/s, keeping up {m['keep_up']:.2f}")
            + (", at the SLO's bound (a p99's 95% interval holds it)" if m.get("slo_at_bound") else "")
            + (f", {m['failed']:.0f} failed" if m["failed"] else "")
            + (f", {m['jit_compiles']:.0f} kernels compiled during it ({kernel_names(run['jit_kernels'])})"
               if m.get("jit_compiles") else ""))
        if m["failed"]:  # why, in the client's words (session 8 saw a few per run on the H200, the same for every scheme)
            log(f"[serve]  {label}: failed requests: {serve_load.failure_reasons(run)}")
    # a closed loop (fixed concurrency) sends as fast as requests complete: arrivals say nothing there
    skip = ("arrival_rate", "keep_up", "saturated") if closed_loop else ()
    # a metric every run has (runs rebuilt from the ledger lack those their first run had none of)
    median = {k: float(statistics.median([r[k] for r in runs])) for k in runs[0]
              if all(r.get(k) is not None for r in runs) and k not in skip}
    if not closed_loop:
        median["saturated"] = float(serve_load.saturated(median["keep_up"]))
    median["slo_met"] = float(all(median.get(f"{k}_p99", math.inf) <= b for k, b in load.slo.items()))
    units = {"request_throughput": "req/s", "goodput": "req/s", "arrival_rate": "req/s", "keep_up": "ratio",
             "output_throughput": "tok/s", "throughput": "tok/s", "input_tokens": "tokens", "jit_compiles": "kernels",
             "jit_reruns": "runs", "itl_over_slo": "share"}
    metrics = []
    for name, value in median.items():
        if name in ("saturated", "slo_met", "slo_at_bound"):
            metrics.append({"metric": name, "value": value, "n": len(runs)})
        elif name.split("_")[-1] in ("mean", "p50", "p99", "low", "high") or name in ("duration", "pause_max"):
            metrics.append(perf.summarize(name, "s", [r[name] for r in runs]))
        else:
            metrics.append(perf.summarize(name, units.get(name, "requests"), [r[name] for r in runs]))
    return metrics, median, runs


def target_key(target, settings, device_backend) -> dict:
    backend, device = device_backend
    return {"model": target.model, "scheme": target.scheme, "provenance": target.provenance, "backend": backend,
            "device": device, "settings": settings.profile}


def refusal(failed: ServerFailed, subject: str) -> str | None:
    """The backend's refusal of the scheme's kernel, in vLLM's own words (the root error in its log); one that
    follows a package vLLM has but cannot import is the environment's, an error."""
    if not (failed.cause and kernels.REFUSALS.search(failed.cause)):
        return None
    broken = []
    for line in failed.log_tail.splitlines():
        kernels.note_broken(broken, line)
    if broken:
        raise kernels.broken_environment(subject, failed.cause, broken) from failed
    return failed.cause


def bench_target(target, settings, load: Load, ledger_path: Path, port: int, force: bool, start_timeout: float,
                 log=print, shape_tokenizer: str | None = None) -> dict:
    """Every rate and concurrency of one (model, scheme); returns the ladder's outcome."""
    from moeq.evaluate.engine import device_name, env_record
    job = run.job_for(target, ledger_path, settings, [], 1, [], None, force)  # identity, as `moeq eval` records it
    settings = engine_settings.from_record(job.settings)  # fp8-online: quantization=fp8 in the server's arguments
    device = device_name()
    key = target_key(target, settings, device)
    ledger = Ledger(ledger_path)
    ledger.add_settings(settings.profile, {**settings.shared(), "non_default": settings.non_default()})
    folder = ledger_path.parent / "serve" / target.model / target.scheme / settings.profile
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_for(target, shape_tokenizer)
    shape_only = target.provenance.startswith("shape-only")
    extra = {"load_format": "dummy", "tokenizer": tokenizer} if shape_only else {}
    flags = server_flags(target.path, settings.llm, extra)
    env = {**run.engine_env(), **settings.environment()}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # set for moeq eval's in-process engines; a server forks its own
    caches = [Path(env.setdefault(var, str(folder / "cache" / sub)))  # counted per run (compiled_kernels)
              for var, sub in (("VLLM_CACHE_ROOT", "vllm"), ("TRITON_CACHE_DIR", "triton"))]
    stack = contextlib.ExitStack()
    server = None

    def start():
        nonlocal server
        if server is None:
            log(f"[serve] {target.model} / {target.scheme}: vllm serve {target.path} {shlex.join(flags)}")
            server = stack.enter_context(Server(target.path, flags, folder / "server.log", port, env, start_timeout, log))
            if settings.server_warmup:
                warm_up(server)
            record_kernel()  # now, not only at the end: a chain cut by its lease keeps what its ladder ran on
        return server

    def record_kernel():
        """The MoE kernel the server's engine chose, from its log (a kind of its own: perf keeps its)."""
        lines = (folder / "server.log").read_text(errors="replace").splitlines()
        ledger.write(key, "serve-engine", "kernel", kernels.metrics(lines), env_id=env_id, checkpoint=job.checkpoint)

    def send(srv, run_name, rate, concurrency, n):
        """One run of vLLM's client (its prompts and seed named by the run), saved as run_name.json."""
        data = None
        if not shape_only:
            data = folder / f"{run_name}.prompts.jsonl"
            write_corpus_prompts(data, tokenizer, n + load.warmups, load, run_name)
        seed = zlib.crc32(run_name.encode()) % 2**31
        before = compiled_kernels(caches)
        run = bench(client_args(srv, target.path, tokenizer, load, rate, concurrency, n, seed, data,
                                folder / f"{run_name}.json"), folder / "client.log")
        run["jit_kernels"] = compiled_kernels(caches) - before
        return run

    def warm_up(srv):
        """One unrecorded run of the client, `server_warmup` requests in flight, before anything is timed."""
        c, t0 = settings.server_warmup, time.monotonic()
        run = send(srv, "warmup", None, c, 2 * c)
        jit = f", {len(run['jit_kernels'])} kernels compiled" if run["jit_kernels"] else ""
        log(f"[serve]  warm-up: {c} in flight, {run['completed']} requests in {time.monotonic() - t0:.0f} s{jit} (not recorded)")

    measured = {}  # cell -> its runs' metrics, for the cells this call measured

    def cell(name, rate, concurrency, label, repeats=None):
        """One rate (or concurrency): measured and written in one transaction, or read back from the ledger.
        repeats: run it until it has that many runs (the knee), counting its earlier runs of this call or, when
        they can pool with new ones (serve_load.runs_from_rows), of the ledger."""
        runs, earlier = measured.get(name, []) if repeats else [], 0
        if not runs and not force and ledger.has(key, name, job.checkpoint):
            rows = ledger.rows(cell=name, **key)
            runs = serve_load.runs_from_rows(rows, load.slo, load.prompts(rate, concurrency)) if repeats else None
            if not runs:
                log(f"[serve]  {label}: already measured" + (" (its runs cannot pool with new ones: recorded before "
                                                             "keep-up, or under another SLO or load)" if repeats else ""))
                return {r["metric"]: r["value"] for r in rows}
            earlier = len(runs)
            if len(runs) < repeats:
                log(f"[serve]  {label}: {len(runs)} run(s) in the ledger, {repeats - len(runs)} more")

        def run_once(rep):
            srv = start()
            return steady(lambda run_name: send(srv, run_name, rate, concurrency, load.prompts(rate, concurrency)),
                          f"{name}-{rep}", label, log)
        before = len(runs)
        metrics, median, measured[name] = measure(run_once, load, label, closed_loop=rate is None, log=log,
                                                  runs=runs, repeats=repeats)
        if len(measured[name]) == before:
            return median
        spec = {"request_rate": rate, "max_concurrency": concurrency, "prompts": load.prompts(rate, concurrency),
                "repeats": len(measured[name]), "input_len": load.input_len, "input_spread": load.input_spread,
                "output_len": load.output_len, "dataset": "random tokens" if shape_only else "held-out corpus",
                "slo_s": load.slo, "server_flags": flags, "tokenizer": tokenizer, "client": "vllm bench serve",
                **({"runs_from_earlier_calls": earlier} if earlier else {})}  # pooled runs may come from other hosts
        ledger.write(key, "serve", name, metrics + [{"metric": "load", "value": None, "note": json.dumps(spec)}],
                     env_id=env_id, recipe_sha=job.recipe_sha, checkpoint=job.checkpoint)
        return median

    env_id = ledger.env_id(env_record(device[1]))
    try:
        with stack:
            def judged(rate, repeats=None, why=""):  # past the first saturated rate only the queue grows: walk stops
                m = cell(load.cell(rate=rate), rate, None, f"rate {rate:g} req/s{why}", repeats=repeats)
                return bool(m.get("saturated")), bool(m.get("slo_met"))
            k = load.knee_repeats
            knee = (lambda rate: judged(rate, k, " (knee)")) if k > 1 else None
            # the next odd count above the knee's: a median of its own, not the mean of two
            settle = lambda rate: judged(rate, k + 2 - k % 2, " (settling: the ladder came back inside the SLO)")
            if max(load.ladder(), default=0) * load.seconds > load.max_prompts:
                # keep-up's allowance can outweigh a short window's debt: tiny on two cores, 400 prompts at 512
                # req/s, kept up 0.99 over 0.8 s while doing 214 req/s; 1,024 prompts (2 s) read 0.41
                log(f"[serve]  rates above {load.max_prompts / load.seconds:g} req/s send their {load.max_prompts} "
                    f"prompts (--max-prompts) in under {load.seconds:g} s: a shorter window judges saturation less surely")
            points = serve_load.walk_ladder(load.ladder(), judged, knee, settle)
            for c in load.concurrency:
                cell(load.cell(concurrency=c), None, c, f"concurrency {c}")
        if server is not None:  # again at the end: the log may name more after the start (a default config's warning)
            record_kernel()
    except ServerFailed as e:
        if reason := refusal(e, f"{target.model} / {target.scheme}"):
            reason = f"unsupported on {device[0]}: {reason}"
            log(f"[serve] {target.model} / {target.scheme}: {reason}")
            ledger.write(key, "status", "serve-status", [{"metric": "supported", "value": 0, "status": "unsupported",
                                                          "note": reason}], env_id=env_id, checkpoint=job.checkpoint)
            return {"text": reason}
        raise
    finally:
        ledger.close()
    outcome = serve_load.ladder_outcome(list(points.values()))
    log(f"[serve] {target.model} / {target.scheme}: {outcome['text']} ({serve_load.slo_text(load.slo)})")
    return outcome


def serve_bench(models=None, schemes=None, weights="real", routing=None, engine_args=None, load: Load | None = None,
                ledger=Path("results/ledger.sqlite"), checkpoints=Path("checkpoints"), port=8000, force=False,
                start_timeout=900, log=print, shape_tokenizer: str | None = None, warmup: int | None = None) -> int:
    """warmup: requests in flight in each server's unrecorded warm-up run (None: the sweep's highest concurrency)."""
    load = load or Load()
    if warmup is None:
        warmup = max(load.concurrency, default=DEFAULT_WARMUP)
    if weights not in ("real", "dummy"):
        raise UserError(f"unknown WEIGHTS {weights!r}; valid: real, dummy")
    if routing and routing.startswith("zipf"):
        raise UserError("zipf routing is installed inside moeq's own engine process; a server cannot take it "
                        "(use a vLLM strategy, e.g. uniform_random)")
    gpu = run.on_gpu()
    shape_only = weights == "dummy"
    settings = engine_settings.build(gpu=gpu, cells=[(1, load.longest_input, load.output_len)], shape_only=shape_only,
                                     user_args=engine_args, routing=routing, server=True, server_warmup=warmup)
    targets = (run.shape_only_targets if shape_only else run.find_targets)(models, schemes, Path(checkpoints))
    parallel.check_targets(settings.llm, [(f"{t.model} / {t.scheme}", t.path) for t in targets], gpu)
    log(f"[serve] {len(targets)} targets; settings {settings.profile}; load {json.dumps(asdict(load))}")
    failures = []
    with lock(Path(ledger)), sigterm_as_interrupt():
        Ledger(ledger).close()  # an unusable ledger is an error before any server starts
        for target in targets:
            try:
                bench_target(target, settings, load, Path(ledger), port, force, start_timeout, log, shape_tokenizer)
            except ServerFailed as e:
                log(f"[serve] ERROR: {target.model} / {target.scheme}: {e}")
                failures.append(f"{target.model} / {target.scheme}")
            except KeyboardInterrupt:  # the server is stopped by now; finished rates are in the ledger
                log(f"[serve] interrupted during {target.model} / {target.scheme}: rates already written are kept")
                return 130
    if failures:
        log(f"[serve] {len(failures)} of {len(targets)} servers failed: {', '.join(failures)}")
    return 1 if failures else 0
