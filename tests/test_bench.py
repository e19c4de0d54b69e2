"""sparselab.bench and experiments/run_benchmark.py: byte bound against hand counts, memory
sampling, generate timing, summaries and the benchmark's JSON. No wall-clock assertions."""

from __future__ import annotations

import importlib.util
import json
import mmap
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import sparselab as sl
from sparselab import bench

ROOT = Path(__file__).resolve().parents[1]
H, N, LAYERS, VOCAB = 64, 200, 2, 101


def tiny_config(tie: bool = True, **kw):
    from transformers import LlamaConfig

    fields = dict(vocab_size=VOCAB, hidden_size=H, intermediate_size=N, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  pad_token_id=0, tie_word_embeddings=tie)
    fields.update(kw)
    return LlamaConfig(**fields)


def tiny_llama(seed: int = 0, **kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(initializer_range=0.2, **kw)
    return LlamaForCausalLM(cfg).eval()


# --------------------------------------------------------------------------------------
# byte bound
# --------------------------------------------------------------------------------------

# hidden 8, intermediate 12, 2 layers, 2 heads of 4, 1 KV head, vocab 10. Per layer:
#   attention q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192, norms 2*8 = 16, MLP 3*8*12 = 288.
#   MLP total 2*288 = 576; other = 2*(192+16) + final norm 8 + LM head 10*8 + one row 8 = 512.
HAND = {"mlp": 576, "other": 512, "lm_head": 80, "row": 8}


def hand_config(tie: bool):
    return tiny_config(tie=tie, vocab_size=10, hidden_size=8, intermediate_size=12,
                       num_attention_heads=2, num_key_value_heads=1)


@pytest.mark.parametrize("tie", [True, False])
def test_decode_bytes_matches_hand_count(tie):
    from transformers import LlamaForCausalLM

    cfg = hand_config(tie)
    model = LlamaForCausalLM(cfg).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    for b in (bench.decode_bytes(model), bench.decode_bytes_from_config(cfg)):
        # a tied head is the embedding table and is still read whole every token
        assert (b.mlp, b.other, b.lm_head, b.embedding_row) == (
            4 * HAND["mlp"], 4 * HAND["other"], 4 * HAND["lm_head"], 4 * HAND["row"])
        assert b.f == pytest.approx(576 / 1088)
        assert b.bound(0.5) == pytest.approx(1088 / (512 + 288))  # = 1.36
        assert b.bound(0.5, extra_bytes=4 * 136) == pytest.approx(1088 / (512 + 288 + 136))
        assert b.bound(1.0) == pytest.approx(1.0)


def test_decode_bytes_dtype_scales_bytes_not_f():
    cfg = hand_config(True)
    b32 = bench.decode_bytes_from_config(cfg, torch.float32)
    b16 = bench.decode_bytes_from_config(cfg, torch.bfloat16)
    assert b16.total * 2 == b32.total and b16.f == b32.f


def test_byte_bound_formula_and_errors():
    assert bench.byte_bound(0.0, 0.1) == 1.0  # nothing in the MLPs: nothing to gain
    assert bench.byte_bound(1.0, 0.25) == pytest.approx(4.0)  # all MLP: 1/d
    assert bench.byte_bound(0.5, 0.5, 0.25) == pytest.approx(1.0)  # predictor eats the gain
    for bad in ((1.5, 0.5, 0.0), (0.5, -0.1, 0.0), (0.5, 0.5, -1.0)):
        with pytest.raises(ValueError):
            bench.byte_bound(*bad)


def test_anchor_bounds_smollm2_and_llama3b_shapes():
    from transformers import LlamaConfig

    # SmolLM2-135M: 30 layers, hidden 576, intermediate 1536, 9 heads / 3 KV, vocab 49152, tied
    smol = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    b = bench.decode_bytes_from_config(smol)
    assert b.f == pytest.approx(0.59, abs=0.01)
    assert b.bound(0.5) == pytest.approx(1.42, abs=0.01)
    assert b.bound(0.3) == pytest.approx(1.71, abs=0.01)
    # Llama-3.2-3B: 28 layers; a rank-327 predictor per layer adds 327*(3072+8192)+8192 weights
    llama = LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                        num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
    b = bench.decode_bytes_from_config(llama)
    assert b.f == pytest.approx(0.66, abs=0.01)
    assert b.bound(0.3) == pytest.approx(1.86, abs=0.01)
    pred = 28 * 4 * (327 * (3072 + 8192) + 8192)
    assert b.bound(0.3, extra_bytes=pred) == pytest.approx(1.75, abs=0.01)


@pytest.mark.slow
def test_real_model_bytes_match_its_config(real_model):
    model, _ = real_model
    b = bench.decode_bytes(model)
    assert b.describe() == bench.decode_bytes_from_config(model.config).describe()
    assert b.f == pytest.approx(0.59, abs=0.01)
    assert b.bound(0.5) == pytest.approx(1.42, abs=0.01)


# --------------------------------------------------------------------------------------
# memory sampling
# --------------------------------------------------------------------------------------


def test_memory_sampler_sees_a_freed_allocation():
    size = 96 * 2**20
    with bench.MemorySampler(interval=0.001) as mem:
        # a fresh anonymous mapping, every page touched: resident whatever state earlier
        # tests left the allocator in (a torch tensor may reuse freed, still-resident heap)
        block = mmap.mmap(-1, size)
        pages = np.frombuffer(block, dtype=np.uint8)
        pages[::4096] = 1
        time.sleep(0.05)
        del pages
        block.close()  # unmapped before the block ends: only the sampler can have seen it
    assert mem.n_samples > 2
    assert mem.peak_rss - mem.start_rss >= 0.8 * size
    assert mem.peak_rss - mem.end_rss >= 0.5 * size
    if mem.kernel_peak_rss is not None:
        assert mem.kernel_peak_rss - mem.start_rss >= 0.8 * size


def test_memory_sampler_is_single_use_and_checks_interval():
    with pytest.raises(ValueError):
        bench.MemorySampler(interval=0)
    mem = bench.MemorySampler()
    with mem:
        pass
    with pytest.raises(RuntimeError):
        mem.__enter__()


# --------------------------------------------------------------------------------------
# timing generate
# --------------------------------------------------------------------------------------


def test_time_generate_counts_tokens_and_ignores_eos():
    model = tiny_llama()
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    first = bench.time_generate(model, ids, max_new_tokens=2)
    # make the token greedy decoding emits first the EOS token: generate must not stop
    model.generation_config.eos_token_id = int(first.output_ids[0, 6])
    t = bench.time_generate(model, ids, max_new_tokens=5)
    assert t.output_ids.shape == (1, 11) and t.n_new == 5 and t.n_prompt == 6
    assert len(t.forward_s) == len(t.token_s) == len(t.mlp_s) == 5
    assert np.all(np.diff(t.token_s) > 0) and t.ttft_s == t.token_s[0] > 0
    assert t.decode_tokens_per_s == pytest.approx(4 / (t.token_s[-1] - t.token_s[0]))
    assert t.total_tokens_per_s == pytest.approx(5 / t.total_s)
    assert np.all(t.mlp_s > 0) and np.all(t.mlp_s < t.forward_s)  # MLPs run inside forwards
    assert not model._forward_hooks and not model._forward_pre_hooks  # hooks removed
    for layer in model.model.layers:
        assert not layer.mlp._forward_hooks


def test_time_generate_rejects_bad_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="max_new_tokens"):
        bench.time_generate(model, torch.ones(1, 3, dtype=torch.long), max_new_tokens=1)
    with pytest.raises(ValueError, match="input_ids"):
        bench.time_generate(model, torch.ones(3, dtype=torch.long), max_new_tokens=4)


