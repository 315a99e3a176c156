# ctest sfr_pkgconfig: `pkg-config --cflags --libs sfr` gives the right folders
#  1. for the installed prefix: -I<prefix>/include, -L<prefix>/lib, an rpath, and a program
#     compiled with exactly those flags runs without LD_LIBRARY_PATH;
#  2. for a Debian-like package (CMAKE_INSTALL_PREFIX=/usr, libdir lib/x86_64-linux-gnu,
#     installed with DESTDIR): -I<root>/usr/include and -L<root>/usr/lib/x86_64-linux-gnu,
#     not /usr/lib/include or /usr/lib/lib/... (the pkgconfig folder is one level deeper), and
#     no rpath to the system folder.
# -D: PREFIX, LIBDIR, INCLUDEDIR, SOURCE_DIR, WORK, GENERATOR, MAKE, C_COMPILER, PKG_CONFIG,
#     VERSION, CARGO_TARGET_DIR.
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err
                  OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " cmd "${ARGN}")
    message(FATAL_ERROR "failed (${rc}): ${cmd}\n${out}\n${err}")
  endif()
  set(out "${out}" PARENT_SCOPE)
endfunction()

# Runs pkg-config on the sfr.pc in `pcdir` only, checks the folders, returns the flags.
function(check_flags pcdir want_include want_lib want_rpath)
  set(env "${CMAKE_COMMAND}" -E env "PKG_CONFIG_PATH=${pcdir}" "PKG_CONFIG_LIBDIR=${pcdir}"
      PKG_CONFIG_ALLOW_SYSTEM_CFLAGS=1 PKG_CONFIG_ALLOW_SYSTEM_LIBS=1)
  run(${env} "${PKG_CONFIG}" --modversion sfr)
  if(NOT out STREQUAL VERSION)
    message(FATAL_ERROR "pkg-config --modversion sfr: ${out}, expected ${VERSION}")
  endif()
  run(${env} "${PKG_CONFIG}" --cflags --libs sfr)
  message(STATUS "pkg-config --cflags --libs sfr (${pcdir}): ${out}")
  set(flags "${out}")
  separate_arguments(args UNIX_COMMAND "${flags}")
  set(inc "")
  set(lib "")
  set(rpath "")
  set(has_l OFF)
  foreach(a IN LISTS args)
    if(a MATCHES "^-I(.+)")
      get_filename_component(inc "${CMAKE_MATCH_1}" REALPATH)
    elseif(a MATCHES "^-L(.+)")
      get_filename_component(lib "${CMAKE_MATCH_1}" REALPATH)
    elseif(a MATCHES "^-Wl,-rpath,(.+)")
      get_filename_component(rpath "${CMAKE_MATCH_1}" REALPATH)
    elseif(a STREQUAL "-lsfr")
      set(has_l ON)
    endif()
  endforeach()
  get_filename_component(want_include "${want_include}" REALPATH)
  get_filename_component(want_lib "${want_lib}" REALPATH)
  if(NOT inc STREQUAL want_include OR NOT EXISTS "${inc}/sfr.h")
    message(FATAL_ERROR "-I${inc}: expected ${want_include} (with sfr.h)")
  endif()
  if(NOT lib STREQUAL want_lib OR NOT has_l)
    message(FATAL_ERROR "-L${lib} -lsfr: expected -L${want_lib} -lsfr")
  endif()
  if(want_rpath AND NOT rpath STREQUAL want_lib)
    message(FATAL_ERROR "expected -Wl,-rpath,${want_lib}, got '${rpath}'")
  elseif(NOT want_rpath AND rpath)
    message(FATAL_ERROR "no rpath expected for a system libdir, got -Wl,-rpath,${rpath}")
  endif()
  set(flags "${flags}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}")

# 1.
check_flags("${PREFIX}/${LIBDIR}/pkgconfig" "${PREFIX}/${INCLUDEDIR}" "${PREFIX}/${LIBDIR}" ON)
separate_arguments(args UNIX_COMMAND "${flags}")
run("${C_COMPILER}" "${SOURCE_DIR}/tests/consumer/main.c" -o "${WORK}/pc_consumer"
    "-DSFR_PACKAGE_VERSION=\"${VERSION}\"" ${args})
run("${CMAKE_COMMAND}" -E env --unset=LD_LIBRARY_PATH "${WORK}/pc_consumer")
message(STATUS "program built with pkg-config's flags: ${out}")

# 2.
set(multiarch "lib/x86_64-linux-gnu")
run("${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${WORK}/usr-build" -G "${GENERATOR}"
    "-DCMAKE_MAKE_PROGRAM=${MAKE}" "-DCMAKE_C_COMPILER=${C_COMPILER}" -DCMAKE_INSTALL_PREFIX=/usr
    "-DCMAKE_INSTALL_LIBDIR=${multiarch}" "-DSFR_CARGO_TARGET_DIR=${CARGO_TARGET_DIR}")
run("${CMAKE_COMMAND}" -E env "DESTDIR=${WORK}/root" "${CMAKE_COMMAND}" --install "${WORK}/usr-build"
    --component Development)
set(root "${WORK}/root/usr")
check_flags("${root}/${multiarch}/pkgconfig" "${root}/include" "${root}/${multiarch}" OFF)
file(REMOVE_RECURSE "${WORK}")
