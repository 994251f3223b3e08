// The training loop, early stopping, and checkpoints with exact resume (see trainer.h).
//
// A checkpoint is one safetensors file written atomically after every epoch: current and
// best weights, optimizer state, the network's generator state, and (in its metadata) the
// epoch, history, early-stopping counters and a fingerprint of the run. The loader's order
// and augmentation are pure functions of (seed, epoch), so nothing else is needed for a
// resumed run to continue bit for bit.
#include "dicebox/trainer.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>

#include "dicebox/errors.h"
#include "dicebox/loader.h"
#include "dicebox/safetensors.h"
#include "model_impl.h"
#include "optim.h"

namespace dicebox {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

constexpr const char* kCheckpointFile = "checkpoint.safetensors";
constexpr int kCheckpointVersion = 1;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

TensorData to_data(const torch::Tensor& t) {
  auto c = t.detach().contiguous().cpu();
  TensorData d;
  if (c.scalar_type() == torch::kFloat32) d.dtype = DType::F32;
  else if (c.scalar_type() == torch::kInt64) d.dtype = DType::I64;
  else if (c.scalar_type() == torch::kUInt8) d.dtype = DType::U8;
  else throw Error("checkpoint: unsupported tensor type");
  d.shape = c.sizes().vec();
  d.bytes.resize(c.nbytes());
  std::memcpy(d.bytes.data(), c.data_ptr(), c.nbytes());
  return d;
}

torch::Tensor from_data(const TensorData& d) {
  auto type = d.dtype == DType::F32 ? torch::kFloat32 : d.dtype == DType::I64 ? torch::kInt64 : torch::kUInt8;
  auto t = torch::empty(d.shape, type);
  std::memcpy(t.data_ptr(), d.bytes.data(), d.bytes.size());
  return t;
}

// What must match for a checkpoint to belong to this run. Epochs and patience may change
// between attempts (a run can be extended); everything that shapes the trajectory may not.
json fingerprint(const Genome& genome, const Dataset& train, const Dataset* val, const TrainOptions& o) {
  return {{"genome", json::parse(genome.to_json())},
          {"train_count", train.size()},
          {"val_count", val ? val->size() : -1},
          {"classes", train.num_classes()},
          {"seed", o.seed},
          {"batch_size", o.batch_size},
          {"augment", o.augment},
          {"label_smoothing", o.label_smoothing},
          {"init", o.init.has_value()}};
}

struct RunState {
  int64_t epoch = 0;  // epochs completed
  std::vector<EpochRecord> history;
  double best_score = INFINITY;
  int64_t best_epoch = 0;
  int64_t bad_epochs = 0;
  bool finished = false;
  std::vector<std::pair<std::string, torch::Tensor>> best;
};

void save_checkpoint(const std::string& dir, const json& fp, const RunState& s, Network& net, const Optimizer& opt) {
  TensorMap tensors;
  for (const auto& [name, t] : net.named_parameters()) tensors.emplace("param." + name, to_data(t));
  for (const auto& [name, t] : s.best) tensors.emplace("best." + name, to_data(t));
  for (const auto& [name, t] : opt.state_dict()) tensors.emplace("optim." + name, to_data(t));
  tensors.emplace("rng", to_data(net.generator().get_state()));
  json state = {{"version", kCheckpointVersion},
                {"fingerprint", fp},
                {"epoch", s.epoch},
                {"history", history_to_json(s.history)},
                {"best_score", std::isfinite(s.best_score) ? json(s.best_score) : json(nullptr)},
                {"best_epoch", s.best_epoch},
                {"bad_epochs", s.bad_epochs},
                {"finished", s.finished},
                {"optimizer_steps", opt.steps()}};
  write_safetensors((fs::path(dir) / kCheckpointFile).string(), tensors, {{"dicebox", state.dump()}});
}

// Restores `s`, `net` and `opt` from the checkpoint in `dir`; false when there is none.
bool load_checkpoint(const std::string& dir, const json& fp, RunState& s, Network& net, Optimizer& opt) {
  const std::string path = (fs::path(dir) / kCheckpointFile).string();
  if (!fs::exists(path)) return false;
  std::map<std::string, std::string> meta;
  auto tensors = read_safetensors(path, &meta);
  json state;
  try {
    state = json::parse(meta.at("dicebox"));
  } catch (const std::exception&) {
    throw IoError(path + ": not a dicebox checkpoint");
  }
  if (state.value("version", 0) != kCheckpointVersion) throw IoError(path + ": unsupported checkpoint version");
  if (state.at("fingerprint") != fp)
    throw InvalidArgument("checkpoint_dir: " + dir +
                          " holds the checkpoint of a different run (genome, data, seed or options differ); "
                          "use a new directory or delete " + path);
  std::vector<std::pair<std::string, torch::Tensor>> params, best;
  std::map<std::string, torch::Tensor> optim;
  for (const auto& [name, d] : tensors) {
    if (name.rfind("param.", 0) == 0) params.emplace_back(name.substr(6), from_data(d));
    else if (name.rfind("best.", 0) == 0) best.emplace_back(name.substr(5), from_data(d));
    else if (name.rfind("optim.", 0) == 0) optim.emplace(name.substr(6), from_data(d));
  }
  net.load(params, path);
  auto rng = tensors.find("rng");
  if (rng == tensors.end()) throw IoError(path + ": no generator state");
  net.generator().set_state(from_data(rng->second));
  opt.load_state_dict(optim, state.at("optimizer_steps").get<int64_t>());
  s.epoch = state.at("epoch").get<int64_t>();
  s.history = history_from_json(state.at("history"));
  s.best_score = state.at("best_score").is_null() ? INFINITY : state.at("best_score").get<double>();
  s.best_epoch = state.at("best_epoch").get<int64_t>();
  s.bad_epochs = state.at("bad_epochs").get<int64_t>();
  s.finished = state.at("finished").get<bool>();
  s.best = best.empty() ? net.clone_parameters() : best;
  return true;
}

}  // namespace

