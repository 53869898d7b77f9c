"""The compression report: per layer what was kept and what it cost, plus totals."""

import dataclasses
import json


@dataclasses.dataclass
class LayerReport:
    """One layer: ``rank`` is None when the layer stays dense (see ``note``).

    ``params_before`` / ``params_after`` count the weight's parameters; a
    weight that an earlier reported layer holds too (two layers tied to one
    matrix) counts 0 here, so that the totals count each tensor once.
    ``weight_error`` is ‖W − B·A‖_F / ‖W‖_F with B and A as stored, in the
    layer's dtype (None where it is unknown: the
    ``compress`` command keeps factors an input file already holds without
    the dense weight to compare with); ``output_error`` the same for the
    outputs on the calibration inputs, ‖(W − B·A)·Xᵀ‖_F / ‖W·Xᵀ‖_F (None
    without calibration). ``sensitivity`` is the measured change of the
    model's outputs per unit of this layer's relative squared output error
    (with ``allocation="sensitivity"``; else None).
    """

    name: str
    shape: tuple
    rank: object
    params_before: int
    params_after: int
    weight_error: object
    output_error: object = None
    note: str = ""
    sensitivity: object = None

    @property
    def compressed(self):
        return self.rank is not None


class CompressionReport:
    """What ``compress_model`` (or the ``compress`` command) did.

    ``print(report)`` gives a table; :meth:`to_dict` / :meth:`to_json` the same
    as data.
    """

    def __init__(self, layers, *, calibrated=False):
        self.layers = list(layers)
        self.calibrated = bool(calibrated)

    @property
    def params_before(self):
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self):
        return sum(layer.params_after for layer in self.layers)

    @property
    def ratio(self):
        """Weight parameters kept over all reported layers."""
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def ranks(self):
        """{name: rank} of the layers that were factorized."""
        return {layer.name: layer.rank for layer in self.layers if layer.compressed}

    def to_dict(self):
        return {
            "calibrated": self.calibrated,
            "layers": [dict(dataclasses.asdict(layer), shape=list(layer.shape))
                       for layer in self.layers],
            "totals": {
                "layers": len(self.layers),
                "compressed": sum(layer.compressed for layer in self.layers),
                "params_before": self.params_before,
                "params_after": self.params_after,
                "ratio": self.ratio,
            },
        }

    def to_json(self, **kwargs):
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self):
        head = ["layer", "shape", "rank", "params", "kept", "weight err"]
        if self.calibrated:
            head.append("output err")
        rows = []
        for layer in self.layers:
            row = [layer.name, "x".join(map(str, layer.shape)),
                   str(layer.rank) if layer.compressed else "dense",
                   f"{layer.params_before:,}",
                   # An empty layer (no weights) keeps all of its nothing.
                   f"{layer.params_after / layer.params_before:.3f}" if layer.params_before
                   else "-",
                   "-" if layer.weight_error is None else f"{layer.weight_error:.4f}"]
            if self.calibrated:
                row.append("-" if layer.output_error is None else f"{layer.output_error:.4f}")
            rows.append(row)
        total = ["total", "", "", f"{self.params_before:,}", f"{self.ratio:.3f}", ""]
        if self.calibrated:
            total.append("")
        widths = [max(len(r[i]) for r in [head, total, *rows]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(r, widths)))
                 for r in [head, *rows, total]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        notes = [f"{layer.name}: {layer.note}" for layer in self.layers if layer.note]
        return "\n".join(lines + notes)

    def __repr__(self):
        return (f"CompressionReport({len(self.layers)} layers, "
                f"{self.params_before:,} -> {self.params_after:,} parameters)")
