"""The backward pass's kernels (`reference.*_vjp`): each against torch autograd in float64
over Hypothesis geometries, and each against its own forward by the adjoint identity
<J u, v> = <u, J^T v>, which needs no framework at all."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import conv_geometry, pool_geometry, seeds
from torch_oracle import to_nchw, to_nhwc

from pyincept.kernels import cpu, gemm
from pyincept.kernels import reference as ref
from pyincept.layers import fold_batchnorm, fold_batchnorm_vjp

SETTINGS = settings(max_examples=40, deadline=None)


def randn(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape)


def tensor(x):
    """A float64 NCHW leaf that wants its gradient."""
    return to_nchw(x, np.float64).requires_grad_(True)


def assert_close(actual, expected, rtol=1e-10, scale=None):
    """Within rtol of the largest value (or of `scale`, the size of the terms that cancelled
    to give it): float64 sums in another order agree to about 1e-15 of it."""
    expected = np.asarray(expected)
    assert actual.shape == expected.shape and actual.dtype == np.float64
    scale = max(np.abs(expected).max(initial=0.0), scale or 0.0, 1e-300)
    assert np.abs(actual - expected).max(initial=0.0) <= rtol * scale


def inner(a, b):
    return float(np.sum(np.asarray(a, np.float64) * np.asarray(b, np.float64)))


def assert_adjoint(ju, v, u, jtv):
    """<J u, v> == <u, J^T v> up to float64 rounding of two sums."""
    left, right = inner(ju, v), inner(u, jtv)
    size = np.abs(np.asarray(ju)).sum() * np.abs(v).max() + np.abs(u).sum() * np.abs(jtv).max()
    assert abs(left - right) <= 1e-12 * max(size, 1e-300), (left, right)


# --- convolution ------------------------------------------------------------------------


def torch_conv(x, w, b, stride, pads):
    top, bottom, left, right = pads
    return F.conv2d(F.pad(x, (left, right, top, bottom)), w, b, stride)


@SETTINGS
@given(conv_geometry(), seeds)
def test_conv2d_vjp_is_torch_autograds(geometry, seed):
    N, H, W, C, K, kernel, stride, pads = geometry
    x, w, b = randn(seed, N, H, W, C), randn(seed + 1, *kernel, C, K), randn(seed + 2, K)
    y = ref.conv2d(x, w, b, stride, pads)
    dy = randn(seed + 3, *y.shape)
    tx, tw, tb = tensor(x), torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_(), torch.from_numpy(b).requires_grad_()
    ty = torch_conv(tx, tw, tb, stride, pads)
    assert_close(y, to_nhwc(ty))
    ty.backward(to_nchw(dy, np.float64))
    dx, dw, db = ref.conv2d_vjp(dy, x, w, stride, pads)
    assert_close(dx, to_nhwc(tx.grad))
    assert_close(dw, tw.grad.numpy().transpose(2, 3, 1, 0))
    assert_close(db, tb.grad.numpy())
    assert ref.conv2d_vjp(dy, x, w, stride, pads, params=False)[1:] == (None, None)


@SETTINGS
@given(conv_geometry(), seeds)
def test_conv2d_vjp_is_the_adjoint_of_conv2d_in_x_and_in_w(geometry, seed):
    N, H, W, C, K, kernel, stride, pads = geometry
    x, w = randn(seed, N, H, W, C), randn(seed + 1, *kernel, C, K)
    u_x, u_w = randn(seed + 2, *x.shape), randn(seed + 3, *w.shape)
    v = randn(seed + 4, *ref.conv2d(x, w, None, stride, pads).shape)
    dx, dw, _ = ref.conv2d_vjp(v, x, w, stride, pads)
    assert_adjoint(ref.conv2d(u_x, w, None, stride, pads), v, u_x, dx)      # linear in x
    assert_adjoint(ref.conv2d(x, u_w, None, stride, pads), v, u_w, dw)      # linear in w


def test_col2im_adds_overlapping_patches_and_drops_the_padding():
    """By hand: a 1x3 input, 2-wide patches at stride 1, padding 1 each side: patches
    (pad, x0), (x0, x1), (x1, x2), (x2, pad); each x_i sits in two of them."""
    cols = np.arange(1.0, 9.0).reshape(1, 1, 4, 2)           # rows (1, 2), (3, 4), (5, 6), (7, 8)
    dx = ref.col2im(cols, (1, 1, 3, 1), (1, 2), 1, (0, 0, 1, 1))
    assert np.array_equal(dx.ravel(), [2 + 3, 4 + 5, 6 + 7])


# --- batch norm, folded ---------------------------------------------------------------


@SETTINGS
@given(conv_geometry(), seeds)
def test_folded_batchnorm_gradients_are_the_checkpoints_own(geometry, seed):
    """conv (no bias) -> eval-mode BN: torch differentiates the two as they are; pyincept
    runs the folded conv and maps its gradients back to the conv weight, gamma and beta."""
    N, H, W, C, K, kernel, stride, pads = geometry
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((N, H, W, C)), rng.standard_normal((*kernel, C, K))
    gamma, beta = rng.random(K) + 0.5, rng.standard_normal(K)
    mean, var = rng.standard_normal(K), rng.random(K) + 0.5
    scale = gamma / np.sqrt(var + 1e-3)
    fw, fb = w * scale, beta - mean * scale                  # fold_batchnorm, kept in float64
    y = ref.conv2d(x, fw, fb, stride, pads)
    dy = rng.standard_normal(y.shape)
    tx, tw = tensor(x), torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_()
    tg, tbeta = torch.from_numpy(gamma).requires_grad_(), torch.from_numpy(beta).requires_grad_()
    ty = F.batch_norm(torch_conv(tx, tw, None, stride, pads), torch.from_numpy(mean), torch.from_numpy(var),
                      tg, tbeta, training=False, eps=1e-3)
    assert_close(y, to_nhwc(ty), 1e-9)
    ty.backward(to_nchw(dy, np.float64))
    dx, dfw, dfb = ref.conv2d_vjp(dy, x, fw, stride, pads)
    dw, dgamma, dbeta = fold_batchnorm_vjp(dfw, dfb, w, gamma, mean, var, eps=1e-3)
    assert_close(dx, to_nhwc(tx.grad))
    assert_close(dw, tw.grad.numpy().transpose(2, 3, 1, 0))
    assert_close(dgamma, tg.grad.numpy())
    assert_close(dbeta, tbeta.grad.numpy())


def test_fold_batchnorm_vjp_uses_the_same_fold_as_loading():
    """The vjp's scale is layers.fold_batchnorm's (eps included): its folded weight, divided
    by the weight, is the scale whose gradient the vjp applies."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 3, 2, 4)).astype(np.float32)
    gamma, beta, mean, var = (rng.random(4).astype(np.float32) + 0.5 for _ in range(4))
    folded_w, _ = fold_batchnorm(w, gamma, beta, mean, var)
    dw, _, _ = fold_batchnorm_vjp(np.ones_like(w), np.zeros(4, np.float32), w, gamma, mean, var)
    np.testing.assert_allclose(dw * w, folded_w, rtol=1e-6)