def _timing(forward_ms, mlp_ms, token_ms):
    return bench.GenerationTiming(
        n_prompt=3, n_new=len(forward_ms), batch_size=1, total_s=token_ms[-1] / 1e3 + 0.001,
        token_s=np.asarray(token_ms) / 1e3, forward_s=np.asarray(forward_ms) / 1e3,
        mlp_s=np.asarray(mlp_ms) / 1e3)


def test_decode_split_adds_up_by_hand():
    # prefill 50 ms; decode forwards 10 and 14 ms (tokens end at 50, 62, 78 ms from the call)
    t = _timing([50.0, 10.0, 14.0], [20.0, 4.0, 6.0], [50.0, 62.0, 78.0])
    ms = 1_000_000
    stats = pd.DataFrame({
        "step": [0, 0, 1, 1, 2, 2], "layer": [0, 1] * 3,
        "phase": ["prefill"] * 2 + ["decode"] * 4,
        "t_predictor_ns": [0, 0, 1 * ms, 1 * ms, 1 * ms, 1 * ms],
        "t_mask_ns": [0] * 6, "t_cache_ns": [0, 0, 0, 0, 2 * ms, 0],
        "t_mlp_ns": [9 * ms, 9 * ms, 1 * ms, 1 * ms, 1 * ms, 1 * ms],
        "density": [1.0, 1.0, 0.3, 0.5, 0.3, 0.5], "rows_copied": [0, 0, 10, 0, 4, 2],
        "added": [0, 0, 10, 0, 4, 2], "active": [200] * 2 + [60, 100] * 2,
    })
    s = bench.decode_split(t, stats)
    assert s["step_ms"] == pytest.approx(14.0)  # (78 - 50) / 2
    assert s["forward_ms"] == pytest.approx(12.0) and s["generate_ms"] == pytest.approx(2.0)
    assert s["mlp_ms"] == pytest.approx(5.0) and s["rest_ms"] == pytest.approx(7.0)
    assert s["predictor_ms"] == pytest.approx(2.0) and s["cache_ms"] == pytest.approx(1.0)
    assert s["kernel_ms"] == pytest.approx(2.0) and s["mask_ms"] == 0.0
    assert s["mlp_other_ms"] == pytest.approx(0.0)
    assert s["active_density"] == pytest.approx(0.4) and s["rows_copied"] == pytest.approx(8.0)


