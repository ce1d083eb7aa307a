"""Fusing a module's 1x1 convolutions: an optimisation laid over a Block's branch table.

Why it is exact: for pixels as rows, x @ [W1 | W2 | W3] = [x @ W1 | x @ W2 | x @ W3]. The
branches of an Inception module that open with a 1x1 conv all read the module's input, so
one (N*H*W, C) @ (C, K1+K2+K3) product reads x once and keeps the matrix product busier
than three thin ones; each branch then takes its columns, adds its bias and applies ReLU.

A pool branch joins too when it opens with a 3x3/1 average pool, then a 1x1 conv. Both
maps are linear and act on different axes (pixels vs channels): the pool's divisor at a
pixel is the same for every channel, whether it counts the zero padding
(`count_include_pad=True`, v3) or only the pixels inside (`False`, the FID network), and
the padding stays zero under the conv's linear part, so W @ avgpool(x) = avgpool(W @ x).
Running the conv first pools K channels instead of C. The bias comes after the pool, as
in the unfused branch: pooled, it would be diluted at the border.

What it refuses (`Pointwise1x1.refused` names each branch left alone, and why):
- a max-pool branch (GoogLeNet's branch4, the FID network's Mixed_7c): max(W x) is not
  W max(x), the pool does not commute with the conv;
- a branch whose first conv is not a 1x1 at stride 1 without padding.

Without a plan the block runs its table in torchvision's order; the tests hold the plan
to that readable path.
"""

import numpy as np

from .errors import PyinceptError
from .layers import BasicConv2d, Pool


