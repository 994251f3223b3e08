// Training, early stopping, callbacks, cancellation, checkpoints and exact resume, warm
// start, model files and metrics, on small synthetic data.
#include <gtest/gtest.h>

#include <filesystem>
#include <random>

#include "dicebox/errors.h"
#include "dicebox/model.h"
#include "dicebox/trainer.h"
#include "model_impl.h"
#include <thread>

using namespace dicebox;
namespace fs = std::filesystem;

namespace {

// Three classes of 8x8 images: a bright row band at the top, middle or bottom, with noise.
Dataset bands(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> noise(0, 60);
  std::vector<uint8_t> pixels(n * 64);
  std::vector<int64_t> labels(n);
  for (int64_t i = 0; i < n; ++i) {
    labels[i] = i % 3;
    for (int y = 0; y < 8; ++y)
      for (int x = 0; x < 8; ++x) {
        bool lit = y / 3 == labels[i] || (labels[i] == 2 && y == 7);
        pixels[i * 64 + y * 8 + x] = static_cast<uint8_t>((lit ? 180 : 20) + noise(rng));
      }
  }
  return Dataset::from_buffers(pixels.data(), labels.data(), n, Shape{1, 8, 8}, {"top", "middle", "bottom"});
}

const Genome& mlp() {
  static Genome g = Genome::from_json(
      R"({"optimizer": {"name": "adam", "learning_rate": 0.01}, "layers": [{"type": "dense", "size": 16}, {"type": "dropout", "rate": 0.2}]})");
  return g;
}

fs::path temp_dir() {
  auto dir = fs::temp_directory_path() / ("dicebox-tr-" + std::to_string(::getpid()) + "-" +
                                          ::testing::UnitTest::GetInstance()->current_test_info()->name());
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

std::vector<float> flat_weights(const Model& m) {
  std::vector<float> out;
  for (const auto& a : m.weights()) out.insert(out.end(), a.data.begin(), a.data.end());
  return out;
}

TrainOptions quick(int64_t epochs) {
  TrainOptions o;
  o.epochs = epochs;
  o.batch_size = 16;
  o.patience = 0;
  o.threads = 1;
  return o;
}

}  // namespace

TEST(Trainer, LearnsASeparableProblem) {
  Dataset data = bands(300, 1), val = bands(90, 2);
  Model m = train(mlp(), data, &val, quick(8));
  EXPECT_EQ(m.history().size(), 8u);
  EXPECT_GT(m.evaluate(val).accuracy, 0.95);
  EXPECT_LT(m.history().back().loss, m.history().front().loss);
}

TEST(Trainer, SameSeedSameWeightsOtherSeedOtherWeights) {
  Dataset data = bands(120, 1);
  auto a = flat_weights(train(mlp(), data, nullptr, quick(2)));
  auto b = flat_weights(train(mlp(), data, nullptr, quick(2)));
  TrainOptions o = quick(2);
  o.seed = 7;
  auto c = flat_weights(train(mlp(), data, nullptr, o));
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
}

TEST(Trainer, ResumeAfterInterruptionEndsExactlyLikeAnUninterruptedRun) {
  Dataset data = bands(150, 1), val = bands(60, 2);
  TrainOptions o = quick(5);
  o.augment = 0.5;
  Model full = train(mlp(), data, &val, o);

  auto dir = temp_dir();
  TrainOptions first = o;
  first.checkpoint_dir = dir.string();
  first.cancel = std::make_shared<CancelToken>();
  auto token = first.cancel;
  first.on_epoch = [token](const EpochRecord& r) {
    if (r.epoch == 2) token->cancel();
    return true;
  };
  EXPECT_THROW(train(mlp(), data, &val, first), Cancelled);

  TrainOptions second = o;
  second.checkpoint_dir = dir.string();
  std::vector<int64_t> epochs_run;
  second.on_epoch = [&](const EpochRecord& r) {
    epochs_run.push_back(r.epoch);
    return true;
  };
  Model resumed = train(mlp(), data, &val, second);
  EXPECT_EQ(epochs_run, (std::vector<int64_t>{3, 4, 5}));
  EXPECT_EQ(flat_weights(resumed), flat_weights(full));
  ASSERT_EQ(resumed.history().size(), full.history().size());
  for (size_t i = 0; i < full.history().size(); ++i) {
    EXPECT_EQ(resumed.history()[i].loss, full.history()[i].loss);
    EXPECT_EQ(resumed.history()[i].val_accuracy, full.history()[i].val_accuracy);
  }
}

TEST(Trainer, FinishedCheckpointReturnsTheResultWithoutTraining) {
  Dataset data = bands(90, 1);
  auto dir = temp_dir();
  TrainOptions o = quick(2);
  o.checkpoint_dir = dir.string();
  auto first = flat_weights(train(mlp(), data, nullptr, o));
  int calls = 0;
  o.on_epoch = [&](const EpochRecord&) { return ++calls > 0; };
  auto again = flat_weights(train(mlp(), data, nullptr, o));
  EXPECT_EQ(calls, 0);
  EXPECT_EQ(first, again);
}

TEST(Trainer, CheckpointOfAnotherRunIsRefused) {
  Dataset data = bands(60, 1);
  auto dir = temp_dir();
  TrainOptions o = quick(1);
  o.checkpoint_dir = dir.string();
  train(mlp(), data, nullptr, o);
  o.seed = 99;
  try {
    train(mlp(), data, nullptr, o);
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("checkpoint_dir"), std::string::npos);
  }
}

