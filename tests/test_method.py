"""The identities of docs/method.md, checked on the per-layer math in float64."""
import pytest
import torch

from prolora.errors import OptionError
from prolora.method import KMode, RankSpec, compress, factor_svd, similarity, transfer_layer
from prolora.ops import phi, phi_null, principal_cosines, project_lora, truncated_svd

ref_svd = truncated_svd.reference.fn
ref_project = project_lora.reference.fn
ref_cos = principal_cosines


def weight(m, n, seed, decay=0.01):
    """A weight with a slowly decaying spectrum, like trained layers."""
    g = torch.Generator().manual_seed(seed)
    d = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, d, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    s = torch.exp(-decay * torch.arange(d, dtype=torch.float64)) + 0.05
    return (U * s) @ V.T


def lora(m, n, r, seed):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64)


def dense(method, dW, Us, Vs, Ut, Vt):
    """The dense formulas of docs/method.md, with explicit projectors."""
    m, n = dW.shape
    PUs, PVs, PUt, PVt = Us @ Us.T, Vs @ Vs.T, Ut @ Ut.T, Vt @ Vt.T
    QUs, QVs, QUt, QVt = (torch.eye(m, dtype=dW.dtype) - PUs, torch.eye(n, dtype=dW.dtype) - PVs,
                          torch.eye(m, dtype=dW.dtype) - PUt, torch.eye(n, dtype=dW.dtype) - PVt)
    par, perp = PUs @ dW @ PVs, QUs @ dW @ QVs
    if method == "prolora":
        return PUt @ par @ PVt + QUt @ perp @ QVt
    if method == "prolora-full":
        return (PUt @ PUs + QUt @ QUs) @ dW @ (PVs @ PVt + QVs @ QVt)
    if method == "subspace":
        return PUt @ par @ PVt
    return dW


def rel(a, b):
    return float((a - b).norm() / b.norm())


SHAPES = [(24, 24), (40, 16), (16, 40)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["prolora", "prolora-full", "subspace"])
def test_low_rank_equals_dense(shape, method):
    """Identity 4: the factored output multiplied out equals the dense formula to 1e-10."""
    m, n = shape
    Ws, Wt = weight(m, n, 0), weight(m, n, 0) + 0.05 * weight(m, n, 1)
    B, A = lora(m, n, 4, 0)
    k = min(m, n) // 2
    s, t = ref_svd(Ws, k), ref_svd(Wt, k)
    up, down = ref_project(B, A, s.U, s.V, t.U, t.V, method)
    assert rel(up @ down, dense(method, B @ A, s.U, s.V, t.U, t.V)) < 1e-10
    assert up.shape[1] <= (2 * 4 if method == "prolora" else 4)  # identity 5: rank <= 2r (r)


