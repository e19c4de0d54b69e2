"""Sparsity metrics over masks: tidy pandas DataFrames, computed on the packed bits.

    >>> masks = trace.masks(sl.rules.Calibrated(density=0.5))
    >>> sl.metrics.churn(masks).groupby("layer")[["churn", "random_churn"]].mean()
    >>> sl.metrics.window_reuse(masks, windows=(1, 4, 16)).head()

Every function takes a :class:`sparselab.Masks` and returns a long ("tidy") DataFrame
with one row per layer and token / neuron / window / batch size, so it feeds
:mod:`sparselab.viz` and ``groupby`` directly. Each frame carries the rule that made
the masks and the library versions in ``df.attrs`` (``"rule"``, ``"versions"``).

Sequences: "consecutive" tokens are neighbours in (sequence id, position) order inside
one sequence; churn and window reuse never look across the start of a sequence.

Modules: :mod:`.tokens` (density, churn), :mod:`.windows` (window reuse),
:mod:`.neurons` (firing frequency), :mod:`.batches` (batch union), :mod:`.activations`
(mass kept, magnitudes, summary). A new metric goes in the module of what it is per
(token, window, neuron, batch) and returns a frame made by ``_frames.long_frame``.
"""

from sparselab.metrics._frames import sequence_order
from sparselab.metrics.activations import activation_magnitude, mass_kept, summary
from sparselab.metrics.batches import batch_union, sample_batches
from sparselab.metrics.neurons import neuron_frequency
from sparselab.metrics.tokens import churn, density
from sparselab.metrics.windows import window_reuse

__all__ = [
    "activation_magnitude",
    "batch_union",
    "churn",
    "density",
    "mass_kept",
    "neuron_frequency",
    "sample_batches",
    "sequence_order",
    "summary",
    "window_reuse",
]
