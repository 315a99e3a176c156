# ctest sfr_relocatable: an installed prefix works after being moved, with no LD_LIBRARY_PATH.
#  A. The installed prefix (libtorch outside it, at the path the build used) is copied; the
#     consumer project (tests/consumer) is built against the copy and installed into it with
#     an `$ORIGIN/../lib` RUNPATH; the copy is moved; the moved program must run, record the
#     SONAME, and load libsfr from the moved prefix.
#  B. The package is installed with SFR_LIBTORCH_DIR inside the prefix (the PyTorch
#     site-packages folder linked in as <prefix>/lib/site-packages, as a package that ships
#     libtorch would hold it): the RUNPATH must be `$ORIGIN/site-packages/torch/lib`, and after
#     the move libtorch must load from the moved prefix.
# -D: PREFIX, WORK, SOURCE_DIR, CARGO_TARGET_DIR, GENERATOR, MAKE, C_COMPILER, VERSION, LIBDIR,
#     REALNAME, SONAME, READELF.
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " cmd "${ARGN}")
    message(FATAL_ERROR "failed (${rc}): ${cmd}\n${out}\n${err}")
  endif()
  set(out "${out}" PARENT_SCOPE)
endfunction()

# Builds tests/consumer against the package in `prefix` and installs it there.
function(install_consumer prefix build)
  run("${CMAKE_COMMAND}" -S "${SOURCE_DIR}/tests/consumer" -B "${build}" -G "${GENERATOR}"
      "-DCMAKE_MAKE_PROGRAM=${MAKE}" "-DCMAKE_C_COMPILER=${C_COMPILER}" "-DCMAKE_PREFIX_PATH=${prefix}"
      "-DCMAKE_INSTALL_PREFIX=${prefix}" "-DCMAKE_INSTALL_LIBDIR=${LIBDIR}" "-DSFR_EXPECTED_VERSION=${VERSION}")
  run("${CMAKE_COMMAND}" --build "${build}")
  run("${CMAKE_COMMAND}" --install "${build}")
endfunction()

# Runs the moved program without LD_LIBRARY_PATH and checks where each library came from.
function(check_moved prefix what)
  set(exe "${prefix}/bin/sfr_consumer")
  run("${CMAKE_COMMAND}" -E env --unset=LD_LIBRARY_PATH "${exe}")
  message(STATUS "${what}: ${out}")
  run("${READELF}" -d "${exe}")
  if(NOT out MATCHES "\\(NEEDED\\)[^\n]*\\[${SONAME}\\]")
    message(FATAL_ERROR "${exe} does not record the SONAME ${SONAME}:\n${out}")
  endif()
  run("${CMAKE_COMMAND}" -E env --unset=LD_LIBRARY_PATH ldd "${exe}")
  if(out MATCHES "not found")
    message(FATAL_ERROR "ldd ${exe}: unresolved dependencies:\n${out}")
  endif()
  resolved("${out}" "${SONAME}" got)
  if(NOT got STREQUAL "${prefix}/${LIBDIR}/${SONAME}")
    message(FATAL_ERROR "${exe} does not load libsfr from the moved prefix ${prefix} but from ${got}:\n${out}")
  endif()
  set(ldd "${out}" PARENT_SCOPE)
endfunction()

# The path ldd resolved `name` to, with "bin/../lib" collapsed (symbolic links are kept).
function(resolved ldd name var)
  string(REPLACE "." "\\." re "${name}")
  if(NOT ldd MATCHES "${re} => ([^ \n]+)")
    message(FATAL_ERROR "ldd does not list ${name}:\n${ldd}")
  endif()
  get_filename_component(p "${CMAKE_MATCH_1}" ABSOLUTE)
  set(${var} "${p}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}")

# A.
run(cp -a "${PREFIX}" "${WORK}/a")
install_consumer("${WORK}/a" "${WORK}/consumer-a")
file(RENAME "${WORK}/a" "${WORK}/moved-a")
check_moved("${WORK}/moved-a" "A (libtorch outside the prefix)")
resolved("${ldd}" libtorch_cpu.so torch_cpu)
if(NOT torch_cpu MATCHES "^(.+)/torch/lib/libtorch_cpu\\.so$")
  message(FATAL_ERROR "A: libtorch_cpu.so not resolved from a torch/lib folder: ${torch_cpu}")
endif()
set(site_packages "${CMAKE_MATCH_1}")

# B.
set(b "${WORK}/b")
file(MAKE_DIRECTORY "${b}/${LIBDIR}")
run(ln -s "${site_packages}" "${b}/${LIBDIR}/site-packages")
run("${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${WORK}/package-b" -G "${GENERATOR}"
    "-DCMAKE_MAKE_PROGRAM=${MAKE}" "-DCMAKE_C_COMPILER=${C_COMPILER}" "-DCMAKE_INSTALL_PREFIX=${b}"
    "-DCMAKE_INSTALL_LIBDIR=${LIBDIR}" "-DSFR_CARGO_TARGET_DIR=${CARGO_TARGET_DIR}"
    "-DSFR_LIBTORCH_DIR=${b}/${LIBDIR}/site-packages/torch/lib")
# Install only: the library is already built in the shared cargo target folder.
run("${CMAKE_COMMAND}" --install "${WORK}/package-b")
run("${READELF}" -d "${b}/${LIBDIR}/${REALNAME}")
if(NOT out MATCHES "\\(RUNPATH\\)[^\n]*\\[\\$ORIGIN/site-packages/torch/lib\\]")
  message(FATAL_ERROR "B: the RUNPATH is not $ORIGIN/site-packages/torch/lib:\n${out}")
endif()
install_consumer("${b}" "${WORK}/consumer-b")
file(RENAME "${b}" "${WORK}/moved-b")
check_moved("${WORK}/moved-b" "B (libtorch inside the prefix)")
resolved("${ldd}" libtorch_cpu.so torch_cpu)
if(NOT torch_cpu STREQUAL "${WORK}/moved-b/${LIBDIR}/site-packages/torch/lib/libtorch_cpu.so")
  message(FATAL_ERROR "B: libtorch_cpu.so not loaded from the moved prefix but from ${torch_cpu}")
endif()
message(STATUS "both moved prefixes run without LD_LIBRARY_PATH")
file(REMOVE_RECURSE "${WORK}")
