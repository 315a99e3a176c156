# Runs at install time (install(CODE) in CMakeLists.txt sets SFR_REALNAME, SFR_LIBDIR,
# SFR_LIBTORCH_DIR, SFR_READELF): points the installed library's RUNPATH at the libtorch
# chosen by SFR_LIBTORCH_DIR. cargo linked it with RUNPATH `$ORIGIN:<libtorch of the build>`
# (build.rs); with SFR_LIBTORCH_DIR empty that is kept as is.
if(NOT SFR_LIBTORCH_DIR)
  return()
endif()
if(IS_ABSOLUTE "${SFR_LIBDIR}")
  set(libdir "${SFR_LIBDIR}")
else()
  set(libdir "${CMAKE_INSTALL_PREFIX}/${SFR_LIBDIR}")
endif()
set(lib "$ENV{DESTDIR}${libdir}/${SFR_REALNAME}")

# A relative SFR_LIBTORCH_DIR is relative to the install prefix.
set(torch "${SFR_LIBTORCH_DIR}")
if(NOT IS_ABSOLUTE "${torch}")
  set(torch "${CMAKE_INSTALL_PREFIX}/${torch}")
endif()
get_filename_component(torch "${torch}" ABSOLUTE)
get_filename_component(prefix "${CMAKE_INSTALL_PREFIX}" ABSOLUTE)
string(FIND "${torch}/" "${prefix}/" at)
if(at EQUAL 0)
  # Inside the prefix: relative to the library, so the prefix can move as a whole.
  file(RELATIVE_PATH rel "${libdir}" "${torch}")
  if(rel STREQUAL "")
    set(new "$ORIGIN")
  else()
    set(new "$ORIGIN/${rel}")
  endif()
  set(check "$ENV{DESTDIR}${torch}")
else()
  set(new "$ORIGIN:${torch}")
  set(check "${torch}")
endif()
if(NOT EXISTS "${check}/libtorch_cpu.so")
  message(WARNING "SFR_LIBTORCH_DIR=${SFR_LIBTORCH_DIR}: ${check} has no libtorch_cpu.so (yet); "
                  "the installed libsfr will look for libtorch 2.13.0 there")
endif()

if(NOT SFR_READELF)
  message(FATAL_ERROR "readelf (binutils) was not found: it is needed to rewrite the RUNPATH for SFR_LIBTORCH_DIR")
endif()
execute_process(COMMAND "${SFR_READELF}" -d "${lib}" OUTPUT_VARIABLE dyn RESULT_VARIABLE rc)
string(REGEX MATCH "\\((RUNPATH|RPATH)\\)[^\n]*\\[([^]\n]*)\\]" m "${dyn}")
if(NOT rc EQUAL 0 OR NOT m)
  message(FATAL_ERROR "cannot read the RUNPATH of ${lib} (readelf -d exit ${rc})")
endif()
set(old "${CMAKE_MATCH_2}")
string(LENGTH "${old}" old_len)
string(LENGTH "${new}" new_len)
# The RUNPATH is edited in place, so the new one cannot be longer than the one cargo wrote.
if(new_len GREATER old_len)
  message(FATAL_ERROR "SFR_LIBTORCH_DIR=${SFR_LIBTORCH_DIR}: the RUNPATH `${new}` (${new_len} characters) "
                      "does not fit in place of `${old}` (${old_len}). Build against that libtorch instead "
                      "(LIBTORCH=<its root> cargo build --release), put libtorch inside the install prefix, "
                      "or set the RUNPATH yourself: patchelf --set-rpath '${new}' ${lib}")
endif()
file(RPATH_CHANGE FILE "${lib}" OLD_RPATH "${old}" NEW_RPATH "${new}")
message(STATUS "RUNPATH of ${lib}: ${new}")