# --------------------------------------------------------------------------------------
# summaries, speedups, targets
# --------------------------------------------------------------------------------------


def _runs():
    rows = []
    for cycle, (dense, sparse) in enumerate([(10.0, 12.0), (10.0, 15.0), (20.0, 24.0), (99.0, 1.0)]):
        for variant, tps in (("dense", dense), ("sparse", sparse)):
            rows.append({"cycle": cycle, "variant": variant, "warmup": cycle == 3,
                         "decode_tokens_per_s": tps, "ttft_ms": 100.0 if variant == "dense" else 104.0,
                         "total_tokens_per_s": tps, "peak_rss": 1000.0 if variant == "dense" else 1030.0,
                         "extra_bytes": 0, "active_rows_bytes": 0, "step_ms": 1e3 / tps})
    return pd.DataFrame(rows)


def test_summarize_and_speedups_by_hand():
    runs = _runs()
    summary = bench.summarize(runs)  # the warm-up cycle (99 vs 1 tok/s) is excluded
    d = summary.loc[("dense", "decode_tokens_per_s")]
    assert (d["n"], d["median"], d["min"], d["max"]) == (3, 10.0, 10.0, 20.0)
    assert d["q1"] == 10.0 and d["q3"] == 15.0 and d["iqr"] == 5.0
    sp = bench.speedups(runs).loc["sparse"]
    assert sp["decode_speedup"] == pytest.approx(15.0 / 10.0)  # ratio of medians
    assert sp["decode_speedup_paired"] == pytest.approx(1.2)  # median of 1.2, 1.5, 1.2
    assert sp["ttft_ratio"] == pytest.approx(1.04) and sp["peak_rss_ratio"] == pytest.approx(1.03)
    with pytest.raises(ValueError, match="baseline"):
        bench.speedups(runs, baseline="nope")


def test_check_targets_decides_met_by_hand():
    budget = bench.DecodeBytes(mlp=600, other=400, lm_head=100, embedding_row=1, n_layers=2)
    # bound at d = 0.5: 1/(0.4 + 0.3) = 1.4286, 90 % of it 1.2857 <= 1.5: met
    t = bench.check_targets(_runs(), budget, density=0.5).set_index("target")
    speed = t.filter(like="decode speedup", axis=0).iloc[0]
    assert speed["met"] and speed["threshold"] == pytest.approx(0.9 / 0.7)
    mem = t.filter(like="peak RSS", axis=0).iloc[0]
    assert mem["met"] and mem["threshold"] * bench.MB == pytest.approx(1050.0)  # 1030 <= 1050
    assert t.filter(like="TTFT", axis=0).iloc[0]["met"]  # 1.04 <= 1.05
    # at d = 0.1 the bound is 1/(0.4+0.06) = 2.17: 1.5 < 0.9 * 2.17. Bytes resident in the
    # dense runs too come off the dense baseline: limit (1000 - 50) * 1.05 = 997.5 < 1030
    t2 = bench.check_targets(_runs(), budget, density=0.1, resident_bytes=50).set_index("target")
    speed = t2.filter(like="decode speedup", axis=0).iloc[0]
    assert not speed["met"] and speed["threshold"] == pytest.approx(0.9 / 0.46)
    mem = t2.filter(like="peak RSS", axis=0).iloc[0]
    assert not mem["met"] and mem["threshold"] * bench.MB == pytest.approx(997.5)
    # a predictor's bytes lower the bound: 1/(0.4+0.3+0.2) at 200 bytes of 1000
    t3 = bench.check_targets(_runs(), budget, density=0.5, predictor_bytes=200).set_index("target")
    assert t3.filter(like="decode speedup", axis=0).iloc[0]["threshold"] == pytest.approx(0.9 / 0.9)