# --- pools ----------------------------------------------------------------------------


@SETTINGS
@given(pool_geometry(), seeds, st.booleans())
def test_max_pool2d_vjp_is_torch_autograds_ties_included(geometry, seed, ties):
    """ties: small integers, so most windows hold their maximum twice or more; torch gives
    the gradient to the first in scan order, and so must pyincept."""
    N, H, W, C, kernel, stride, pad, ceil_mode, _ = geometry
    x = randn(seed, N, H, W, C)
    if ties:
        x = np.round(x)
    y = ref.max_pool2d(x, kernel, stride, pad, ceil_mode)
    dy = randn(seed + 1, *y.shape)
    tx = tensor(x)
    ty = F.max_pool2d(tx, kernel, stride, pad, ceil_mode=ceil_mode)
    assert np.array_equal(y, to_nhwc(ty))
    ty.backward(to_nchw(dy, np.float64))
    assert_close(ref.max_pool2d_vjp(dy, x, kernel, stride, pad, ceil_mode), to_nhwc(tx.grad))


@SETTINGS
@given(pool_geometry(), seeds)
def test_avg_pool2d_vjp_is_torch_autograds(geometry, seed):
    N, H, W, C, kernel, stride, pad, ceil_mode, count_include_pad = geometry
    x = randn(seed, N, H, W, C)
    y = ref.avg_pool2d(x, kernel, stride, pad, ceil_mode, count_include_pad)
    dy = randn(seed + 1, *y.shape)
    tx = tensor(x)
    ty = F.avg_pool2d(tx, kernel, stride, pad, ceil_mode, count_include_pad)
    assert_close(y, to_nhwc(ty))
    ty.backward(to_nchw(dy, np.float64))
    assert_close(ref.avg_pool2d_vjp(dy, x, kernel, stride, pad, ceil_mode, count_include_pad), to_nhwc(tx.grad))


