// Hostile case values are input errors naming the case file and the key, found when the case is loaded: never a
// crash, an allocation the machine cannot hold, a run that fails (or passes) on a value that could not mean
// anything, or an internal error naming nothing.
#include <gtest/gtest.h>

#include <functional>
#include <random>
#include <string>
#include <vector>

#include "harness/io/input_error.h"
#include "harness/model/config.h"
#include "harness/model/layer_geometry.h"
#include "harness/runner/suite.h"
#include "harness/train/case.h"
#include "model_fixtures.h"

namespace cpharness {
namespace {

using nlohmann::json;

json good_case() {
  return json::parse(R"({"id": "v", "model": {"preset": "tiny-31b"}, "data": {"seq_len": 24, "padding": 4, "seed": 1},
                         "steps": 2, "cp": [2]})");
}

// `spoil` applied to a good case must be refused, naming `subject` (a prefix of the error's key is enough).
void expect_refused(const std::string& what, const std::function<void(json&)>& spoil, const std::string& subject) {
  SCOPED_TRACE(what);
  json j = good_case();
  spoil(j);
  try {
    train::case_from_json(j, "v.json");
    ADD_FAILURE() << "accepted";
  } catch (const io::InputError& e) {
    EXPECT_EQ(e.file(), "v.json") << e.what();
    EXPECT_EQ(e.subject().rfind(subject, 0), 0u) << e.what();
  }
}

TEST(CaseValidation, ValuesThatCannotMeanAnythingAreRefusedNamingTheKey) {
  ASSERT_NO_THROW(train::case_from_json(good_case(), "v.json"));
  // Model: a zero or negative head count (a division by zero crashed the process), a config of nothing (a default
  // 2.6 B-parameter model), an unknown RoPE key (a typo that silently changed the RoPE).
  expect_refused("global kv heads 0", [](json& j) { j["model"]["overrides"] = {{"num_global_key_value_heads", 0}}; },
                 "model.overrides.num_global_key_value_heads");
  expect_refused("global kv heads -1", [](json& j) { j["model"]["overrides"] = {{"num_global_key_value_heads", -1}}; },
                 "model.overrides.num_global_key_value_heads");
  expect_refused("k_eq_v with 0 global heads", [](json& j) {
    j["model"] = {{"preset", "tiny-e4b"}, {"overrides", {{"attention_k_eq_v", true}, {"num_global_key_value_heads", 0}}}};
  }, "model.overrides.num_global_key_value_heads");
  expect_refused("empty inline config", [](json& j) { j["model"] = {{"config", json::object()}}; }, "model.config.");
  expect_refused("rope typo", [](json& j) {
    j["model"]["overrides"] = {{"rope_parameters", {{"full_attention", {{"rope_typo", "default"}}}}}};
  }, "model.overrides.rope_parameters.full_attention.rope_typo");
  // Optimizer and tolerances: values AdamW refuses mid-run, or that make every update NaN, or every check fail.
  for (const auto& [key, value] : std::vector<std::pair<std::string, double>>{
           {"lr", -1}, {"lr", 1e38}, {"beta1", 2}, {"beta2", -0.1}, {"eps", -1}, {"eps", 0}, {"weight_decay", -1}})
    expect_refused("optimizer." + key, [&](json& j) { j["optimizer"] = {{key, value}}; }, "optimizer." + key);
  for (const char* key : {"bf16_k", "bf16_floor", "cp_growth", "fp32_relative", "fp32_oracle_k", "activation_memory"})
    expect_refused(key, [&](json& j) { j["tolerances"] = {{key, -1.0}}; }, std::string("tolerances.") + key);
  // Identity and sizes: an empty id, no candidate, steps no parity case needs, a checkpoint named by "".
  expect_refused("empty id", [](json& j) { j["id"] = ""; }, "id");
  expect_refused("100 KB id", [](json& j) { j["id"] = std::string(100000, 'x'); }, "id");
  // Ids are printed on terminals and drawn on the page as they are: no control, escape or bidi characters.
  for (const std::string bad : {std::string("a\x1b[2Jb"), std::string("nul\0", 4), std::string("bell\a"), std::string("del\x7f"),
                                std::string("c1\xc2\x9b"), std::string("rlo\xe2\x80\xae"), std::string("lri\xe2\x81\xa7"),
                                std::string("rlm\xe2\x80\x8f")})
    expect_refused("id with a control character", [&](json& j) { j["id"] = bad; }, "id");
  json unicode = good_case();
  unicode["id"] = "e4b-\xc3\xa9t\xc3\xa9-\xe2\x80\x94";  // accents and an em dash are fine
  EXPECT_NO_THROW(train::case_from_json(unicode, "v.json"));
  // A row of padding only (it was named as a document length the case never wrote), and every layer KV-shared.
  expect_refused("all padding", [](json& j) { j["data"]["padding"] = 24; }, "data.padding");
  expect_refused("every layer shared", [](json& j) { j["model"]["overrides"] = {{"num_kv_shared_layers", 1000}}; },
                 "model.overrides.num_kv_shared_layers");
  expect_refused("no cp", [](json& j) { j["cp"] = json::array(); }, "cp");
  expect_refused("a cp size twice", [](json& j) { j["cp"] = {2, 3, 2}; }, "cp[2]");  // ran and counted twice
  expect_refused("huge steps", [](json& j) { j["steps"] = int64_t(1) << 62; }, "steps");
  // A block longer than any sequence (2^40 was an internal error after cp 1 had run), and integers past 2^63,
  // which arrive unsigned and wrapped to negative values ("must be positive, got -9223372036854775808").
  expect_refused("huge block", [](json& j) { j["block_size"] = int64_t(1) << 40; }, "block_size");
  expect_refused("2^63 width", [](json& j) { j["model"]["overrides"] = {{"hidden_size", uint64_t(1) << 63}}; },
                 "model.overrides.hidden_size");
  expect_refused("2^63 steps", [](json& j) { j["steps"] = uint64_t(1) << 63; }, "steps");
  expect_refused("2^63 vision start", [](json& j) { j["data"]["vision_runs"] = {{uint64_t(1) << 63, 1}}; },
                 "data.vision_runs[0]");
  for (const auto& [key, value] : std::vector<std::pair<std::string, json>>{
           {"model.overrides.hidden_size", {{"model", {{"preset", "tiny-31b"}, {"overrides", {{"hidden_size", uint64_t(1) << 63}}}}}}},
           {"steps", {{"steps", uint64_t(1) << 63}}}}) {
    json j = good_case();
    j.update(value);
    try {
      train::case_from_json(j, "v.json");
    } catch (const io::InputError& e) {
      EXPECT_NE(std::string(e.what()).find("9223372036854775808"), std::string::npos) << key << ": " << e.what();
    }
  }
  expect_refused("empty checkpoint", [](json& j) { j["weights"] = {{"checkpoint", ""}}; }, "weights.checkpoint");
  // Data: a vision run whose start + length overflows, and a batch with no target at all (nothing to train).
  expect_refused("vision overflow", [](json& j) { j["data"]["vision_runs"] = {{int64_t(9223372036854775000), 1000}}; },
                 "data.vision_runs[0]");
  expect_refused("no documents", [](json& j) { j["data"]["document_lengths"] = json::array(); }, "data.document_lengths");
  expect_refused("no target", [](json& j) { j["data"]["document_lengths"] = std::vector<int>(20, 1); }, "data");
  // Vision runs that touch or overlap: one group to transformers (it derives groups from contiguous vision tokens).
  expect_refused("touching vision runs", [](json& j) { j["data"]["vision_runs"] = {{9, 3}, {2, 4}, {6, 3}}; },
                 "data.vision_runs[2]");
  expect_refused("overlapping vision runs", [](json& j) { j["data"]["vision_runs"] = {{2, 5}, {4, 2}}; },
                 "data.vision_runs[1]");
  json apart = good_case();
  apart["data"]["vision_runs"] = {{10, 3}, {2, 4}, {7, 2}};  // in any order, one text token apart
  EXPECT_EQ(train::case_from_json(apart, "v.json").data.layout.vision_runs.size(), 3u);
}

// model.vision_mask picks the vision-group rule of a transformers version for a vision model: groups inside the
// window (5.13 on) or past it (5.5 .. 5.8) on sliding layers only, or past it and on full layers too (5.9 .. 5.12); a
// misspelt rule, or one for a model without vision groups, is refused.
TEST(CaseValidation, VisionMaskPicksTheGroupRuleOfVisionModelsOnly) {
  using model::VisionMask;
  json j = good_case();
  EXPECT_EQ(train::case_from_json(j, "v.json").model.vision_mask, VisionMask::kGroupInsideWindow);
  struct Rule {
    const char* name;
    VisionMask mask;
    bool past_window, full_layers_open;
  };
  for (const Rule& r : {Rule{"group_inside_window", VisionMask::kGroupInsideWindow, false, false},
                        Rule{"group_past_window", VisionMask::kGroupPastWindow, true, false},
                        Rule{"group_on_every_layer", VisionMask::kGroupOnEveryLayer, true, true}}) {
    SCOPED_TRACE(r.name);
    j["model"]["vision_mask"] = r.name;
    const auto c = train::case_from_json(j, "v.json").model;
    EXPECT_EQ(c.vision_mask, r.mask);
    EXPECT_EQ(model::to_string(c.vision_mask), r.name);
    int64_t full = 0;
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      const auto g = model::layer_geometry(c, l);
      full += c.is_full(l);
      EXPECT_EQ(g.vision_bidirectional, !c.is_full(l) || r.full_layers_open) << "layer " << l;
      EXPECT_EQ(g.vision_group_past_window, !c.is_full(l) && r.past_window) << "layer " << l;
    }
    ASSERT_GT(full, 0) << "the case has no full layer to tell the rules apart";
  }
  expect_refused("misspelt rule", [](json& j) { j["model"]["vision_mask"] = "past_window"; }, "model.vision_mask");
  expect_refused("not a string", [](json& j) { j["model"]["vision_mask"] = true; }, "model.vision_mask");
  expect_refused("no vision groups", [](json& j) {
    j["model"] = {{"preset", "tiny-e4b"}, {"vision_mask", "group_past_window"}};
  }, "model.vision_mask");
}