TEST(Trainer, EarlyStoppingRestoresTheBestWeights) {
  Dataset data = bands(60, 1), val = bands(60, 2);
  // A learning rate this large makes validation loss bounce: patience must cut it short.
  Genome wild = Genome::from_json(R"({"optimizer": {"name": "sgd", "learning_rate": 3.0}, "layers": [{"type": "dense", "size": 32}]})");
  TrainOptions o = quick(40);
  o.patience = 2;
  Model m = train(wild, data, &val, o);
  ASSERT_LT(m.history().size(), 40u);
  double best = INFINITY;
  for (const auto& r : m.history()) best = std::min(best, r.val_loss);
  EXPECT_NEAR(m.evaluate(val).loss, best, 1e-4);
}

TEST(Trainer, CallbackReturningFalseStopsAfterThatEpoch) {
  Dataset data = bands(60, 1);
  TrainOptions o = quick(10);
  o.on_epoch = [](const EpochRecord& r) { return r.epoch < 3; };
  EXPECT_EQ(train(mlp(), data, nullptr, o).history().size(), 3u);
}

TEST(Trainer, CancelFromAnotherThreadStopsPromptly) {
  Dataset data = bands(3000, 1);
  TrainOptions o = quick(1000);
  o.cancel = std::make_shared<CancelToken>();
  std::thread canceller([token = o.cancel] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    token->cancel();
  });
  auto start = std::chrono::steady_clock::now();
  EXPECT_THROW(train(mlp(), data, nullptr, o), Cancelled);
  canceller.join();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
}

TEST(Trainer, HistoryHasValidationOnlyWithAValidationSet) {
  Dataset data = bands(60, 1), val = bands(30, 2);
  auto with = train(mlp(), data, &val, quick(1)).history().at(0);
  auto without = train(mlp(), data, nullptr, quick(1)).history().at(0);
  EXPECT_FALSE(std::isnan(with.val_loss));
  EXPECT_TRUE(std::isnan(without.val_loss));
  EXPECT_GT(with.samples_per_second, 0);
  EXPECT_GT(with.seconds, 0);
}

TEST(Trainer, LabelSmoothingRaisesTheTrainingLoss) {
  Dataset data = bands(90, 1);
  TrainOptions o = quick(3);
  double plain = train(mlp(), data, nullptr, o).history().back().loss;
  o.label_smoothing = 0.2;
  double smooth = train(mlp(), data, nullptr, o).history().back().loss;
  EXPECT_GT(smooth, plain);
}