@SETTINGS
@given(pool_geometry(), seeds)
def test_pool_vjps_are_the_adjoints_of_their_pools(geometry, seed):
    """avg_pool2d is linear: J u is the pool of u. max_pool2d is linear near x, away from
    ties: J u is the difference quotient (pool(x + t u) - pool(x)) / t for a small t."""
    N, H, W, C, kernel, stride, pad, ceil_mode, count_include_pad = geometry
    x, u = randn(seed, N, H, W, C), randn(seed + 1, N, H, W, C)
    ju = ref.avg_pool2d(u, kernel, stride, pad, ceil_mode, count_include_pad)
    v = randn(seed + 2, *ju.shape)
    assert_adjoint(ju, v, u, ref.avg_pool2d_vjp(v, x, kernel, stride, pad, ceil_mode, count_include_pad))
    t = 2.0**-20
    pooled = ref.max_pool2d(x, kernel, stride, pad, ceil_mode)
    ju = (ref.max_pool2d(x + t * u, kernel, stride, pad, ceil_mode) - pooled) / t
    jtv = ref.max_pool2d_vjp(v, x, kernel, stride, pad, ceil_mode)
    assert abs(inner(ju, v) - inner(u, jtv)) <= 1e-6 * (np.abs(ju).sum() * np.abs(v).max() + 1e-300)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 12), st.integers(1, 12), st.integers(1, 4), st.integers(1, 5),
       st.integers(1, 5), seeds)
def test_adaptive_and_global_avg_pool_vjps_are_torch_autograds(N, H, W, C, OH, OW, seed):
    x = randn(seed, N, H, W, C)
    dy = randn(seed + 1, N, OH, OW, C)
    tx = tensor(x)
    F.adaptive_avg_pool2d(tx, (OH, OW)).backward(to_nchw(dy, np.float64))
    assert_close(ref.adaptive_avg_pool2d_vjp(dy, x, (OH, OW)), to_nhwc(tx.grad))
    assert_adjoint(ref.adaptive_avg_pool2d(x, (OH, OW)), dy, x, ref.adaptive_avg_pool2d_vjp(dy, x, (OH, OW)))
    g = dy[:, :1, :1]
    tx = tensor(x)
    tx.mean(dim=(2, 3), keepdim=True).backward(to_nchw(g, np.float64))
    assert_close(ref.global_avg_pool2d_vjp(g, x), to_nhwc(tx.grad))
    assert_adjoint(ref.global_avg_pool2d(x), g, x, ref.global_avg_pool2d_vjp(g, x))


