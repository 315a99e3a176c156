# ctest sfr_header_fresh: include/sfr.h must be exactly what cbindgen makes from src/ffi/ now,
# and its version macros must equal Cargo.toml's version (-DVERSION).
if(NOT CBINDGEN)
  message(FATAL_ERROR "cbindgen was not found, so include/sfr.h cannot be checked: "
                      "install it with `cargo install cbindgen --locked` (scripts/setup.sh does)")
endif()
execute_process(
  COMMAND "${CBINDGEN}" --config cbindgen.toml --crate sfr --output "${OUT}"
  WORKING_DIRECTORY "${SOURCE_DIR}" RESULT_VARIABLE rc ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "cbindgen failed (${rc}):\n${err}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" -E compare_files "${SOURCE_DIR}/include/sfr.h" "${OUT}" RESULT_VARIABLE same)
if(NOT same EQUAL 0)
  execute_process(COMMAND diff -u "${SOURCE_DIR}/include/sfr.h" "${OUT}" OUTPUT_VARIABLE d)
  execute_process(COMMAND "${CBINDGEN}" --version OUTPUT_VARIABLE v OUTPUT_STRIP_TRAILING_WHITESPACE)
  message(FATAL_ERROR "include/sfr.h is stale (or ${v} is not the version scripts/setup.sh pins). "
                      "Regenerate it with\n"
                      "  cbindgen --config cbindgen.toml --crate sfr --output include/sfr.h\n${d}")
endif()
file(STRINGS "${SOURCE_DIR}/include/sfr.h" macros REGEX "^#define SFR_VERSION")
string(REPLACE "." ";" parts "${VERSION}")
list(GET parts 0 major)
list(GET parts 1 minor)
list(GET parts 2 patch)
foreach(want "#define SFR_VERSION_MAJOR ${major}" "#define SFR_VERSION_MINOR ${minor}"
             "#define SFR_VERSION_PATCH ${patch}" "#define SFR_VERSION \"${VERSION}\"")
  list(FIND macros "${want}" i)
  if(i LESS 0)
    message(FATAL_ERROR "include/sfr.h lacks `${want}` (Cargo.toml says ${VERSION}): "
                        "update after_includes in cbindgen.toml and regenerate the header")
  endif()
endforeach()
message(STATUS "include/sfr.h is fresh; version macros = ${VERSION}")