// A misspelt check selected nothing and the case passed with only train.trained judged.
TEST(CaseValidation, ChecksAreCatalogueNamesOrPrefixesOfOne) {
  for (const char* bad : {"train.loss_parit", "train", "cache.build", "bogus.", "mask.dense_slice.", ""})
    expect_refused(std::string("checks ") + bad, [&](json& j) { j["checks"] = {"attention.parity", bad}; }, "checks[1]");
  expect_refused("no check", [](json& j) { j["checks"] = json::array(); }, "checks");  // read as every check
  for (const char* good : {"train.loss_parity", "cache.", "golden.match", "power.boundary_label", "ring."}) {
    json j = good_case();
    j["checks"] = {good};
    EXPECT_EQ(train::case_from_json(j, "v.json").checks, std::vector<std::string>{good});
  }
}

TEST(CaseValidation, SeedsTakeTheWholeUnsignedRange) {
  json j = good_case();
  j["data"]["seed"] = uint64_t(18446744073709551615ull);
  j["weights"] = {{"init_seed", uint64_t(9223372036854775808ull)}};
  const auto c = train::case_from_json(j, "v.json");
  EXPECT_EQ(c.data.seed, 18446744073709551615ull);
  EXPECT_EQ(c.init_seed, 9223372036854775808ull);
  j["data"]["seed"] = -1;
  try {
    train::case_from_json(j, "v.json");
    ADD_FAILURE() << "accepted a negative seed";
  } catch (const io::InputError& e) {
    EXPECT_EQ(e.subject(), "data.seed");
  }
  // libtorch's generator keeps the low 32 bits of a seed: 2^32 and 2^63 drew seed 0's batch and weights.
  const auto config = model::preset_config("tiny-31b");
  const auto batch0 = testing::structured_batch(config, 48, 0);
  const auto weights0 = testing::make_model(config, torch::kFloat32, 0)->embed_tokens->weight;
  for (const uint64_t high : {uint64_t(1) << 32, uint64_t(1) << 63}) {
    SCOPED_TRACE(high);
    EXPECT_FALSE(torch::equal(testing::structured_batch(config, 48, high).input_ids, batch0.input_ids));
    EXPECT_FALSE(torch::equal(testing::make_model(config, torch::kFloat32, high)->embed_tokens->weight, weights0));
  }
}

