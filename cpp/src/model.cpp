// Models: metrics, batched inference, and the model directory (weights.safetensors +
// model.json, the JSON written last so a directory is complete or not a model at all).
#include <cmath>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "dicebox/errors.h"
#include "dicebox/loader.h"
#include "dicebox/safetensors.h"
#include "model_file.h"
#include "model_impl.h"

namespace dicebox {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

}  // namespace

Normalisation Normalisation::of(const Dataset& dataset) {
  const Shape s = dataset.shape();
  const int64_t plane = s.height * s.width;
  // A strided sample of at most 20000 images is plenty for two moments per channel.
  const int64_t n = dataset.size();
  const int64_t stride = std::max<int64_t>(1, n / 20000);
  std::vector<double> sum(s.channels, 0.0), sq(s.channels, 0.0);
  int64_t used = 0;
  for (int64_t i = 0; i < n; i += stride, ++used) {
    const uint8_t* img = dataset.image(i);
    for (int64_t c = 0; c < s.channels; ++c) {
      uint64_t a = 0, b = 0;
      for (int64_t p = 0; p < plane; ++p) {
        uint32_t v = img[c * plane + p];
        a += v;
        b += v * v;
      }
      sum[c] += static_cast<double>(a);
      sq[c] += static_cast<double>(b);
    }
  }
  Normalisation norm;
  for (int64_t c = 0; c < s.channels; ++c) {
    double count = static_cast<double>(used * plane);
    double mean = count > 0 ? sum[c] / count / 255.0 : 0.0;
    double var = count > 0 ? sq[c] / count / (255.0 * 255.0) - mean * mean : 1.0;
    norm.mean.push_back(static_cast<float>(mean));
    norm.std.push_back(static_cast<float>(std::max(std::sqrt(std::max(var, 0.0)), 1e-3)));
  }
  return norm;
}

torch::Tensor normalise(const uint8_t* images, int64_t n, Shape shape, const Normalisation& norm) {
  auto out = torch::empty({n, shape.channels, shape.height, shape.width}, torch::kFloat32);
  normalise_images(images, n, shape, norm.mean, norm.std, out.data_ptr<float>());
  return out;
}