def test_shortfall_excesses_add_up_to_the_gap_by_hand():
    common = {"warmup": False, "decode_tokens_per_s": 1.0, "ttft_ms": 1.0}
    runs = pd.DataFrame([
        {"cycle": 0, "variant": "dense", "step_ms": 10.0, "rest_ms": 5.0, "mlp_ms": 4.0,
         "generate_ms": 1.0, **common},
        {"cycle": 0, "variant": "sparse", "step_ms": 8.7, "rest_ms": 5.2, "mlp_ms": 2.5,
         "generate_ms": 1.0, "kernel_ms": 1.5, "predictor_ms": 0.5, "mask_ms": 0.1,
         "cache_ms": 0.0, "mlp_other_ms": 0.4, **common},
    ])
    budget = bench.DecodeBytes(mlp=600, other=400, lm_head=100, embedding_row=1, n_layers=2)
    gap = bench.shortfall(runs, budget, density=0.25, predictor_bytes=60).loc["sparse"]
    # ideal: kernel 0.25 * 4 = 1.0, predictor 60/600 * 4 = 0.4, rest 5, generate 1 -> step 7.4
    assert gap.at["kernel", "ideal_ms"] == pytest.approx(1.0)
    assert gap.at["predictor", "ideal_ms"] == pytest.approx(0.4)
    assert gap["excess_ms"].sum() == pytest.approx(8.7 - 7.4)
    assert gap.at["kernel", "excess_ms"] == pytest.approx(0.5) and gap["share"].sum() == pytest.approx(1.0)


# --------------------------------------------------------------------------------------
# the alternating loop and the random predictors
# --------------------------------------------------------------------------------------


class CountingHandle:
    log: list = []

    def __init__(self, name):
        self.name = name
        CountingHandle.log.append(("enter", name))

    def restore(self):
        CountingHandle.log.append(("restore", self.name))


def test_compare_alternates_rotates_and_restores():
    model = tiny_llama()
    ids = torch.randint(1, VOCAB, (1, 4), generator=torch.Generator().manual_seed(1))
    CountingHandle.log = []
    variants = {"dense": None, "a": lambda: CountingHandle("a"), "b": lambda: CountingHandle("b")}
    runs = bench.compare(model, ids, variants, num_runs=2, warmup_runs=1, max_new_tokens=3,
                         progress=False)
    assert list(runs["variant"]) == ["dense", "a", "b", "a", "b", "dense", "b", "dense", "a"]
    assert list(runs["warmup"]) == [True] * 3 + [False] * 6
    # every handle was restored right after its own run, before the next one started
    assert CountingHandle.log == [(k, v) for v in ["a", "b", "a", "b", "b", "a"] for k in ("enter", "restore")]
    assert (runs["n_new"] == 3).all() and (runs["memory_samples"] >= 2).all()
    assert set(runs.attrs["outputs"]) == {"dense", "a", "b"}


def test_random_predictors_shapes_bytes_and_density():
    p = bench.RandomLowRankPredictors(hidden=H, n_neurons=N, layers=range(LAYERS), rank=8, density=0.3)
    assert p.bytes == LAYERS * 4 * (8 * H + N * 8 + N)
    x = torch.randn(5, H)
    m = p.mask(1, x)
    assert m.shape == (5, N) and m.dtype == torch.bool and (m.sum(1) == 60).all()
    top = p.scores(1, x).topk(60, dim=1).indices
    assert torch.equal(m, torch.zeros(5, N, dtype=torch.bool).scatter_(1, top, True))
    q = bench.RandomLowRankPredictors(hidden=H, n_neurons=N, layers=range(LAYERS), rank=8, density=0.3)
    assert torch.equal(p.mask(0, x), q.mask(0, x))  # seeded
    assert bench.RandomLowRankPredictors(H, N, [0], rank=0.04).rank == 8  # fraction of N
    with pytest.raises(ValueError):
        bench.RandomLowRankPredictors(H, N, [0], rank=H + 1)


def test_random_predictors_drive_the_sparse_model():
    model = tiny_llama()
    p = bench.RandomLowRankPredictors(hidden=H, n_neurons=N, layers=range(LAYERS), rank=8, density=0.3)
    ids = torch.randint(1, VOCAB, (1, 4), generator=torch.Generator().manual_seed(2))
    with sl.sparsify(model, p) as handle:
        t = bench.time_generate(model, ids, max_new_tokens=4)
        split = bench.decode_split(t, handle.stats())
    assert split["active_density"] == pytest.approx(0.3, abs=0.005)
    assert split["kernel_ms"] > 0 and split["predictor_ms"] > 0


# --------------------------------------------------------------------------------------
# the benchmark script
# --------------------------------------------------------------------------------------


