// Checks the CUDA launcher's schedule without a GPU: runs the shared math (jacobi.h) on an
// emulated thread block, one std::thread per lane with real barriers, and compares it with the
// serial CPU run. Built with -fsanitize=thread it also proves that every cross-lane access is
// ordered by one of the team's barriers (the property the CUDA BlockTeam relies on).
//   g++ -std=c++17 -O1 -g -fsanitize=thread -pthread -Icsrc csrc/check_block_team.cpp
// Exit status 0 when every problem agrees; tests/test_native.py builds and runs it.
#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <limits>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "jacobi.h"
#include "team.h"

namespace {

class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const long gen = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != gen; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_, arrived_ = 0;
  long generation_ = 0;
};

// State shared by the lanes of one emulated block.
struct Block {
  Block(int groups, int width) : groups(groups), width(width), all(groups * width), slots(groups * width) {
    for (int g = 0; g < groups; ++g) group_barriers.emplace_back(new Barrier(width));
  }
  ~Block() {
    for (auto* b : group_barriers) delete b;
  }
  int groups, width;
  Barrier all;
  std::vector<Barrier*> group_barriers;
  std::vector<double> slots;  // one per lane, for the reductions
};

// The team interface of team.h over an emulated block (compare BlockTeam in cuda_launch.cu).
struct EmulatedTeam {
  Block* block;
  int id;
  int rank() const { return id; }
  int size() const { return block->groups * block->width; }
  int group() const { return id / block->width; }
  int groups() const { return block->groups; }
  int lane() const { return id % block->width; }
  int width() const { return block->width; }
  template <class T>
  T group_sum(T x) const {
    block->slots[id] = double(x);
    group_sync();
    T sum = 0;  // the same order on every lane, as the CUDA broadcast guarantees
    for (int l = 0; l < width(); ++l) sum += T(block->slots[group() * width() + l]);
    group_sync();
    return sum;
  }
  void group_sync() const { block->group_barriers[group()]->wait(); }
  void sync() const { block->all.wait(); }
  bool block_any(bool b) const {
    block->slots[id] = b;
    sync();
    bool any = false;
    for (int i = 0; i < size(); ++i) any = any || block->slots[i] != 0;
    sync();
    return any;
  }
  template <class T>
  T block_max(T x) const {
    block->slots[id] = double(x);
    sync();
    T m = x;
    for (int i = 0; i < size(); ++i) m = prolora::hd_max(m, T(block->slots[i]));
    sync();
    return m;
  }
};

template <class Fn>
void run_block(int groups, int width, Fn fn) {
  Block block(groups, width);
  std::vector<std::thread> lanes;
  for (int i = 0; i < groups * width; ++i) lanes.emplace_back([&, i] { fn(EmulatedTeam{&block, i}); });
  for (auto& t : lanes) t.join();
}

template <class T>
double max_abs_diff(const std::vector<T>& x, const std::vector<T>& y) {
  double d = 0;
  for (size_t i = 0; i < x.size(); ++i) d = std::max(d, std::abs(double(x[i]) - double(y[i])));
  return d;
}

// |(u diag(s) v^T - a)| / |a| and the worst |u^T u - I|, |v^T v - I| entry, in double.
template <class T>
void svd_quality(const std::vector<T>& a, const std::vector<T>& u, const std::vector<T>& s,
                 const std::vector<T>& v, int m, int n, double& rec, double& orth) {
  const int k = std::min(m, n);
  double num = 0, den = 0;
  for (int r = 0; r < m; ++r)
    for (int c = 0; c < n; ++c) {
      double x = 0;
      for (int j = 0; j < k; ++j) x += double(u[r * k + j]) * s[j] * v[c * k + j];
      num += (x - a[r * n + c]) * (x - a[r * n + c]);
      den += double(a[r * n + c]) * a[r * n + c];
    }
  rec = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  orth = 0;
  for (int i = 0; i < k; ++i)
    for (int j = 0; j < k; ++j) {
      double du = 0, dv = 0;
      for (int r = 0; r < m; ++r) du += double(u[r * k + i]) * u[r * k + j];
      for (int r = 0; r < n; ++r) dv += double(v[r * k + i]) * v[r * k + j];
      orth = std::max({orth, std::abs(du - (i == j)), std::abs(dv - (i == j))});
    }
}

