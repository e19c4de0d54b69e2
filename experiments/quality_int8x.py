"""What rounding x to int8 costs on top of int8 weights: the embedded model, dense, held out.

    python experiments/quality_int8x.py           # ~3 min on 2 cores

The int8-x kernels (``IndexedMLP(..., x_int8=True)``) compute gate and up over x rounded
to int8 per group of 64 channels, exactly the float model over the dequantized x
(tests/test_fast_int8x.py). So the quality of that format is the model whose MLP weights
are the dequantized int8 weights and whose MLP input is ``round_x_int8``'s dequantized x;
this script builds that model with weight copies and a forward pre-hook on every MLP (no
kernel involved), and scores it against fp32 dense on the corpus tail (the texts
quality_int8.py uses): perplexity and mean KL(fp32 dense || variant) per token.
Writes experiments/results/quality_int8x.{csv,md}.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import torch

import sparselab as sl
from sparselab._fast.quant import INT8_FORMATS, round_x_int8
from sparselab._version import versions
from sparselab.models import adapter_for
from sparselab.runtime.sparsify import put_back, quantize_layer_in_place

RESULTS = Path(__file__).resolve().parent / "results"
GROUP = 64


def rounded_x(x: torch.Tensor) -> torch.Tensor:
    """x as the int8-x kernels see it (per token, groups of 64 channels)."""
    xq, sx = round_x_int8(x, GROUP)
    return (xq.float() * sx.repeat_interleave(GROUP, -1)[..., : x.shape[-1]]).to(x.dtype)


def token_log_probs(model, ids_list) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
                for ids in ids_list]


def score(ref, lps, ids_list) -> tuple[float, float]:
    nll, kl, n = 0.0, 0.0, 0
    for r, lp, ids in zip(ref, lps, ids_list, strict=True):
        tgt = ids[0, 1:]
        nll -= lp.gather(1, tgt[:, None]).sum().item()
        kl += (r.exp() * (r - lp)).sum().item()
        n += tgt.numel()
    return float(torch.exp(torch.tensor(nll / n))), kl / n


def main():
    t0 = time.perf_counter()
    model, tok = sl.load_model()
    texts = sl.load_corpus()[-8:]  # the corpus tail, as quality_int8.py
    ids_list = [tok(t, return_tensors="pt", truncation=True, max_length=256).input_ids
                for t in texts]
    ids_list = [i for i in ids_list if i.shape[1] >= 2]
    ref = token_log_probs(model, ids_list)
    rows = [{"variant": "fp32 dense", "weights": "fp32", "x": "fp32"}]
    rows[0]["perplexity"], rows[0]["kl"] = score(ref, ref, ids_list)
    for fmt, wname in (("int8", "int8 blocks of 32"), ("int8_b64", "int8 blocks of 64"),
                       ("int8_rows", "int8 per row"),
                       ("int8_rowcol", "int8 per row, down also per output channel")):
        saved: list = []  # the same int8 weights as sl.sparsify(weights=fmt) runs
        for spec in adapter_for(model).layers:
            quantize_layer_in_place(spec, saved, **INT8_FORMATS[fmt])
        try:
            for x8 in (False, True):
                hooks = [layer.mlp.register_forward_pre_hook(
                    lambda m, args: (rounded_x(args[0]),) + tuple(args[1:]))
                    for layer in model.model.layers] if x8 else []
                try:
                    ppl, kl = score(ref, token_log_probs(model, ids_list), ids_list)
                finally:
                    for h in hooks:
                        h.remove()
                rows.append({"variant": f"{wname}, x {'int8 per 64' if x8 else 'fp32'}",
                             "weights": wname, "x": "int8 per 64" if x8 else "fp32",
                             "perplexity": ppl, "kl": kl})
        finally:
            put_back(saved)
    df = pd.DataFrame(rows)
    base = df["perplexity"].iloc[0]
    df["ppl_vs_fp32_dense_pct"] = (100 * (df["perplexity"] / base - 1)).round(3)
    RESULTS.mkdir(exist_ok=True)
    df.to_csv(RESULTS / "quality_int8x.csv", index=False)
    n_tok = sum(i.shape[1] - 1 for i in ids_list)
    lines = ["# int8 weights with x rounded to int8: quality on the embedded model", "",
             f"- texts: {len(ids_list)} held-out corpus passages (the corpus tail), {n_tok} "
             "scored tokens, teacher-forced; KL(fp32 dense || variant) per token",
             f"- versions: {json.dumps(versions(), default=str)}",
             "- command: `python experiments/quality_int8x.py`",
             f"- wall time: {time.perf_counter() - t0:.0f} s", "",
             "| weights | MLP input x (gate, up) | perplexity | vs fp32 dense | KL |",
             "|---|---|---|---|---|"]
    for r in df.itertuples():
        lines.append(f"| {r.weights} | {r.x} | {r.perplexity:.3f} | "
                     f"{r.ppl_vs_fp32_dense_pct:+.2f} % | {r.kl:.4f} |")
    (RESULTS / "quality_int8x.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