def _load_run_benchmark():
    """experiments/run_benchmark.py as a module (experiments/ is not a package)."""
    if "run_benchmark" in sys.modules:
        return sys.modules["run_benchmark"]
    spec = importlib.util.spec_from_file_location("run_benchmark", ROOT / "experiments" / "run_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_benchmark"] = module  # dataclasses look their module up while defined
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["run_benchmark"]
        raise
    return module


def test_shipped_configs_are_valid():
    rb = _load_run_benchmark()
    smol = rb.load_config(ROOT / "experiments" / "configs" / "smollm2_135m.json")
    big = rb.load_config(ROOT / "experiments" / "configs" / "llama_skip_causal_3b.json")
    assert smol["model"]["kind"] == "embedded" and smol["predictors"]["kind"] == "trained"
    assert big["density"] == 0.3 and big["model"]["llama_config"]["hidden_size"] == 3072
    full = rb.full_model_bytes(big, torch.float32)
    assert full.n_layers == 28 and full.bound(0.3) == pytest.approx(1.86, abs=0.01)


def test_config_errors_name_the_problem(tmp_path):
    rb = _load_run_benchmark()
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"model": {"kind": "random_llama", "llama_config": {}},
                                "predictors": {"kind": "trained", "rank": 8}}))
    with pytest.raises(ValueError, match="trained predictors need a real model"):
        rb.load_config(path)


def tiny_bench_config(**kw) -> dict:
    """A benchmark config of the tiny random Llama; ``kw`` replaces top-level keys."""
    config = {
        "name": "tiny",
        "model": {"kind": "random_llama", "num_hidden_layers": LAYERS, "seed": 0, "init_scale": 0.2,
                  "llama_config": {"vocab_size": VOCAB, "hidden_size": H, "intermediate_size": N,
                                   "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "max_position_embeddings": 64, "tie_word_embeddings": True,
                                   "pad_token_id": 0, "full_num_hidden_layers": 4}},
        "predictors": {"kind": "random_low_rank", "rank": 8, "seed": 0},
        "density": 0.3, "prompt": {"kind": "random", "tokens": 6, "seed": 0},
        "max_new_tokens": 8, "warmup_runs": 1, "num_runs": 5,
    }
    config.update(kw)
    return config


def test_run_benchmark_main_writes_json_csv_md(tmp_path):
    rb = _load_run_benchmark()
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_bench_config()))
    threads = torch.get_num_threads()
    try:
        result = rb.main(["--device", "cpu", "--config", str(path), "--num_runs", "2",
                          "--max_new_tokens", "4", "--threads", "1", "--out", str(tmp_path / "res")])
    finally:
        torch.set_num_threads(threads)
    latest = json.loads((tmp_path / "res" / "tiny.json").read_text())
    for key in ("config", "versions", "torch_threads", "machine", "model", "predictors", "bytes",
                "bound", "summary", "speedup", "split_ms", "targets", "memory", "runs_csv",
                "shortfall_ms", "huge_page_bytes"):
        assert key in latest, key
    assert latest["config"]["num_runs"] == 2 and latest["config"]["max_new_tokens"] == 4
    assert latest["torch_threads"] == 1 and latest["versions"]["torch"] == torch.__version__
    assert set(latest["summary"]) == {"dense", "sparse_cache", "sparse_direct"}
    assert set(latest["speedup"]) == {"sparse_cache", "sparse_direct"}
    assert latest["bound"]["bound_with_predictor"] < latest["bound"]["bound"]
    assert latest["bound"]["full_model"]["n_layers"] == 4
    for key in ("median", "q1", "q3", "iqr", "min", "max"):
        assert key in latest["summary"]["dense"]["decode_tokens_per_s"]
    assert {"predictor_ms", "cache_ms", "kernel_ms", "rest_ms"} <= set(latest["split_ms"]["sparse_cache"])
    assert len(latest["targets"]) == 6 and all(isinstance(t["met"], bool) for t in latest["targets"])
    runs = pd.read_csv(tmp_path / "res" / latest["runs_csv"])
    assert len(runs) == 3 * (1 + 2) and set(runs["n_new"]) == {4}
    stamped = Path(result["paths"]["json"])
    assert stamped.name.startswith("tiny_") and json.loads(stamped.read_text()) == latest
    md = (tmp_path / "res" / "tiny.md").read_text()
    assert "## Headline" in md and "## Targets" in md and "in 2 MiB pages: " in md


