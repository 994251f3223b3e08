// The core's exception types. The bindings translate each into one Python exception:
// InvalidArgument -> ValueError, IoError -> OSError, Cancelled -> dicebox.Cancelled.
#pragma once
#include <stdexcept>
#include <string>

namespace dicebox {

// Base of every error the core raises on purpose.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Bad input from the caller: a field, a shape, a value. The message names the field.
struct InvalidArgument : Error {
  using Error::Error;
};

// A file that cannot be read or written, or whose bytes are not what they claim.
struct IoError : Error {
  using Error::Error;
};

// A run stopped because its cancel token was set.
struct Cancelled : Error {
  using Error::Error;
};

}  // namespace dicebox
