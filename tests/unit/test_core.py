"""Fast tier: pure functions, no engine, no trained model (seconds). `make test` runs these first."""
import contextlib
import json
import logging
import sqlite3

import numpy as np
import pytest

from moeq import env, flags, roofline, schemes
from moeq.evaluate import engine, kernels, ledger as ledger_mod, routing, settings
from moeq.evaluate.report import verdicts
from moeq.evaluate.ledger import Ledger
from moeq.evaluate.run import misloads
from moeq.quantize import coverage
from moeq.errors import UserError

CELLS = [(1, 512, 128), (16, 2048, 128)]


def test_engine_settings_built_once_with_defaults():
    s = settings.build(gpu=True, cells=CELLS, shape_only=True, warmup_tokens=16)
    assert s.llm == {"max_model_len": 2176 + 64, "disable_log_stats": False}  # nothing else: vLLM's defaults
    assert s.routing == "uniform_random" and s.environment() == {settings.ROUTING_ENV: "uniform_random"}
    assert s.non_default() == {"disable_log_stats": False, "routing": "uniform_random", "warmup_tokens": 16}
    real = settings.build(gpu=True, cells=CELLS, shape_only=False)
    assert real.routing == "model" and real.environment() == {}
    # the scheme's own quantization and the context length do not change the comparison group...
    online = settings.EngineSettings(llm=dict(s.llm, quantization="fp8", max_model_len=99), routing=s.routing,
                                     warmup_tokens=16)
    assert online.profile == s.profile
    # ...every other setting does
    assert settings.build(gpu=True, cells=CELLS, shape_only=True, warmup_tokens=16,
                          user_args={"moe_backend": "triton"}).profile != s.profile
    assert settings.from_record(s.record()) == s


def test_moe_configs_supplied_beside_vllms_are_settings(tmp_path, monkeypatch):
    """VLLM_TUNED_CONFIG_FOLDER changes the fused-MoE kernels' tiles: rows made with it are a settings group of
    their own, named by the files' contents; without it, ids stay what they were."""
    plain = settings.build(gpu=True, cells=CELLS, shape_only=True, warmup_tokens=16)
    assert "moe_configs" not in plain.record()
    monkeypatch.setenv(settings.TUNED_CONFIGS_ENV, str(tmp_path))
    with pytest.raises(UserError, match="holds no fused-MoE config files"):
        settings.build(gpu=True, cells=CELLS, shape_only=True, warmup_tokens=16)
    name = "E=64,N=768,device_name=NVIDIA_H200.json"
    (tmp_path / name).write_text('{"1": {"BLOCK_SIZE_M": 16}}')
    lent = settings.build(gpu=True, cells=CELLS, shape_only=True, warmup_tokens=16)
    assert list(lent.moe_configs) == [name] and lent.non_default()["moe_configs"] == lent.moe_configs
    assert lent.profile != plain.profile and settings.from_record(lent.record()) == lent
    (tmp_path / name).write_text('{"1": {"BLOCK_SIZE_M": 32}}')  # other tiles, other settings
    assert settings.build(gpu=True, cells=CELLS, shape_only=True, warmup_tokens=16).profile != lent.profile
    lines = [f"Using configuration from {tmp_path / name} for MoE layer.",
             "Using configuration from /site/vllm/model_executor/layers/fused_moe/configs/E=128,N=768,"
             "device_name=NVIDIA_H200.json for MoE layer."]
    assert kernels.summary(lines[:1])["moe_config"] == f"{kernels.SUPPLIED}: {name}"
    assert kernels.summary(lines[1:])["moe_config"] == "tuned: E=128,N=768,device_name=NVIDIA_H200.json"
    assert [kernels.config_kind(kernels.summary(x)["moe_config"]) for x in (lines[:1], lines[1:], [])] == \
        ["supplied", "tuned", None]


