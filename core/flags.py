"""Flag parsers shared by the verbs: every value is range-checked when parsed, and a bad one names itself."""
import argparse

from moeq.errors import UserError


def positive_int(text: str) -> int:
    if not str(text).strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; valid: a whole number >= 1")
    return int(text)


def int_list(text, name: str, low: int = 1) -> list[int] | None:
    if not text:
        return None
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{name} {text!r}: expected whole numbers separated by commas, e.g. 1,16,64") from None
    if bad := [v for v in values if v < low]:
        raise UserError(f"{name} {bad[0]}: must be at least {low}")
    return values


def int_at_least(text, name: str, low: int) -> int | None:
    if text in (None, ""):
        return None
    values = int_list(str(text), name, low)
    if not values or len(values) != 1:
        raise UserError(f"{name} {text!r}: expected one whole number ≥ {low}")
    return values[0]


def csv(value) -> list[str] | None:
    return [v.strip() for v in str(value).split(",") if v.strip()] if value else None


def engine_arg(item: str) -> tuple[str, object]:
    import yaml
    key, eq, value = item.partition("=")
    if not eq or not key:
        raise UserError(f"--engine-arg {item!r}: expected KEY=VALUE, e.g. enforce_eager=true")
    return key, yaml.safe_load(value)