// A case whose candidates are all the reference's size compares nothing; a model that cannot fit the host is
// refused before it is built. Both are the runner's to say (they depend on --cp and the machine).
TEST(CaseValidation, NothingToCompareAndAModelLargerThanTheHostAreRefusedBeforeAnyWork) {
  auto c = train::case_from_json(good_case(), "v.json");
  runner::SuiteOptions options;
  EXPECT_FALSE(runner::unsupported_configuration(c, options)) << *runner::unsupported_configuration(c, options);
  c.cp_sizes = {1};
  ASSERT_TRUE(runner::unsupported_configuration(c, options));
  EXPECT_NE(runner::unsupported_configuration(c, options)->find("nothing would be compared"), std::string::npos);
  c.cp_sizes = {2};
  c.reference_cp = 2;
  EXPECT_TRUE(runner::unsupported_configuration(c, options));
  c.reference_cp = 1;
  c.model = model::preset_config("31b");  // 31 B parameters: far more than any CI host holds in fp32 with AdamW
  ASSERT_TRUE(runner::unsupported_configuration(c, options));
  EXPECT_NE(runner::unsupported_configuration(c, options)->find("host memory"), std::string::npos);
}

// Checks a case selects that run can never produce: the case passed on train.trained alone (exit 0, bisect "good").
TEST(CaseValidation, ASelectionThatCanProduceNoCheckIsRefusedBeforeAnyWork) {
  runner::SuiteOptions options;
  auto refused = [&](json spoil, const std::string& reason) {
    json j = good_case();  // tiny-31b: no KV-shared layers, no golden
    j.update(spoil);
    const auto c = train::case_from_json(j, "v.json");
    const auto why = runner::unsupported_configuration(c, options);
    ASSERT_TRUE(why) << spoil.dump();
    EXPECT_NE(why->find(reason), std::string::npos) << *why;
  };
  refused({{"checks", {"attention.parity", "kvshare."}}}, "checks[1] 'kvshare.' selects no check this case can run: the model has no KV-shared layers");
  refused({{"checks", {"kvshare.loss_parity"}}}, "checks[0]");
  refused({{"checks", {"golden.match"}}}, "names no golden");
  refused({{"checks", {"memory.activations"}}}, "names no golden");
  refused({{"checks", {"hf.parity"}}}, "hf-parity");
  // A prefix is enough when one of its checks can run, and a model with KV sharing runs kvshare.
  for (const json& fine : {json{{"checks", {"train.", "cache."}}}, json{{"checks", {"kvshare."}}, {"model", {{"preset", "tiny-e4b"}}}}}) {
    json j = good_case();
    j.update(fine);
    const auto c = train::case_from_json(j, "v.json");
    EXPECT_FALSE(runner::unsupported_configuration(c, options)) << fine.dump();
  }
}

