"""sl.sweeps: one-pass calibration equals fitting each Calibrated rule separately."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparselab.masking import rules, sweeps
from sparselab.recording import Trace


def _trace(dtype=torch.float16) -> Trace:
    gen = torch.Generator().manual_seed(2)
    # layers of very different scale, so one global threshold would be wrong
    h = torch.randn(3, 50, 70, generator=gen) * torch.tensor([0.01, 1.0, 30.0])[:, None, None]
    gate = torch.randn(3, 50, 70, generator=gen)
    n = 50
    return Trace(layers=(2, 5, 7), arrays={"h": h.to(dtype), "gate": gate.to(dtype)},
                 token_ids=np.zeros(n), seq_ids=np.repeat([0, 1], 25), positions=np.tile(np.arange(25), 2),
                 steps=np.zeros(n), is_prefill=np.ones(n, dtype=bool))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(("source", "kind"), [("h", rules.Calibrated), ("gate", rules.GateThreshold)])
def test_same_masks_as_fitting_each_rule(dtype, source, kind):
    trace = _trace(dtype)
    got = sweeps.calibrated_masks(trace, (0.1, 0.5, 1.0), source=source, progress=False)
    assert list(got) == [0.1, 0.5, 1.0]
    for d, masks in got.items():
        reference = trace.masks(kind(density=d))
        np.testing.assert_array_equal(masks.bits, reference.bits)
        assert masks.rule == reference.rule
        # calibrated per layer: every layer keeps the target share despite its scale
        np.testing.assert_allclose(masks.density().mean(axis=1), d, atol=1 / 70)


def test_clear_errors():
    trace = _trace()
    with pytest.raises(ValueError, match="density must be in"):
        sweeps.calibrated_rules(trace, (0.0, 0.5))
    with pytest.raises(ValueError, match="source"):
        sweeps.calibrated_rules(trace, (0.5,), source="up")
    with pytest.raises(ValueError, match="at least one"):
        sweeps.calibrated_rules(trace, ())
    no_gate = Trace(layers=trace.layers, arrays={"h": trace.arrays["h"]}, token_ids=trace.token_ids,
                    seq_ids=trace.seq_ids, positions=trace.positions, steps=trace.steps,
                    is_prefill=trace.is_prefill)
    with pytest.raises(KeyError, match="gate"):
        sweeps.calibrated_rules(no_gate, (0.5,), source="gate")
