"""Numerical core of the quantization family: k-means, binarization, IMP, packing."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.optimize import minimize, minimize_scalar

from tshrink_plugins.quant.binarize import BSFlex, SignResult, binarize_fixed, binarize_sign
from tshrink_plugins.quant.kmeans import (
    KMeansResult,
    centroid_gradient_step,
    codebook_gradient,
    kmeans_quantize,
)
from tshrink_plugins.quant.packing import bits_per_weight, pack, pack_bits, unpack, unpack_bits
from tshrink_plugins.quant.unstructured import (
    IMPConfig,
    imp_schedule,
    iterative_magnitude_prune,
    magnitude_mask,
)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def groups_of(W: torch.Tensor, G: int) -> torch.Tensor:
    return W.reshape(G, -1)


# ---------------------------------------------------------------- k-means


@pytest.mark.parametrize("granularity,bits", [("layer", 2), ("layer", 3), ("row", 2), ("row", 3)])
def test_kmeans_converged_centroids_are_cluster_means_and_assignment_is_nearest(granularity, bits):
    W = randn(6, 40)
    r = kmeans_quantize(W, bits, granularity=granularity, iters=1000)
    assert r.converged
    G = r.codebook.shape[0]
    X, idx = groups_of(W, G), groups_of(r.indices, G).long()
    for g in range(G):
        for j in range(2**bits):
            members = X[g][idx[g] == j]
            if members.numel():
                torch.testing.assert_close(r.codebook[g, j], members.mean(), rtol=0, atol=1e-6)
    # every weight sits at its nearest centroid (brute force over the whole codebook)
    dist = (X[:, :, None] - r.codebook[:, None, :]).abs()  # (G, N, K)
    own = torch.gather(dist, 2, idx[:, :, None]).squeeze(2)
    assert (own <= dist.min(dim=2).values + 1e-6).all()


@pytest.mark.parametrize(
    "granularity,group_size,groups", [("layer", None, 1), ("row", None, 8), ("group", 8, 32)]
)
def test_kmeans_codebook_shape_and_at_most_2_pow_bits_values_per_group(granularity, group_size, groups):
    W = randn(8, 32, seed=1)
    for bits in (1, 2, 3):
        r = kmeans_quantize(W, bits, granularity=granularity, group_size=group_size)
        assert r.codebook.shape == (groups, 2**bits)
        assert r.indices.shape == W.shape and r.indices.dtype == torch.uint8
        Q = groups_of(r.dequantize(), groups)
        assert max(row.unique().numel() for row in Q) <= 2**bits


def test_kmeans_error_falls_as_bits_rise():
    W = randn(32, 64, seed=2)
    errors = [((kmeans_quantize(W, b).dequantize() - W) ** 2).mean().item() for b in range(1, 9)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors


def test_kmeans_empty_clusters_and_degenerate_groups():
    # 3 distinct values, 8 codes: empty clusters must be reseeded/harmless, reconstruction exact
    W = torch.tensor([[0.0, 1.0, 5.0, 5.0], [2.0, 2.0, 2.0, 2.0]])
    for granularity in ("layer", "row"):
        for init in ("linear", "quantile", "random"):
            r = kmeans_quantize(W, 3, granularity=granularity, init=init)
            assert torch.isfinite(r.codebook).all()
            torch.testing.assert_close(r.dequantize(), W, rtol=0, atol=0)
    # more codes than points: every weight becomes its own centroid
    W = randn(4, 16, seed=3)
    torch.testing.assert_close(kmeans_quantize(W, 5, granularity="row").dequantize(), W, rtol=0, atol=0)


def test_kmeans_is_deterministic_and_keeps_dtype():
    W = randn(16, 16, seed=4)
    for init in ("linear", "quantile", "random"):
        a, b = kmeans_quantize(W, 3, init=init), kmeans_quantize(W, 3, init=init)
        assert torch.equal(a.codebook, b.codebook) and torch.equal(a.indices, b.indices)
    r = kmeans_quantize(W.to(torch.bfloat16), 2)
    assert r.codebook.dtype == torch.bfloat16 and r.dequantize().dtype == torch.bfloat16


def test_codebook_gradient_is_scatter_add_and_matches_autograd():
    r = kmeans_quantize(randn(3, 10, seed=5), 2, granularity="row")
    grad_W = randn(3, 10, seed=6)
    # hand reference: loop over weights
    ref = torch.zeros_like(r.codebook)
    for g in range(3):
        for i in range(10):
            ref[g, int(r.indices[g, i])] += grad_W[g, i]
    torch.testing.assert_close(codebook_gradient(r.codebook, r.indices, grad_W), ref)
    # autograd through the dequantization
    cb = r.codebook.clone().requires_grad_(True)
    (KMeansResult(cb, r.indices).dequantize() * grad_W).sum().backward()
    torch.testing.assert_close(cb.grad, ref)
    stepped = centroid_gradient_step(r.codebook, r.indices, grad_W, lr=0.1)
    torch.testing.assert_close(stepped, r.codebook - 0.1 * ref)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=0), "bits"),
        (dict(bits=9), "bits"),
        (dict(bits=2.0), "bits"),
        (dict(bits=2, granularity="column"), "granularity"),
        (dict(bits=2, granularity="group", group_size=5), "group_size"),
        (dict(bits=2, granularity="row", group_size=4), "group_size"),
        (dict(bits=2, iters=-1), "iters"),
        (dict(bits=2, init="kmeans++"), "init"),
    ],
)
def test_kmeans_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kmeans_quantize(randn(4, 8), **kwargs)


# ---------------------------------------------------------------- binarization


def brute_force_two_level_sse(x: np.ndarray) -> float:
    """Best SSE over every split of x into two clusters with mean centroids."""
    best = float(((x - x.mean()) ** 2).sum())
    for labels in itertools.product((0, 1), repeat=len(x)):
        lab = np.array(labels, dtype=bool)
        if lab.all() or not lab.any():
            continue
        sse = ((x[lab] - x[lab].mean()) ** 2).sum() + ((x[~lab] - x[~lab].mean()) ** 2).sum()
        best = min(best, float(sse))
    return best


@pytest.mark.parametrize("group_size", [None, 4])
def test_binarize_fixed_is_the_optimal_two_level_quantizer(group_size):
    W = randn(3, 8, seed=7).double()
    r = binarize_fixed(W, group_size)
    G = 3 if group_size is None else 6
    X, Q, idx = groups_of(W, G).numpy(), groups_of(r.dequantize(), G).numpy(), groups_of(r.indices, G).numpy()
    for g in range(G):
        assert len(np.unique(Q[g])) == 2
        sse = float(((X[g] - Q[g]) ** 2).sum())
        assert sse == pytest.approx(brute_force_two_level_sse(X[g]), rel=1e-12, abs=1e-12)
        # for its assignment, the two values minimise the L2 error (scipy, independent of the closed form)
        lab = idx[g].astype(bool)
        res = minimize(lambda c: ((X[g] - np.where(lab, c[1], c[0])) ** 2).sum(), x0=[0.0, 0.0], tol=1e-12)
        np.testing.assert_allclose(r.codebook.numpy()[g], res.x, atol=1e-5)


@pytest.mark.parametrize("group_size", [None, 4])
def test_binarize_sign_scale_is_l2_optimal_for_the_sign_pattern(group_size):
    W = randn(3, 8, seed=8).double()
    W[0, 0] = 0.0  # sign(0) = +1
    r = binarize_sign(W, group_size)
    G = 3 if group_size is None else 6
    X, Q = groups_of(W, G).numpy(), groups_of(r.dequantize(), G).numpy()
    for g in range(G):
        b = np.where(X[g] >= 0, 1.0, -1.0)
        assert len(np.unique(Q[g])) == len(np.unique(b))  # two values unless the group has one sign
        res = minimize_scalar(lambda a: ((X[g] - a * b) ** 2).sum())
        assert r.scales[g].item() == pytest.approx(res.x, abs=1e-6)
        assert r.scales[g].item() == pytest.approx(np.abs(X[g]).mean(), rel=1e-12)
    # the free 2-level quantizer is at least as good as the symmetric one
    assert ((binarize_fixed(W, group_size).dequantize() - W) ** 2).sum() <= ((r.dequantize() - W) ** 2).sum()


def test_binarize_bad_group_size():
    with pytest.raises(ValueError, match="group_size"):
        binarize_fixed(randn(4, 8), group_size=3)
    with pytest.raises(ValueError, match="group_size"):
        binarize_sign(randn(4, 8), group_size=0)


def test_bsflex_forward_gradients_are_ste_and_scatter_add():
    W = randn(3, 8, seed=9)
    bs = BSFlex(W)
    fixed = binarize_fixed(W)
    torch.testing.assert_close(bs(), fixed.dequantize())  # starts at the optimal fixed binarization
    grad_Q = randn(3, 8, seed=10)
    (bs() * grad_Q).sum().backward()
    torch.testing.assert_close(bs.latent.grad, grad_Q)  # straight-through
    torch.testing.assert_close(bs.centroids.grad, codebook_gradient(bs.centroids.detach(), fixed.indices, grad_Q))


def test_bsflex_assignments_move_during_recovery_but_fixed_ones_cannot():
    """Toy recovery: the target needs 4 weights per row in the other cluster."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(4, 16, generator=gen)
    fixed = binarize_fixed(W)
    idx0 = fixed.indices.long()
    flip = torch.zeros_like(idx0, dtype=torch.bool)
    flip[:, :4] = True
    T = torch.gather(fixed.codebook, 1, torch.where(flip, 1 - idx0, idx0))  # (4, 16) target weight
    X = torch.randn(64, 16, generator=gen)
    Y = X @ T.T

    def loss(Q: torch.Tensor) -> torch.Tensor:
        return ((X @ Q.T - Y) ** 2).sum(dim=1).mean()

    bs = BSFlex(W)
    opt = torch.optim.SGD(bs.parameters(), lr=0.03)
    codebook = fixed.codebook.clone()
    for _ in range(30):
        opt.zero_grad()
        loss(bs()).backward()
        opt.step()
        Q = KMeansResult(codebook, fixed.indices).dequantize().requires_grad_(True)
        loss(Q).backward()
        codebook = centroid_gradient_step(codebook, fixed.indices, Q.grad, lr=0.03)

    r = bs.result()
    assert torch.equal(r.indices.long() != idx0, flip)  # exactly the needed weights crossed clusters
    assert all(row.unique().numel() == 2 for row in r.dequantize())
    flex_loss = loss(r.dequantize()).item()
    fixed_loss = loss(KMeansResult(codebook, fixed.indices).dequantize()).item()
    assert flex_loss < 1e-2 < 10.0 < fixed_loss  # fixed assignments cannot fit the flipped target


