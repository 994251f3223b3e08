// dicebox._core: the pybind11 face of the C++ core. Numpy buffers in and out, no torch
// headers (so pybind11 never meets the copy bundled in torch), the GIL released around
// every long call, core exceptions translated to Python ones. No logic lives here.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>

#include "dicebox/dataset.h"
#include "dicebox/errors.h"
#include "dicebox/evolution.h"
#include "dicebox/genome.h"
#include "dicebox/loader.h"
#include "dicebox/model.h"
#include "dicebox/optim_trace.h"
#include "dicebox/trainer.h"

namespace py = pybind11;
using namespace dicebox;

namespace {

template <typename T>
py::array_t<T> read_only_view(const T* data, std::vector<py::ssize_t> shape, py::handle base) {
  py::array_t<T> a(shape, data, base);
  py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return a;
}

// A numpy array that owns a shared vector without copying it.
template <typename T>
py::array_t<T> share(std::shared_ptr<std::vector<T>> data, std::vector<py::ssize_t> shape) {
  auto* holder = new std::shared_ptr<std::vector<T>>(std::move(data));
  py::capsule owner(holder, [](void* p) { delete static_cast<std::shared_ptr<std::vector<T>>*>(p); });
  return py::array_t<T>(shape, (*holder)->data(), owner);
}

template <typename T>
py::array_t<T> to_array(std::vector<T> data, std::vector<py::ssize_t> shape) {
  return share(std::make_shared<std::vector<T>>(std::move(data)), std::move(shape));
}

py::tuple shape_tuple(const Shape& s) { return py::make_tuple(s.channels, s.height, s.width); }

using ShapeTuple = std::tuple<int64_t, int64_t, int64_t>;

Shape to_shape(const ShapeTuple& t) { return Shape{std::get<0>(t), std::get<1>(t), std::get<2>(t)}; }

Shape image_shape(const py::array& images) {
  if (images.ndim() != 4)
    throw InvalidArgument("images: expected a uint8 array [N, C, H, W], got " + std::to_string(images.ndim()) +
                          " dimensions");
  return Shape{images.shape(1), images.shape(2), images.shape(3)};
}

py::dict record_dict(const EpochRecord& r) {
  py::dict d;
  auto num = [](double v) -> py::object { return std::isfinite(v) ? py::object(py::float_(v)) : py::none(); };
  d["epoch"] = r.epoch;
  d["loss"] = num(r.loss);
  d["accuracy"] = r.accuracy;
  d["val_loss"] = num(r.val_loss);
  d["val_accuracy"] = num(r.val_accuracy);
  d["samples_per_second"] = r.samples_per_second;
  d["seconds"] = r.seconds;
  return d;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "dicebox's compiled core (LibTorch). Use the dicebox package, not this module.";

  static py::exception<Cancelled> cancelled(m, "Cancelled", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Cancelled& e) {
      py::set_error(cancelled, e.what());
    } catch (const InvalidArgument& e) {
      py::set_error(PyExc_ValueError, e.what());
    } catch (const IoError& e) {
      py::set_error(PyExc_OSError, e.what());
    }
  });

  m.def("set_threads", &set_threads, py::arg("threads"));
  m.def("get_threads", &get_threads);

  py::class_<Dataset>(m, "Dataset")
      .def_static(
          "from_arrays",
          [](py::array_t<uint8_t, py::array::c_style | py::array::forcecast> images,
             py::array_t<int64_t, py::array::c_style | py::array::forcecast> labels,
             std::vector<std::string> categories) {
            Shape s = image_shape(images);
            if (labels.ndim() != 1 || labels.shape(0) != images.shape(0))
              throw InvalidArgument("labels: expected " + std::to_string(images.shape(0)) + " labels (one per image), got shape with " +
                                    std::to_string(labels.ndim() == 1 ? labels.shape(0) : -1) + " entries");
            py::gil_scoped_release release;
            return Dataset::from_buffers(images.data(), labels.data(), images.shape(0), s, std::move(categories));
          },
          py::arg("images"), py::arg("labels"), py::arg("categories"))
      .def_static("from_idx", &Dataset::from_idx, py::arg("images_path"), py::arg("labels_path"),
                  py::call_guard<py::gil_scoped_release>())
      .def_static("load", &Dataset::load, py::arg("path"), py::call_guard<py::gil_scoped_release>())
      .def("save", &Dataset::save, py::arg("path"), py::call_guard<py::gil_scoped_release>())
      .def("__len__", &Dataset::size)
      .def_property_readonly("shape", [](const Dataset& d) { return shape_tuple(d.shape()); })
      .def_property_readonly("categories", &Dataset::categories)
      .def_property_readonly("counts", &Dataset::counts)
      .def_property_readonly("images", [](py::object self) {
        const auto& d = self.cast<const Dataset&>();
        const Shape& s = d.shape();
        return read_only_view<uint8_t>(d.pixels(), {d.size(), s.channels, s.height, s.width}, self);
      })
      .def_property_readonly("labels", [](py::object self) {
        const auto& d = self.cast<const Dataset&>();
        return read_only_view<int64_t>(d.labels(), {d.size()}, self);
      })
      .def("subset",
           [](const Dataset& d, py::array_t<int64_t, py::array::c_style | py::array::forcecast> idx) {
             std::vector<int64_t> v(idx.data(), idx.data() + idx.size());
             py::gil_scoped_release release;
             return d.subset(v);
           })
      .def("split", &Dataset::split, py::arg("fractions"), py::arg("seed"),
           py::call_guard<py::gil_scoped_release>());

  m.def("canonical_genome", [](const std::string& text) { return Genome::from_json(text).to_json(); });
  m.def("plan_network", [](const std::string& genome, std::tuple<int64_t, int64_t, int64_t> shape, int64_t classes) {
    auto [c, h, w] = shape;
    return plan_to_json(plan_network(Genome::from_json(genome), Shape{c, h, w}, classes));
  });
  m.def("activations", [] {
    std::vector<std::string> v;
    for (auto a : all_activations()) v.emplace_back(name_of(a));
    return v;
  });
  m.def("optimizers", [] {
    std::vector<std::string> v;
    for (auto o : all_optimizers()) v.emplace_back(name_of(o));
    return v;
  });

  // Evolution operators: genomes and spaces travel as canonical JSON strings.
  m.def("space_preset", [](const std::string& name) { return SearchSpace::preset(name).to_json(); });
  m.def("canonical_space", [](const std::string& text) { return SearchSpace::from_json(text).to_json(); });
  m.def(
      "network_cost",
      [](const std::string& genome, ShapeTuple shape, int64_t classes) {
        NetworkCost c = network_cost(Genome::from_json(genome), to_shape(shape), classes);
        return py::make_tuple(c.parameters, c.macs);
      },
      py::arg("genome"), py::arg("shape"), py::arg("classes"));
  m.def(
      "random_genome",
      [](const std::string& space, ShapeTuple shape, int64_t classes, uint64_t seed) {
        return random_genome(SearchSpace::from_json(space), to_shape(shape), classes, seed).to_json();
      },
      py::arg("space"), py::arg("shape"), py::arg("classes"), py::arg("seed"));
  m.def(
      "crossover",
      [](const std::string& a, const std::string& b, const std::string& space, ShapeTuple shape, int64_t classes,
         uint64_t seed) {
        return crossover(Genome::from_json(a), Genome::from_json(b), SearchSpace::from_json(space), to_shape(shape),
                         classes, seed)
            .to_json();
      },
      py::arg("a"), py::arg("b"), py::arg("space"), py::arg("shape"), py::arg("classes"), py::arg("seed"));
  m.def(
      "mutate",
      [](const std::string& genome, const std::string& space, ShapeTuple shape, int64_t classes, double chance,
         uint64_t seed) {
        std::vector<std::string> applied;
        auto g = mutate(Genome::from_json(genome), SearchSpace::from_json(space), to_shape(shape), classes, chance,
                        seed, &applied);
        return py::make_tuple(g.to_json(), applied);
      },
      py::arg("genome"), py::arg("space"), py::arg("shape"), py::arg("classes"), py::arg("chance"), py::arg("seed"));
  m.def(
      "breed",
      [](const std::vector<std::tuple<int64_t, std::string, double>>& scored, int64_t population, double retain,
         double random_select, double mutate_chance, const std::string& space, ShapeTuple shape, int64_t classes,
         uint64_t seed) {
        std::vector<Scored> in;
        for (const auto& [id, genome, fitness] : scored) in.push_back(Scored{id, Genome::from_json(genome), fitness});
        BreedOptions o;
        o.population = population;
        o.retain = retain;
        o.random_select = random_select;
        o.mutate_chance = mutate_chance;
        std::vector<std::pair<std::string, std::vector<int64_t>>> out;
        for (auto& child : breed(in, o, SearchSpace::from_json(space), to_shape(shape), classes, seed))
          out.emplace_back(child.genome.to_json(), child.parents);
        return out;
      },
      py::arg("scored"), py::arg("population"), py::arg("retain"), py::arg("random_select"),
      py::arg("mutate_chance"), py::arg("space"), py::arg("shape"), py::arg("classes"), py::arg("seed"));

  py::class_<CancelToken, std::shared_ptr<CancelToken>>(m, "CancelToken")
      .def(py::init<>())
      .def("cancel", &CancelToken::cancel)
      .def_property_readonly("cancelled", &CancelToken::cancelled);

  py::class_<Model>(m, "Model")
      .def_static("load", &Model::load, py::arg("dir"), py::call_guard<py::gil_scoped_release>())
      .def("save", &Model::save, py::arg("dir"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("genome_json", [](const Model& mo) { return mo.genome().to_json(); })
      .def_property_readonly("categories", &Model::categories)
      .def_property_readonly("input_shape", [](const Model& mo) { return shape_tuple(mo.input_shape()); })
      .def_property_readonly("normalisation",
                             [](const Model& mo) { return py::make_tuple(mo.normalisation().mean, mo.normalisation().std); })
      .def_property_readonly("history",
                             [](const Model& mo) {
                               py::list out;
                               for (const auto& r : mo.history()) out.append(record_dict(r));
                               return out;
                             })
      .def_property("extra_json", &Model::extra_json, &Model::set_extra_json)
      .def_property_readonly("plan_json", &Model::plan_json)
      .def("predict",
           [](const Model& mo, py::array_t<uint8_t, py::array::c_style | py::array::forcecast> images, int64_t batch_size) {
             Shape s = image_shape(images);
             if (s != mo.input_shape())
               throw InvalidArgument("images: expected shape [N, " + std::to_string(mo.input_shape().channels) + ", " +
                                     std::to_string(mo.input_shape().height) + ", " + std::to_string(mo.input_shape().width) +
                                     "], got [N, " + std::to_string(s.channels) + ", " + std::to_string(s.height) + ", " +
                                     std::to_string(s.width) + "]");
             const int64_t n = images.shape(0);
             const auto classes = static_cast<py::ssize_t>(mo.categories().size());
             std::vector<float> probs;
             {
               py::gil_scoped_release release;
               probs = mo.predict(images.data(), n, batch_size);
             }
             return to_array(std::move(probs), {n, classes});
           },
           py::arg("images"), py::arg("batch_size") = 256)
      .def("evaluate",
           [](const Model& mo, const Dataset& d, int64_t k, int64_t batch_size) {
             Metrics r;
             {
               py::gil_scoped_release release;
               r = mo.evaluate(d, k, batch_size);
             }
             const auto classes = static_cast<py::ssize_t>(mo.categories().size());
             py::dict out;
             out["accuracy"] = r.accuracy;
             out["loss"] = r.loss;
             out["top_k"] = r.top_k;
             out["k"] = r.k;
             out["precision"] = r.precision;
             out["recall"] = r.recall;
             out["f1"] = r.f1;
             out["count"] = r.count;
             out["confusion"] = to_array(std::move(r.confusion), {classes, classes});
             return out;
           },
           py::arg("dataset"), py::arg("k") = 5, py::arg("batch_size") = 256)
      .def("weights", [](const Model& mo) {
        py::dict out;
        for (auto& a : mo.weights()) {
          std::vector<py::ssize_t> shape(a.shape.begin(), a.shape.end());
          out[py::str(a.name)] = to_array(std::move(a.data), shape);
        }
        return out;
      });

  m.def(
      "train",
      [](const std::string& genome_json, const Dataset& train_set, const Dataset* val, int64_t epochs,
         int64_t batch_size, int64_t patience, uint64_t seed, double augment, double label_smoothing, int threads,
         std::string checkpoint_dir, const Model* init, std::shared_ptr<CancelToken> cancel, py::object callback,
         std::string device) {
        Genome genome = Genome::from_json(genome_json);
        TrainOptions o;
        o.epochs = epochs;
        o.batch_size = batch_size;
        o.patience = patience;
        o.seed = seed;
        o.augment = augment;
        o.label_smoothing = label_smoothing;
        o.threads = threads;
        o.checkpoint_dir = std::move(checkpoint_dir);
        o.device = std::move(device);
        if (init) o.init = *init;
        o.cancel = std::move(cancel);
        if (!callback.is_none()) {
          o.on_epoch = [callback](const EpochRecord& r) {
            py::gil_scoped_acquire gil;
            py::object answer = callback(record_dict(r));
            return !(answer.is(py::bool_(false)));
          };
        }
        // Ctrl-C in a terminal or a notebook's interrupt reaches long runs here.
        o.on_batch = [](int64_t, int64_t, int64_t) {
          py::gil_scoped_acquire gil;
          if (PyErr_CheckSignals() != 0) throw py::error_already_set();
          return true;
        };
        py::gil_scoped_release release;
        return train(genome, train_set, val, o);
      },
      py::arg("genome_json"), py::arg("train"), py::arg("val"), py::arg("epochs"), py::arg("batch_size"),
      py::arg("patience"), py::arg("seed"), py::arg("augment"), py::arg("label_smoothing"), py::arg("threads"),
      py::arg("checkpoint_dir"), py::arg("init"), py::arg("cancel"), py::arg("callback"), py::arg("device"));

  py::class_<BatchLoader>(m, "BatchLoader")
      .def(py::init([](const Dataset& d, int64_t batch_size, bool shuffle, uint64_t seed, double augment,
                       std::vector<float> mean, std::vector<float> std, int threads, int prefetch, bool drop_last) {
             LoaderOptions o;
             o.batch_size = batch_size;
             o.shuffle = shuffle;
             o.seed = seed;
             o.augment = augment;
             o.mean = std::move(mean);
             o.std = std::move(std);
             o.threads = threads;
             o.prefetch = prefetch;
             o.drop_last = drop_last;
             return std::make_unique<BatchLoader>(d, o);
           }),
           py::arg("dataset"), py::arg("batch_size") = 64, py::arg("shuffle") = true, py::arg("seed") = 0,
           py::arg("augment") = 0.0, py::arg("mean") = std::vector<float>{}, py::arg("std") = std::vector<float>{},
           py::arg("threads") = 1, py::arg("prefetch") = 4, py::arg("drop_last") = false)
      .def("__len__", &BatchLoader::batches_per_epoch)
      .def("start_epoch", &BatchLoader::start_epoch, py::arg("epoch"), py::call_guard<py::gil_scoped_release>())
      .def("next", [](BatchLoader& l) -> py::object {
        Batch b;
        bool got;
        {
          py::gil_scoped_release release;
          got = l.next(b);
        }
        if (!got) return py::none();
        return py::make_tuple(share(b.images, {b.size, b.shape.channels, b.shape.height, b.shape.width}),
                              share(b.labels, {b.size}));
      });

  m.def(
      "optimizer_trace",
      [](const std::string& name, double lr, py::array_t<float, py::array::c_style | py::array::forcecast> init,
         py::array_t<float, py::array::c_style | py::array::forcecast> grads) {
        if (init.ndim() != 1 || grads.ndim() != 2 || grads.shape(1) != init.shape(0))
          throw InvalidArgument("optimizer_trace: init must be [n] and grads [steps, n]");
        std::vector<float> start(init.data(), init.data() + init.size());
        std::vector<float> g(grads.data(), grads.data() + grads.size());
        auto out = optimizer_trace(name, lr, start, g, grads.shape(0));
        return to_array(std::move(out), {grads.shape(0), init.shape(0)});
      },
      py::arg("name"), py::arg("lr"), py::arg("init"), py::arg("grads"));
}
