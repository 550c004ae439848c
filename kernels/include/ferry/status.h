// Status plumbing shared by every host path above the CUDA launchers.
//
// Debian 12's Abseil (20220623) has neither the status macros nor absl/log, so Ferry defines
// them once, here. Use:
//   FERRY_RETURN_IF_ERROR(DoThing());
//   FERRY_ASSIGN_OR_RETURN(auto value, MakeValue());
// FERRY_CHECK aborts; it is for broken invariants only, never for bad input.
#pragma once

#include <cstdio>
#include <cstdlib>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define FERRY_STATUS_CONCAT_INNER(a, b) a##b
#define FERRY_STATUS_CONCAT(a, b) FERRY_STATUS_CONCAT_INNER(a, b)

#define FERRY_RETURN_IF_ERROR(expr)                          \
  do {                                                       \
    ::absl::Status ferry_status_ = (expr);                   \
    if (!ferry_status_.ok()) return ferry_status_;           \
  } while (0)

#define FERRY_ASSIGN_OR_RETURN_IMPL(statusor, lhs, expr) \
  auto statusor = (expr);                                \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = *std::move(statusor)

#define FERRY_ASSIGN_OR_RETURN(lhs, expr) \
  FERRY_ASSIGN_OR_RETURN_IMPL(FERRY_STATUS_CONCAT(ferry_statusor_, __LINE__), lhs, expr)

#define FERRY_CHECK(cond)                                                             \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::fprintf(stderr, "%s:%d: invariant broken: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                   \
    }                                                                                 \
  } while (0)