void set_threads(int threads) {
  if (threads < 1) throw InvalidArgument("threads must be >= 1, got " + std::to_string(threads));
  if (at::get_num_threads() != threads) at::set_num_threads(threads);
}

int get_threads() { return at::get_num_threads(); }

void TrainOptions::validate() const {
  auto bad = [](const std::string& what) { throw InvalidArgument(what); };
  if (epochs < 1 || epochs > 100000) bad("epochs must be in 1..100000, got " + std::to_string(epochs));
  if (batch_size < 1 || batch_size > 65536) bad("batch_size must be in 1..65536, got " + std::to_string(batch_size));
  if (patience < 0) bad("patience must be >= 0, got " + std::to_string(patience));
  if (!(augment >= 0 && augment <= 1)) bad("augment must be in [0, 1], got " + std::to_string(augment));
  if (!(label_smoothing >= 0 && label_smoothing < 1))
    bad("label_smoothing must be in [0, 1), got " + std::to_string(label_smoothing));
  if (threads < 0 || threads > 1024) bad("threads must be in 1..1024, got " + std::to_string(threads));
  if (loader_threads < 1 || loader_threads > 64) bad("loader_threads must be in 1..64, got " + std::to_string(loader_threads));
}

Model train(const Genome& genome, const Dataset& train_set, const Dataset* val, const TrainOptions& o) {
  o.validate();
  if (train_set.size() == 0) throw InvalidArgument("train: the dataset is empty");
  if (val && val->size() == 0) val = nullptr;  // an empty validation set is no validation set
  if (val && val->shape() != train_set.shape())
    throw InvalidArgument("val: its images have a different shape from the training images");
  if (val && val->categories() != train_set.categories())
    throw InvalidArgument("val: its categories differ from the training set's");
  if (o.threads > 0) set_threads(o.threads);

  auto plan = plan_network(genome, train_set.shape(), train_set.num_classes());
  auto impl = std::make_shared<Model::Impl>();
  impl->genome = genome;
  impl->categories = train_set.categories();
  impl->shape = train_set.shape();
  const torch::Device device = resolve_device(o.device);
  impl->network = std::make_unique<Network>(plan, o.seed);
  Network& net = *impl->network;
  net.to(device);
  if (o.init) {
    const Model& init = *o.init;
    if (init.input_shape() != train_set.shape() || init.categories().size() != train_set.categories().size())
      throw InvalidArgument("init: the model's input shape or category count differs from this dataset's");
    net.load(init.impl().network->named_parameters(), "init");
    impl->normalisation = init.normalisation();  // the weights were trained on these inputs
  } else {
    impl->normalisation = Normalisation::of(train_set);
  }
  auto optimizer = make_optimizer(genome.optimizer, net.parameters(), genome.learning_rate);

  const json fp = fingerprint(genome, train_set, val, o);
  RunState state;
  state.best = net.clone_parameters();
  if (!o.checkpoint_dir.empty()) {
    std::error_code ec;
    fs::create_directories(o.checkpoint_dir, ec);
    if (ec) throw IoError("cannot create checkpoint_dir " + o.checkpoint_dir + ": " + ec.message());
    load_checkpoint(o.checkpoint_dir, fp, state, net, *optimizer);
  }

  LoaderOptions lo;
  lo.batch_size = o.batch_size;
  lo.shuffle = true;
  lo.seed = o.seed;
  lo.augment = o.augment;
  lo.mean = impl->normalisation.mean;
  lo.std = impl->normalisation.std;
  lo.threads = o.loader_threads;
  BatchLoader loader(train_set, lo);
  auto loss_options = torch::nn::functional::CrossEntropyFuncOptions().label_smoothing(o.label_smoothing);

  auto tick = Clock::now();
  while (!state.finished && state.epoch < o.epochs) {
    const int64_t epoch = state.epoch + 1;
    const auto epoch_start = Clock::now();
    net.set_training(true);
    loader.start_epoch(epoch);
    double loss_sum = 0;
    int64_t correct = 0, seen = 0, batch_index = 0;
    Batch b;
    while (loader.next(b)) {
      if (o.cancel && o.cancel->cancelled()) throw Cancelled("training was cancelled");
      if (o.on_batch && seconds_since(tick) > 0.5) {
        tick = Clock::now();
        if (!o.on_batch(epoch, batch_index, loader.batches_per_epoch())) throw Cancelled("training was cancelled");
      }
      auto x = torch::from_blob(b.images->data(), {b.size, b.shape.channels, b.shape.height, b.shape.width}, torch::kFloat32);
      auto y = torch::from_blob(b.labels->data(), {b.size}, torch::kInt64).to(device);
      auto logits = net.forward(x);
      auto loss = torch::nn::functional::cross_entropy(logits, y, loss_options);
      optimizer->zero_grad();
      loss.backward();
      optimizer->step();
      {
        torch::NoGradGuard no_grad;
        loss_sum += loss.item<double>() * b.size;
        correct += logits.argmax(1).eq(y).sum().item<int64_t>();
      }
      seen += b.size;
      ++batch_index;
    }
    const double train_seconds = seconds_since(epoch_start);
    EpochRecord r;
    r.epoch = epoch;
    r.loss = loss_sum / std::max<int64_t>(seen, 1);
    r.accuracy = static_cast<double>(correct) / std::max<int64_t>(seen, 1);
    r.samples_per_second = seen / std::max(train_seconds, 1e-9);
    r.val_loss = r.val_accuracy = std::nan("");
    if (val) {
      Metrics m = score(net, *val, impl->normalisation, 1, 512, false);
      r.val_loss = m.loss;
      r.val_accuracy = m.accuracy;
    }
    r.seconds = seconds_since(epoch_start);
    state.history.push_back(r);
    state.epoch = epoch;

    const double monitored = val ? r.val_loss : r.loss;
    if (monitored < state.best_score) {
      state.best_score = monitored;
      state.best_epoch = epoch;
      state.best = net.clone_parameters();
      state.bad_epochs = 0;
    } else {
      ++state.bad_epochs;
    }
    if (o.patience > 0 && state.bad_epochs >= o.patience) state.finished = true;
    // The epoch is durable before anyone hears of it; a callback that stops the run
    // marks the checkpoint finished too, so a resumed run stops where this one did.
    if (!o.checkpoint_dir.empty()) save_checkpoint(o.checkpoint_dir, fp, state, net, *optimizer);
    if (o.on_epoch && !o.on_epoch(r) && !state.finished) {
      state.finished = true;
      if (!o.checkpoint_dir.empty()) save_checkpoint(o.checkpoint_dir, fp, state, net, *optimizer);
    }
    if (o.cancel && o.cancel->cancelled()) throw Cancelled("training was cancelled");
  }
  if (state.best_epoch > 0) net.load(state.best, "best weights");
  net.set_training(false);
  net.to(torch::kCPU);  // models are kept, saved and served on the CPU
  impl->history = state.history;
  return Model(impl);
}

}  // namespace dicebox
