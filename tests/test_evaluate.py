"""sl.evaluate: perplexity, KL and greedy agreement against independent recomputations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sparselab as sl
from sparselab.testing.tiny import tiny_llama

H, N, LAYERS = 64, 160, 2
TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "def add(a, b):\n    return a + b  # adds two numbers together",
    "Return the number of items in a container; raises TypeError otherwise.",
]


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(vocab_size=len(tokenizer), hidden_size=H, intermediate_size=N,
                      num_layers=LAYERS, tie_word_embeddings=True,
                      initializer_range=0.15)  # large enough that the MLPs move the logits


class StandInPredictors:
    """Scores x @ A, top-``density`` per token; ``with_policy`` re-thresholds."""

    def __init__(self, density=0.5, seed=3):
        g = torch.Generator().manual_seed(seed)
        self.A = {i: torch.randn(H, N, generator=g) for i in range(LAYERS)}
        self.layers, self.lookahead, self.density, self.bytes = tuple(range(LAYERS)), False, density, 0

    def with_policy(self, target_density):
        out = StandInPredictors.__new__(StandInPredictors)
        out.__dict__.update(self.__dict__, density=target_density)
        return out

    def mask(self, layer, x):
        return sl.rules.TopK(self.density).mask(x.float() @ self.A[layer], layer)

    # the rest of the MaskPredictor protocol
    hidden_size, n_neurons, dtype = H, N, torch.float32

    def low_rank_form(self, layer):
        return None

    def at_density(self, density):
        return self.with_policy(target_density=density)

    def describe(self):
        return {"kind": "stand-in", "density": self.density}


def masked_model(model, mask_fn, decode_only=False):
    """Pre-hooks on down_proj multiplying h by mask_fn(layer, h, x): an independent sparse model."""
    hooks = []
    for i, layer in enumerate(model.model.layers):
        store = {}
        hooks.append(layer.mlp.register_forward_pre_hook(lambda m, a, s=store: s.update(x=a[0])))

        def hook(m, a, i=i, s=store):
            h = a[0]
            if decode_only and h.shape[1] != 1:
                return None
            return (h * mask_fn(i, h, s["x"]),)

        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(hook))
    return hooks


def reference_ppl_kl(model, tokenizer, texts, mask_fn, max_length=64):
    nll_d = nll_s = kl = 0.0
    n = 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length).input_ids
            tgt = ids[0, 1:]
            lp_d = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            hooks = masked_model(model, mask_fn)
            try:
                lp_s = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            finally:
                for h in hooks:
                    h.remove()
            nll_d -= float(lp_d[torch.arange(len(tgt)), tgt].sum())
            nll_s -= float(lp_s[torch.arange(len(tgt)), tgt].sum())
            kl += float((lp_d.exp() * (lp_d - lp_s)).sum())
            n += len(tgt)
    return math.exp(nll_d / n), math.exp(nll_s / n), kl / n


def test_oracle_density_one_equals_dense(model, tokenizer):
    df = sl.evaluate(model, tokenizer, TEXTS, densities=(1.0,), modes=("dense", "oracle"),
                     max_length=32, n_generate=4, n_prompts=2, progress=False)
    dense, oracle = df.set_index("mode").loc["dense"], df.set_index("mode").loc["oracle"]
    assert oracle.perplexity == dense.perplexity
    assert abs(oracle.kl) < 1e-7
    assert oracle.greedy_agreement == 1.0
    assert dense.n_tokens == oracle.n_tokens > 0


def test_oracle_perplexity_and_kl_match_an_independent_masked_model(model, tokenizer):
    df = sl.evaluate(model, tokenizer, TEXTS, densities=(0.3,), modes=("dense", "oracle"),
                     max_length=64, n_generate=0, progress=False)
    topk = sl.rules.TopK(0.3)
    ppl_d, ppl_s, kl = reference_ppl_kl(model, tokenizer, TEXTS, lambda i, h, x: topk.mask(h, i))
    rows = df.set_index("mode")
    assert rows.loc["dense", "perplexity"] == pytest.approx(ppl_d, rel=1e-5)
    assert rows.loc["oracle", "perplexity"] == pytest.approx(ppl_s, rel=1e-4)
    assert rows.loc["oracle", "kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
    assert kl > 1e-4  # sparsity made a difference


def test_predicted_and_static_modes_match_independent_references(model, tokenizer):
    pred = StandInPredictors()
    trace = sl.record(model, tokenizer, TEXTS, max_length=32, progress=False)
    df = sl.evaluate(model, tokenizer, TEXTS[:2], predictors=pred, static_trace=trace,
                     densities=(0.25,), modes=("dense", "static", "predicted"), max_length=48,
                     n_generate=0, progress=False)
    rows = df.set_index("mode")
    p25 = pred.with_policy(0.25)
    _, ppl_p, kl_p = reference_ppl_kl(model, tokenizer, TEXTS[:2],
                                      lambda i, h, x: p25.mask(i, x.reshape(-1, H)).reshape(h.shape),
                                      max_length=48)
    sets = sl.prediction.static_from_trace(trace, sl.rules.TopK(0.25), 0.25)
    assert len(sets[0]) == 40

    def static_mask(i, h, x):
        m = torch.zeros(N, dtype=torch.bool)
        m[sets[i]] = True
        return m

    _, ppl_s, kl_s = reference_ppl_kl(model, tokenizer, TEXTS[:2], static_mask, max_length=48)
    assert rows.loc["predicted", "perplexity"] == pytest.approx(ppl_p, rel=1e-4)
    assert rows.loc["predicted", "kl"] == pytest.approx(kl_p, rel=1e-3, abs=1e-6)
    assert rows.loc["static", "perplexity"] == pytest.approx(ppl_s, rel=1e-4)
    assert rows.loc["static", "kl"] == pytest.approx(kl_s, rel=1e-3, abs=1e-6)


def test_greedy_agreement_matches_independent_generation(model, tokenizer):
    n_gen, prompts = 6, TEXTS[:2]
    df = sl.evaluate(model, tokenizer, prompts, densities=(0.2,), modes=("dense", "oracle"),
                     max_length=16, n_generate=n_gen, n_prompts=2, prompt_length=8, progress=False)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=8)
    tokenizer.padding_side = side
    kw = dict(do_sample=False, max_new_tokens=n_gen, min_new_tokens=n_gen,
              pad_token_id=tokenizer.pad_token_id)
    topk = sl.rules.TopK(0.2)
    with torch.no_grad():
        dense = model.generate(**batch, **kw)[:, batch.input_ids.shape[1]:]
        hooks = masked_model(model, lambda i, h, x: topk.mask(h, i), decode_only=True)
        try:
            sparse = model.generate(**batch, **kw)[:, batch.input_ids.shape[1]:]
        finally:
            for h in hooks:
                h.remove()
    expected = float((dense == sparse).double().mean())
    rows = df.set_index("mode")
    assert rows.loc["oracle", "greedy_agreement"] == pytest.approx(expected)
    assert rows.loc["oracle", "n_generated"] == 2 * n_gen


def test_tidy_frame_with_config_and_versions(model, tokenizer):
    with pytest.warns(UserWarning, match="skipped"):
        df = sl.evaluate(model, tokenizer, TEXTS[:1], densities=(0.5, 0.9), max_length=16,
                         n_generate=2, n_prompts=1, progress=False)
    assert list(df.columns) == ["mode", "density", "perplexity", "kl", "greedy_agreement",
                                "n_tokens", "n_generated"]
    assert list(zip(df["mode"], df["density"], strict=True)) == [("dense", 1.0), ("oracle", 0.5), ("oracle", 0.9)]
    assert set(df.attrs["config"]["skipped"]) == {"static", "predicted"}
    assert df.attrs["versions"]["torch"] == torch.__version__
    assert df.attrs["model"]["intermediate_size"] == N
    assert np.isfinite(df.perplexity).all()
    assert not sl.runtime.is_sparsified(model)


@pytest.mark.parametrize("kwargs,message", [
    ({"modes": ("dense", "magic")}, "unknown modes"),
    ({"densities": (0.0,)}, "densities"),
    ({"densities": (1.2,)}, "densities"),
    ({"max_length": 1}, "max_length"),
])
def test_bad_arguments(model, tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sl.evaluate(model, tokenizer, TEXTS, progress=False, **kwargs)


def test_texts_must_be_a_list(model, tokenizer):
    with pytest.raises(ValueError, match="list of strings"):
        sl.evaluate(model, tokenizer, "one string", progress=False)


@pytest.mark.slow
def test_real_model_oracle_half_density_stays_close_to_dense(real_model):
    model, tokenizer = real_model
    _, test = sl.corpus.split(sl.load_corpus())
    df = sl.evaluate(model, tokenizer, test[:4], densities=(0.5,), modes=("dense", "oracle"),
                     max_length=256, n_generate=0, progress=False)
    rows = df.set_index("mode")
    dense, oracle = rows.loc["dense", "perplexity"], rows.loc["oracle", "perplexity"]
    # anchors.md measured +3 % at keep 50 % on ~4.9k tokens; 4 passages are noisier (on
    # some, dropping half the neurons even lowers perplexity), so only the +10 % bound holds
    assert oracle <= 1.10 * dense
    assert oracle != dense
    assert 0 < rows.loc["oracle", "kl"] < 0.5