def test_with_int8_mlp_counts_one_byte_per_weight_plus_scales():
    from sparselab.evaluation.byte_bound import DecodeBytes, with_int8_mlp

    b = DecodeBytes(mlp=HAND["mlp"], other=HAND["other"], lm_head=HAND["lm_head"],
                    embedding_row=HAND["row"], n_layers=2)
    # 576 fp32 bytes = 144 weights in rows of 8: per row one byte a weight + a 4-byte scale
    assert with_int8_mlp(b, row_length=8).mlp == 144 + 18 * 4
    assert with_int8_mlp(b, row_length=8, block=4).mlp == 144 + 36 * 4
    assert with_int8_mlp(b, row_length=8).other == HAND["other"]  # only the MLP changes
    # down's output-channel scales: 8 float32 per layer, 2 layers, read whatever the density
    cols = with_int8_mlp(b, row_length=8, down_col_scales=True)
    assert cols.mlp == 144 + 18 * 4 and cols.other == HAND["other"] + 2 * 8 * 4
    with pytest.raises(ValueError, match="divisor of the row length 8"):
        with_int8_mlp(b, row_length=8, block=3)


def test_kernel_bench_bytes_per_weight_count_the_scales():
    from sparselab.evaluation.kernel_bench import bytes_per_weight

    assert bytes_per_weight("float32", 3072) == 4.0 and bytes_per_weight("bfloat16", 3072) == 2.0
    assert bytes_per_weight("int8_b32", 3072) == 1.125  # 32 bytes + a 4-byte scale per 32
    assert bytes_per_weight("int8_b64_x8", 3072) == 1.0625  # x8: the same weights
    assert bytes_per_weight("int8_row", 3072) == pytest.approx(1 + 4 / 3072)
    assert bytes_per_weight("int8_rowcol", 3072) == bytes_per_weight("int8_row", 3072)


def test_kernel_bench_ceiling_counts_every_tokens_bytes_of_weights():
    """bench_ceiling's GB/s is the bytes of the active rows, scales counted, once per token
    of the batch, over the median time (computed here from the row's own fields)."""
    from sparselab.evaluation import kernel_bench as kb

    rows = kb.Rows()
    kb.bench_ceiling(rows, "smollm2-135m", 3, np.random.default_rng(0), density=0.1, batch=4)
    assert [r["dtype"] for r in rows.rows] == list(kb.FORMATS)
    hidden = kb.SHAPES["smollm2-135m"][0]
    for r in rows.rows:
        assert r["section"] == "ceiling" and r["n_active"] > 0 and r["batch"] == 4
        assert r["bytes_per_weight"] == kb.bytes_per_weight(r["dtype"], hidden)
        expect = 3 * r["n_active"] * hidden * r["bytes_per_weight"] * 4 / (r["median_ms"] * 1e6)
        assert r["gb_per_s"] == pytest.approx(expect, rel=1e-3, abs=0.01)


def test_kernel_sweep_cli_writes_both_files_and_restores_torch_threads(tmp_path):
    """run_sweep: the parsed arguments reach ``run`` (defaults and overrides), its frame and
    markdown land in <name>.csv/.md, and torch's thread count is what it was, also when
    ``run`` raises."""
    import torch

    from sparselab.evaluation.kernel_bench import run_sweep

    before = torch.get_num_threads()
    seen = {}

    def run(args):
        seen.update(vars(args), threads_inside=torch.get_num_threads())
        return pd.DataFrame({"reps": [args.reps]}), "# table\n"

    df = run_sweep("sweep", "Doc line.\n\nMore.", run, tmp_path, ["--densities", "0.2"], reps=7)
    assert seen["reps"] == 7 and seen["densities"] == [0.2] and seen["threads"] == [1, 2]
    assert seen["threads_inside"] == 1 and torch.get_num_threads() == before
    assert pd.read_csv(tmp_path / "sweep.csv").equals(df)
    assert (tmp_path / "sweep.md").read_text() == "# table\n"

    def fails(args):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_sweep("sweep", "Doc.", fails, tmp_path, [])
    assert torch.get_num_threads() == before


def _int8_config(**kw):
    return tiny_bench_config(**{"name": "tiny_int8", "max_new_tokens": 4, "warmup_runs": 0,
                                "num_runs": 2, "weights": "int8",
                                "variants": ["dense", "sparse_direct", "dense_float"], **kw})


@pytest.mark.parametrize("change, message", [
    ({"weights": "int4"}, "weights must be one of"),
    ({"weights": "model"}, "variant 'dense_float'"),
    ({"model": {"kind": "random_llama", "dtype": "bfloat16", "llama_config": {}}}, "float32 model"),
])
def test_int8_config_errors_name_the_problem(tmp_path, change, message):
    rb = _load_run_benchmark()
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_int8_config(**change)))
    with pytest.raises(ValueError, match=message):
        rb.load_config(path)


