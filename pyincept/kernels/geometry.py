"""Output-size arithmetic and argument normalisation shared by every kernel.

Nothing here touches data: it turns the ways a user may write a kernel size,
stride or padding into one canonical tuple, and says how large the output is.
The formulas are PyTorch's, so shapes agree with torchvision layer for layer.
"""


def pair(value):
    """3 -> (3, 3); (1, 7) -> (1, 7)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"expected an int or a pair, got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def pad4(padding):
    """Padding as (top, bottom, left, right).

    Accepts an int (all sides), a pair (pad_h, pad_w), as PyTorch writes it, or four
    values per side. v3's 1x7 conv has padding (0, 3): no rows added, 3 columns each side.
    """
    if isinstance(padding, (tuple, list)) and len(padding) == 4:
        top, bottom, left, right = (int(p) for p in padding)
    else:
        ph, pw = pair(padding)
        top, bottom, left, right = ph, ph, pw, pw
    if min(top, bottom, left, right) < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    return top, bottom, left, right


def conv_output_size(size, kernel, stride, pad_before, pad_after):
    """floor((L + pads - kernel) / stride) + 1: how many kernel positions fit."""
    return (size + pad_before + pad_after - kernel) // stride + 1


def conv_output_hw(H, W, kernel, stride, pads):
    """(OH, OW) of a convolution over an H x W input; pads = (top, bottom, left, right).
    A ValueError, in the words every backend uses, when no kernel position fits."""
    (R, S), (sh, sw) = pair(kernel), pair(stride)
    top, bottom, left, right = pads
    OH = conv_output_size(H, R, sh, top, bottom)
    OW = conv_output_size(W, S, sw, left, right)
    if OH < 1 or OW < 1:
        raise ValueError(f"input {H}x{W} is smaller than kernel {R}x{S} with padding {tuple(pads)}")
    return OH, OW


def pool_output_size(size, kernel, stride, pad, ceil_mode):
    """PyTorch's pooling size: floor or ceil, but the last window must start inside
    the input or its left padding (otherwise it would see only padding)."""
    span = size + 2 * pad - kernel
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def adaptive_windows(size, out):
    """PyTorch's adaptive pooling windows along one axis: window i covers
    floor(i * size / out) .. ceil((i + 1) * size / out) - 1, so the windows tile the input,
    overlapping by a pixel where size is not a multiple of out (14 -> 4: 0-3, 3-6, 7-10, 10-13)."""
    return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]