TEST(Trainer, WarmStartBeginsWhereTheInitModelEnded) {
  Dataset data = bands(150, 1);
  Model init = train(mlp(), data, nullptr, quick(4));
  TrainOptions o = quick(1);
  double cold = train(mlp(), data, nullptr, o).history().at(0).loss;
  o.init = init;
  double warm = train(mlp(), data, nullptr, o).history().at(0).loss;
  EXPECT_LT(warm, cold);
}

TEST(Trainer, WarmStartFromAnIncompatibleModelIsRefused) {
  Dataset data = bands(60, 1);
  Model init = train(mlp(), data, nullptr, quick(1));
  TrainOptions o = quick(1);
  o.init = init;
  Genome other = Genome::from_json(R"({"optimizer": "adam", "layers": [{"type": "dense", "size": 5}]})");
  EXPECT_THROW(train(other, data, nullptr, o), InvalidArgument);
}

TEST(Trainer, EveryActivationTrains) {
  Dataset data = bands(48, 1);
  for (auto a : all_activations()) {
    std::string g = std::string(R"({"optimizer": {"name": "adam", "learning_rate": 0.001}, "layers": [{"type": "conv2d", "filters": 2, "kernel": 3, "activation": ")") +
                    std::string(name_of(a)) + R"("}, {"type": "dense", "size": 4, "activation": ")" + std::string(name_of(a)) + R"("}]})";
    EXPECT_NO_THROW(train(Genome::from_json(g), data, nullptr, quick(1))) << name_of(a);
  }
}

TEST(Trainer, EveryOptimizerLowersTheLoss) {
  Dataset data = bands(150, 1);
  for (auto opt : all_optimizers()) {
    double lr = opt == OptimizerName::Adadelta ? 1.0 : opt == OptimizerName::Sgd ? 0.1 : 0.01;
    std::string g = R"({"optimizer": {"name": ")" + std::string(name_of(opt)) + R"(", "learning_rate": )" +
                    std::to_string(lr) + R"(}, "layers": [{"type": "dense", "size": 16}]})";
    auto h = train(Genome::from_json(g), data, nullptr, quick(4)).history();
    EXPECT_LT(h.back().loss, h.front().loss) << name_of(opt);
  }
}

TEST(Trainer, BadOptionsAreRefusedByName) {
  Dataset data = bands(30, 1);
  TrainOptions o = quick(1);
  o.batch_size = 0;
  try {
    train(mlp(), data, nullptr, o);
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("batch_size"), std::string::npos);
  }
  o = quick(1);
  o.augment = 2;
  EXPECT_THROW(train(mlp(), data, nullptr, o), InvalidArgument);
}

TEST(Trainer, EmptyDatasetIsRefused) {
  Dataset empty = bands(30, 1).subset({});
  EXPECT_THROW(train(mlp(), empty, nullptr, quick(1)), InvalidArgument);
}

TEST(ModelFiles, SaveLoadGivesIdenticalPredictions) {
  Dataset data = bands(90, 1);
  Model m = train(mlp(), data, nullptr, quick(2));
  m.set_extra_json(R"({"note": "x"})");
  auto dir = temp_dir() / "model";
  m.save(dir.string());
  Model back = Model::load(dir.string());
  EXPECT_EQ(back.genome(), m.genome());
  EXPECT_EQ(back.categories(), m.categories());
  EXPECT_EQ(back.history().size(), 2u);
  EXPECT_EQ(back.extra_json(), m.extra_json());
  EXPECT_EQ(back.predict(data.pixels(), data.size()), m.predict(data.pixels(), data.size()));
}

TEST(ModelFiles, MissingOrCorruptFilesAreNamed) {
  auto dir = temp_dir();
  try {
    Model::load((dir / "nope").string());
    FAIL();
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("nope"), std::string::npos);
  }
  Dataset data = bands(30, 1);
  train(mlp(), data, nullptr, quick(1)).save((dir / "m").string());
  fs::resize_file(dir / "m" / "weights.safetensors", 100);
  EXPECT_THROW(Model::load((dir / "m").string()), IoError);
  fs::remove(dir / "m" / "weights.safetensors");
  try {
    Model::load((dir / "m").string());
    FAIL();
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("weights.safetensors"), std::string::npos);
  }
}

