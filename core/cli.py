"""The moeq command: `moeq <verb>`. Each verb is a module with HELP, ENVIRONMENT, add_args(parser) and
run(args); their top levels import only the standard library and this core, so `--help` is instant in
either environment, and each verb's libraries load only when it runs, in the environment that has them."""
import argparse
import importlib
import importlib.util
import os
import shlex
import sys
from pathlib import Path

from moeq.errors import UserError

VERBS = ["moeq.quantize.verbs." + v for v in ("list", "build", "corpus", "quantize", "dequantize", "verify", "shape",
                                             "outliers", "prune")] + \
        ["moeq.evaluate.verbs." + v for v in ("eval", "sweep", "serve_bench", "estimate", "report", "ledger",
                                                "routing")]
# per environment: the library it has and the other lacks, and its folder under .venv (README, "Why two environments").
# vLLM marks the serve environment: a GPU machine with vLLM alone (no lm-eval) still runs perf sweeps.
ENVIRONMENTS = {"quantize": ("llmcompressor", "quant"), "serve": ("vllm", "serve")}


def check_environment(verb: str, environment: str | None):
    """A verb run from the wrong environment names the right one, before any library import fails."""
    library, folder = ENVIRONMENTS.get(environment, (None, None))
    if library and importlib.util.find_spec(library) is None:
        quant = os.environ.get("MOEQ_QUANT_PYTHON") if environment == "quantize" else None
        venv = Path(quant).parent.parent if quant else Path(sys.prefix).parent / folder
        command = venv / "bin" / "moeq"
        try:
            command = command.relative_to(Path.cwd())
        except ValueError:
            pass
        raise UserError(f"`moeq {verb}` runs in the {environment} environment ({library} is not "
                        f"installed in {sys.prefix}): {command} {shlex.join(sys.argv[1:])}")


def command(module: str) -> str:
    """The verb's name on the command line: its module's, with dashes (moeq.evaluate.verbs.serve_bench -> serve-bench)."""
    return module.rsplit(".", 1)[1].replace("_", "-")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="moeq", description="quantize Mixture-of-Experts LLMs and measure what it buys")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name in VERBS:
        verb = importlib.import_module(name)
        p = sub.add_parser(command(name), help=verb.HELP, description=verb.HELP)
        verb.add_args(p)
        p.set_defaults(verb_module=verb)
    args = parser.parse_args(argv)
    try:
        check_environment(args.verb, args.verb_module.ENVIRONMENT)
        sys.exit(args.verb_module.run(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