# --- the rest -------------------------------------------------------------------------


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 40), st.integers(1, 30), seeds)
def test_linear_vjp_is_torch_autograds(N, I, O, seed):
    x, w, b, dy = randn(seed, N, I), randn(seed + 1, I, O), randn(seed + 2, O), randn(seed + 3, N, O)
    tx, tw, tb = (torch.from_numpy(a).requires_grad_() for a in (x, w, b))
    (tx @ tw + tb).backward(torch.from_numpy(dy))
    dx, dw, db = ref.linear_vjp(dy, x, w)
    for mine, theirs in ((dx, tx), (dw, tw), (db, tb)):
        assert_close(mine, theirs.grad.numpy())
    assert_adjoint(ref.linear(x, w), dy, x, dx)
    assert_adjoint(ref.linear(x, w), dy, w, dw)


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 20), seeds, st.floats(0.1, 30))
def test_relu_softmax_and_log_softmax_vjps_are_torch_autograds(N, K, seed, spread):
    x = randn(seed, N, K) * spread
    x[:, ::3] = 0.0                                            # ReLU's gradient at exactly 0 is 0
    dy = randn(seed + 1, N, K)
    for forward, vjp, theirs in ((ref.relu, ref.relu_vjp, torch.relu),
                                 (ref.softmax, ref.softmax_vjp, lambda t: torch.softmax(t, -1)),
                                 (ref.log_softmax, ref.log_softmax_vjp, lambda t: torch.log_softmax(t, -1))):
        tx = torch.from_numpy(x).requires_grad_()
        ty = theirs(tx)
        y = forward(x)
        assert_close(y, ty.detach().numpy(), 1e-12)
        ty.backward(torch.from_numpy(dy))
        assert_close(vjp(dy, y), tx.grad.numpy(), scale=np.abs(dy).max())    # dy - p * sum(dy) may cancel


@pytest.mark.parametrize("widths", [[1], [3, 5], [64, 64, 96, 64]])
def test_concat_vjp_hands_each_input_its_channels(widths):
    xs = [randn(i, 2, 3, 4, k) for i, k in enumerate(widths)]
    dy = randn(9, 2, 3, 4, sum(widths))
    ts = [tensor(x) for x in xs]
    torch.cat(ts, dim=1).backward(to_nchw(dy, np.float64))
    for mine, t in zip(ref.concat_channels_vjp(dy, widths), ts):
        assert np.array_equal(mine, to_nhwc(t.grad))


# --- the fast CPU kernels: float32, against torch's float64 ------------------------------


def assert_float32_close(actual, expected64):
    """The fast path's bar: within 1e-4 of the largest value of torch's float64 answer."""
    actual = np.asarray(actual)
    assert actual.dtype == np.float32 and actual.shape == expected64.shape
    assert np.abs(actual - expected64).max(initial=0.0) <= 1e-4 * max(np.abs(expected64).max(initial=0.0), 1e-30)


@SETTINGS
@given(conv_geometry(), seeds)
def test_cpu_conv2d_vjp_is_torch_autograds_within_float32(geometry, seed):
    N, H, W, C, K, kernel, stride, pads = geometry
    x, w = randn(seed, N, H, W, C).astype(np.float32), randn(seed + 1, *kernel, C, K).astype(np.float32)
    dy32 = randn(seed + 2, *ref.conv2d(x, w, None, stride, pads).shape).astype(np.float32)
    tx, tw = tensor(x), torch.from_numpy(w.astype(np.float64).transpose(3, 2, 0, 1).copy()).requires_grad_()
    torch_conv(tx, tw, None, stride, pads).backward(to_nchw(dy32, np.float64))
    for params in (True, False):
        dx, dw, db = cpu.conv2d_vjp(dy32, x, gemm.pack_weights(w) if params else w, stride, pads, params=params)
        assert_float32_close(dx, to_nhwc(tx.grad))
        if params:
            assert_float32_close(dw, tw.grad.numpy().transpose(2, 3, 1, 0))
            assert_float32_close(db, dy32.astype(np.float64).sum(axis=(0, 1, 2)))
        else:
            assert dw is None and db is None


