// Message buffers and a pool that reuses them.
//
// Buffer is an uninitialised, movable byte array (no zero fill: messages are written in full
// before they are sent). BufferPool keeps up to `max_cached` released buffers and hands the
// smallest one that fits back out, so steady request/reply traffic of similar sizes stops
// allocating after warm-up, and the same addresses go to UCX again (its registration cache hits).
// Threads: BufferPool is thread-safe; a Buffer is owned by one thread at a time.
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace ferry::transport {

class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t size) : data_(new uint8_t[size > 0 ? size : 1]), size_(size),
                                 capacity_(size) {}
  Buffer(Buffer&& other) noexcept
      : data_(std::move(other.data_)), size_(std::exchange(other.size_, 0)),
        capacity_(std::exchange(other.capacity_, 0)) {}
  Buffer& operator=(Buffer&& other) noexcept {
    data_ = std::move(other.data_);
    size_ = std::exchange(other.size_, 0);
    capacity_ = std::exchange(other.capacity_, 0);
    return *this;
  }
  static Buffer CopyOf(const void* data, size_t size) {
    Buffer buffer(size);
    if (size > 0) std::memcpy(buffer.data(), data, size);
    return buffer;
  }

  uint8_t* data() { return data_.get(); }
  const uint8_t* data() const { return data_.get(); }
  size_t size() const { return size_; }
  size_t capacity() const { return capacity_; }
  // Shrinks or grows within capacity; contents up to the old size stay.
  void Resize(size_t size) {
    if (size > capacity_) {
      Buffer bigger(size);
      if (size_ > 0) std::memcpy(bigger.data(), data(), size_);
      *this = std::move(bigger);
    }
    size_ = size;
  }

 private:
  std::unique_ptr<uint8_t[]> data_;
  size_t size_ = 0;
  size_t capacity_ = 0;
};

class BufferPool {
 public:
  explicit BufferPool(size_t max_cached = 64) : max_cached_(max_cached) {}

  // A buffer of exactly `size` bytes (capacity may be larger); contents are undefined.
  Buffer Acquire(size_t size) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i) {
        // Smallest that fits, but not one more than 4x too big (it would pin memory for nothing).
        if (free_[i].capacity() >= size && free_[i].capacity() <= 4 * size + 4096 &&
            (best == free_.size() || free_[i].capacity() < free_[best].capacity())) {
          best = i;
        }
      }
      if (best != free_.size()) {
        Buffer buffer = std::move(free_[best]);
        free_[best] = std::move(free_.back());
        free_.pop_back();
        ++hits_;
        buffer.Resize(size);
        return buffer;
      }
      ++misses_;
    }
    return Buffer(size);
  }

  void Release(Buffer buffer) {
    if (buffer.capacity() == 0) return;
    std::lock_guard<std::mutex> lock(mutex_);
    if (free_.size() < max_cached_) free_.push_back(std::move(buffer));
  }

  uint64_t hits() const { std::lock_guard<std::mutex> lock(mutex_); return hits_; }
  uint64_t misses() const { std::lock_guard<std::mutex> lock(mutex_); return misses_; }

 private:
  const size_t max_cached_;
  mutable std::mutex mutex_;
  std::vector<Buffer> free_;
  uint64_t hits_ = 0;
  uint64_t misses_ = 0;
};

}  // namespace ferry::transport