# ---------------------------------------------------------------- packing


def test_pack_bits_hand_example_and_round_trip():
    # 1 -> bits (1,0), 2 -> (0,1), 3 -> (1,1): stream 100111 -> 1 + 8 + 16 + 32 = 57
    assert pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [57]
    assert pack_bits(torch.tensor([255, 0, 1]), 8).tolist() == [255, 0, 1]
    assert pack_bits(torch.tensor([True, False, True] * 3), 1).tolist() == [0b01101101, 0b1]
    gen = torch.Generator().manual_seed(11)
    for bits in range(1, 9):
        for n in (1, 7, 13, 64):
            v = torch.randint(0, 2**bits, (n,), generator=gen)
            packed = pack_bits(v, bits)
            assert packed.dtype == torch.uint8 and packed.numel() == -(-n * bits // 8)
            assert torch.equal(unpack_bits(packed, bits, n).long(), v)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 2, 5)


def results_to_pack():
    W = randn(6, 16, seed=12)
    pruned = W.clone()
    pruned[pruned.abs() < 0.8] = 0
    out = {f"kmeans{b}_{g}": kmeans_quantize(W, b, granularity=g) for b in range(1, 9) for g in ("layer", "row")}
    out["kmeans3_group"] = kmeans_quantize(W, 3, granularity="group", group_size=4)
    out["fixed"] = binarize_fixed(W, group_size=8)
    out["bsflex"] = BSFlex(W).result()
    out["sign"] = binarize_sign(W)
    out["sign_group"] = binarize_sign(W.half(), group_size=4)
    out["sparse"] = pruned
    return out


