// Moving a cp N run's per-rank records to rank 0 when the ranks are processes (mpi): each record is encoded to
// bytes (small fields as JSON, tensors through torch's pickle format) and broadcast from its rank in turn.
#pragma once
#include <vector>

#include "harness/cp/comm.h"
#include "harness/runner/case_runner.h"

namespace cpharness::runner {

std::vector<char> encode_rank_record(const CpRankRecord& record);
CpRankRecord decode_rank_record(const std::vector<char>& bytes);  // std::runtime_error when malformed

// Collective: every rank passes its record; rank 0 receives all of them in rank order, the others an empty list.
std::vector<CpRankRecord> gather_rank_records(cp::Comm& comm, const CpRankRecord& mine);

}  // namespace cpharness::runner
