"""Models are data (models.yaml); this module only finds them and says clearly when it cannot."""
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

REGISTRY_FILE = Path(__file__).with_name("models.yaml")


class UserError(Exception):
    """Bad input from the user: printed as one clear message, exit status 2."""


TRUE, FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def env_default(name: str, default=None):
    """A flag's default from MOEQ_<name>; moeq reads no other environment variables of its own."""
    return os.environ.get(f"MOEQ_{name}") or default


def env_flag(name: str) -> bool:
    """MOEQ_<name> as a yes/no value, strictly: MOEQ_FORCE=0 is false, MOEQ_FORCE=maybe an error."""
    value = os.environ.get(f"MOEQ_{name}", "").strip().lower()
    if value not in TRUE + FALSE:
        raise UserError(f"MOEQ_{name}={os.environ[f'MOEQ_{name}']!r} is not a yes/no value; "
                        f"valid: {', '.join(TRUE)} or {', '.join(FALSE[1:])}")
    return value in TRUE


def cache_root() -> Path:
    base = os.environ.get("MOEQ_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moeq"
    return Path(base)


@lru_cache(maxsize=None)
def registry() -> dict:
    return yaml.safe_load(REGISTRY_FILE.read_text())


@dataclass
class Model:
    name: str
    spec: dict
    path: Path | None = None  # local checkpoint folder, when known
    source: str = "registry"  # registry entry built by moeq, hub model, or a user's folder
    extra: dict = field(default_factory=dict)

    @property
    def buildable(self) -> bool:
        return "train" in self.spec

    @property
    def ignore(self) -> list[str]:
        return list(self.spec.get("ignore", ["lm_head"]))

    @property
    def calibration(self) -> dict:
        return dict(self.spec.get("calibration", {"samples": 64, "seq_len": 512}))


def _entry_for_model_type(model_type: str) -> dict:
    for spec in registry().values():
        if spec["config"]["model_type"] == model_type:
            return spec
    return {}


def hub_snapshot(hub_id: str) -> Path | None:
    """The local snapshot of a hub model, if its weights are already on disk (never downloads)."""
    try:
        from huggingface_hub import snapshot_download
        path = Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:
        return None
    return path if any(path.glob("*.safetensors")) else None


def resolve(name: str, need_weights: bool = True) -> Model:
    """A registry name or a checkpoint folder; raises UserError naming the valid choices."""
    reg = registry()
    if not str(name).strip():
        raise UserError(f"MODEL is empty; valid: {', '.join(reg)}, or a path to a checkpoint folder")
    if name in reg:
        spec = reg[name]
        if "train" in spec:
            return Model(name, spec, cache_root() / "models" / name, source="built")
        path = hub_snapshot(spec["hub_id"])
        if path is None and need_weights:
            raise UserError(
                f"the weights of {name!r} ({spec['hub_id']}) are not on this machine. Supply them with\n"
                f"  hf download {spec['hub_id']}          (needs hub access; HF_TOKEN for gated models)\n"
                f"or point at a local copy: MODEL=/path/to/checkpoint. "
                f"Shape-only runs need no weights: WEIGHTS=dummy.")
        return Model(name, spec, path, source="hub")
    path = Path(name).expanduser()
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise UserError(f"{path} has no config.json: not a Hugging Face checkpoint folder")
        config = json.loads(cfg_file.read_text())
        base = _entry_for_model_type(config.get("model_type", ""))
        spec = {"config": config, "ignore": base.get("ignore", ["lm_head", "re:.*mlp[.]gate$"]),
                "expert_names": base.get("expert_names", {}),
                "calibration": base.get("calibration", {"samples": 256, "seq_len": 1024})}
        return Model(path.resolve().name, spec, path.resolve(), source="path")
    raise UserError(f"unknown MODEL {name!r}; valid: {', '.join(reg)}, or a path to a checkpoint folder")


def ensure_built(model: Model, log=print) -> Path:
    """The checkpoint folder of `model`, building the embedded models on first use."""
    from moeq.quantize.atomic import folder_lock, is_complete
    if model.source != "built" or is_complete(model.path):
        return model.path
    with folder_lock(model.path, wait=True):  # a second process waits for the first build instead of repeating it
        if not is_complete(model.path):
            from moeq.quantize import tiny
            log(f"[moeq] building {model.name} into {model.path} (once; cached)")
            tiny.build(model.name, model.spec, model.path, log=log)
    return model.path
