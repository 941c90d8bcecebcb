// Running the C++ model on a golden exported from Hugging Face transformers (report/hf_golden.h) at cp 1 (the
// plain model, eager attention) or cp N (ring attention over local ranks), from the golden's own weights and
// batch. Judging is check/hf_parity.h's job.
#pragma once
#include "harness/report/hf_golden.h"

namespace cpharness::runner {

using report::HfGolden;
using report::HfRun;
using report::load_hf_golden;

// Loads the golden's weights into a fresh model (fp32) and runs forward + backward at `cp` (1: eager, whole
// sequence; > 1: ring attention, ranks as threads). `holder` passes the KV-share holder (cache-gated only).
// `semantics` overrides the golden's (e.g. to run the correct, sharing reference against a buggy export).
HfRun run_on_hf_golden(const HfGolden& golden, int cp, bool holder);
// `drop_boundary_label` (cp > 1): the power check's perturbation, the label of cp::boundary_label_target() dropped.
// `dtype` kFloat64: the run in fp64 from the same weights (hf.parity's fp64 runs, check/hf_parity.h); logits and
// gradients are then fp64.
HfRun run_on_hf_golden(const HfGolden& golden, int cp, bool holder, model::KvShareSemantics semantics,
                       bool drop_boundary_label = false, torch::ScalarType dtype = torch::kFloat32);

}  // namespace cpharness::runner
