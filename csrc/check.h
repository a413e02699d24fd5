// Argument checks whose messages never go through std::ostream.
//
// Why: on the lent GPU image (torch 2.11+cu130, GCC 13.3) any `std::ostream <<` of
// an integer or a double made inside an extension segfaults (`std::ostringstream`
// and so `c10::str`, and so every TORCH_CHECK whose message holds a number). So the
// checks of this library build their messages here: integers and doubles through
// std::to_chars, shapes, dtypes and devices through their string forms, and the
// error is thrown with one finished std::string (c10::str of a single string is the
// identity, so nothing reaches ostream numeric formatting on our side).
// tests/test_no_ostream.py enforces it: a lint of csrc/ and a run of the error tests
// with std::ostream's numeric inserters made to abort when called from anchor_ext.
//
// Use:  ANCHOR_CHECK_VALUE(n > 0, "n: expected a positive number, got ", n);
// Kinds: ANCHOR_CHECK_VALUE (ValueError), ANCHOR_CHECK_NOT_IMPLEMENTED
// (NotImplementedError), ANCHOR_CHECK (RuntimeError). The message is built only when
// the check fails.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <charconv>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

namespace anchor::detail {

inline void append(std::string& s, std::string_view text) { s.append(text); }
inline void append(std::string& s, const char* text) { s.append(text); }
inline void append(std::string& s, const std::string& text) { s.append(text); }
inline void append(std::string& s, char c) { s.push_back(c); }
inline void append(std::string& s, bool b) { s.append(b ? "true" : "false"); }

template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                                           !std::is_same_v<T, char>, int> = 0>
void append(std::string& s, T value) {
  char buffer[24];
  const auto result = std::to_chars(buffer, buffer + sizeof(buffer), value);
  s.append(buffer, result.ptr);
}

// Shortest representation that reads back to the same double ("0.5", "1e+40", "inf").
inline void append(std::string& s, double value) {
  char buffer[32];
  const auto result = std::to_chars(buffer, buffer + sizeof(buffer), value);
  s.append(buffer, result.ptr);
}
inline void append(std::string& s, float value) { append(s, double(value)); }

// A double with a fixed number of decimals ("8.00"), for sizes and times.
struct Fixed {
  double value;
  int decimals = 2;
};
inline void append(std::string& s, Fixed x) {
  char buffer[64];
  const auto result =
      std::to_chars(buffer, buffer + sizeof(buffer), x.value, std::chars_format::fixed, x.decimals);
  s.append(buffer, result.ptr);
}

// "[1, 4, 64]", the form torch prints sizes and strides in.
inline void append(std::string& s, c10::IntArrayRef values) {
  s.push_back('[');
  for (size_t i = 0; i < values.size(); ++i) {
    if (i > 0) s.append(", ");
    append(s, values[i]);
  }
  s.push_back(']');
}

inline void append(std::string& s, c10::ScalarType dtype) { s.append(c10::toString(dtype)); }
inline void append(std::string& s, const c10::Device& device) { s.append(device.str()); }

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string s;
  (append(s, parts), ...);
  return s;
}

}  // namespace anchor::detail

#define ANCHOR_CHECK_KIND_(kind, cond, ...)                                              \
  do {                                                                                   \
    if (C10_UNLIKELY(!(cond))) {                                                         \
      throw ::c10::kind({__func__, __FILE__, static_cast<uint32_t>(__LINE__)},           \
                        ::anchor::detail::message(__VA_ARGS__));                         \
    }                                                                                    \
  } while (0)

#define ANCHOR_CHECK_VALUE(cond, ...) ANCHOR_CHECK_KIND_(ValueError, cond, __VA_ARGS__)
#define ANCHOR_CHECK_NOT_IMPLEMENTED(cond, ...) \
  ANCHOR_CHECK_KIND_(NotImplementedError, cond, __VA_ARGS__)
#define ANCHOR_CHECK(cond, ...) ANCHOR_CHECK_KIND_(Error, cond, __VA_ARGS__)