def test_pack_unpack_round_trip_is_exact_also_through_safetensors(tmp_path):
    results = results_to_pack()
    flat = {}
    for name, r in results.items():
        expected = r if isinstance(r, torch.Tensor) else r.dequantize()
        packed = pack(r)
        assert torch.equal(unpack(packed), expected), name
        flat.update({f"{name}.{k}": v for k, v in packed.items()})
    save_file(flat, str(tmp_path / "w.safetensors"))
    loaded = load_file(str(tmp_path / "w.safetensors"))
    for name, r in results.items():
        expected = r if isinstance(r, torch.Tensor) else r.dequantize()
        packed = {k.split(".", 1)[1]: v for k, v in loaded.items() if k.split(".", 1)[0] == name}
        got = unpack(packed)
        assert got.dtype == expected.dtype and torch.equal(got, expected), name


def test_packed_sizes_and_bits_per_weight():
    W = randn(16, 32, seed=13)  # 512 fp32 weights = 2048 bytes
    p = pack(kmeans_quantize(W, 4))
    assert p["indices"].numel() == W.numel() * 4 // 8 == 2048 // 8  # 4-bit indices: 1/8 of fp32
    assert p["codebook"].numel() * 4 == 64
    assert bits_per_weight(p) == (256 + 64) * 8 / 512  # = 5.0
    p = pack(kmeans_quantize(W, 3, granularity="row"))
    assert p["indices"].numel() == 192
    assert bits_per_weight(p) == (192 + 16 * 8 * 4) * 8 / 512
    p = pack(binarize_sign(W))
    assert bits_per_weight(p) == 1 + 16 * 32 / 512  # sign bits + one fp32 scale per row
    pruned = W.clone()
    pruned.view(-1)[::4] = 0  # 384 non-zeros
    p = pack(pruned)
    assert bits_per_weight(p) == 1 + 384 * 32 / 512


