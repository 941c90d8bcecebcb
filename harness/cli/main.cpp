#include "harness/cli/commands.h"

int main(int argc, char** argv) { return cpharness::cli::dispatch(std::vector<std::string>(argv + 1, argv + argc)); }
