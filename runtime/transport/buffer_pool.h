// Message buffers and a pool that reuses them.
//
// Buffer is an uninitialised, movable byte array (no zero fill: messages are written in full
// before they are sent). BufferPool keeps up to `max_cached` released buffers and hands the
// smallest one that fits back out, so steady request/reply traffic of similar sizes stops
// allocating after warm-up, and the same addresses go to UCX again (its registration cache hits).
// A pool may take its memory from a BufferAllocator: a CUDA worker's pool hands out page-locked
// host memory, so frames are copied to and from the device at full speed with no staging copy,
// each buffer registered once and then reused. An allocator that fails falls back to the heap.
// Threads: BufferPool is thread-safe; a Buffer is owned by one thread at a time.
#pragma once

#include <cstdint>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

namespace ferry::transport {

// Where buffers' memory comes from. allocate returns nullptr on failure (the heap is used
// instead); release frees what allocate returned. Both may be called from any thread.
struct BufferAllocator {
  void* (*allocate)(size_t bytes, void* context) = nullptr;
  void (*release)(void* data, void* context) = nullptr;
  void* context = nullptr;
};

class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t size, const BufferAllocator* allocator = nullptr)
      : size_(size), capacity_(size) {
    const size_t bytes = size > 0 ? size : 1;
    if (allocator != nullptr && allocator->allocate != nullptr) {
      data_ = static_cast<uint8_t*>(allocator->allocate(bytes, allocator->context));
      if (data_ != nullptr) allocator_ = allocator;
    }
    if (data_ == nullptr) data_ = new uint8_t[bytes];
  }
  Buffer(Buffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)),
        capacity_(std::exchange(other.capacity_, 0)),
        allocator_(std::exchange(other.allocator_, nullptr)) {}
  Buffer& operator=(Buffer&& other) noexcept {
    if (this != &other) {
      Free();
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
      capacity_ = std::exchange(other.capacity_, 0);
      allocator_ = std::exchange(other.allocator_, nullptr);
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { Free(); }

  static Buffer CopyOf(const void* data, size_t size) {
    Buffer buffer(size);
    if (size > 0) std::memcpy(buffer.data(), data, size);
    return buffer;
  }

  uint8_t* data() { return data_; }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  size_t capacity() const { return capacity_; }
  // Whether the memory came from the pool's allocator (pinned, for a CUDA worker).
  bool from_allocator() const { return allocator_ != nullptr; }
  // Shrinks or grows within capacity; contents up to the old size stay. Growing takes new memory
  // from the same allocator.
  void Resize(size_t size) {
    if (size > capacity_) {
      Buffer bigger(size, allocator_);
      if (size_ > 0) std::memcpy(bigger.data(), data(), size_);
      *this = std::move(bigger);
    }
    size_ = size;
  }

 private:
  void Free() {
    if (data_ == nullptr) return;
    if (allocator_ != nullptr) {
      allocator_->release(data_, allocator_->context);
    } else {
      delete[] data_;
    }
    data_ = nullptr;
  }

  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  size_t capacity_ = 0;
  const BufferAllocator* allocator_ = nullptr;  // null: the heap
};

class BufferPool {
 public:
  explicit BufferPool(size_t max_cached = 64) : max_cached_(max_cached) {}

  // Takes new buffers' memory from `allocator` from now on. Buffers keep a pointer to it, so it
  // must outlive every buffer (static storage, in practice). Cached heap buffers are dropped.
  void SetAllocator(const BufferAllocator* allocator) {
    std::lock_guard<std::mutex> lock(mutex_);
    allocator_ = allocator;
    free_.clear();
  }

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
    const BufferAllocator* allocator;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      allocator = allocator_;
    }
    return Buffer(size, allocator);
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
  const BufferAllocator* allocator_ = nullptr;  // null: the heap
  uint64_t hits_ = 0;
  uint64_t misses_ = 0;
};

}  // namespace ferry::transport