def test_unpack_bad_input():
    with pytest.raises(ValueError, match="unknown packed keys"):
        unpack({"codebook": torch.zeros(1, 4), "shape": torch.tensor([2])})
    p = pack(torch.tensor([1.0, 0.0, 2.0]))
    p["values"] = p["values"][:1]
    with pytest.raises(ValueError, match="non-zeros"):
        unpack(p)
    with pytest.raises(ValueError, match="pack accepts"):
        pack([1.0, 2.0])


# ---------------------------------------------------------------- unstructured IMP


def reference_mask(weights: dict[str, torch.Tensor], sparsity: float, previous=None) -> dict[str, torch.Tensor]:
    """Brute-force global mask: sort (pruned-before, |w|, name, flat index) tuples."""
    entries = []
    for name in sorted(weights):
        for i, w in enumerate(weights[name].flatten().tolist()):
            was_pruned = previous is not None and not bool(previous[name].flatten()[i])
            entries.append((0 if was_pruned else 1, abs(w), name, i))
    k = int(sparsity * len(entries) + 0.5)
    masks = {n: torch.ones(t.numel(), dtype=torch.bool) for n, t in weights.items()}
    for _, _, name, i in sorted(entries)[:k]:
        masks[name][i] = False
    return {n: m.reshape(weights[n].shape) for n, m in masks.items()}