def test_kernel_environment_is_settings(tmp_path, monkeypatch):
    """vLLM 0.26's humming kernel takes its activation dtype from VLLM_HUMMING_INPUT_QUANT_CONFIG: rows made with
    it set are another engine, shown beside the numbers; a config file is named by its contents too."""
    for name in settings.KERNEL_ENV:
        monkeypatch.delenv(name, raising=False)
    plain = settings.build(gpu=True, cells=CELLS, shape_only=True, warmup_tokens=16)
    assert "kernel_env" not in plain.record()  # ids of rows made before it was recorded hold
    # set to nothing is not unset to vLLM (session 25: json.loads("") after the model loaded): refused up front
    monkeypatch.setenv("VLLM_HUMMING_INPUT_QUANT_CONFIG", "")
    with pytest.raises(UserError, match="VLLM_HUMMING_INPUT_QUANT_CONFIG is set but empty.*unset VLLM_HUMMING"):
        settings.build(gpu=True, cells=CELLS, shape_only=True, warmup_tokens=16)
    monkeypatch.setenv("VLLM_HUMMING_INPUT_QUANT_CONFIG", '{"dtype": "int8"}')
    int8 = settings.build(gpu=True, cells=CELLS, shape_only=True, warmup_tokens=16)
    assert int8.non_default()["VLLM_HUMMING_INPUT_QUANT_CONFIG"] == '{"dtype": "int8"}'
    assert int8.profile != plain.profile and settings.from_record(int8.record()) == int8
    config = tmp_path / "input.json"
    monkeypatch.setenv("VLLM_HUMMING_INPUT_QUANT_CONFIG", str(config))
    config.write_text('{"dtype": "int8"}')
    first = settings.build(gpu=True, cells=CELLS, shape_only=True, warmup_tokens=16)
    config.write_text('{"dtype": "float8e4m3"}')
    assert settings.build(gpu=True, cells=CELLS, shape_only=True, warmup_tokens=16).profile != first.profile


@pytest.mark.parametrize("kwargs, message", [
    ({"user_args": {"enforce_eagr": True}}, "unknown engine argument 'enforce_eagr'"),
    ({"user_args": {"moe_backend": "fastest"}}, "unknown moe_backend 'fastest'; valid: auto, triton"),
    ({"routing": "uniform"}, "unknown routing 'uniform'; valid: model"),
    ({"routing": "zipf:-1"}, "zipf:S with S > 0"),
    ({"warmup_tokens": 0}, "at least 1")])
def test_bad_engine_settings_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        settings.build(gpu=True, cells=CELLS, shape_only=True, **kwargs)


def test_real_weights_keep_their_routing():
    with pytest.raises(UserError, match="shape-only"):
        settings.build(gpu=True, cells=CELLS, shape_only=False, routing="uniform_random")


def test_cli_numbers_are_range_checked():
    assert flags.int_list("1,16, 64", "--batch") == [1, 16, 64]
    for bad, message in (("0", "at least 1"), ("-1", "at least 1"), ("1,x", "whole numbers"), ("4.5", "whole numbers")):
        with pytest.raises(UserError, match=message):
            flags.int_list(bad, "--batch")
    with pytest.raises(UserError, match="one whole number"):
        flags.int_at_least("1,2", "--repeats", 1)


def test_env_flags_parse_strictly(monkeypatch):
    for value, expected in (("0", False), ("false", False), ("1", True), ("yes", True), ("", False)):
        monkeypatch.setenv("MOEQ_FORCE", value)
        assert env.env_flag("FORCE") is expected
    monkeypatch.setenv("MOEQ_FORCE", "maybe")
    with pytest.raises(UserError, match="MOEQ_FORCE='maybe'"):
        env.env_flag("FORCE")


def test_verdict_boundaries():
    minimum, maximum = {"min": 20}, {"max": 1}
    assert verdicts.judge(25, 20, 30, minimum) == verdicts.HOLDS  # lo on the bound holds
    assert verdicts.judge(19, 18, 19.99, minimum) == verdicts.FAILS
    assert verdicts.judge(21, 19.99, 22, minimum) == verdicts.INCONCLUSIVE
    assert verdicts.judge(0.5, 0, 1, maximum) == verdicts.HOLDS  # hi on the bound holds
    assert verdicts.judge(1.5, 1.01, 2, maximum) == verdicts.FAILS
    assert verdicts.judge(1, np.nan, np.nan, maximum) == verdicts.INCONCLUSIVE
    assert verdicts.judge(np.nan, np.nan, np.nan, maximum) == verdicts.NOT_MEASURED


