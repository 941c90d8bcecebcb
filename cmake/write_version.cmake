# cmake -DSOURCE_DIR=... -DOUTPUT=... -P write_version.cmake: writes OUTPUT from version.cpp.in with the git sha
# of SOURCE_DIR's HEAD. configure_file leaves OUTPUT untouched when the text is unchanged, so an unchanged commit
# recompiles nothing.
execute_process(COMMAND git rev-parse --short=12 HEAD WORKING_DIRECTORY "${SOURCE_DIR}"
                OUTPUT_VARIABLE CPHARNESS_GIT_SHA OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
if(CPHARNESS_GIT_SHA)
  # Tracked files that differ from HEAD: a report or golden from this build is not reproducible from the sha alone.
  execute_process(COMMAND git diff --quiet HEAD -- WORKING_DIRECTORY "${SOURCE_DIR}" RESULT_VARIABLE dirty
                  OUTPUT_QUIET ERROR_QUIET)
  if(dirty EQUAL 1)
    string(APPEND CPHARNESS_GIT_SHA "-dirty")
  endif()
else()
  set(CPHARNESS_GIT_SHA "unknown")
endif()
configure_file("${SOURCE_DIR}/cmake/version.cpp.in" "${OUTPUT}" @ONLY)