// data.rows: one layout per row, keys left out taken from the shared layout; every mistake names the row and key.
TEST(CaseValidation, RowLayoutsAreOnePerRowAndNamedInEveryError) {
  auto with_rows = [](json rows) {
    return [rows](json& j) {
      j["data"]["batch"] = 2;
      j["data"]["document_lengths"] = {10, 10};
      j["data"]["rows"] = rows;
    };
  };
  json ok = good_case();
  with_rows(json::array({json::object(), {{"document_lengths", {5, 10, 7}}, {"padding", 2}}}))(ok);
  ASSERT_NO_THROW(train::case_from_json(ok, "v.json"));
  expect_refused("one layout for two rows", with_rows(json::array({json::object()})), "data.rows");
  expect_refused("not an array", with_rows(json::object()), "data.rows");
  expect_refused("a row that is not an object", with_rows(json::array({json::object(), 3})), "data.rows[1]");
  expect_refused("unknown row key", with_rows(json::array({json::object(), {{"paddding", 2}}})), "data.rows[1].paddding");
  expect_refused("row padding longer than a row", with_rows(json::array({json::object(), {{"padding", 25}}})),
                 "data.rows[1].padding");
  // The shared documents sum to 20, not to 24 - 2.
  expect_refused("row documents that miss the row", with_rows(json::array({json::object(), {{"padding", 2}}})),
                 "data.rows[1].document_lengths");
  expect_refused("row vision runs that touch",
                 with_rows(json::array({json::object(), {{"vision_runs", {{2, 3}, {5, 2}}}}})), "data.rows[1].vision_runs[1]");
  expect_refused("row vision run in the padding",
                 with_rows(json::array({json::object(), {{"vision_runs", {{18, 4}}}}})), "data.rows[1].vision_runs");
}