def test_claims_select_schemes_by_format():
    claims = {c["id"]: c for c in verdicts.load_claims()["claims"]}
    formats = {n: schemes.scheme_format(n) for n in schemes.scheme_names()}
    covered = lambda cid, model="qwen3moe": sorted(s for s, f in formats.items() if verdicts.covers(claims[cid], f, model))
    assert covered("fp8-throughput") == ["fp8", "fp8-block", "fp8-online", "fp8-static"]
    assert covered("int-throughput") == ["w4a16-awq", "w4a16-gptq", "w8a16"]  # W8A8-INT8 is not weight-only
    assert covered("mixtral-fp16-48gb", "mixtral") == ["bf16"] and covered("mixtral-fp16-48gb") == []
    assert covered("mixtral-int8-24gb", "mixtral") == ["w8a16", "w8a8-int8"]


def test_roofline_floor_by_hand():
    config = {"hidden_size": 4096, "num_layers": 32, "num_experts": 8, "top_k": 2, "vocab_size": 32000,
              "num_kv_heads": 8, "head_dim": 128, "params_active": 12.9e9, "params_dense": 1.6e9,
              "params_per_expert": 3 * 4096 * 14336, "moe_layers": 32, "weight_bits": 16, "activation_bits": 16}
    device = {"memory_bandwidth_GBps": 4800, "tflops": {"bf16": 989}}
    f = roofline.floors(config, device, batch=1, input_len=512, output_len=128)
    kv = 2 * 32 * 8 * 128 * 2
    step_bytes = 2 * (1.6e9 - 32000 * 4096 + 32 * 3 * 4096 * 14336 * 2) + (512 + 64) * kv  # two experts touched
    assert f["itl_floor"] == pytest.approx(step_bytes / 4.8e12) and f["decode_bound"] == "memory"
    # balanced routing at batch 64 touches all 8 experts; the model's own routers may touch only 2
    assert roofline.floors(config, device, 64, 512, 128)["itl_floor"] > \
        roofline.floors(config, device, 64, 512, 128, routing="model")["itl_floor"]


def test_kv_layout_mla_and_gqa():
    from types import SimpleNamespace as C
    assert roofline.kv_bytes_per_token(C(num_hidden_layers=27, kv_lora_rank=512, qk_rope_head_dim=64)) == 27 * 576 * 2
    gqa = C(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_size=4096)
    assert roofline.kv_bytes_per_token(gqa) == 2 * 32 * 8 * 128 * 2
    assert roofline.kv_bytes_per_token(gqa, "fp8") == 2 * 32 * 8 * 128


def test_routing_stats():
    even = np.array([[[e % 8, (e + 1) % 8]] for e in range(800)])  # [tokens, layers, top_k]
    assert routing.load_stats(even, 8)["median"]["entropy"] == pytest.approx(1.0)
    skewed = np.zeros((800, 1, 2), int)
    skewed[:, 0, 1] = 1
    s = routing.load_stats(skewed, 8)["median"]
    assert s["max_over_mean"] == pytest.approx(4.0) and s["min_over_mean"] == 0 and s["entropy"] < 0.4
    assert settings.parse_zipf("zipf:1.5") == 1.5


def test_starved_experts():
    out = coverage.summarize({"l0": [100, 100, 100, 100], "l1": [390, 4, 3, 3]}, n_tokens=200, top_k=2)
    assert out["fair_share"] == 100 and out["starved"] == {"l1": [1, 2, 3]} and out["min_share_of_fair"] == 0.03


def test_kernel_log_summary():
    log = engine.KernelLog()
    for line in ("Using VLLM_CUTLASS Fp8 MoE backend out of potential backends: ['VLLM_CUTLASS', 'TRITON'].",
                 "Using default MoE config. Performance might be sub-optimal! Config file not found at x.json"):
        log.emit(logging.LogRecord("vllm", logging.INFO, __file__, 0, line, None, None))
    got = {m["metric"]: m["note"] for m in kernels.metrics(log.lines)}
    assert got["moe_kernel"] == "VLLM_CUTLASS" and got["moe_config"].startswith("default")


