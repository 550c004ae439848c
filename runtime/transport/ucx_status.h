// The one conversion from UCX's ucs_status_t to absl::Status (STYLE.md's UCX boundary).
//
//   NO_MEMORY -> ResourceExhausted; TIMED_OUT, ENDPOINT_TIMEOUT -> DeadlineExceeded;
//   UNREACHABLE, CONNECTION_RESET -> Unavailable; CANCELED -> Cancelled;
//   INVALID_PARAM -> InvalidArgument; UNSUPPORTED -> Unimplemented; anything else -> Internal.
// UCS_OK (and UCS_INPROGRESS, which is not an error) map to OkStatus.
// The message names what failed ("ucp_ep_create to 10.0.0.2:7000") and UCX's own text.
#pragma once

#include "absl/strings/string_view.h"

#include <ucs/type/status.h>

#include "absl/status/status.h"

namespace ferry::transport {

absl::Status UcsToStatus(ucs_status_t status, absl::string_view what);

}  // namespace ferry::transport