// A row layout that repeats the shared one changes nothing; one that differs changes its row only, and that row is
// exactly what make_batch writes from the layout alone (documents, positions, targets, padding, vision groups).
TEST(BatchRows, EachRowIsLaidOutFromItsOwnLayout) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 60; ++trial) {
    SCOPED_TRACE(trial);
    const int64_t B = 1 + int64_t(rng() % 4), S = 8 + int64_t(rng() % 40);
    train::BatchSpec shared;
    shared.batch = B;
    shared.seq_len = S;
    shared.seed = rng();
    shared.layout.padding = int64_t(rng() % 5);
    shared.layout.document_lengths = {S - shared.layout.padding};
    auto plain = train::make_batch(shared);
    auto same = shared;
    same.rows.assign(size_t(B), train::row_layout(shared, 0));
    auto again = train::make_batch(same);
    EXPECT_TRUE(torch::equal(plain.input_ids, again.input_ids) && torch::equal(plain.labels, again.labels) &&
                torch::equal(plain.position_ids, again.position_ids) && torch::equal(plain.meta.padding, again.meta.padding));
    auto spec = shared;
    for (int64_t b = 0; b < B; ++b) {
      train::RowLayout row;
      row.padding = int64_t(rng() % size_t(S / 2));
      for (int64_t left = S - row.padding; left > 0;) {
        const int64_t d = std::min<int64_t>(left, 1 + int64_t(rng() % 9));
        row.document_lengths.push_back(d);
        left -= d;
      }
      if (rng() % 2) row.vision_runs.push_back({0, 1 + int64_t(rng() % size_t(S - row.padding))});
      spec.rows.push_back(row);
    }
    const auto batch = train::make_batch(spec);
    EXPECT_TRUE(torch::equal(batch.input_ids.ne(0) | batch.meta.padding, torch::ones_like(batch.meta.padding)));
    for (int64_t b = 0; b < B; ++b) {
      const auto& row = spec.rows[size_t(b)];
      int64_t t = 0, doc = 0;
      for (auto d : row.document_lengths) {
        ++doc;
        for (int64_t i = 0; i < d; ++i, ++t) {
          ASSERT_EQ(batch.meta.document_ids[b][t].item<int64_t>(), doc) << b << " " << t;
          ASSERT_EQ(batch.position_ids[b][t].item<int64_t>(), i) << b << " " << t;
          ASSERT_EQ(batch.labels[b][t].item<int64_t>() == -100, i == 0) << b << " " << t;
          ASSERT_FALSE(batch.meta.padding[b][t].item<bool>());
        }
      }
      for (; t < S; ++t) {
        ASSERT_TRUE(batch.meta.padding[b][t].item<bool>()) << b << " " << t;
        ASSERT_EQ(batch.labels[b][t].item<int64_t>(), -100);
        ASSERT_EQ(batch.input_ids[b][t].item<int64_t>(), 0);
      }
      for (int64_t i = 0; i < S; ++i) {
        const bool in_run = !row.vision_runs.empty() && i < row.vision_runs[0].length;
        const int64_t group = batch.meta.vision_group_ids.defined() ? batch.meta.vision_group_ids[b][i].item<int64_t>() : -1;
        ASSERT_EQ(group, in_run ? 0 : -1) << b << " " << i;
      }
    }
  }
}

// Each step rotates every row's documents by the step, as it rotates the shared layout's.
TEST(BatchRows, EveryRowsDocumentsRotateWithTheStep) {
  json j = good_case();
  j["data"]["batch"] = 2;
  j["data"]["rows"] = json::array({json::object(), {{"document_lengths", {5, 10, 7}}, {"padding", 2}}});
  const auto c = train::case_from_json(j, "v.json");
  const auto step1 = train::batch_for_step(c, 1);
  // Row 1 at step 1: documents [10, 7, 5]; row 0 (one document) unchanged.
  EXPECT_EQ(step1.meta.document_ids[1][9].item<int64_t>(), 1);
  EXPECT_EQ(step1.meta.document_ids[1][10].item<int64_t>(), 2);
  EXPECT_EQ(step1.meta.document_ids[1][17].item<int64_t>(), 3);
  EXPECT_EQ(step1.meta.document_ids[1][21].item<int64_t>(), 3);
  EXPECT_TRUE(step1.meta.padding[1][22].item<bool>());
  EXPECT_EQ(step1.meta.document_ids[0][19].item<int64_t>(), 1);
}

// block_size: one size, or {"q": n, "kv": m}; and the gradient bucket.
TEST(CaseValidation, BlockSizesMayDifferForQueriesAndKeys) {
  json j = good_case();
  j["block_size"] = {{"q", 8}, {"kv", 4}};
  j["gradient_bucket_elements"] = 1000;
  const auto c = train::case_from_json(j, "v.json");
  EXPECT_EQ(c.q_block, 8);
  EXPECT_EQ(c.kv_block, 4);
  EXPECT_EQ(c.gradient_bucket_elements, 1000);
  expect_refused("kv missing", [](json& k) { k["block_size"] = {{"q", 8}}; }, "block_size.kv");
  expect_refused("unknown block key", [](json& k) { k["block_size"] = {{"q", 8}, {"kv", 8}, {"k", 8}}; }, "block_size.k");
  expect_refused("zero q block", [](json& k) { k["block_size"] = {{"q", 0}, {"kv", 8}}; }, "block_size.q");
  expect_refused("a string", [](json& k) { k["block_size"] = "8"; }, "block_size");
  expect_refused("bucket 0", [](json& k) { k["gradient_bucket_elements"] = 0; }, "gradient_bucket_elements");
}

}  // namespace
}  // namespace cpharness