# vLLM 0.26 on the H200 (session 23), moe_backend=humming with humming-kernels installed but pyelftools not
HUMMING_BROKEN = ("WARNING 12-03 11:23:50 [import_utils.py:408] Module humming was found but failed to import",
                  "WARNING 12-03 11:23:50 [import_utils.py:408]     from elftools.elf.elffile import ELFFile",
                  "WARNING 12-03 11:23:50 [import_utils.py:408] ModuleNotFoundError: No module named 'elftools'",
                  "INFO 12-03 11:23:51 [scheduler.py:252] Chunked prefill is enabled with max_num_batched_tokens=16384.")
HUMMING_REFUSAL = ("ValueError: Int8 MoE backend HUMMING does not support the deployment configuration since kernel "
                   "does not support current device cuda.")


def test_a_package_vllm_has_but_cannot_import_is_named_with_its_error():
    broken = []
    for line in HUMMING_BROKEN:
        kernels.note_broken(broken, line)
    assert broken == ["humming (ModuleNotFoundError: No module named 'elftools')"]
    assert kernels.REFUSALS.search(HUMMING_REFUSAL)  # what vLLM says next: a refusal, in the environment's cause
    log = engine.KernelLog()  # in-process: vLLM's logger record carries the exception itself
    try:
        import elftools_that_is_not_installed  # noqa: F401
    except ModuleNotFoundError:
        logging.getLogger("vllm.utils.import_utils").warning("Module %s was found but failed to import", "humming",
                                                             exc_info=True)
    finally:
        logging.getLogger("vllm").removeHandler(log)
    assert log.broken == ["humming (ModuleNotFoundError: No module named 'elftools_that_is_not_installed')"]
    assert not log.lines
    error = kernels.broken_environment("mixtral / w8a8-int8", HUMMING_REFUSAL, broken)
    assert isinstance(error, UserError) and "failing to import humming (ModuleNotFoundError" in str(error)


def test_the_largest_cuda_graph_is_read_from_the_servers_log():
    """A step of more tokens than the largest captured graph runs eagerly (Qwen3 fp8 under load, H200 session 21):
    the kernel record keeps vLLM 0.26's own line, and the summary its largest size; no line, no size."""
    line = ("INFO 12-01 15:32:42 [gpu_model_runner.py:6612] Profiling CUDA graph memory: PIECEWISE=51 (largest=512), "
            "FULL=35 (largest=1024)")  # an H200 server's line (session 13), FULL's size raised to tell them apart
    kept = {m["metric"]: m["note"] for m in kernels.metrics(["Using TRITON Fp8 MoE backend", line, "other"])}
    assert kept["vllm_log"].splitlines() == ["Using TRITON Fp8 MoE backend", line]
    assert kernels.summary(kept["vllm_log"].splitlines())["cuda_graph_tokens"] == 1024
    assert kernels.summary(["Using TRITON Fp8 MoE backend"])["cuda_graph_tokens"] is None


def test_the_kernel_variant_vllm_ran_is_read_from_its_config_lookup():
    """H200 session 6: vLLM 0.26 looked up an int8_w8a16 config for W8A8-INT8 checkpoints (experts on
    16-bit activations); the report must say so for a scheme that asks for 8-bit activations, and only then."""
    from moeq.evaluate.report.build import unquantized_experts
    lines = ["Using TRITON Int8 MoE backend out of potential backends: ['TRITON', 'HUMMING', 'CPU'].",
             "Using default MoE config. Performance might be sub-optimal! Config file not found at "
             "/x/configs/E=64,N=1024,device_name=NVIDIA_H200,dtype=int8_w8a16.json"]
    got = kernels.summary(lines)
    assert got["moe_kernel"] == "TRITON" and got["moe_dtype"] == "int8_w8a16"
    assert kernels.summary(lines[:1])["moe_dtype"] is None
    w8a8, w8a16 = {"weight_bits": 8, "activation_bits": 8}, {"weight_bits": 8, "activation_bits": 16}
    assert unquantized_experts(w8a8, "int8_w8a16")
    assert not unquantized_experts(w8a16, "int8_w8a16") and not unquantized_experts(w8a8, "fp8_w8a8")
    assert not unquantized_experts(w8a8, None) and not unquantized_experts(None, "int8_w8a16")
    # the experts' quant config read from vLLM's worker, where recorded, decides (any kernel, Triton or not)
    read = "CompressedTensorsW8A8Int8MoEMethod: activations {}"
    assert unquantized_experts(w8a8, None, read.format("unquantized (int8_w8a16)"))
    assert not unquantized_experts(w8a8, "int8_w8a16", read.format("torch.int8 per-token (int8_w8a8)"))
    assert unquantized_experts(w8a8, "int8_w8a16", "not readable: AttributeError: x")  # then the config name


