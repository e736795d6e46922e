"""moeq corpus"""
HELP = ("make or check a built model's corpus manifest (files + sha256 + split) and count its bytes and tokens "
        "without training")
ENVIRONMENT = None  # moeq and torch only: either environment, or a GPU machine's python3


def add_args(p):
    p.add_argument("model", nargs="?", default="moe-500m")
    p.add_argument("--manifest", help="check this manifest instead of the registry's pinned one")
    p.add_argument("--write", help="write a new manifest of this machine's files here")


def run(args):
    import json

    from moeq import corpus, registry
    from moeq.errors import UserError
    from moeq.quantize import gpubuild

    spec = registry.registry().get(args.model)
    if spec is None or "corpus" not in spec.get("train", {}):
        raise UserError(f"{args.model!r} has no manifest corpus; such models: "
                        + ", ".join(n for n, s in registry.registry().items() if "corpus" in s.get("train", {})))
    train = spec["train"]
    if args.write:
        manifest = corpus.collect(list(dict.fromkeys(train["corpus"].get("packages", []))),
                                  stdlib=train["corpus"].get("stdlib", True))
        corpus.write_manifest(manifest, args.write)
    else:
        path = args.manifest or gpubuild.pinned_manifest_path(train)
        if not path or not __import__("pathlib").Path(path).is_file():
            raise UserError(f"no manifest at {path}: make one with --write PATH")
        manifest = corpus.read_manifest(path)
        corpus.verify(manifest)
    summary = corpus.manifest_summary(manifest)
    summary["missing_packages"] = manifest["missing"]
    summary["packages"] = manifest["packages"]
    print(json.dumps(summary, indent=1))
