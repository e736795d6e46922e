"""moeq list"""
HELP = "list the registered models and schemes"
ENVIRONMENT = None  # schemes' formats are read from compressed-tensors, which both environments have


def add_args(p):
    pass


def run(args):
    from moeq import registry, schemes
    print("models:")
    for name, spec in registry.registry().items():
        print(f"  {name:18s} {spec.get('hub_id', 'built by moeq'):40s} {spec['description']}")
    print("schemes:")
    print(f"  {schemes.BASELINE:18s} {'baseline':11s} the unquantized model")
    for name, r in schemes.all_recipes().items():
        aliases = ", ".join(r.meta.get("aliases", []))
        print(f"  {name:18s} {r.claim:11s} {r.meta['description']}" + (f" (aliases: {aliases})" if aliases else ""))
