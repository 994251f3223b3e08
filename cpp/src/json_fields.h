// Typed reads of JSON fields for the core's parsers (genomes, search spaces): each error
// names the field and shows the value found.
#pragma once
#include <cmath>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "dicebox/errors.h"

namespace dicebox::json_fields {

using json = nlohmann::json;

inline std::string at(std::string_view base, std::string_view key) {
  return std::string(base) + "." + std::string(key);
}

inline void reject_unknown_keys(const json& object, std::string_view field,
                                std::initializer_list<std::string_view> known) {
  for (const auto& [key, value] : object.items()) {
    bool ok = false;
    for (auto k : known) ok = ok || key == k;
    if (!ok) throw InvalidArgument(at(field, key) + ": unknown field");
  }
}

inline const json& require(const json& object, std::string_view field, std::string_view key) {
  auto it = object.find(std::string(key));
  if (it == object.end()) throw InvalidArgument(at(field, key) + ": missing");
  return *it;
}

inline int64_t as_int(const json& value, const std::string& field) {
  if (value.is_number_integer()) return value.get<int64_t>();
  if (value.is_number_float()) {
    double d = value.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::abs(d) < 9e15) return static_cast<int64_t>(d);
  }
  throw InvalidArgument(field + ": expected an integer, got " + value.dump());
}

inline double as_number(const json& value, const std::string& field) {
  if (!value.is_number()) throw InvalidArgument(field + ": expected a number, got " + value.dump());
  return value.get<double>();
}

inline std::string as_string(const json& value, const std::string& field) {
  if (!value.is_string()) throw InvalidArgument(field + ": expected a string, got " + value.dump());
  return value.get<std::string>();
}

}  // namespace dicebox::json_fields