def tied_weights(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # small integers: lots of exact ties in |w|
    return {
        "b.weight": torch.randint(-4, 5, (10, 7), generator=gen).float(),
        "a.weight": torch.randint(-4, 5, (13,), generator=gen).float(),
    }


@pytest.mark.parametrize("schedule,expected", [("30,50", [0.3, 0.5]), ("50,80", [0.5, 0.8])])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_imp_reaches_exact_sparsity_each_step_with_monotone_masks(schedule, expected, scope):
    weights = tied_weights(14)
    sizes = {n: t.numel() for n, t in weights.items()}
    seen = []

    def recover(step, sparsity, masks):
        # fine-tuning that touches every weight, pruned ones included
        for name, w in weights.items():
            w.add_(0.5 * randn(*w.shape, seed=100 + step) + 0.01)
        seen.append((step, sparsity, {n: m.clone() for n, m in masks.items()}))

    final = iterative_magnitude_prune(weights, IMPConfig(schedule=schedule, scope=scope), recover)
    assert [(s, sp) for s, sp, _ in seen] == list(enumerate(expected))
    for (_, sp, masks), prev in zip(seen, [None] + [m for _, _, m in seen]):
        if scope == "global":
            pruned = sum(int((~m).sum()) for m in masks.values())
            assert pruned == int(sp * sum(sizes.values()) + 0.5)
        else:
            for name, m in masks.items():
                assert int((~m).sum()) == int(sp * sizes[name] + 0.5)
        if prev is not None:
            assert all((masks[n] <= prev[n]).all() for n in masks)  # once pruned, stays pruned
    for name, w in weights.items():
        assert (w[~final[name]] == 0).all()  # recovery did not revive pruned weights


def test_magnitude_mask_matches_brute_force_tie_breaking():
    weights = tied_weights(15)
    m1 = magnitude_mask(weights, 0.3)
    ref1 = reference_mask(weights, 0.3)
    assert all(torch.equal(m1[n], ref1[n]) for n in weights)
    # with previous masks and weights that regrew: old prunes stay, the rest by |w|
    regrown = {n: w + 0.25 * randn(*w.shape, seed=16) for n, w in weights.items()}
    m2 = magnitude_mask(regrown, 0.6, previous=m1)
    ref2 = reference_mask(regrown, 0.6, previous=m1)
    assert all(torch.equal(m2[n], ref2[n]) for n in weights)
    # layer scope == global scope on each tensor alone
    ml = magnitude_mask(weights, 0.45, scope="layer")
    for n, w in weights.items():
        assert torch.equal(ml[n], reference_mask({n: w}, 0.45)[n])


def test_imp_schedule_parsing():
    assert imp_schedule("30,50") == [0.3, 0.5]
    assert imp_schedule(" 0.3, 0.5 ") == [0.3, 0.5]
    assert imp_schedule("30%,50%") == [0.3, 0.5]
    assert imp_schedule("50,80,90") == [0.5, 0.8, 0.9]
    assert imp_schedule("0.5%") == [0.005]


@pytest.mark.parametrize(
    "spec,match",
    [
        ("", "non-empty"),
        ("30,abc", "not a number"),
        ("50,30", "increasing"),
        ("30,30", "increasing"),
        ("0.5,30", "mixes"),
        ("30%,50", "some entries"),
        ("100", r"outside \[0, 1\)"),
        ("-10,20", r"must lie in \[0, 1\)"),
        ("nan", "finite"),
    ],
)
def test_imp_schedule_bad_strings(spec, match):
    with pytest.raises(ValueError, match=match):
        imp_schedule(spec)


def test_magnitude_mask_bad_input():
    w = {"w": randn(4, 4)}
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="sparsity"):
            magnitude_mask(w, bad)
    with pytest.raises(ValueError, match="scope"):
        magnitude_mask(w, 0.5, scope="row")
    with pytest.raises(ValueError, match="already pruned"):
        magnitude_mask(w, 0.2, previous=magnitude_mask(w, 0.5))


def test_sign_result_validation():
    with pytest.raises(ValueError, match="bool"):
        SignResult(signs=torch.ones(4), scales=torch.ones(2))