TEST(ModelFiles, PlannedParametersAreTheNetworksParameters) {
  // check_weights (torch-free) validates a model's weights against plan_parameters; the
  // network must hold exactly those names and shapes, or a checked file could still fail.
  const Genome cnn = Genome::from_json(
      R"({"optimizer": "adam", "layers": [{"type": "conv2d", "filters": 3, "kernel": [2, 3], "stride": 2},
          {"type": "maxpool2d", "kernel": 2}, {"type": "dense", "size": 5}]})");
  const auto plan = plan_network(cnn, Shape{2, 9, 9}, 4);
  const auto planned = plan_parameters(plan);
  const auto actual = Network(plan, 0).named_parameters();
  ASSERT_EQ(planned.size(), actual.size());
  for (size_t i = 0; i < planned.size(); ++i) {
    EXPECT_EQ(planned[i].name, actual[i].first);
    EXPECT_EQ(planned[i].shape, actual[i].second.sizes().vec()) << planned[i].name;
  }
}

TEST(ModelFiles, ModelJsonNumbersAreChecked) {
  // JSON numbers are doubles: one that does not fit the field's type is refused, not cast.
  Dataset data = bands(30, 1);
  const auto saved = nlohmann::json::parse(model_json_text(train(mlp(), data, nullptr, quick(1)).impl()));
  EXPECT_NO_THROW(parse_model_json(saved.dump(), "model.json"));
  auto with = [&](const nlohmann::json::json_pointer& field, double value) {
    nlohmann::json changed = saved;
    changed[field] = value;
    return changed.dump();
  };
  using pointer = nlohmann::json::json_pointer;
  EXPECT_THROW(parse_model_json(with(pointer("/version"), 1e300), "model.json"), IoError);
  EXPECT_THROW(parse_model_json(with(pointer("/input_shape/1"), 1e300), "model.json"), IoError);
  EXPECT_THROW(parse_model_json(with(pointer("/history/0/epoch"), -1e300), "model.json"), IoError);
  EXPECT_THROW(parse_model_json(with(pointer("/normalisation/std/0"), 1e300), "model.json"), IoError);
  EXPECT_THROW(parse_model_json(with(pointer("/normalisation/mean/0"), 1e39), "model.json"), IoError);
}

TEST(Metrics, ConfusionMatrixAgreesWithAccuracy) {
  Dataset data = bands(90, 1), test = bands(45, 3);
  Metrics r = train(mlp(), data, nullptr, quick(2)).evaluate(test, 2);
  ASSERT_EQ(r.confusion.size(), 9u);
  int64_t total = 0, diagonal = 0;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) {
      total += r.confusion[i * 3 + j];
      if (i == j) diagonal += r.confusion[i * 3 + j];
    }
  EXPECT_EQ(total, 45);
  EXPECT_DOUBLE_EQ(r.accuracy, diagonal / 45.0);
  EXPECT_GE(r.top_k, r.accuracy);
  EXPECT_EQ(r.k, 2);
  EXPECT_GE(r.f1, 0.0);
  EXPECT_LE(r.f1, 1.0);
}

TEST(Metrics, PredictionsAreProbabilities) {
  Dataset data = bands(30, 1);
  Model m = train(mlp(), data, nullptr, quick(1));
  auto p = m.predict(data.pixels(), 5, 2);
  ASSERT_EQ(p.size(), 15u);
  for (int i = 0; i < 5; ++i) EXPECT_NEAR(p[i * 3] + p[i * 3 + 1] + p[i * 3 + 2], 1.0, 1e-5);
}

TEST(Metrics, EvaluateRefusesAnotherShapeOrCategories) {
  Dataset data = bands(30, 1);
  Model m = train(mlp(), data, nullptr, quick(1));
  std::vector<uint8_t> px(4 * 16, 0);
  std::vector<int64_t> lb(4, 0);
  Dataset other = Dataset::from_buffers(px.data(), lb.data(), 4, Shape{1, 4, 4}, {"a", "b", "c"});
  EXPECT_THROW(m.evaluate(other), InvalidArgument);
}
