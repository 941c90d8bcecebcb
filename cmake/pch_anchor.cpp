// Anchors the shared precompiled header (cmake/pch.h); holds no code.
