"""Where int8 per-row scales lose quality, and which column scales win it back: the
embedded model, dense, held out.

    python experiments/quality_int8_scales.py     # ~1.5 min on 2 cores
    python experiments/quality_int8_scales.py --model gemma3-270m   # the second embedded model

Each variant quantizes every layer's gate, up and down_t with ``quantize_int8`` (per-row
scales, optionally ``col_scales=True`` on some of the three) and copies the dequantized
weights into the model (no kernel involved; the kernels compute exactly these weights,
tests/test_fast_int8.py). Scored against fp32 dense on the corpus tail (quality_int8x.py's
texts and scoring): perplexity and mean KL(fp32 dense || variant) per token. The kernels
take column scales on down_t only (``sl.sparsify(weights="int8_rowcol")``): on gate and up
they would have to scale x per matrix; this measures whether that would pay.
Writes experiments/results/quality_int8_scales.{csv,md} (``--model``: an embedded model's
name, then quality_int8_scales_<name>.{csv,md}).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch
from quality_int8x import score, token_log_probs

import sparselab as sl
from sparselab._fast.quant import quantize_int8
from sparselab._version import versions
from sparselab.models import adapter_for
from sparselab.runtime.sparsify import put_back

RESULTS = Path(__file__).resolve().parent / "results"
# variant -> (gate, up, down_t) each: None (per row) or "cols" (per row and per column);
# blocks of 64 as the per-block reference
VARIANTS = {
    "per row": (None, None, None),
    "per row, down_t also per column (int8_rowcol)": (None, None, "cols"),
    "per row, gate and up also per column": ("cols", "cols", None),
    "per row, all three also per column": ("cols", "cols", "cols"),
    "blocks of 64 (int8_b64)": (64, 64, 64),
}


def quantized(w: torch.Tensor, how) -> torch.Tensor:
    if how == "cols":
        return quantize_int8(w, col_scales=True).dequantize()
    return quantize_int8(w, how).dequantize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="an embedded model (default: SmolLM2-135M)")
    args = ap.parse_args(argv)
    stem = "quality_int8_scales" + (f"_{args.model}" if args.model else "")
    t0 = time.perf_counter()
    model, tok = sl.load_model(args.model)
    texts = sl.load_corpus()[-8:]
    ids_list = [tok(t, return_tensors="pt", truncation=True, max_length=256).input_ids
                for t in texts]
    ids_list = [i for i in ids_list if i.shape[1] >= 2]
    ref = token_log_probs(model, ids_list)
    base, _ = score(ref, ref, ids_list)
    rows = []
    for name, hows in VARIANTS.items():
        saved: list = []
        with torch.no_grad():
            for spec in adapter_for(model).layers:
                gate_w, up_w = spec.gate_up_weights()
                down = spec.down_proj.weight
                for t, how, transposed in ((gate_w, hows[0], False), (up_w, hows[1], False),
                                           (down, hows[2], True)):
                    w = (t.t() if transposed else t).detach().float().contiguous()
                    deq = quantized(w, how)
                    saved.append((t, t.detach().clone()))
                    t.copy_(deq.t() if transposed else deq)
        try:
            ppl, kl = score(ref, token_log_probs(model, ids_list), ids_list)
        finally:
            put_back(saved)
        rows.append({"scales": name, "perplexity": ppl, "ppl_vs_fp32_dense_pct": 100 * (ppl / base - 1),
                     "kl": kl})
        print(f"{name}: {rows[-1]['ppl_vs_fp32_dense_pct']:+.2f} %, KL {kl:.4f}", flush=True)
    df = pd.DataFrame(rows)
    RESULTS.mkdir(exist_ok=True)
    df.to_csv(RESULTS / f"{stem}.csv", index=False)
    n_tok = sum(i.shape[1] - 1 for i in ids_list)
    lines = [f"# int8 scales per row and per column: quality on {type(model).__name__} "
             f"({args.model or 'the default embedded model'})", "",
             f"- texts: {len(ids_list)} held-out corpus passages (the corpus tail), {n_tok} "
             "scored tokens, teacher-forced; KL(fp32 dense || variant) per token; fp32 dense "
             f"perplexity {base:.3f}",
             f"- versions: {json.dumps(versions(), default=str)}",
             "- command: `python experiments/quality_int8_scales.py"
             + (f" --model {args.model}`" if args.model else "`"),
             f"- wall time: {time.perf_counter() - t0:.0f} s", "",
             "| int8 scales | perplexity | vs fp32 dense | KL |", "|---|---|---|---|"]
    for r in df.itertuples():
        lines.append(f"| {r.scales} | {r.perplexity:.3f} | {r.ppl_vs_fp32_dense_pct:+.2f} % | {r.kl:.4f} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
