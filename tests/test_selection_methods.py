"""Selection methods: bytes against hand counts, density 1 against dense, the quantizer
against a float64 reference, sparsify with a method restores the model, the frontier."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparselab.prediction import methods as M
from sparselab.prediction.quantize import dequantize_groups, quantize_groups, quantized_bytes
from sparselab.prediction.selection import (
    MLPWeights,
    Selection,
    dense_mlp_bytes,
    run_selection,
    selection_bytes,
)

# ---- no model -------------------------------------------------------------------------


def _reference_quantize(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """float64 group-wise symmetric quantize-dequantize, written out loop by loop."""
    top = 2 ** (bits - 1) - 1
    out = np.empty_like(w, dtype=np.float64)
    for r in range(w.shape[0]):
        for g0 in range(0, w.shape[1], group):
            block = w[r, g0:g0 + group].astype(np.float64)
            scale = float(np.float16(np.abs(block).max() / top))  # stored as fp16
            if scale == 0:
                out[r, g0:g0 + group] = 0.0
                continue
            q = np.clip(np.round(block / scale), -top - 1, top)
            out[r, g0:g0 + group] = q * scale
    return out


@pytest.mark.parametrize("bits,group", [(4, 64), (3, 16), (8, 32)])
def test_quantizer_matches_float64_reference(bits, group):
    g = torch.Generator().manual_seed(bits * 100 + group)
    w = torch.randn(12, 128, generator=g) * torch.rand(12, 1, generator=g)
    w[3, :group] = 0.0  # an all-zero group
    codes, scale = quantize_groups(w, bits, group)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float16
    assert int(codes.max()) <= 2 ** (bits - 1) - 1 and int(codes.min()) >= -(2 ** (bits - 1))
    got = dequantize_groups(codes, scale, group).double().numpy()
    ref = _reference_quantize(w.numpy(), bits, group)
    # ties of round() at float32 vs float64 can differ by one step on rare values
    step = np.repeat(scale.double().numpy(), group, axis=1)
    assert np.mean(np.abs(got - ref) <= 1e-6 * (1 + np.abs(ref))) > 0.999
    assert np.all(np.abs(got - ref) <= step + 1e-6)
    # error of a b-bit grid: at most half a step (plus fp16 rounding of the scale)
    assert np.all(np.abs(got - w.numpy()) <= 0.5 * step * 1.01 + 1e-6)
    assert quantized_bytes((12, 128), bits, group) == (12 * 128 * bits + 7) // 8 + 2 * 12 * (128 // group)


def test_quantizer_rejects_bad_group():
    with pytest.raises(ValueError, match="group"):
        quantize_groups(torch.zeros(2, 10), 4, 64)


def _toy_weights(n=6, h=4, seed=0) -> MLPWeights:
    g = torch.Generator().manual_seed(seed)
    return MLPWeights(0, torch.randn(n, h, generator=g), torch.randn(n, h, generator=g),
                      torch.randn(h, n, generator=g), F.silu)


def test_selection_bytes_hand_count_and_compute():
    w = _toy_weights()
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    gate = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0]], dtype=torch.bool)
    up = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0]], dtype=torch.bool)
    down = torch.tensor([[1, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    inputs = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    sel = Selection(gate_rows=gate, up_rows=up, down_rows=down, inputs=inputs, extra_bytes=10)
    # token 0: 3 cols x (6 gate + 2 up rows) + 1 neuron (0) reaching down x 4 hidden
    # token 1: 4 cols x (3 + 2) + 2 neurons (0, 2) x 4
    expected = torch.tensor([4 * (3 * 8 + 1 * 4) + 10, 4 * (4 * 5 + 2 * 4) + 10], dtype=torch.float64)
    assert torch.equal(selection_bytes(sel, w, 2), expected)
    assert dense_mlp_bytes(w) == 3 * 6 * 4 * 4
    assert float(selection_bytes(Selection(), w, 1)[0]) == dense_mlp_bytes(w)
    # the computed output, against a loop over the neurons that were read
    y = run_selection(x, w, sel)
    for t in range(2):
        ref = torch.zeros(4, dtype=torch.float64)
        xt = (x[t] * inputs[t]).double()
        for i in range(6):
            if gate[t, i] and up[t, i] and down[t, i]:
                hi = F.silu(w.gate[i].double() @ xt) * (w.up[i].double() @ xt)
                ref += hi * w.down[:, i].double()
        assert torch.allclose(y[t].double(), ref, atol=1e-5)


# ---- the real model ---------------------------------------------------------------------


def _layer_mlp_weights(model, layer):
    return M._layer_weights(model)[layer]


@pytest.mark.slow
def test_each_method_bytes_against_hand_count(real_model, small_trace):
    model, _ = real_model
    layer = 2
    w = _layer_mlp_weights(model, layer)
    n, h, size = w.n_neurons, w.hidden_size, 4
    x = small_trace.mlp_inputs(layer)[:5].float()
    k = round(0.5 * n)

    def share(method):
        sel = method.select(x, w)
        return selection_bytes(sel, w, x.shape[0]), sel

    got, _ = share(M.Oracle(0.5))
    assert torch.all(got == 3 * k * h * size)
    shadow = M.Shadow(0.5).fit(model)
    got, _ = share(shadow)
    q = (n * h * 4) // 8 + 2 * n * (h // 64)  # 4-bit codes + fp16 scale per 64
    assert torch.all(got == 3 * k * h * size + 2 * q)
    teal = M.TEAL(0.7, 0.5).fit(model, small_trace)
    got, sel = share(teal)
    cols = sel.inputs.sum(1).double()
    assert torch.equal(got, size * (cols * 2 * n + k * h))
    wina = M.WINA(0.7, 0.5).fit(model, small_trace)
    got, sel = share(wina)
    assert torch.equal(got, size * (sel.inputs.sum(1).double() * 2 * n + k * h))
    cats = M.CATS(0.5).fit(model, small_trace)
    got, sel = share(cats)
    active = (w.act(x @ w.gate.T).abs() > cats._thresholds[layer]).sum(1).double()
    assert torch.equal(got, size * (n * h + 2 * active * h))
    # training-text thresholds keep about the asked share on the training text itself
    xs = small_trace.mlp_inputs(layer).float()
    assert abs(float(teal.select(xs, w).inputs.float().mean()) - 0.7) < 0.01
    cal = M.Shadow(0.5, calibrated=True).fit(model, small_trace)
    sel = cal.select(xs, w)
    assert abs(float(sel.gate_rows.float().mean()) - 0.5) < 0.01
    assert sel.gate_rows.sum(1).unique().numel() > 1  # a per-token count that varies
    rows = sel.gate_rows.sum(1).double()
    assert torch.equal(selection_bytes(sel, w, len(xs)), size * 3 * rows * h + 2 * q)


@pytest.mark.slow
def test_predicted_and_two_stage_bytes(real_model, small_trace):
    import sparselab as sl

    model, _ = real_model
    layer = 1
    trained = sl.train_predictors(small_trace, rank=8, layers=[layer], epochs=1, progress=False)
    w = _layer_mlp_weights(model, layer)
    x = small_trace.mlp_inputs(layer)[:4].float()
    p_bytes = sum(t.numel() * t.element_size() for t in trained.layer_weights(layer))
    sel = M.Predicted(trained, 0.5).select(x, w)
    rows = sel.gate_rows.sum(1).double()
    assert torch.equal(selection_bytes(sel, w, 4), 4 * 3 * rows * w.hidden_size + p_bytes)
    two = M.TwoStage(trained, superset=0.7, keep=0.4).select(x, w)
    assert bool((two.down_rows <= two.gate_rows).all())
    assert torch.equal(two.down_rows.sum(1), torch.full((4,), round(0.4 * w.n_neurons)))
    expected = 4 * (2 * two.gate_rows.sum(1).double() * w.hidden_size
                    + round(0.4 * w.n_neurons) * w.hidden_size) + p_bytes
    assert torch.equal(selection_bytes(two, w, 4), expected)


@pytest.mark.slow
def test_methods_at_density_one_equal_dense_and_restore(real_model, small_trace):
    import sparselab as sl

    model, tokenizer = real_model
    ids = tokenizer(sl.load_corpus(n=1)[0], return_tensors="pt").input_ids[:, :24]
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        for method in (M.Oracle(1.0), M.Shadow(1.0).fit(model), M.TEAL(1.0, 1.0).fit(model, small_trace),
                       M.WINA(1.0, 1.0).fit(model, small_trace), M.CATS(1.0).fit(model, small_trace),
                       M.Shadow(1.0, calibrated=True).fit(model, small_trace),
                       M.TEAL(1.0, 1.0, calibrated=True).fit(model, small_trace)):
            with sl.sparsify(model, method=method) as handle:
                out = model(input_ids=ids).logits
                assert sl.runtime.is_sparsified(model)
            assert torch.allclose(out, dense, atol=1e-4), method
            extra = 0.0885 if method.name.startswith("shadow") else 0.0
            assert handle.bytes_share() == pytest.approx(1.0 + extra, abs=5e-4), method
            assert not sl.runtime.is_sparsified(model)
        # a sparse method changes the output, and restore gives the dense model back bit for bit
        with sl.sparsify(model, M.Oracle(0.3)) as handle:
            sparse = model(input_ids=ids).logits
        assert handle.bytes_share() == pytest.approx(round(0.3 * 1536) / 1536)
        assert not torch.allclose(sparse, dense, atol=1e-3)
        assert torch.equal(model(input_ids=ids).logits, dense)
    with pytest.raises(ValueError, match="not fitted"):
        sl.sparsify(model, method=M.TEAL(0.5, 0.5))
    with pytest.raises(ValueError, match='mode="method"'):
        sl.sparsify(model, mode="oracle", density=0.5, method=M.Oracle(0.5))
    assert not sl.runtime.is_sparsified(model)


@pytest.mark.slow
def test_frontier_rows_and_oracle_order(real_model, small_trace):
    import sparselab as sl

    model, tokenizer = real_model
    held_out = sl.load_corpus(n=12)[10:12]
    df = sl.frontier(model, tokenizer, [M.Oracle(0.3), M.Oracle(0.7), M.CATS(0.5)], held_out,
                     train_trace=small_trace, max_length=48, progress=False)
    assert list(df.method) == ["dense", "oracle", "oracle", "cats"]
    assert df.bytes_share.tolist()[:3] == pytest.approx([1.0, round(0.3 * 1536) / 1536, round(0.7 * 1536) / 1536])
    oracle = df[df.method == "oracle"].set_index("point")
    assert oracle.loc["0.3", "perplexity"] > oracle.loc["0.7", "perplexity"]
    assert (df.kl[1:] > 0).all()
    # greedy agreement: dense 1, the denser oracle at least as often on dense's top token
    assert df.greedy_agreement[0] == 1.0 and df.greedy_agreement.between(0, 1).all()
    assert oracle.loc["0.7", "greedy_agreement"] >= oracle.loc["0.3", "greedy_agreement"]
    assert df.fit_seconds.iloc[3] > 0 and df.attrs["versions"]
    # the evaluate path runs the same method
    ev = sl.evaluate(model, tokenizer, held_out, modes=("dense",), max_length=48, n_generate=0,
                     progress=False, extra_modes={"o": lambda d: {"mode": "method", "method": M.Oracle(d)}},
                     densities=(0.3,))
    assert ev.set_index("mode").loc["o", "perplexity"] == pytest.approx(oracle.loc["0.3", "perplexity"], rel=1e-4)
    ev = sl.evaluate(model, tokenizer, held_out, modes=(), max_length=48, n_generate=4, n_prompts=1,
                     progress=False, methods=[M.Oracle(0.7)])
    assert ev["mode"].tolist() == ["oracle 0.7"]
    assert ev.perplexity[0] == pytest.approx(oracle.loc["0.7", "perplexity"], rel=1e-4)
    assert 0 <= ev.greedy_agreement[0] <= 1


def _frontier_frame():
    import pandas as pd

    rows = [("m", "dense", "1", True, 1.0, 10.0, 0.0, 0.0)]
    rows += [("m", "oracle", p, False, b, 10 * (1 + q), q, q / 2) for p, b, q in
             (("0.4", 0.4, 0.06), ("0.5", 0.5, 0.015), ("0.6", 0.6, 0.001))]
    rows += [("m", "teal", p, True, b, 10 * (1 + q), q, q / 2) for p, b, q in
             (("x0.7/h0.5", 0.63, 0.05), ("x0.8/h0.5", 0.70, 0.021))]
    cols = ["model", "method", "point", "realizable", "bytes_share", "perplexity", "ppl_vs_dense", "kl"]
    return pd.DataFrame(rows, columns=cols)


def test_smallest_bytes_and_frontier_figure():
    from sparselab.evaluation.frontier import smallest_bytes
    from sparselab.viz.frontier import frontier_figure

    df = _frontier_frame()
    best = smallest_bytes(df, 0.05).set_index("method")
    assert best.loc["oracle", "bytes_share"] == 0.5 and best.loc["teal", "bytes_share"] == 0.63
    best = smallest_bytes(df, 0.02).set_index("method")
    assert best.loc["oracle", "point"] == "0.5" and np.isnan(best.loc["teal", "bytes_share"])
    fig = frontier_figure(df)
    names = [t.name for t in fig.data]
    assert names == ["oracle", "teal"]  # dense left out, one line per method
    assert list(fig.data[0].x) == [0.4, 0.5, 0.6] and fig.data[0].line.dash == "dash"
    assert list(fig.data[1].y) == pytest.approx([5.0, 2.1])  # percent
    with pytest.raises(ValueError, match="metric"):
        frontier_figure(df, metric="speed")
    with pytest.raises(ValueError, match="no method rows"):
        frontier_figure(df[df.method == "dense"])


def test_fit_needs_the_recorded_arrays():
    class NoInputs:
        arrays = {"h": None}
        layers = (0,)

    with pytest.raises(ValueError, match="mlp_in"):
        M.TEAL(0.5, 0.5).fit(None, NoInputs())
    with pytest.raises(ValueError, match="gate"):
        M.CATS(0.5).fit(None, NoInputs())
