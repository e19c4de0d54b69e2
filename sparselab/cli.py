"""Command line: ``sparselab demo`` (also ``python -m sparselab demo``).

    $ sparselab demo                        # record the embedded model, print, write report
    $ sparselab demo --texts 64 --density 0.3 --out report.html
    $ sparselab record --texts 32 --out smollm2.trace

The demo records the embedded model on the embedded text, prints a per-layer table
(density under a calibrated rule, mean churn between consecutive tokens, share of |h|
mass the mask keeps) and writes a self-contained HTML report of the figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_REPORT = Path("experiments/results/demo_report.html")


def _record(args: argparse.Namespace):
    import sparselab as sl

    t0 = time.perf_counter()
    model, tokenizer = sl.load_model(args.model)
    print(f"model {model.config.sparselab_name} loaded in {time.perf_counter() - t0:.1f} s")
    texts = sl.load_corpus(args.corpus, n=args.texts)
    trace = sl.record(model, tokenizer, texts, max_length=args.max_length, batch_size=args.batch_size)
    print(f"recorded {trace.n_tokens} tokens x {trace.n_layers} layers x {trace.n_neurons} neurons")
    return trace


def demo(args: argparse.Namespace) -> int:
    import pandas as pd

    import sparselab as sl

    started = time.perf_counter()
    trace = _record(args)
    rule = sl.rules.Calibrated(density=args.density).fit(trace)
    masks = trace.masks(rule)
    table = sl.metrics.summary(masks, trace)
    with pd.option_context("display.max_rows", 200, "display.width", 120):
        print(f"\nPer-layer summary under {rule.label}:")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    middle = trace.layers[len(trace.layers) // 2]
    figures = {
        "Density by layer": sl.figures.density_by_layer(sl.metrics.density(masks)),
        "Median |h| by layer": sl.figures.activation_magnitude_by_layer(trace),
        f"Active neurons, layer {middle}": sl.figures.token_heatmap(
            masks, middle, pieces=trace.pieces, max_tokens=96, max_neurons=256
        ),
        "Churn over tokens": sl.figures.churn_over_tokens(sl.metrics.churn(masks), layer=middle),
        "Window reuse": sl.figures.window_reuse_curves(sl.metrics.window_reuse(masks)),
    }
    meta = {
        "rule": rule.describe(),
        "texts": args.texts,
        "max_length": args.max_length,
        "tokens": trace.n_tokens,
        **trace.meta,
    }
    path = sl.report(
        figures, args.out, title="sparselab demo: contextual sparsity of the embedded model",
        tables={"Per-layer summary": table}, meta=meta,
    )
    print(f"\nreport written to {path} ({time.perf_counter() - started:.0f} s in all)")
    return 0


def record_cmd(args: argparse.Namespace) -> int:
    trace = _record(args)
    path = trace.save(args.out)
    print(f"trace written to {path}")
    return 0


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (checked before the model loads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _density(text: str) -> float:
    """argparse type: a fraction in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value:g}")
    return value


def _output_file(text: str) -> Path:
    """argparse type: a file path whose folder exists (it is written at the end of a run)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a directory: give a file name")
    if not path.parent.exists() and path.parent != DEFAULT_REPORT.parent:
        raise argparse.ArgumentTypeError(f"folder {path.parent} does not exist")
    return path


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF id or folder (default: embedded SmolLM2-135M)")
    parser.add_argument("--corpus", default="pydoc", help="'pydoc' or a text file")
    parser.add_argument("--texts", type=_positive_int, default=32, help="number of passages")
    parser.add_argument("--max-length", type=_positive_int, default=128, help="tokens per passage")
    parser.add_argument("--batch-size", type=_positive_int, default=8)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparselab", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="record, print the per-layer table, write a report")
    _common(p_demo)
    p_demo.add_argument("--density", type=_density, default=0.5, help="calibrated target density")
    p_demo.add_argument("--out", type=_output_file, default=DEFAULT_REPORT, help="HTML report path")
    p_demo.set_defaults(func=demo)
    p_rec = sub.add_parser("record", help="record a trace and save it")
    _common(p_rec)
    p_rec.add_argument("--out", type=_output_file, required=True, help="trace file to write")
    p_rec.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p_rec.set_defaults(func=record_cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "record" and args.out.exists() and not args.overwrite:
        parser.error(f"argument --out: {args.out} exists (pass --overwrite to replace it)")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
