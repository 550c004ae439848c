// Logging for every host component: spdlog behind FERRY_LOG_* macros, defined once here.
// Messages are lower case and name the object ("worker 3: peer error: connection reset"); log an
// error once, where it is decided. Thread-safe (spdlog's default logger is).
#pragma once

#include "spdlog/spdlog.h"

#define FERRY_LOG_DEBUG(...) ::spdlog::debug(__VA_ARGS__)
#define FERRY_LOG_INFO(...) ::spdlog::info(__VA_ARGS__)
#define FERRY_LOG_WARN(...) ::spdlog::warn(__VA_ARGS__)
#define FERRY_LOG_ERROR(...) ::spdlog::error(__VA_ARGS__)
