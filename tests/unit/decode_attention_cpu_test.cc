// Placeholder replaced in the next commit.
#include "gtest/gtest.h"
TEST(DecodeAttentionCpuTest, Builds) {}
