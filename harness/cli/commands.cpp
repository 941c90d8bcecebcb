#include "harness/cli/commands.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "cpharness/version.h"
#include "harness/io/input_error.h"
#include "harness/model/init.h"
#include "harness/train/case.h"
#include "harness/train/trainer.h"

namespace cpharness::cli {
namespace {

using nlohmann::json;

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr const char* kUsage =
    "usage: cpharness <verb> [options]\n"
    "  run CASE... [--cp 1] [--out DIR]   train each case at cp 1, print per-step loss and grad norm\n"
    "  list [CASE...]                     list cases and what they need\n";

void write_atomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    if (!out) throw io::InputError(path, "output", "cannot write");
    out << text;
    if (!out.flush()) throw io::InputError(path, "output", "write failed");
  }
  std::filesystem::rename(tmp, path);
}

json run_case_cp1(const train::Case& c) {
  model::Gemma4Model m(c.model);
  model::init_weights(m, c.init_seed);
  if (!c.checkpoint.empty()) throw io::InputError(c.path, "weights.checkpoint", "checkpoint loading is not wired into run yet");
  m->to(c.dtype == train::DtypeLane::kBf16 ? torch::kBFloat16 : torch::kFloat32);
  train::Trainer trainer(m, c.optimizer, /*use_share_holder=*/true);
  auto batch = train::make_batch(c.data);
  model::EagerAttention eager;
  json losses = json::array(), norms = json::array();
  for (int64_t s = 0; s < c.steps; ++s) {
    auto r = trainer.step(batch, eager);
    const bool finite = std::isfinite(r.loss) && std::isfinite(r.grad_norm);
    std::cerr << fmt::format("[{}] cp1 {} step {}: loss {:.6f} grad_norm {:.6f} {}\n", c.id, train::to_string(c.dtype), s,
                             r.loss, r.grad_norm, finite ? "ok" : "NON-FINITE");
    losses.push_back(r.loss);
    norms.push_back(r.grad_norm);
  }
  return {{"id", c.id}, {"dtype", train::to_string(c.dtype)}, {"model", c.model.name},
          {"trajectories", {{"1", {{"loss", losses}, {"grad_norm", norms}}}}}};
}

}  // namespace

int run_command(const std::vector<std::string>& args) {
  std::vector<std::string> case_paths;
  std::string out_dir;
  std::vector<int64_t> cp = {1};
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--out" && i + 1 < args.size()) out_dir = args[++i];
    else if (args[i] == "--cp" && i + 1 < args.size()) {
      cp.clear();
      std::stringstream ss(args[++i]);
      for (std::string item; std::getline(ss, item, ',');) {
        try {
          cp.push_back(std::stoll(item));
        } catch (...) {
          throw UsageError("--cp expects a comma-separated list of integers, got '" + args[i] + "'");
        }
      }
    } else if (args[i].rfind("--", 0) == 0) throw UsageError("unknown option " + args[i]);
    else case_paths.push_back(args[i]);
  }
  if (case_paths.empty()) throw UsageError("run needs at least one CASE");
  for (auto n : cp)
    if (n != 1) throw UsageError(fmt::format("--cp {}: only cp 1 runs so far (the CP runtime is not built yet)", n));
  auto cases = train::load_cases(case_paths);  // validate every case before running any
  const auto start = std::chrono::steady_clock::now();
  json results = json::array();
  bool all_finite = true;
  for (auto& c : cases) {
    if (!c.requires_features.empty()) {
      std::cerr << fmt::format("[{}] skipped: requires {}\n", c.id, c.requires_features.front());
      results.push_back({{"id", c.id}, {"status", "skipped"}, {"reason", "requires " + c.requires_features.front()}});
      continue;
    }
    auto r = run_case_cp1(c);
    for (auto& v : r["trajectories"]["1"]["loss"]) all_finite = all_finite && std::isfinite(v.get<double>());
    results.push_back(r);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!out_dir.empty()) {
    std::filesystem::create_directories(out_dir);
    json out = {{"tool", {{"name", kToolName}, {"version", kToolVersion}, {"git_sha", kGitSha}}},
                {"duration_s", seconds}, {"cases", results}};
    write_atomically(out_dir + "/cp1_run.json", out.dump(2) + "\n");
  }
  std::cerr << fmt::format("{} case(s) in {:.1f}s\n", cases.size(), seconds);
  return all_finite ? 0 : 1;
}

int list_command(const std::vector<std::string>& args) {
  auto cases = train::load_cases(args.empty() ? std::vector<std::string>{"cases/default"} : args);
  for (auto& c : cases)
    std::cout << fmt::format("{:<28} {:<10} {:<5} steps {} cp {} {}\n", c.id, c.model.name, train::to_string(c.dtype), c.steps,
                             fmt::join(c.cp_sizes, ","), c.requires_features.empty() ? "" : "requires " + c.requires_features.front());
  return 0;
}

int dispatch(const std::vector<std::string>& args) {
  try {
    if (args.empty() || args[0] == "--help" || args[0] == "-h") {
      std::cout << kUsage;
      return args.empty() ? 2 : 0;
    }
    const std::vector<std::string> rest(args.begin() + 1, args.end());
    if (args[0] == "run") return run_command(rest);
    if (args[0] == "list") return list_command(rest);
    throw UsageError("unknown verb '" + args[0] + "'");
  } catch (const UsageError& e) {
    std::cerr << "cpharness: " << e.what() << "\n" << kUsage;
    return 2;
  } catch (const io::InputError& e) {
    std::cerr << "cpharness: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "cpharness: internal error: " << e.what() << "\n";
    return 2;
  }
}

}  // namespace cpharness::cli
