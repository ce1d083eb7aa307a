"""The layer table against torchvision: parameters counted by torch itself, MACs counted
by forward hooks on every Conv2d and Linear, shapes hooked from torchvision's layers."""

import pytest
import torch
import torchvision

from pyincept.summary import format_table, layer_table, totals

TORCHVISION_PARAMS = 27_161_264     # Inception_V3_Weights.IMAGENET1K_V1.meta["num_params"]
TORCHVISION_GMACS = 5.713           # ... meta["_ops"]: conv and linear MACs, aux head not run


@pytest.fixture(scope="module")
def tv_model():
    return torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).eval()


def torchvision_trace(model, size, names):
    """Run torchvision on zeros at `size`, hooking every Conv2d/Linear (MACs per layer) and
    the named modules (output shapes, NCHW -> HWC). The aux head runs on Mixed_6e's output."""
    macs, shapes = {}, {}

    def count(module, inputs, out, name):
        per_output = module.in_features if isinstance(module, torch.nn.Linear) else (
            module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1])
        macs[name] = out[0].numel() * per_output                         # one image

    def shape(module, inputs, out, name):
        shapes[name] = tuple(out.shape[2:]) + tuple(out.shape[1:2]) if out.ndim == 4 else tuple(out.shape[1:])

    hooks = [m.register_forward_hook(lambda m, i, o, n=n: count(m, i, o, n))
             for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    hooks += [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: shape(m, i, o, n)) for n in names]
    mixed_6e = []
    hooks.append(model.Mixed_6e.register_forward_hook(lambda m, i, o: mixed_6e.append(o)))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *size))
            model.AuxLogits(mixed_6e[0])                                  # eval mode skips it; run it by hand
    finally:
        for h in hooks:
            h.remove()
    return macs, shapes


@pytest.mark.parametrize("size", [(299, 299), (311, 400)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_row_matches_torchvision(tv_model, size):
    """Each row's shape, parameters and MACs are torchvision's for the same layer; module
    rows are their branches' sums; totals count each parameter and MAC once."""
    rows = layer_table(size, include_aux=True)
    names = [r["name"] for r in rows]
    assert names[:3] == ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"] and names[-2:] == ["avgpool", "fc"]
    assert {"Mixed_5b", "Mixed_5b.branch_pool", "Mixed_7c.branch3x3dbl_3b", "maxpool2", "AuxLogits.fc"} <= set(names)
    assert [r["name"] for r in rows if r["aux"]] == ["AuxLogits", "AuxLogits.conv0", "AuxLogits.conv1", "AuxLogits.fc"]

    macs, shapes = torchvision_trace(tv_model, size, names)
    for row in rows:
        name = row["name"]
        assert row["shape"] == shapes[name], name
        module = tv_model.get_submodule(name)
        assert row["params"] == sum(p.numel() for p in module.parameters()), name
        layer_macs = sum(v for k, v in macs.items() if k == name or k.startswith(name + "."))
        assert row["macs"] == layer_macs, name

    no_aux = layer_table(size)
    assert no_aux == [r for r in rows if not r["aux"]]
    every = sum(p.numel() for p in tv_model.parameters())
    aux_params = sum(p.numel() for p in tv_model.AuxLogits.parameters())
    aux_macs = sum(v for k, v in macs.items() if k.startswith("AuxLogits."))
    assert totals(rows) == {"params": every, "macs": sum(macs.values())}
    assert totals(no_aux) == {"params": every - aux_params, "macs": sum(macs.values()) - aux_macs}


def test_totals_are_torchvisions_published_figures():
    t, t_aux = totals(layer_table()), totals(layer_table(include_aux=True))
    assert t_aux["params"] == TORCHVISION_PARAMS
    assert round(t["params"] / 1e6, 1) == 23.8
    assert abs(t["macs"] / 1e9 - TORCHVISION_GMACS) <= 0.005 * TORCHVISION_GMACS
    assert t["macs"] < t_aux["macs"]


def test_blog_layer_row_and_format():
    rows = layer_table()
    row = next(r for r in rows if r["name"] == "Mixed_5b.branch_pool")
    # 1x1 conv 192 -> 32: 192*32 weights + 2*32 BN; 35*35 positions * 32 outputs * 192 MACs each.
    assert row == {"name": "Mixed_5b.branch_pool", "kind": "conv 1x1", "shape": (35, 35, 32),
                   "params": 6_208, "macs": 7_526_400, "aux": False, "alias": "mixed/tower_2/conv"}
    text = format_table(rows)
    line = next(s for s in text.splitlines() if "Mixed_5b.branch_pool" in s)
    assert line.split() == ["Mixed_5b.branch_pool", "(mixed/tower_2/conv)", "conv", "1x1", "35x35x32", "6,208", "7,526,400"]
    assert "maxpool1" in text and "max_pool2d 3x3/2" in text
    assert text.splitlines()[-1] == "total: 23.83 M params (23,834,568), 5.713 GMACs (5,713,216,096)"
    with_aux = format_table(layer_table(include_aux=True)).splitlines()
    assert with_aux[-1].startswith("total with aux head: 27.16 M params (27,161,264), ")
    assert len({len(s) for s in text.splitlines()[:2]}) == 1, "header and rule line up"


def test_totals_skip_modules_only_when_their_branches_are_listed():
    rows = layer_table()
    modules_only = [r for r in rows if "." not in r["name"]]
    assert totals(modules_only) == totals(rows)