@SETTINGS
@given(conv_geometry(), seeds, st.integers(0, 3))
def test_cpu_conv2d_vjp_gives_an_image_the_same_input_gradient_alone_and_in_a_batch(geometry, seed, i):
    N, H, W, C, K, kernel, stride, pads = geometry
    i = i % N
    x = randn(seed, N, H, W, C).astype(np.float32)
    w = randn(seed + 1, *kernel, C, K).astype(np.float32)
    dy = randn(seed + 2, *ref.conv2d(x, w, None, stride, pads).shape).astype(np.float32)
    batch = cpu.conv2d_vjp(dy, x, w, stride, pads, params=False)[0]
    alone = cpu.conv2d_vjp(dy[i : i + 1], x[i : i + 1], w, stride, pads, params=False)[0]
    assert np.array_equal(batch[i : i + 1], alone)


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 70), st.integers(1, 40), seeds)
def test_cpu_linear_vjp_is_torch_autograds_within_float32(N, I, O, seed):
    x, w, dy = (randn(seed + i, *shape).astype(np.float32) for i, shape in enumerate([(N, I), (I, O), (N, O)]))
    tx, tw = (torch.from_numpy(a.astype(np.float64)).requires_grad_() for a in (x, w))
    (tx @ tw).backward(torch.from_numpy(dy.astype(np.float64)))
    dx, dw, db = cpu.linear_vjp(dy, x, gemm.pack_weights(w))
    assert_float32_close(dx, tx.grad.numpy())
    assert_float32_close(dw, tw.grad.numpy())
    assert_float32_close(db, dy.astype(np.float64).sum(axis=0))


# --- whole networks, against torch autograd ----------------------------------------------


def torch_gradients(net, x, targets, tap, cotangent, keys, dtype, aux=None):
    """torch's answers in `dtype`: the input gradient of sum_n logits[n, targets[n]], the
    input gradient of <tap's output, cotangent>, and the logit sum's gradients of `keys`
    (checkpoint names), in pyincept's layout (HWIO convs, (in, out) linear weights).
    aux: the name of an aux head that reads `tap`; its logits are then the tapped output
    (torch runs aux heads only in training mode, so the test calls it on the tap)."""
    import copy

    net = copy.deepcopy(net).to(dtype).eval()
    captured = {}
    hook = net.get_submodule(tap).register_forward_hook(lambda m, i, o: captured.__setitem__("y", o))
    tx = to_nchw(x, np.float64).to(dtype).requires_grad_(True)
    try:
        logits = net(tx)
    finally:
        hook.remove()
    chosen = logits[torch.arange(len(x)), torch.as_tensor(targets)].sum()
    params = [net.get_parameter(key) for key in keys]
    dx_logit, *dparams = torch.autograd.grad(chosen, [tx, *params], retain_graph=True)
    tapped = net.get_submodule(aux)(captured["y"]) if aux else captured["y"]
    (dx_tap,) = torch.autograd.grad(tapped, tx, to_tensor(cotangent).to(dtype))

    def layout(g):
        g = g.double().numpy()
        return g.transpose(2, 3, 1, 0) if g.ndim == 4 else g.T if g.ndim == 2 else g

    return to_nhwc(dx_logit.double()), to_nhwc(dx_tap.double()), {k: layout(g) for k, g in zip(keys, dparams)}


def to_tensor(a):
    """NHWC -> NCHW for a map, as it is for a (N, K) output; float64."""
    return to_nchw(a, np.float64) if np.ndim(a) == 4 else torch.from_numpy(np.asarray(a, np.float64))


def errors(actual, expected):
    """(max |error| over max |expected|, 1 - cosine), against float64."""
    a, e = np.asarray(actual, np.float64).ravel(), np.asarray(expected, np.float64).ravel()
    return np.abs(a - e).max() / np.abs(e).max(), 1 - a @ e / (np.linalg.norm(a) * np.linalg.norm(e))