def test_only_a_kernel_refusal_is_unsupported():
    assert kernels.REFUSALS.search("ValueError: Unsupported FP8 MoE backend: NONE")
    assert kernels.REFUSALS.search("RuntimeError: _C::static_scaled_fp8_quant() expected at most 0 argument(s)")
    # vLLM 0.26 on DeepSeek-V2-Lite fp8-block (H200, session 6): its dense MLP is 10944 wide
    assert kernels.REFUSALS.search("ValueError: Weight output_partition_size = 10944 is not divisible by weight "
                                   "quantization block_n = 128.")
    for other in ("ValidationError: max_num_seqs must be positive", "No module named 'lm_eval'",
                  "CUDA out of memory. Tried to allocate 2.00 GiB", "TypeError: unexpected keyword 'enforce_eagr'"):
        assert not kernels.REFUSALS.search(other), other


def _v1_ledger(path):
    """A ledger as schema 1 wrote it (no settings, no identity columns, no version)."""
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE env (id INTEGER PRIMARY KEY, digest TEXT UNIQUE NOT NULL, record TEXT NOT NULL);
        CREATE TABLE results (model TEXT NOT NULL, scheme TEXT NOT NULL, provenance TEXT NOT NULL, backend TEXT NOT NULL,
          device TEXT NOT NULL, kind TEXT NOT NULL, cell TEXT NOT NULL, metric TEXT NOT NULL, value REAL, spread REAL,
          spread_kind TEXT, n INTEGER, unit TEXT, repeats TEXT, status TEXT NOT NULL DEFAULT 'ok', note TEXT,
          recipe_sha TEXT, env_id INTEGER, created TEXT NOT NULL,
          PRIMARY KEY (model, scheme, provenance, backend, device, cell, metric));
        CREATE TABLE items (model TEXT NOT NULL, scheme TEXT NOT NULL, provenance TEXT NOT NULL, backend TEXT NOT NULL,
          device TEXT NOT NULL, task TEXT NOT NULL, metric TEXT NOT NULL, item INTEGER NOT NULL, value REAL NOT NULL,
          PRIMARY KEY (model, scheme, provenance, backend, device, task, metric, item));
        INSERT INTO results (model, scheme, provenance, backend, device, kind, cell, metric, value, created)
          VALUES ('m', 'bf16', 'real', 'vllm-cuda', 'H200', 'perf', 'b1-i8-o8', 'itl_p99', 0.01, 'then');""")
    db.commit()
    db.close()


def test_old_ledger_is_migrated_on_a_copy(tmp_path):
    path = tmp_path / "ledger.sqlite"
    _v1_ledger(path)
    led = Ledger(path)
    assert ledger_mod.schema_version(led.db) == ledger_mod.VERSION
    row = led.rows()[0]
    assert row["settings"] == ledger_mod.LEGACY and row["metric"] == "itl_request_p99" and row["value"] == 0.01
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.sqlite"]  # no copy left behind


def test_failed_migration_leaves_the_ledger_untouched(tmp_path, monkeypatch):
    path = tmp_path / "ledger.sqlite"
    _v1_ledger(path)
    before = path.read_bytes()
    monkeypatch.setattr(ledger_mod, "SCHEMA", "CREATE TABLE broken (")  # fails half-way through
    with pytest.raises(sqlite3.Error):
        ledger_mod.migrate(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ledger.sqlite"]


def test_garbage_ledger_is_a_user_error(tmp_path):
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(UserError, match="not a usable moeq ledger"):
        Ledger(path)
    assert path.read_bytes() == b"not a database at all" * 100


def test_one_writer_per_ledger(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with ledger_mod.lock(path):
        with pytest.raises(UserError, match=r"being written by pid \d+"):
            with ledger_mod.lock(path):
                pass
    with ledger_mod.lock(path):  # released when the holder is done
        pass


KEY = {"model": "m", "provenance": "real", "backend": "b", "device": "d", "settings": "s"}


def test_identity_and_limit_decide_what_is_measured(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    led.write(KEY | {"scheme": "fp8"}, "perf", "c", [{"metric": "throughput", "value": 1}], checkpoint="A")
    led.write(KEY | {"scheme": "fp8"}, "accuracy", "task", [{"metric": "acc", "value": 1}], checkpoint="A", limit=5)
    key = KEY | {"scheme": "fp8"}
    assert led.has(key, "c", "A") and not led.has(key, "c", "B")  # a re-quantized checkpoint is re-measured
    assert led.has(key, "task", "A", limit=5) and not led.has(key, "task", "A", limit=None)  # partial != full


def test_misload_guard_and_its_negative_control(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    for scheme, bpb in (("bf16", 1.6), ("fp8", 1.61), ("w4a16-gptq", 3.0)):
        led.write(KEY | {"scheme": scheme}, "accuracy", "moeq_ppl", [{"metric": "bits_per_byte", "value": bpb}])
    bad = misloads(led, ["m"], log=lambda *_: None)
    assert len(bad) == 1 and "w4a16-gptq" in bad[0]  # fp8, 0.6% worse, is not flagged


def test_run_cell_timings_survive_a_json_round_trip():
    job = engine.Job(model="m", scheme="s", path="/p", ledger="/l", settings={"llm": {}, "routing": "model"})
    assert engine.Job(**json.loads(engine.job_json(job))) == job


def test_plain_eval_skips_hidden_folders_and_finds_models_quantized_from_a_path(tmp_path):
    """`moeq eval` without MODEL once died on checkpoints/.shape-only and on a model quantized from a path."""
    from moeq.evaluate.run import _base_of, model_folders
    source = tmp_path / "src" / "mymoe"
    source.mkdir(parents=True)
    (source / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    root = tmp_path / "checkpoints"
    for folder in (".shape-only/mixtral/bf16", ".dequantized/x", "mymoe/fp8"):
        (root / folder).mkdir(parents=True)
    (root / "mymoe" / "fp8" / "manifest.json").write_text(json.dumps({"base": str(source)}))
    assert model_folders(root) == ["mymoe"]
    model = _base_of(root, "mymoe")
    assert model.path == source.resolve() and model.source == "path"
    (root / "orphan" / "fp8").mkdir(parents=True)
    with pytest.raises(UserError, match="no checkpoint there names its source model"):
        _base_of(root, "orphan")


def test_per_item_scores_become_one_json_row_per_task_and_metric(tmp_path):
    """Schema 2-3 kept one row per item, the whole key repeated (23 of the H200 ledger's 25 MiB): schema 4 keeps
    a task's scores of one metric as one JSON row, and the view item_rows gives them back one per item."""
    from tests.unit.test_ledger_writers import V2_SCHEMA
    path = tmp_path / "ledger.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as db, db:  # schema 2 as moeq wrote it until session 8 (rowid)
        db.executescript(V2_SCHEMA.replace(" WITHOUT ROWID", ""))
        db.execute("PRAGMA user_version = 2")
        db.executemany("INSERT INTO items VALUES ('m', 'bf16', 'real', 'vllm-cuda', 'H200', 's', 't', 'acc', ?, ?)",
                       [(i, i % 2) for i in range(5000)])
        db.executemany("INSERT INTO items VALUES ('m', 'bf16', 'real', 'vllm-cuda', 'H200', 's', 't', 'll', ?, ?)",
                       [(3, -1.25), (7, 2.5)])  # not 0..n-1: kept by item
    before = path.stat().st_size
    led = Ledger(path)
    assert tuple(led.db.execute("SELECT COUNT(*), SUM(value) FROM item_rows WHERE metric = 'acc'").fetchone()) == (5000, 2500)
    assert list(map(tuple, led.db.execute("SELECT item, value FROM item_rows WHERE metric = 'll'"))) == [(3, -1.25), (7, 2.5)]
    assert led.db.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 2
    assert path.stat().st_size < 0.2 * before
    assert not ledger_mod.migrate(path)  # once only


def test_scores_json_keeps_every_item_and_value():
    assert ledger_mod.scores_json([(1, 0.0), (0, 1.0), (2, 0.5)]) == "[1,0,0.5]"
    assert ledger_mod.scores_json([(0, float("nan")), (2, 1.0)]) == '{"0":null,"2":1}'
