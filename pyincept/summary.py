"""The layer table behind `pyincept layers`: every named layer's output shape,
parameters and multiply-accumulates (MACs).

One row per name a registered model's `run` accepts: the stem convolutions and pools,
each Inception module followed by its branch layers, avgpool and fc; with
`include_aux=True` also the auxiliary heads (after the stage each reads), flagged `aux`.
The totals are torchvision's published figures (its `Weights.meta`): Inception v3 at
299x299, 5.71 GMACs ("_ops": 5.713) and 23.8 M parameters, 27,161,264 with the aux head
("num_params"); GoogLeNet at 224x224, 1.50 GMACs and 6,624,904 parameters.

How each number is made:

- shape: measured, not derived. The real network (seeded random init; shapes do not
  depend on weights) runs a zeros image of the requested size and every row's shape
  is what came out, NHWC without the batch axis: (35, 35, 32), or (1000,) for fc.
- params: what torchvision counts as parameters. A BasicConv2d has its conv weight
  R*S*C*K (no bias) and its batch norm's weight and bias, 2K; the BN running mean and
  variance are buffers, not parameters (and here they are folded away at load time).
  fc has in*out weights and out biases.
- macs: a convolution computes, for each of its OH*OW*K outputs, a dot product of
  length R*S*C, so OH*OW*K*R*S*C multiply-accumulates; fc, in*out. Pooling, ReLU,
  BN (folded) and bias adds count 0: the convention of torchvision's "_ops" figure,
  which counts conv and linear MACs only.
- module rows (Mixed_5b ...) are the sums of their branch rows, so `totals` adds only
  the leaf rows and nothing is counted twice.

What it is not: a profiler. MACs count arithmetic, not time; `benchmarks/` times things.
"""

import numpy as np

from .layers import BasicConv2d, Block, Linear, Split
from .models.registry import create_model, get_spec


def layer_table(input_size=None, include_aux=False, model="inception_v3"):
    """Rows {"name", "kind", "shape", "params", "macs", "aux"} in execution order, each
    module row right before its branch rows. input_size is (H, W), by default the size the
    model's published weights were trained at; model a registered name."""
    H, W = input_size or get_spec(model).input_size
    network = create_model(model)
    aux = set(network.aux)
    names = [n for n in network.layer_names() if include_aux or n.split(".")[0] not in aux]
    shapes = {name: y.shape[1:] for name, y in network.run(np.zeros((1, H, W, 3), np.float32), names).items()}

    rows = []
    for part in network.parts():                     # the stages, each aux head after the stage it reads
        is_aux = part.name in aux
        if is_aux and not include_aux:
            continue
        if isinstance(part, Block):
            leaves = [s for s in part.steps() if s.name and not isinstance(s, Split)]
            branches = [_leaf_row(layer, shapes[layer.name], is_aux) for layer in leaves]
            rows.append(_row(part.name, type(part).__name__, shapes[part.name],
                             sum(r["params"] for r in branches), sum(r["macs"] for r in branches), is_aux))
            rows.extend(branches)
        else:
            rows.append(_leaf_row(part, shapes[part.name], is_aux))
    graph_names = {}                                 # layer -> its first alias, e.g. the TF graph's name
    for alias, layer in network.aliases.items():
        graph_names.setdefault(layer, alias)
    for row in rows:
        row["alias"] = graph_names.get(row["name"])
    return rows


def totals(rows):
    """{"params", "macs"} over the leaf rows: a module row whose branch rows are also
    present only repeats their numbers, so it is skipped."""
    names = [r["name"] for r in rows]
    leaves = [r for r in rows if not any(n.startswith(r["name"] + ".") for n in names)]
    return {"params": sum(r["params"] for r in leaves), "macs": sum(r["macs"] for r in leaves)}


def format_table(rows):
    """An aligned text table, branch rows indented under their module, and totals lines."""
    header = ("layer", "kind", "output", "params", "MACs")
    body = [
        (("  " if "." in r["name"] else "") + r["name"] + (f" ({r['alias']})" if r.get("alias") else ""), r["kind"],
         "x".join(map(str, r["shape"])), f"{r['params']:,}", f"{r['macs']:,}")
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells):
        left = "  ".join(c.ljust(w) for c, w in zip(cells[:3], widths))
        right = "  ".join(c.rjust(w) for c, w in zip(cells[3:], widths[3:]))
        return f"{left}  {right}".rstrip()

    out = [line(header), line(["-" * w for w in widths]), *map(line, body), ""]
    main = [r for r in rows if not r["aux"]]
    out.append(_totals_line("total", totals(main)))
    if len(main) < len(rows):
        out.append(_totals_line("total with aux head", totals(rows)))
    return "\n".join(out)


def _totals_line(label, t):
    return f"{label}: {t['params'] / 1e6:.2f} M params ({t['params']:,}), {t['macs'] / 1e9:.3f} GMACs ({t['macs']:,})"


def _row(name, kind, shape, params, macs, aux):
    return {"name": name, "kind": kind, "shape": tuple(int(s) for s in shape),
            "params": int(params), "macs": int(macs), "aux": aux}


def _leaf_row(layer, shape, aux):
    """A conv, fc or pool row: parameters from the layer's checkpoint table, MACs from its output."""
    if isinstance(layer, BasicConv2d):
        R, S = layer.kernel_size
        OH, OW, K = shape
        stride = "" if layer.stride in (1, (1, 1)) else f"/{layer.stride}"
        kind, macs = f"conv {R}x{S}{stride}", OH * OW * K * R * S * layer.in_channels
    elif isinstance(layer, Linear):
        kind, macs = "fc", layer.in_features * layer.out_features
    else:                                             # a Pool stage: comparisons and adds, no MACs
        k, stride = layer.settings.get("kernel_size"), layer.settings.get("stride") or 1
        kind = layer.kernel + (f" {k}x{k}" if k else "") + (f"/{stride}" if stride != 1 else "")
        macs = 0
    # Checkpoint keys minus BN running statistics = what torchvision calls parameters.
    params = sum(int(np.prod(s)) for key, s in layer.parameter_shapes().items() if ".running_" not in key)
    return _row(layer.name, kind, shape, params, macs, aux)