template <class T>
bool check_svd(int m, int n, int rank, int groups, int width, std::mt19937& rng) {
  using prolora::View;
  const int k = std::min(m, n);
  std::normal_distribution<double> normal;
  std::vector<T> a(size_t(m) * n, T(0));
  for (int j = 0; j < rank; ++j) {  // a sum of `rank` outer products
    std::vector<double> x(m), y(n);
    for (auto& e : x) e = normal(rng);
    for (auto& e : y) e = normal(rng);
    for (int r = 0; r < m; ++r)
      for (int c = 0; c < n; ++c) a[r * n + c] += T(x[r] * y[c]);
  }
  std::vector<T> work(prolora::svd_work_elems(m, n));
  std::vector<T> u1(size_t(m) * k), s1(k), v1(size_t(n) * k), u2 = u1, s2 = s1, v2 = v1;
  const int sw1 = prolora::svd_jacobi(prolora::SerialTeam{}, View<const T>{a.data(), n, 1}, m, n,
                                      View<T>{u1.data(), k, 1}, s1.data(), 1,
                                      View<T>{v1.data(), k, 1}, work.data(), 30, T(0));
  int sw2 = 0;
  run_block(groups, width, [&](EmulatedTeam team) {
    const int sw = prolora::svd_jacobi(team, View<const T>{a.data(), n, 1}, m, n,
                                       View<T>{u2.data(), k, 1}, s2.data(), 1,
                                       View<T>{v2.data(), k, 1}, work.data(), 30, T(0));
    if (team.rank() == 0) sw2 = sw;
  });
  double rec1, orth1, rec2, orth2;
  svd_quality(a, u1, s1, v1, m, n, rec1, orth1);
  svd_quality(a, u2, s2, v2, m, n, rec2, orth2);
  const double eps = std::numeric_limits<T>::epsilon(), smax = s1.empty() ? 1 : std::max<double>(s1[0], 1e-300);
  const double ds = max_abs_diff(s1, s2) / smax;
  const double bound = 50 * eps * std::sqrt(double(std::max(m, n)));
  const bool ok = sw1 > 0 && sw2 > 0 && rec2 <= bound && orth2 <= bound && ds <= bound;
  std::printf("%s svd %s %dx%d rank %d on %dx%d lanes: sweeps %d/%d rec %.1e/%.1e orth %.1e/%.1e ds %.1e\n",
              ok ? "ok  " : "FAIL", sizeof(T) == 4 ? "f32" : "f64", m, n, rank, groups, width, sw1,
              sw2, rec1, rec2, orth1, orth2, ds);
  return ok;
}

template <class T>
bool check_eigh(int n, int groups, int width, std::mt19937& rng) {
  using prolora::View;
  std::normal_distribution<double> normal;
  std::vector<T> a(size_t(n) * n);
  for (int r = 0; r < n; ++r)
    for (int c = 0; c <= r; ++c) a[r * n + c] = a[c * n + r] = T(normal(rng));
  std::vector<T> work(prolora::eigh_work_elems(n));
  std::vector<T> w1(n), v1(size_t(n) * n), w2 = w1, v2 = v1;
  const int sw1 = prolora::eigh_jacobi(prolora::SerialTeam{}, View<const T>{a.data(), n, 1}, n,
                                       w1.data(), 1, View<T>{v1.data(), n, 1}, work.data(), 30, T(0));
  int sw2 = 0;
  run_block(groups, width, [&](EmulatedTeam team) {
    const int sw = prolora::eigh_jacobi(team, View<const T>{a.data(), n, 1}, n, w2.data(), 1,
                                        View<T>{v2.data(), n, 1}, work.data(), 30, T(0));
    if (team.rank() == 0) sw2 = sw;
  });
  // eigh is an SVD with signed values: reuse the reconstruction with u = v, s = w.
  double rec1, orth1, rec2, orth2;
  svd_quality(a, v1, w1, v1, n, n, rec1, orth1);
  svd_quality(a, v2, w2, v2, n, n, rec2, orth2);
  double wmax = 1e-300;
  for (T x : w1) wmax = std::max(wmax, std::abs(double(x)));
  const double dw = max_abs_diff(w1, w2) / wmax;
  const double bound = 50 * std::numeric_limits<T>::epsilon() * std::sqrt(double(n));
  const bool ok = sw1 > 0 && sw2 > 0 && rec2 <= bound && orth2 <= bound && dw <= bound;
  std::printf("%s eigh %s %dx%d on %dx%d lanes: sweeps %d/%d rec %.1e/%.1e orth %.1e/%.1e dw %.1e\n",
              ok ? "ok  " : "FAIL", sizeof(T) == 4 ? "f32" : "f64", n, n, groups, width, sw1, sw2,
              rec1, rec2, orth1, orth2, dw);
  return ok;
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  bool ok = true;
  // Group counts that divide the pairs of a round unevenly, widths that split rows unevenly.
  const int shapes[][3] = {{1, 1, 1}, {2, 2, 2}, {7, 3, 3}, {3, 7, 3}, {9, 9, 3}, {20, 12, 12}, {12, 20, 5}};
  for (const auto& sh : shapes) {
    ok &= check_svd<float>(sh[0], sh[1], sh[2], 3, 4, rng);
    ok &= check_svd<double>(sh[0], sh[1], sh[2], 2, 5, rng);
  }
  for (int n : {1, 2, 5, 9, 16}) {
    ok &= check_eigh<float>(n, 3, 4, rng);
    ok &= check_eigh<double>(n, 2, 3, rng);
  }
  std::printf(ok ? "all agree\n" : "MISMATCH\n");
  return ok ? 0 : 1;
}