def test_int8_benchmark_runs_a_dense_int8_baseline_beside_the_float_model(tmp_path):
    from sparselab.evaluation.byte_bound import with_int8_mlp

    rb = _load_run_benchmark()
    path = tmp_path / "tiny_int8.json"
    path.write_text(json.dumps(_int8_config()))
    threads = torch.get_num_threads()
    try:
        rb.main(["--config", str(path), "--threads", "1", "--out", str(tmp_path / "res")])
    finally:
        torch.set_num_threads(threads)
    latest = json.loads((tmp_path / "res" / "tiny_int8.json").read_text())
    model = tiny_llama()  # the float model's bytes, then its MLPs as int8 in blocks of 32
    want = with_int8_mlp(sl.bench.decode_bytes(model), row_length=H, block=32)
    assert latest["bytes"]["mlp"] == want.mlp and latest["bytes"]["other"] == want.other
    split = latest["split_ms"]
    # dense is the int8 kernel over every neuron; dense_float the float model in torch
    assert split["dense"]["active_density"] == 1.0 and split["dense"]["kernel_ms"] > 0
    assert split["sparse_direct"]["active_density"] == pytest.approx(0.3, abs=0.02)
    assert split["dense_float"].get("kernel_ms") is None  # no sparse kernel ran (NaN -> null)
    assert {t["variant"] for t in latest["targets"]} == {"sparse_direct"}  # not the reference
    md = (tmp_path / "res" / "tiny_int8.md").read_text()
    assert "dense is the dense int8 MLP" in md and "against the float model (dense_float)" in md


@pytest.mark.parametrize("change, message", [
    ({"variants": ["dense", "dense_kernel"], "weights": "int8"}, "'dense' already runs the kernel"),
    ({"prefill": "dense"}, "prefill .* is a choice of predictors.kind 'method'"),
])
def test_reference_and_prefill_config_errors_name_the_problem(tmp_path, change, message):
    rb = _load_run_benchmark()
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(tiny_bench_config(**change)))
    with pytest.raises(ValueError, match=message):
        rb.load_config(path)


def test_dense_kernel_reference_runs_every_neuron_through_the_kernel(tmp_path):
    rb = _load_run_benchmark()
    path = tmp_path / "tiny_dk.json"
    path.write_text(json.dumps(tiny_bench_config(
        name="tiny_dk", max_new_tokens=4, warmup_runs=0, num_runs=2,
        variants=["dense", "sparse_direct", "dense_kernel"])))
    threads = torch.get_num_threads()
    try:
        rb.main(["--config", str(path), "--threads", "1", "--out", str(tmp_path / "res")])
    finally:
        torch.set_num_threads(threads)
    latest = json.loads((tmp_path / "res" / "tiny_dk.json").read_text())
    split = latest["split_ms"]
    assert split["dense_kernel"]["active_density"] == 1.0 and split["dense_kernel"]["kernel_ms"] > 0
    assert split["dense"].get("kernel_ms") is None  # the model as it is
    assert {t["variant"] for t in latest["targets"]} == {"sparse_direct"}  # not the reference
    md = (tmp_path / "res" / "tiny_dk.md").read_text()
    section = md.split("## Against the dense MLP through the same kernel (dense_kernel)")[1]
    assert "sparse_direct" in section and "| sparse_direct | kernel |" in section
    assert "| dense | " not in section  # only sparse variants in its gap table


def test_bench_targets_counts_a_cell_met_by_the_median_of_its_rounds():
    """experiments/bench_targets.py: per round the ratio of two formats' medians in the same
    loop, the median over rounds against the target (by hand on made-up timings)."""
    spec = importlib.util.spec_from_file_location("bench_targets",
                                                  ROOT / "experiments" / "bench_targets.py")
    bt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bt)
    ms = {  # (round, kernel, dtype) -> median ms; one thread count, one density
        (0, "cache_kernel", "float32"): 6.0, (0, "cache_kernel", "bfloat16"): 3.0,
        (0, "cache_kernel", "int8_rowcol"): 1.5,
        (1, "cache_kernel", "float32"): 6.0, (1, "cache_kernel", "bfloat16"): 4.0,
        (1, "cache_kernel", "int8_rowcol"): 2.5,
        (2, "cache_kernel", "float32"): 6.0, (2, "cache_kernel", "bfloat16"): 3.2,
        (2, "cache_kernel", "int8_rowcol"): 2.1,
    }
    ms.update({(r, "index_kernel", f): v * 2 for (r, _, f), v in ms.items()})
    df = pd.DataFrame([{"round": r, "threads": 1, "density": 0.3, "method": k, "dtype": f,
                        "median_ms": v} for (r, k, f), v in ms.items()])
    t = bt.target_table(df, ["int8_rowcol"]).set_index(["target", "kernel"])
    bf = t.loc[("bfloat16 >= 1.8x float32", "cache_kernel")]
    assert bf["rounds"] == "2.00 / 1.50 / 1.88" and bf["median"] == 1.875 and bf["lowest"] == 1.5
    assert bool(bf["met"])  # median 1.875 >= 1.8 although one round is 1.5
    i8 = t.loc[("int8_rowcol >= 3x float32", "index_kernel")]  # 4.0, 2.4, 2.857...
    assert i8["median"] == pytest.approx(2.857, abs=1e-3) and not bool(i8["met"])
    vs = t.loc[("int8_rowcol >= 1.6x bfloat16", "cache_kernel")]  # 2.0, 1.6, 1.524
    assert vs["median"] == 1.6 and bool(vs["met"])
    assert len(t) == 3 * 2


