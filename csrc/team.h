// The "team" that executes one problem of the shared math (jacobi.h).
//
// The algorithms are written once against this interface. A team is `groups()` groups of
// `width()` lanes; independent column pairs go to different groups, a group's lanes split the
// rows of one pair. The CPU runs each problem on a SerialTeam (one group of one lane, every
// call a no-op); the CUDA launcher runs it on a thread block whose groups are warps
// (BlockTeam in cuda_launch.cu). A team type provides:
//   rank(), size()            flat index of this lane in the team, number of lanes
//   group(), groups()         index of this lane's group, number of groups
//   lane(), width()           index of this lane in its group, lanes per group
//   group_sum(x)              sum over the group's lanes, the same bits on every lane
//   group_sync()              barrier (and memory fence) for the group
//   sync()                    barrier for the team
//   block_any(b), block_max(x)  team-wide OR / max (ignoring NaN), a barrier included
// Every lane of a group makes the same sequence of group calls, every lane of the team the
// same sequence of team calls.
#pragma once

#include "hd.h"

namespace prolora {

struct SerialTeam {
  PROLORA_HD static constexpr int rank() { return 0; }
  PROLORA_HD static constexpr int size() { return 1; }
  PROLORA_HD static constexpr int group() { return 0; }
  PROLORA_HD static constexpr int groups() { return 1; }
  PROLORA_HD static constexpr int lane() { return 0; }
  PROLORA_HD static constexpr int width() { return 1; }
  template <class T>
  PROLORA_HD static T group_sum(T x) {
    return x;
  }
  PROLORA_HD static void group_sync() {}
  PROLORA_HD static void sync() {}
  PROLORA_HD static bool block_any(bool b) { return b; }
  template <class T>
  PROLORA_HD static T block_max(T x) {
    return x;
  }
};

}  // namespace prolora