Metrics score(Network& network, const Dataset& dataset, const Normalisation& norm, int64_t k,
              int64_t batch_size, bool full) {
  torch::InferenceMode guard;
  network.set_training(false);
  const int64_t classes = static_cast<int64_t>(network.plan().back().out);
  Metrics m;
  m.k = std::min(k, classes);
  m.count = dataset.size();
  if (full) m.confusion.assign(classes * classes, 0);
  if (dataset.size() == 0) return m;
  LoaderOptions lo;
  lo.batch_size = batch_size;
  lo.shuffle = false;
  lo.mean = norm.mean;
  lo.std = norm.std;
  BatchLoader loader(dataset, lo);
  loader.start_epoch(0);
  double loss_sum = 0;
  int64_t correct = 0, top_correct = 0;
  Batch b;
  while (loader.next(b)) {
    auto x = torch::from_blob(b.images->data(), {b.size, b.shape.channels, b.shape.height, b.shape.width}, torch::kFloat32);
    auto y = torch::from_blob(b.labels->data(), {b.size}, torch::kInt64);
    auto logits = network.forward(x).cpu();
    loss_sum += torch::nn::functional::cross_entropy(
                    logits, y, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
                    .item<double>();
    auto pred = logits.argmax(1);
    correct += pred.eq(y).sum().item<int64_t>();
    if (full) {
      auto topk = std::get<1>(logits.topk(m.k, 1));
      top_correct += topk.eq(y.unsqueeze(1)).any(1).sum().item<int64_t>();
      auto p = pred.contiguous();
      const int64_t* pp = p.data_ptr<int64_t>();
      for (int64_t i = 0; i < b.size; ++i) m.confusion[(*b.labels)[i] * classes + pp[i]] += 1;
    }
  }
  const double n = static_cast<double>(dataset.size());
  m.loss = loss_sum / n;
  m.accuracy = correct / n;
  if (full) {
    m.top_k = top_correct / n;
    // Macro averages over the classes that occur in the labels or the predictions
    // (scikit-learn's convention, zero where a ratio is undefined).
    double p_sum = 0, r_sum = 0, f_sum = 0;
    int64_t present = 0;
    for (int64_t c = 0; c < classes; ++c) {
      int64_t tp = m.confusion[c * classes + c], actual = 0, predicted = 0;
      for (int64_t j = 0; j < classes; ++j) {
        actual += m.confusion[c * classes + j];
        predicted += m.confusion[j * classes + c];
      }
      if (actual == 0 && predicted == 0) continue;
      ++present;
      double p = predicted ? static_cast<double>(tp) / predicted : 0.0;
      double r = actual ? static_cast<double>(tp) / actual : 0.0;
      p_sum += p;
      r_sum += r;
      f_sum += (p + r) > 0 ? 2 * p * r / (p + r) : 0.0;
    }
    if (present) {
      m.precision = p_sum / present;
      m.recall = r_sum / present;
      m.f1 = f_sum / present;
    }
  }
  return m;
}

Model::Model() : impl_(std::make_shared<Impl>()) {}
Model::~Model() = default;
Model::Model(const Model&) = default;
Model& Model::operator=(const Model&) = default;
Model::Model(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

const Genome& Model::genome() const { return impl_->genome; }
const std::vector<std::string>& Model::categories() const { return impl_->categories; }
Shape Model::input_shape() const { return impl_->shape; }
const Normalisation& Model::normalisation() const { return impl_->normalisation; }
const std::vector<EpochRecord>& Model::history() const { return impl_->history; }
std::string Model::extra_json() const { return impl_->extra; }

void Model::set_extra_json(const std::string& text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw InvalidArgument(std::string("extra: not valid JSON (") + e.what() + ")");
  }
  if (!j.is_object()) throw InvalidArgument("extra: expected a JSON object");
  impl_->extra = j.dump();
}

std::string Model::plan_json() const { return plan_to_json(impl_->network->plan()); }

std::vector<float> Model::predict(const uint8_t* images, int64_t n, int64_t batch_size) const {
  if (!impl_->network) throw InvalidArgument("model: empty");
  if (batch_size < 1) throw InvalidArgument("batch_size must be >= 1");
  torch::InferenceMode guard;
  const int64_t classes = static_cast<int64_t>(impl_->categories.size());
  std::vector<float> out(static_cast<size_t>(n * classes));
  for (int64_t start = 0; start < n; start += batch_size) {
    int64_t count = std::min(batch_size, n - start);
    auto x = normalise(images + start * impl_->shape.pixels(), count, impl_->shape, impl_->normalisation);
    auto probs = torch::softmax(impl_->network->forward(x), 1).cpu().contiguous();
    std::memcpy(out.data() + start * classes, probs.data_ptr<float>(), sizeof(float) * count * classes);
  }
  return out;
}

Metrics Model::evaluate(const Dataset& dataset, int64_t k, int64_t batch_size) const {
  if (dataset.shape() != impl_->shape)
    throw InvalidArgument("dataset: images are " + std::to_string(dataset.shape().channels) + "x" +
                          std::to_string(dataset.shape().height) + "x" + std::to_string(dataset.shape().width) +
                          ", the model takes " + std::to_string(impl_->shape.channels) + "x" +
                          std::to_string(impl_->shape.height) + "x" + std::to_string(impl_->shape.width));
  if (dataset.categories() != impl_->categories)
    throw InvalidArgument("dataset: its categories differ from the model's");
  if (k < 1) throw InvalidArgument("k must be >= 1");
  return score(*impl_->network, dataset, impl_->normalisation, k, batch_size, true);
}

std::vector<NamedArray> Model::weights() const {
  std::vector<NamedArray> out;
  for (const auto& [name, t] : impl_->network->named_parameters()) {
    auto c = t.detach().contiguous();
    NamedArray a{name, c.sizes().vec(), {}};
    a.data.assign(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
    out.push_back(std::move(a));
  }
  return out;
}

void Model::save(const std::string& dir) const {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw IoError("cannot create model directory " + dir + ": " + ec.message());
  TensorMap tensors;
  for (const auto& a : weights()) {
    TensorData t{DType::F32, a.shape, {}};
    t.bytes.resize(a.data.size() * sizeof(float));
    std::memcpy(t.bytes.data(), a.data.data(), t.bytes.size());
    tensors.emplace(a.name, std::move(t));
  }
  write_safetensors((fs::path(dir) / kModelWeightsFile).string(), tensors, {{"format", "pt"}});
  const std::string text = model_json_text(*impl_);
  write_file_atomic((fs::path(dir) / kModelJsonFile).string(), text.data(), text.size());
}

Model Model::load(const std::string& dir) {
  const fs::path json_path = fs::path(dir) / kModelJsonFile;
  if (!fs::is_directory(dir)) throw IoError("model directory " + dir + " does not exist");
  if (!fs::exists(json_path)) throw IoError(json_path.string() + " is missing: " + dir + " is not a saved model");
  const auto bytes = read_file(json_path.string());
  ModelDescription description =
      parse_model_json(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()), json_path.string());
  const std::string weights_path = (fs::path(dir) / kModelWeightsFile).string();
  if (!fs::exists(weights_path)) throw IoError(weights_path + " is missing");
  const auto tensors = read_safetensors(weights_path);
  check_weights(tensors, description.plan, weights_path);

  auto impl = std::make_shared<Impl>();
  static_cast<ModelFields&>(*impl) = std::move(description.fields);
  impl->network = std::make_unique<Network>(std::move(description.plan), 0);
  impl->network->set_training(false);
  std::vector<std::pair<std::string, torch::Tensor>> values;
  for (const auto& [name, t] : tensors) {
    auto tensor = torch::empty(t.shape, torch::kFloat32);
    std::memcpy(tensor.data_ptr<float>(), t.bytes.data(), t.bytes.size());
    values.emplace_back(name, tensor);
  }
  impl->network->load(values, weights_path);
  return Model(impl);
}

}  // namespace dicebox
