// A damaged HDF5 file can crash the HDF5 library itself (a flipped byte in a global heap or a link table: memcpy past
// the end, free() of a wild pointer), and no check of ours runs before the library decodes those structures. So a
// file is first read by a forked child, with the very read this process is about to make: the child starts from a
// copy of this process's state, so the library takes the same steps on the same bytes there. A child that dies of a
// signal, or does not finish, makes the file an input error naming it, and this process never decodes it.
#pragma once

#include <functional>
#include <string>

namespace cpharness::io {

// Runs `read` (a read of `path` and nothing else: no output, no other state) in a child process, then returns, so
// that the caller makes the read itself. Throws InputError(path, "", reason) when the child died of a signal or did
// not end within a limit that grows with the file's size. An exception inside the child is ignored (the caller's own
// read throws it again). Returns at once when no child can be had (no memory for one): the read goes on unprobed.
void read_in_a_child_first(const std::string& path, const std::function<void()>& read);

}  // namespace cpharness::io
