"""Models are data (models.yaml); this module only finds them and says clearly when it cannot."""
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from moeq.env import cache_root
from moeq.errors import UserError

REGISTRY_FILE = Path(__file__).with_name("models.yaml")
# for a model folder of an architecture no entry has: router gates and lm_head stay in full precision,
# and calibration as llm-compressor's MoE examples use it
DEFAULT_IGNORE = ["lm_head", "re:.*mlp[.]gate$"]
DEFAULT_CALIBRATION = {"samples": 512, "seq_len": 2048}


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
        return list(self.spec.get("ignore", DEFAULT_IGNORE))

    @property
    def calibration(self) -> dict:
        return dict(self.spec.get("calibration", DEFAULT_CALIBRATION))


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
        spec = {"config": config, "ignore": base.get("ignore", DEFAULT_IGNORE),
                "expert_names": base.get("expert_names", {}), "calibration": base.get("calibration", DEFAULT_CALIBRATION)}
        return Model(path.resolve().name, spec, path.resolve(), source="path")
    raise UserError(f"unknown MODEL {name!r}; valid: {', '.join(reg)}, or a path to a checkpoint folder")


def experts_per_layer(config) -> int:
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if getattr(config, key, None):
            return getattr(config, key)
    raise ValueError(f"{config.model_type}: cannot tell how many experts it has")