def test_knob_sweep_sets_the_knob_before_every_call_and_restores_its_default():
    """kernel_bench.knob_sweep (bench_prefetch.py): a row per (format, kernel, value), the
    kernels run with the knob at each value (the real prefetch knob here: off and the
    default), and the default is set last, also when a call fails."""
    from sparselab._fast import _mlp
    from sparselab.evaluation import kernel_bench as kb

    seen = []

    def knob(v):
        seen.append(v)
        _mlp._set_prefetch(v)

    rows = kb.knob_sweep("smollm2-135m", [0.3], [1], 2, ("float32", "int8_rowcol"), knob,
                         (0, -1), -1, "ahead")
    assert {(r["format"], r["kernel"], r["ahead"]) for r in rows} == {
        (f, k, a) for f in ("float32", "int8_rowcol") for k in ("cache_kernel", "index_kernel")
        for a in (0, -1)}
    assert all(r["median_ms"] > 0 and r["reps"] == 2 for r in rows)
    assert seen[-1] == -1 and set(seen[:-1]) == {0, -1}
    # (2 warm-ups + 2 reps) calls per (format, kernel, value), each setting its value first
    assert len(seen) - 1 == 2 * 2 * 2 * (2 + 2)
    seen.clear()

    def bad(v):
        seen.append(v)
        if v == 7:
            raise RuntimeError("knob refused")

    with pytest.raises(RuntimeError, match="knob refused"):
        kb.knob_sweep("smollm2-135m", [0.3], [1], 1, ("float32",), bad, (7,), 0, "v")
    assert seen[-1] == 0  # the default, set in spite of the error


def test_interleaved_shuffle_times_every_call_once_per_rep_in_varying_order():
    """interleaved(shuffle_seed=...): every callable runs warmup + reps times, and the order
    changes from rep to rep (so no callable always follows the same one)."""
    from sparselab.evaluation.kernel_bench import interleaved

    log = []
    fns = {n: (lambda n=n: log.append(n)) for n in "abcd"}
    out = interleaved(fns, 20, warmup=1, shuffle_seed=0)
    assert {n: len(v) for n, v in out.items()} == dict.fromkeys("abcd", 20)
    reps = [tuple(log[4 + 4 * r: 8 + 4 * r]) for r in range(20)]
    assert all(sorted(r) == list("abcd") for r in reps)
    # which callable runs right before "b": with rotation it is "a" in 3 reps of 4
    before_b = {r[r.index("b") - 1] for r in reps if r.index("b") > 0}
    assert len(before_b) == 3


def test_bench_loops_speedup_is_the_alternatives_median_over_each_rows():
    """experiments/bench_loops.py on made-up timings: the alternative loop (on == 0) is the
    reference of each (threads, density, kernel) cell; every knob names a real setter."""
    spec = importlib.util.spec_from_file_location("bench_loops",
                                                  ROOT / "experiments" / "bench_loops.py")
    bl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bl)
    df = pd.DataFrame([
        {"threads": 1, "density": 0.3, "kernel": "index_kernel", "on": 0, "median_ms": 3.0},
        {"threads": 1, "density": 0.3, "kernel": "index_kernel", "on": 1, "median_ms": 2.5},
        {"threads": 1, "density": 0.3, "kernel": "cache_kernel", "on": 0, "median_ms": 2.0},
        {"threads": 1, "density": 0.3, "kernel": "cache_kernel", "on": 1, "median_ms": 2.5},
    ])
    s = bl.speedups(df).set_index(["kernel", "on"]).speedup_vs_off
    assert s[("index_kernel", 1)] == 1.2 and s[("index_kernel", 0)] == 1.0
    assert s[("cache_kernel", 1)] == 0.8
    from sparselab._fast import isa
    for setter, fmt, path, _, _ in bl.KNOBS.values():
        assert callable(setter) and fmt in ("float32", "bfloat16") and path in isa.ISA_NAMES