def assert_gradients_as_good_as_torch_float32(model, net, x, targets, tap, keys, aux=None):
    """pyincept's float32 gradients against torch's float64, beside torch's own float32
    ones: a float32 gradient jumps wherever a ReLU's input or a max pool's runner-up sits
    within rounding of the decision, so the bar is torch float32's own error, twice over
    (max norm and 1 - cosine).

    Those jumps are few (0 to 4 per layer on these photos), so one float32 run's error is
    a draw: for one Mixed_7c filter's gradient, torch's run had no flipped decision in its
    layer and pyincept's one, 9x apart. The bar is therefore torch float32's worst of three
    draws: x, and x nudged by one ulp up and down, which moves every rounding in the network
    while moving the float64 answer by far less than float32's own error."""
    tapped = aux or tap                                           # pyincept's name for the tapped output
    cotangent = np.random.default_rng(7).standard_normal(model.run(x, [tapped])[tapped].shape).astype(np.float32)
    exact = torch_gradients(net, x, targets, tap, cotangent, keys, torch.float64, aux)
    draws = [torch_gradients(net, nudged, targets, tap, cotangent, keys, torch.float32, aux)
             for nudged in (x, np.nextafter(x, np.inf), np.nextafter(x, -np.inf))]
    logit = np.zeros((len(x), model.num_classes), np.float32)
    logit[np.arange(len(x)), targets] = 1.0
    dx_logit, grads = model.vjp(x, {model.classifier: logit}, params=True)
    assert np.array_equal(dx_logit, model.grad(x, targets))
    dx_tap = model.vjp(x, {tapped: cotangent}, checkpoint="blocks")
    pairs = [("dx of the logits", dx_logit, [d[0] for d in draws], exact[0]),
             (f"dx of {tapped}", dx_tap, [d[1] for d in draws], exact[1])]
    pairs += [(key, grads[key], [d[2][key] for d in draws], exact[2][key]) for key in keys]
    for name, mine, torch32, torch64 in pairs:
        assert mine.shape == torch64.shape, name
        ours = errors(mine, torch64)
        bar = np.max([errors(draw, torch64) for draw in torch32], axis=0)
        assert ours[0] <= 2 * bar[0] and ours[1] <= 2 * bar[1], (name, ours, bar)


V3_KEYS = ["fc.weight", "fc.bias", "Mixed_7c.branch3x3dbl_2.conv.weight", "Mixed_7c.branch3x3dbl_2.bn.weight",
           "Mixed_7c.branch3x3dbl_2.bn.bias", "Conv2d_1a_3x3.conv.weight"]