@pytest.mark.parametrize("shape", SHAPES)
def test_same_model_identities(shape):
    """Identity 1: target == source."""
    m, n = shape
    W = weight(m, n, 3)
    B, A = lora(m, n, 4, 3)
    dW = B @ A
    for k in (1, min(m, n) // 3, min(m, n) // 2, min(m, n)):
        b = ref_svd(W, k)
        P, Q = b.U @ b.U.T, b.V @ b.V.T
        up, down = ref_project(B, A, b.U, b.V, b.U, b.V, "prolora-full")
        assert rel(up @ down, dW) < 1e-12  # exact for every k
        up, down = ref_project(B, A, b.U, b.V, b.U, b.V, "prolora")
        Im, In = torch.eye(m, dtype=dW.dtype), torch.eye(n, dtype=dW.dtype)
        two_term = P @ dW @ Q + (Im - P) @ dW @ (In - Q)
        assert rel(up @ down, two_term) < 1e-12
        if k == min(m, n) and m == n:
            assert rel(up @ down, dW) < 1e-12


def test_prolora_two_term_is_lossy_for_unrelated_directions():
    """The published two-term form drops the cross terms: about half the energy at k = d/2."""
    m = n = 64
    W = weight(m, n, 5)
    B, A = lora(m, n, 8, 5)
    b = ref_svd(W, 32)
    up, down = ref_project(B, A, b.U, b.V, b.U, b.V, "prolora")
    kept = float((up @ down).norm() ** 2 / (B @ A).norm() ** 2)
    assert 0.3 < kept < 0.7


def test_copy_returns_input_objects():
    """Identity 3: copy returns dW_s unchanged (the very tensors)."""
    B, A = lora(8, 6, 2, 0)
    up, down = ref_project(B, A, None, None, None, None, "copy")
    assert up is B and down is A


@pytest.mark.parametrize("shape", SHAPES)
def test_phi_self_and_invariance(shape):
    """Identity 2: phi(W, W) = 1 on both sides; invariant to sign flips and rotations."""
    m, n = shape
    W = weight(m, n, 7)
    k = min(m, n) // 2
    b = ref_svd(W, k)
    assert phi(b.U, b.U) == pytest.approx(1.0, abs=1e-12)
    assert phi(b.V, b.V) == pytest.approx(1.0, abs=1e-12)
    g = torch.Generator().manual_seed(1)
    R, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    signs = torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    other = ref_svd(W + 0.1 * weight(m, n, 8), k)
    base = phi(b.U, other.U)
    assert phi(b.U @ R, other.U * signs) == pytest.approx(base, abs=1e-12)
    assert 0.0 <= base <= 1.0
    # phi is the mean squared principal cosine
    cos = ref_cos(b.U, other.U)
    assert float((cos ** 2).mean()) == pytest.approx(base, abs=1e-12)


def test_null_space_similarity_matches_explicit_complements():
    m, n, k = 30, 20, 8
    Ws, Wt = weight(m, n, 11), weight(m, n, 12)
    Fs, Ft = ref_svd(Ws), ref_svd(Wt)  # all min(m, n) = 20 vectors
    Us_full = torch.linalg.svd(Ws, full_matrices=True)[0]
    Ut_full = torch.linalg.svd(Wt, full_matrices=True)[0]
    p = phi(Fs.U[:, :k], Ft.U[:, :k])
    explicit = float((Us_full[:, k:].T @ Ut_full[:, k:]).norm() ** 2 / (m - k))
    assert phi_null(p, m, k) == pytest.approx(explicit, abs=1e-10)
    sims = similarity(Fs.truncate(k), Ft.truncate(k), (m, n)).sims
    assert sims["phi_left"] == pytest.approx(p, abs=1e-12)
    Vs_full, Vt_full = torch.linalg.svd(Ws)[2].T, torch.linalg.svd(Wt)[2].T
    explicit_r = float((Vs_full[:, k:].T @ Vt_full[:, k:]).norm() ** 2 / (n - k))
    assert sims["phi_null_right"] == pytest.approx(explicit_r, abs=1e-10)
    assert phi_null(1.0, 10, 10) is None


def test_compress_is_best_rank_r_and_reports_energy():
    """Identity 5: compression keeps the top r' triplets of the exact product; energy in [0, 1]."""
    B, A = lora(40, 30, 8, 2)
    exact = B @ A
    for r in (1, 3, 8):
        up, down, kept = compress(B, A, r)
        S = torch.linalg.svdvals(exact)
        best = (S[r:] ** 2).sum().sqrt()
        assert float((up @ down - exact).norm()) == pytest.approx(float(best), rel=1e-9, abs=1e-9)
        assert kept == pytest.approx(float((S[:r] ** 2).sum() / (S ** 2).sum()), rel=1e-12)
        assert 0.0 <= kept <= 1.0
        # balanced factors: equal column/row norms
        assert torch.allclose(up.norm(dim=0), down.norm(dim=1), rtol=1e-9)
    _, _, kept = compress(torch.zeros(5, 2, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64), 1)
    assert kept == 1.0


def test_transfer_layer_gate_and_compression():
    m, n, r = 32, 24, 4
    Ws = weight(m, n, 20)
    B, A = lora(m, n, r, 20)
    k = 12
    s = ref_svd(Ws, k)
    same = transfer_layer(B, A, s, s, method="prolora", tau=0.8, rank=RankSpec.parse("2r"), r_in=r)
    assert same.record.transferred and same.record.phi_left == pytest.approx(1.0) and same.up.shape[1] == 2 * r
    squeezed = transfer_layer(B, A, s, s, method="prolora", tau=0.8, rank=RankSpec.parse("same"), r_in=r)
    assert squeezed.up.shape[1] == r and 0.0 <= squeezed.record.retained_energy <= 1.0
    unrelated = ref_svd(weight(m, n, 99), k)
    gated = transfer_layer(B, A, s, unrelated, method="prolora-full", tau=0.8, rank=RankSpec.parse("same"), r_in=r)
    assert not gated.record.transferred and gated.up is None and "< tau" in gated.record.reason
    assert min(gated.record.phi_left, gated.record.phi_right) < 0.8


def test_kmode_parse_and_choose():
    S = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert KMode.parse("energy:0.7").choose(4, S) == 1
    assert KMode.parse("energy:0.9").choose(4, S) == 2
    assert KMode.parse("energy:1.0").choose(4, S) == 4
    assert KMode.parse("ratio:0.25").choose(1280) == 320
    assert KMode.parse("ratio:0.0001").choose(10) == 1
    assert KMode.parse("rank:320").choose(100) == 100
    assert str(KMode.parse("rank:320")) == "rank:320" and str(KMode.parse("energy:0.9")) == "energy:0.9"
    for bad in ("energy", "energy:1.5", "ratio:0", "rank:0", "rank:2.5", "top:3", "energy:x"):
        with pytest.raises(OptionError):
            KMode.parse(bad)


def test_rank_spec():
    assert RankSpec.parse("same").target(8, 16) == 8
    assert RankSpec.parse("2r").target(8, 16) == 16
    assert RankSpec.parse("4").target(8, 16) == 4
    assert RankSpec.parse(32).target(8, 16) == 16
    for bad in ("0", "-1", "r", "1.5"):
        with pytest.raises(OptionError):
            RankSpec.parse(bad)


def test_factor_svd_is_the_svd_of_the_product():
    g = torch.Generator().manual_seed(4)
    up, down = torch.randn(200, 12, generator=g, dtype=torch.float64), torch.randn(12, 150, generator=g, dtype=torch.float64)
    f = factor_svd(up, down)
    D = up @ down
    assert rel((f.U * f.S) @ f.V.T, D) < 1e-12
    assert rel(f.S, torch.linalg.svdvals(D)[:12]) < 1e-12