class Pointwise1x1:
    """The plan for one Block: which branches open with a fusable 1x1, and their one GEMM.

    members: [(branch index, conv)] for branches whose first step is a pointwise conv;
    pooled: (branch index, conv) for the avg-pool -> 1x1 branch that joins, or None.
    Build it with `Pointwise1x1.over(block)`: None when fewer than two branches would share.
    """

    def __init__(self, block, members, pooled, refused):
        self.block = block
        self.members, self.pooled, self.refused = members, pooled, refused
        self.ops = block.ops
        self.host_weight = self.weight = None
        for _, conv in self.convs():
            conv.fused = True                 # from now on: no weight form of its own, even while loading

    @classmethod
    def over(cls, block):
        members, pooled, refused = [], None, {}
        for i, branch in enumerate(block.branches or ()):
            first = branch[0]
            if isinstance(first, BasicConv2d):
                if first.is_pointwise():
                    members.append((i, first))
                else:
                    refused[first.name] = "not a 1x1 at stride 1 without padding"
            elif isinstance(first, Pool) and len(branch) > 1:
                reason = cls._pool_refusal(first, branch[1])
                if reason is None and pooled is None:
                    pooled = (i, branch[1])
                else:
                    refused[branch[1].name] = reason or "one pooled branch per GEMM"
        if len(members) + (pooled is not None) < 2:
            return None
        plan = cls(block, members, pooled, refused)
        if all(conv.folded is not None for _, conv in plan.convs()):
            plan.load()
        return plan

    @staticmethod
    def _pool_refusal(pool, conv):
        """Why avg-pool -> conv cannot run as conv -> avg-pool, or None when it can."""
        s = pool.settings
        if pool.kernel != "avg_pool2d":
            return f"a {pool.kernel} branch: max(W x) != W max(x)"
        if (s.get("kernel_size"), s.get("stride"), s.get("padding")) not in ((3, 1, 1), ((3, 3), (1, 1), (1, 1))):
            return "only a 3x3/1 pool padded by 1 keeps the map's size"
        if not (isinstance(conv, BasicConv2d) and conv.is_pointwise()):
            return "the pool is not followed by a 1x1 conv"
        return None

    def convs(self):
        return self.members + ([self.pooled] if self.pooled is not None else [])

    def load(self, lean=False):
        """Concatenate the members' folded (1, 1, C, K_i) weights along K; each member's then
        becomes its columns of that one array, so the filters are held once. lean: the
        network can read them again, so the GEMM's form is made from the members' blocks
        straight away (`ops.pack_weights` of a list: no concatenated copy) and is all that
        is kept."""
        blocks = [conv.folded[0] for _, conv in self.convs()]                       # (1, 1, C, K_i) each
        if lean:
            self.host_weight = None
            self.weight = self.ops.pack_weights(blocks)                             # (1, 1, C, sum K)
            for _, conv in self.convs():
                conv.folded = (None, conv.folded[1])
                conv.use(conv.ops)                                                 # no weight of its own
            return
        self.host_weight = np.concatenate(blocks, axis=3)                          # (1, 1, C, sum K)
        k0 = 0
        for _, conv in self.convs():
            K = conv.out_channels
            conv.folded = (self.host_weight[..., k0 : k0 + K], conv.folded[1])       # a view: (1, 1, C, K_i)
            conv.use(conv.ops)                                                     # no weight of its own now
            k0 += K
        self.use(self.ops)

    def use(self, ops):
        self.ops = ops
        if self.host_weight is not None:
            self.weight = ops.pack_weights(self.host_weight)

    def keep_kernel_form_only(self):
        """Let go of the concatenated host matrix, and the members' views of it, where the
        GEMM runs from a form of its own (the CPU's panels, a GPU copy)."""
        if self.host_weight is None or self.weight is self.host_weight:
            return
        self.host_weight = None
        for _, conv in self.convs():
            conv.folded = (None, conv.folded[1])

    def __call__(self, x, taps, slices):
        """Run the members on x as one GEMM. Returns {branch index: (output, steps done)}
        for the block to carry on from; a member that ends its branch wrote its slice."""
        ops, branches = self.ops, self.block.branches
        N, H, W, _ = x.shape
        outputs = {}
        for i, conv in self.convs():
            ends = len(branches[i]) == (2 if self.pooled and i == self.pooled[0] else 1)
            outputs[i] = slices[i] if ends else ops.empty((N, H, W, conv.out_channels))
        # Every member but the pooled one is a head of the GEMM: its columns + its bias, ReLU,
        # into its output, done tile by tile while the product is in cache (kernels' conv2d).
        heads, k0 = [], 0
        for i, conv in self.convs():
            if self.pooled is None or i != self.pooled[0]:
                heads.append((k0, conv.bias, True, outputs[i]))
            else:
                pooled_k0 = k0
            k0 += conv.out_channels
        raw = ops.conv2d(x, self.weight, heads=heads)                        # (N, H, W, sum K), no bias
        started = {}
        for i, conv in self.members:
            started[i] = (taps.record(conv.name, outputs[i]), 1)
        if self.pooled is not None:
            i, conv = self.pooled
            z = raw[..., pooled_k0 : pooled_k0 + conv.out_channels]           # its columns, no bias yet
            z = ops.avg_pool2d(z, **branches[i][0].settings)                 # the branch's pool, after the 1x1 (exact)
            ops.bias_act(z, conv.bias, relu=True, out=outputs[i])
            started[i] = (taps.record(conv.name, outputs[i]), 2)
        return started


def fuse(block, on=True):
    """Lay the plan over `block` (on=True, where it has two branches to share a GEMM) or take
    it off (on=False: the branch table runs as written). Returns the plan, or None.
    Refused, with nothing changed, where the members hold their packed form only: the
    network reloads their filters first (`Network.set_fuse`)."""
    if not all(layer.holds_host_weight() for layer in block.layers()) or (
            block.plan is not None and block.plan.host_weight is None and block.plan.weight is not None):
        raise PyinceptError(f"{block.name}'s filters are held in their kernels' form only: switch the "
                            "algorithm, fusion or device through the network, which reloads them")
    for layer in block.layers():                  # the last plan's members run on their own again,
        if isinstance(layer, BasicConv2d) and layer.fused:       # each with a copy of its columns,
            layer.fused = False                                  # until a new plan takes them in
            layer.use(layer.ops)
    block.plan = Pointwise1x1.over(block) if on and block.branches is not None else None
    if block.plan is not None:
        block.plan.use(block.ops)
    return block.plan