@pytest.mark.parametrize("size", [(299, 299), (240, 320)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_inception_v3_gradients_are_as_good_as_torch_float32(tv_inception, converted, size):
    from photos import photo_batch

    import pyincept

    x = photo_batch(size)[: 2 if size == (299, 299) else 1]
    model = pyincept.load_model(converted["zip"])
    assert_gradients_as_good_as_torch_float32(model, tv_inception, x, [281, 17][: len(x)], "Mixed_6e", V3_KEYS)


def test_googlenet_gradients_are_as_good_as_torch_float32(tmp_path):
    from photos import photo_batch
    from test_googlenet import calibrated_googlenet

    import pyincept

    net = calibrated_googlenet()
    torch.save(net.state_dict(), tmp_path / "googlenet.pth")
    pyincept.convert_checkpoint(tmp_path / "googlenet.pth", tmp_path / "googlenet.npz")
    model = pyincept.load_model(tmp_path / "googlenet.npz")
    keys = ["fc.weight", "fc.bias", "inception5b.branch3.1.conv.weight", "inception5b.branch3.1.bn.weight",
            "conv1.conv.weight"]
    # All five photos: with two, four flipped ReLU decisions in the whole network against
    # torch's six decide the ratio of the logits' 1 - cosine (measured 3x one way at batch 2).
    x = photo_batch((224, 224))
    targets = [281, 17, 5, 400, 999]
    assert_gradients_as_good_as_torch_float32(model, net, x, targets, "inception4e.branch2.1", keys)   # inside a module
    assert_gradients_as_good_as_torch_float32(model, net, x, targets, "inception4d", [], aux="aux2")   # an aux head


def test_fid_network_gradients_are_as_good_as_torch_float32(fid_net, fid_file):
    from photos import photo_batch

    import pyincept

    x = photo_batch()[:2] * np.float32(0.45)
    model = pyincept.load_model(fid_file)
    assert_gradients_as_good_as_torch_float32(model, fid_net, x, [281, 17], "Mixed_6e", V3_KEYS)


# --- the network API: determinism, names and bad input -------------------------------------


@pytest.fixture(scope="module")
def small_v3():
    import pyincept

    return pyincept.inception_v3()                     # seeded random weights


def test_an_images_input_gradient_has_the_same_bits_alone_in_any_batch_at_any_thread_count(small_v3):
    from photos import photo_batch

    from pyincept.kernels import runtime

    x = photo_batch((107, 93))[:3]
    targets = [3, 500, 999]
    batch = small_v3.grad(x, targets)
    for i in range(3):
        assert np.array_equal(small_v3.grad(x[i : i + 1], targets[i]), batch[i : i + 1])
    assert np.array_equal(small_v3.grad(x, targets), batch)                          # every call
    assert np.array_equal(small_v3.vjp(x, {"fc": np.eye(1000, dtype=np.float32)[targets]}, checkpoint="blocks"), batch)
    before = runtime.get_num_threads()
    try:
        for threads in (1, 2, 3):
            runtime.set_num_threads(threads)
            assert np.array_equal(small_v3.grad(x, targets), batch), threads
    finally:
        runtime.set_num_threads(before)


def test_cotangents_at_aliases_inner_layers_and_softmax(small_v3):
    from photos import photo_batch

    x = photo_batch((80, 80))[:2]
    out = small_v3.run(x, ["Mixed_5b.branch_pool", "softmax", "fc"])
    g = np.random.default_rng(0).standard_normal(out["Mixed_5b.branch_pool"].shape).astype(np.float32)
    by_name = small_v3.vjp(x, {"Mixed_5b.branch_pool": g})
    assert np.array_equal(small_v3.vjp(x, {"mixed/tower_2/conv:0": g}), by_name)     # the TF graph's name
    assert np.abs(by_name).max() > 0
    # softmax's vjp composed with the logits' by hand is the cotangent at softmax. The
    # backward differentiates the direct convolutions, so the probabilities are those of a
    # model whose forward is direct too (im2col, unfused).
    import pyincept

    direct = pyincept.inception_v3(fuse=False, algorithm="im2col")
    p = direct.run(x, ["softmax"])["softmax"]
    dsoft = np.random.default_rng(1).standard_normal(p.shape).astype(np.float32)
    dlogits = p * (dsoft - (dsoft * p).sum(axis=1, keepdims=True))
    assert np.array_equal(direct.vjp(x, {"softmax": dsoft}), direct.vjp(x, {"fc": dlogits}))
    assert np.array_equal(direct.vjp(x, {"softmax": dsoft}), small_v3.vjp(x, {"softmax": dsoft}))   # knobs aside


def test_bad_cotangents_and_targets_are_refused_in_one_line(small_v3):
    from pyincept.errors import PyinceptError

    x = np.zeros((2, 80, 80, 3), np.float32)
    cases = [
        (lambda: small_v3.vjp(x, {"Mixed_5b": np.zeros((2, 9, 9, 256), np.float32)}),
         r"the cotangent for Mixed_5b is \(2, 9, 9, 256\); Mixed_5b's output is \(2, 7, 7, 256\)"),
        (lambda: small_v3.vjp(x, {"Mixed_5b.branch_pool": np.zeros((2, 7, 7, 31), np.float32)}),
         r"the cotangent for Mixed_5b.branch_pool is \(2, 7, 7, 31\); Mixed_5b.branch_pool's output is \(2, 7, 7, 32\)"),
        (lambda: small_v3.vjp(x, {"Mixed_9z": np.zeros((2, 4))}), r"unknown layer 'Mixed_9z'"),
        (lambda: small_v3.vjp(x, {"fc": np.zeros((3, 1000))}), r"one row per image \(2\)"),
        (lambda: small_v3.vjp(x, {}), r"non-empty"),
        (lambda: small_v3.vjp(x, {"fc": np.zeros((2, 1000))}, checkpoint="all"), r"checkpoint must be"),
        (lambda: small_v3.grad(x, 1000), r"target 1000 is out of range: fc has 1000 outputs"),
        (lambda: small_v3.grad(x, [1, 2, 3]), r"one index or one per image \(2\)"),
        (lambda: small_v3.grad(x, -1), r"target -1 is out of range"),
    ]
    for call, message in cases:
        with pytest.raises(PyinceptError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


def test_parameter_gradients_are_keyed_like_the_checkpoint_and_shaped_like_its_arrays(small_v3):
    x = np.random.default_rng(0).standard_normal((1, 80, 80, 3)).astype(np.float32)
    dx, grads = small_v3.vjp(x, {"fc": np.ones((1, 1000), np.float32)}, params=True)
    shapes = small_v3.parameter_shapes()
    trained = {k for k in shapes if not k.startswith("AuxLogits") and not k.endswith(("running_mean", "running_var"))}
    assert set(grads) == trained
    for key, g in grads.items():
        assert g.shape == shapes[key] and g.dtype == np.float32 and np.isfinite(g).all(), key
    assert dx.shape == x.shape and dx.dtype == np.float32


def test_a_backend_without_the_backward_kernels_says_so_in_one_line(small_v3, monkeypatch):
    import types

    from pyincept.errors import PyinceptError
    from pyincept.kernels import cuda

    assert "conv2d_vjp" in __import__("pyincept").kernels.missing_backward(cuda)
    monkeypatch.setattr(small_v3, "ops", types.SimpleNamespace(DEVICE="cuda"))
    with pytest.raises(PyinceptError, match=r"^the cuda backend has no backward pass \(it lacks conv2d_vjp, "):
        small_v3.grad(np.zeros((1, 80, 80, 3), np.float32), 0)


@SETTINGS
@given(pool_geometry(), seeds, st.sampled_from(["normal", "ties", "nan"]))
def test_cpu_pool_vjps_are_their_twins_bit_for_bit(geometry, seed, values):
    N, H, W, C, kernel, stride, pad, ceil_mode, count_include_pad = geometry
    x = randn(seed, N, H, W, C).astype(np.float32)
    if values == "ties":
        x = np.round(x)
    elif values == "nan":
        x[np.random.default_rng(seed + 1).random(x.shape) < 0.2] = np.nan
    dy = randn(seed + 2, *ref.max_pool2d(x, kernel, stride, pad, ceil_mode).shape).astype(np.float32)
    assert np.array_equal(cpu.max_pool2d_vjp(dy, x, kernel, stride, pad, ceil_mode),
                          ref.max_pool2d_vjp(dy, x, kernel, stride, pad, ceil_mode))
    assert np.array_equal(cpu.avg_pool2d_vjp(dy, x, kernel, stride, pad, ceil_mode, count_include_pad),
                          ref.avg_pool2d_vjp(dy, x, kernel, stride, pad, ceil_mode, count_include_pad))


def test_max_pool_vjp_sends_a_windows_gradient_to_its_last_nan_as_torch_does():
    x = np.array([[1.0, np.nan, 3.0], [np.nan, 5.0, 0.0], [2.0, 2.0, np.nan]]).reshape(1, 3, 3, 1)
    tx = tensor(x)
    F.max_pool2d(tx, 2, 1).backward(torch.ones(1, 1, 2, 2, dtype=torch.float64))
    expected = to_nhwc(tx.grad)
    assert np.array_equal(ref.max_pool2d_vjp(np.ones((1, 2, 2, 1)), x, 2, 1), expected)
    assert np.array_equal(cpu.max_pool2d_vjp(np.ones((1, 2, 2, 1), np.float32), x.astype(np.float32), 2, 1),
                          expected.astype(np.float32))
