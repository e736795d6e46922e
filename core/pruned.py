"""How a pruned model is named, in one place: `moeq prune` writes `<base>-keep<NN>` (NN: the percent of
each layer's experts kept), and the report reads the base model and the keep ratio back from a ledger's
model name (the ledger holds names, not folders). Standard library only: both environments import it."""
import re

FOLDER = ".pruned"  # under the checkpoint root; a dot-folder, so `moeq eval` never takes it for a model
_NAME = re.compile(r"^(?P<base>.+)-keep(?P<pct>\d{1,3})$")


def name(base: str, keep: float) -> str:
    return f"{base}-keep{round(100 * keep)}"


def parse(model: str) -> tuple[str, float]:
    """(base model, kept fraction); an unpruned model keeps 1.0 of its experts."""
    m = _NAME.match(str(model))
    return (m["base"], int(m["pct"]) / 100) if m and 0 < int(m["pct"]) < 100 else (str(model), 1.0)
