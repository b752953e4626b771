// Jacobi SVD and symmetric eigensolver for one small dense matrix, written once for the CPU and
// CUDA launchers (see team.h for how a problem is split among lanes).
//
// Both solvers copy the input (any strides) into a caller-provided workspace, scale it by an
// exact power of two so that squares neither overflow nor underflow, iterate there, and write
// results sorted in descending order to caller-provided outputs (any strides). They allocate
// nothing. Accumulation is in T itself. Pairs are visited in round-robin order: each round
// holds floor(n/2) disjoint pairs that the team's groups rotate concurrently (on one lane the
// order is simply cyclic), so the result does not depend on how many groups the team has.
#pragma once

#include "hd.h"

namespace prolora {

// ---- workspace sizes and defaults ----------------------------------------------------------

// Elements of T svd_jacobi needs for an m x n problem.
PROLORA_HD inline int64_t svd_work_elems(int m, int n) {
  const int64_t rows = m > n ? m : n, cols = m > n ? n : m;
  return rows * cols + cols * cols + cols + rows;
}

// Leading dimension of the working copy in eigh_jacobi: odd, so that a warp walking a row of
// a column-major matrix in shared memory hits distinct banks.
PROLORA_HD inline int eigh_ld(int n) { return n | 1; }

// Elements of T eigh_jacobi needs for an n x n problem.
PROLORA_HD inline int64_t eigh_work_elems(int n) {
  return int64_t(eigh_ld(n)) * n + int64_t(n) * n + 2 * (n + 1);
}

// Default relative threshold: a pair is rotated while |cos| of the angle between two working
// columns (SVD) or |a_pq| / sqrt(|a_pp a_qq|) (eigh) exceeds it. The final orthogonality is
// proportional to it; 2 eps still converges (measured to 2048 rows and 300 columns, float and
// double) and leaves ||U^T U - I|| at or below LAPACK's.
template <class T>
PROLORA_HD inline T default_tol() {
  return 2 * Limits<T>::eps();
}

// ---- building blocks -----------------------------------------------------------------------

// Element pair k (0 <= k < ne/2) of round `round` (0 <= round < ne-1) of the round-robin
// schedule for ne (even) elements: element 0 stays, the others rotate through positions
// 1..ne-1, position i is paired with position ne-1-i. Returns p < q.
PROLORA_HD inline void round_robin_pair(int ne, int round, int k, int& p, int& q) {
  const int m = ne - 1;
  int i = k - 1 + round, j = ne - 2 - k + round;  // both in [-1, 2m): wrap without a division
  if (i >= m) i -= m;
  if (j >= m) j -= m;
  const int a = k == 0 ? 0 : 1 + i;
  const int b = 1 + j;
  p = a < b ? a : b;
  q = a < b ? b : a;
}

// The Jacobi rotation J = [c s; -s c] that diagonalizes the symmetric 2x2 matrix
// [alpha gamma; gamma beta] as J^T [.] J (gamma != 0): the smaller of the two angles, t = s / c
// in [-1, 1], computed without overflow for any ratio. rotate() takes s and tau = s / (1 + c)
// rather than c, which rounds to 1 for small angles: (c, s) = (1, t) would stretch vectors by
// sqrt(1 + t^2) each time, a drift that adds up over thousands of rotations.
template <class T>
struct Rotation {
  T t, s, tau;
};

template <class T>
PROLORA_HD inline Rotation<T> jacobi_rotation(T alpha, T beta, T gamma) {
  const T zeta = (beta - alpha) / (2 * gamma);
  const T az = hd_abs(zeta);
  T t;
  if (az > 1) {
    const T inv = 1 / az;
    t = inv / (1 + hd_sqrt(1 + inv * inv));
  } else {
    t = 1 / (az + hd_sqrt(1 + az * az));
  }
  if (zeta < 0) t = -t;
  const T c = 1 / hd_sqrt(1 + t * t);
  const T s = c * t;
  return {t, s, s / (1 + c)};
}

// alpha = x.x, beta = y.y, gamma = x.y over len contiguous elements, summed over the group.
template <class T, class Team>
PROLORA_HD inline void dot3(const Team& team, const T* x, const T* y, int len, T& alpha, T& beta,
                            T& gamma) {
  const int r0 = team.lane(), dr = team.width();
  T a = 0, b = 0, g = 0;
#if PROLORA_HOST_SIMD
#pragma omp simd reduction(+ : a, b, g)
#endif
  for (int r = r0; r < len; r += dr) {
    const T xr = x[r], yr = y[r];
    a += xr * xr;
    b += yr * yr;
    g += xr * yr;
  }
  alpha = team.group_sum(a);
  beta = team.group_sum(b);
  gamma = team.group_sum(g);
}

// x.y over len contiguous elements, summed over the group.
template <class T, class Team>
PROLORA_HD inline T dot(const Team& team, const T* x, const T* y, int len) {
  const int r0 = team.lane(), dr = team.width();
  T acc = 0;
#if PROLORA_HOST_SIMD
#pragma omp simd reduction(+ : acc)
#endif
  for (int r = r0; r < len; r += dr) acc += x[r] * y[r];
  return team.group_sum(acc);
}

// One rotation of a pair of coordinates from jacobi_rotation's (s, tau):
// (x, y) <- (c x - s y, s x + c y) written as corrections to x and y, so that a small angle
// changes them only by small, unbiased amounts.
template <class T>
PROLORA_HD inline void rotate2(T& x, T& y, T s, T tau) {
  const T xr = x, yr = y;
  x = xr - s * (yr + tau * xr);
  y = yr + s * (xr - tau * yr);
}

// rotate2 on len contiguous pairs (x[r], y[r]).
template <class T, class Team>
PROLORA_HD inline void rotate(const Team& team, T* x, T* y, int len, T s, T tau) {
  const int r0 = team.lane(), dr = team.width();
#if PROLORA_HOST_SIMD
#pragma omp simd
#endif
  for (int r = r0; r < len; r += dr) rotate2(x[r], y[r], s, tau);
}

// Position of key j when keys[0..n) are sorted in descending order: NaN first, ties by index.
// A permutation of 0..n-1 whatever the keys hold.
template <class T>
PROLORA_HD inline int descending_rank(const T* keys, int n, int j) {
  const T kj = keys[j];
  int rank = 0;
  for (int i = 0; i < n; ++i) {
    const T ki = keys[i];
    const bool before = hd_isnan(ki) ? (!hd_isnan(kj) || i < j)
                                     : (!hd_isnan(kj) && (ki > kj || (ki == kj && i < j)));
    rank += before;
  }
  return rank;
}

// Power of two that brings the largest magnitude amax into [0.5, 1); 1 for zero or non-finite.
template <class T>
PROLORA_HD inline T pow2_scale(T amax) {
  if (!(amax > 0) || !hd_isfinite(amax)) return T(1);
  int e = 0;
  hd_frexp(amax, &e);
  return hd_ldexp(T(1), -e);
}

// Replaces the (zero) column j of the rows x cols column-major W, whose other columns are
// orthonormal or zero, by a unit vector orthogonal to all of them: the unit vector e_r that
// the columns cover least, orthogonalized twice (modified Gram-Schmidt). Run by one group;
// tmp holds rows elements. Needs rows >= cols.
template <class T, class Team>
PROLORA_HD inline void complete_column(const Team& team, T* W, int rows, int cols, int j, T* tmp) {
  const int r0 = team.lane(), dr = team.width();
  for (int r = r0; r < rows; r += dr) {
    T covered = 0;
    for (int k = 0; k < cols; ++k) covered += W[int64_t(k) * rows + r] * W[int64_t(k) * rows + r];
    tmp[r] = 1 - covered;
  }
  team.group_sync();
  int best = 0;
  for (int r = 1; r < rows; ++r)
    if (tmp[r] > tmp[best]) best = r;
  T* x = W + int64_t(j) * rows;
  for (int r = r0; r < rows; r += dr) x[r] = T(r == best);
  for (int pass = 0; pass < 2; ++pass) {
    for (int k = 0; k < cols; ++k) {
      if (k == j) continue;
      const T* w = W + int64_t(k) * rows;
      const T d = dot(team, w, x, rows);
      for (int r = r0; r < rows; r += dr) x[r] -= d * w[r];
    }
  }
  const T inv = 1 / hd_sqrt(dot(team, x, x, rows));
  for (int r = r0; r < rows; r += dr) x[r] *= inv;
  team.group_sync();
}

// ---- one-sided Jacobi SVD (Hestenes) -------------------------------------------------------

// Thin SVD A = U diag(S) V^T of the m x n matrix a: U is m x k, S has k values in descending
// order, V is n x k, k = min(m, n). A wide matrix is factored as its transpose (tall) with the
// roles of U and V swapped. U and V are orthonormal also for rank-deficient input: left
// vectors of (numerically) zero singular values are completed to an orthonormal set.
// work: svd_work_elems(m, n) elements. tol <= 0 selects default_tol. Returns the number of
// sweeps used (the last one rotated nothing), or -1 when max_sweeps did not reach convergence
// (the outputs then hold the current, less accurate, factorization).
template <class T, class Team>
PROLORA_HD int svd_jacobi(const Team& team, View<const T> a, int m, int n, View<T> u, T* s,
                          int64_t s_stride, View<T> v, T* work, int max_sweeps, T tol) {
  const bool wide = m < n;
  const int rows = wide ? n : m, cols = wide ? m : n;
  if (cols == 0) return 0;
  const View<const T> at = wide ? a.transposed() : a;  // rows x cols
  const View<T> uo = wide ? v : u;                     // left vectors of the tall problem
  const View<T> vo = wide ? u : v;                     // its right vectors
  if (!(tol > 0)) tol = default_tol<T>();

  T* W = work;                              // rows x cols, column-major: the working columns
  T* V = W + int64_t(rows) * cols;          // cols x cols, column-major: accumulated rotations
  T* norms = V + int64_t(cols) * cols;      // cols
  T* tmp = norms + cols;                    // rows
  const int64_t wsize = int64_t(rows) * cols, vsize = int64_t(cols) * cols;

  T amax = 0;
  for (int64_t i = team.rank(); i < wsize; i += team.size()) {
    const T x = at(i % rows, i / rows);
    W[i] = x;
    amax = hd_max(amax, hd_abs(x));
  }
  const T scale = pow2_scale(team.block_max(amax));
  for (int64_t i = team.rank(); i < wsize; i += team.size()) W[i] *= scale;
  for (int64_t i = team.rank(); i < vsize; i += team.size()) V[i] = T(i % cols == i / cols);
  team.sync();

  const int ne = cols + (cols & 1), npairs = ne / 2;
  int sweeps = -1;
  for (int sweep = 0; sweep < max_sweeps; ++sweep) {
    bool rotated = false;
    for (int round = 0; round < ne - 1; ++round) {
      for (int k = team.group(); k < npairs; k += team.groups()) {
        int p, q;
        round_robin_pair(ne, round, k, p, q);
        if (q >= cols) continue;  // the padding element of an odd count
        T* x = W + int64_t(p) * rows;
        T* y = W + int64_t(q) * rows;
        T alpha, beta, gamma;
        dot3(team, x, y, rows, alpha, beta, gamma);
        const T ag = hd_abs(gamma);
        if (!(ag > tol * hd_sqrt(alpha) * hd_sqrt(beta)) || ag < Limits<T>::min_normal()) continue;
        rotated = true;
        const Rotation<T> jac = jacobi_rotation(alpha, beta, gamma);
        rotate(team, x, y, rows, jac.s, jac.tau);
        rotate(team, V + int64_t(p) * cols, V + int64_t(q) * cols, cols, jac.s, jac.tau);
      }
      team.sync();
    }
    if (!team.block_any(rotated)) {
      sweeps = sweep + 1;
      break;
    }
  }

  // Singular values are the column norms; normalized columns are the left vectors.
  for (int j = team.group(); j < cols; j += team.groups()) {
    T* x = W + int64_t(j) * rows;
    const T nrm = hd_sqrt(dot(team, x, x, rows));
    const bool null = nrm < Limits<T>::tiny_norm();
    const T inv = null ? T(0) : 1 / nrm;
    for (int r = team.lane(); r < rows; r += team.width()) x[r] *= inv;
    if (team.lane() == 0) norms[j] = nrm;
  }
  team.sync();
  if (team.group() == 0) {
    for (int j = 0; j < cols; ++j)
      if (norms[j] < Limits<T>::tiny_norm()) complete_column(team, W, rows, cols, j, tmp);
  }
  team.sync();

  for (int j = team.group(); j < cols; j += team.groups()) {
    const int to = descending_rank(norms, cols, j);
    if (team.lane() == 0) s[to * s_stride] = norms[j] / scale;
    for (int r = team.lane(); r < rows; r += team.width()) uo(r, to) = W[int64_t(j) * rows + r];
    for (int r = team.lane(); r < cols; r += team.width()) vo(r, to) = V[int64_t(j) * cols + r];
  }
  return sweeps;
}

// ---- cyclic Jacobi symmetric eigensolver ---------------------------------------------------

// A = V diag(w) V^T for the symmetric n x n matrix a (only its lower triangle is read): w in
// descending order, V orthonormal. Each round applies its disjoint rotations J as J^T A J in
// two passes (rows, then columns), so the pairs of a round can run concurrently; the pair's
// diagonal entries take the exact update a_pp - t a_pq, a_qq + t a_pq, off-diagonal zero.
// work: eigh_work_elems(n) elements. tol <= 0 selects default_tol. Returns the number of sweeps
// used (the last one rotated nothing), or -1 when max_sweeps did not reach convergence.
template <class T, class Team>
PROLORA_HD int eigh_jacobi(const Team& team, View<const T> a, int n, T* w, int64_t w_stride,
                           View<T> v, T* work, int max_sweeps, T tol) {
  if (n == 0) return 0;
  if (!(tol > 0)) tol = default_tol<T>();
  const int ld = eigh_ld(n);
  T* A = work;                      // n x n, column-major with leading dimension ld
  T* V = A + int64_t(ld) * n;       // n x n, column-major: accumulated rotations
  T* rot = V + int64_t(n) * n;      // per pair of a round: s, tau, new a_pp, new a_qq
  const int64_t nn = int64_t(n) * n;

  T amax = 0;
  for (int64_t i = team.rank(); i < nn; i += team.size()) {
    const int r = int(i % n), c = int(i / n);
    const T x = r >= c ? a(r, c) : a(c, r);
    A[r + int64_t(c) * ld] = x;
    amax = hd_max(amax, hd_abs(x));
  }
  const T scale = pow2_scale(team.block_max(amax));
  for (int64_t i = team.rank(); i < nn; i += team.size()) {
    A[i % n + (i / n) * ld] *= scale;
    V[i] = T(i % n == i / n);
  }
  team.sync();

  const int ne = n + (n & 1), npairs = ne / 2;
  int sweeps = -1;
  for (int sweep = 0; sweep < max_sweeps; ++sweep) {
    bool rotated = false;
    for (int round = 0; round < ne - 1; ++round) {
      // Rows: each pair decides from its own 2x2 block, which only it modifies in this pass.
      for (int k = team.group(); k < npairs; k += team.groups()) {
        int p, q;
        round_robin_pair(ne, round, k, p, q);
        if (q >= n) continue;
        const T app = A[p + int64_t(p) * ld], aqq = A[q + int64_t(q) * ld];
        const T apq = A[p + int64_t(q) * ld];
        const T ag = hd_abs(apq);
        team.group_sync();  // every lane has read the block before any lane rotates it
        Rotation<T> jac{0, 0, 0};
        if (ag > tol * hd_sqrt(hd_abs(app)) * hd_sqrt(hd_abs(aqq)) && ag >= Limits<T>::min_normal()) {
          rotated = true;
          jac = jacobi_rotation(app, aqq, apq);
          for (int col = team.lane(); col < n; col += team.width())
            rotate2(A[p + int64_t(col) * ld], A[q + int64_t(col) * ld], jac.s, jac.tau);
        }
        if (team.lane() == 0) {
          T* r = rot + 4 * k;
          r[0] = jac.s;
          r[1] = jac.tau;
          r[2] = app - jac.t * apq;  // the new diagonal, more accurate than the rotated one
          r[3] = aqq + jac.t * apq;
        }
      }
      team.sync();
      // Columns of A and V, then the pair's off-diagonal entries, now rounding noise, are zeroed.
      for (int k = team.group(); k < npairs; k += team.groups()) {
        int p, q;
        round_robin_pair(ne, round, k, p, q);
        if (q >= n) continue;
        const T* r = rot + 4 * k;
        if (r[0] == 0) continue;
        rotate(team, A + int64_t(p) * ld, A + int64_t(q) * ld, n, r[0], r[1]);
        rotate(team, V + int64_t(p) * n, V + int64_t(q) * n, n, r[0], r[1]);
        team.group_sync();
        if (team.lane() == 0) {
          A[p + int64_t(q) * ld] = A[q + int64_t(p) * ld] = 0;
          A[p + int64_t(p) * ld] = r[2];
          A[q + int64_t(q) * ld] = r[3];
        }
      }
      team.sync();
    }
    if (!team.block_any(rotated)) {
      sweeps = sweep + 1;
      break;
    }
  }

  // Eigenvalues as Rayleigh quotients v^T A v with the input (scaled as the working copy): the
  // working diagonal has absorbed the rounding of every rotation, the quotient only that of
  // one product and the square of V's error.
  T* diag = rot;  // the pair slots are free now
  for (int j = team.group(); j < n; j += team.groups()) {
    const T* vj = V + int64_t(j) * n;
    T acc = 0;
    for (int r = team.lane(); r < n; r += team.width()) {
      T y = 0;
      for (int c = 0; c <= r; ++c) y += a(r, c) * scale * vj[c];
      for (int c = r + 1; c < n; ++c) y += a(c, r) * scale * vj[c];
      acc += vj[r] * y;
    }
    acc = team.group_sum(acc);
    if (team.lane() == 0) diag[j] = acc;
  }
  team.sync();
  for (int j = team.group(); j < n; j += team.groups()) {
    const int to = descending_rank(diag, n, j);
    if (team.lane() == 0) w[to * w_stride] = diag[j] / scale;
    for (int r = team.lane(); r < n; r += team.width()) v(r, to) = V[r + int64_t(j) * n];
  }
  return sweeps;
}

}  // namespace prolora
