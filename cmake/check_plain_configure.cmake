# ctest sfr_plain_configure: a user's `cmake -S . -B build && cmake --build build &&
# cmake --install build` needs none of the test tools: the tests are off by default and
# valgrind is not even looked for; the install has every file. With -DBUILD_TESTING=ON and no
# valgrind, configure still works and the one test that needs valgrind fails saying so.
# -D: SOURCE_DIR, WORK, GENERATOR, MAKE, C_COMPILER, CARGO_TARGET_DIR, LIBDIR, REALNAME, SONAME,
#     CTEST.
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " cmd "${ARGN}")
    message(FATAL_ERROR "failed (${rc}): ${cmd}\n${out}\n${err}")
  endif()
  set(out "${out}${err}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE "${WORK}")
set(common -G "${GENERATOR}" "-DCMAKE_MAKE_PROGRAM=${MAKE}" "-DCMAKE_C_COMPILER=${C_COMPILER}"
    "-DSFR_CARGO_TARGET_DIR=${CARGO_TARGET_DIR}")
run("${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${WORK}/build" ${common} "-DCMAKE_INSTALL_PREFIX=${WORK}/prefix")
file(STRINGS "${WORK}/build/CMakeCache.txt" cache)
list(FILTER cache INCLUDE REGEX "^(BUILD_TESTING|SFR_VALGRIND):")
if(NOT cache STREQUAL "BUILD_TESTING:BOOL=OFF")
  message(FATAL_ERROR "a plain configure should leave the tests off and not look for valgrind: ${cache}")
endif()
if(EXISTS "${WORK}/build/CTestTestfile.cmake")
  message(FATAL_ERROR "a plain configure defined tests")
endif()
run("${CMAKE_COMMAND}" --build "${WORK}/build")
run("${CMAKE_COMMAND}" --install "${WORK}/build")
foreach(f "${LIBDIR}/${REALNAME}" "${LIBDIR}/${SONAME}" "${LIBDIR}/libsfr.so" include/sfr.h
          "${LIBDIR}/cmake/SFR/SFRConfig.cmake" "${LIBDIR}/cmake/SFR/SFRConfigVersion.cmake"
          "${LIBDIR}/pkgconfig/sfr.pc")
  if(NOT EXISTS "${WORK}/prefix/${f}")
    message(FATAL_ERROR "the plain install lacks ${f}")
  endif()
endforeach()
message(STATUS "plain configure, build and install: OK")

# Tests on, valgrind missing (a path that does not exist stands for "not found").
run("${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${WORK}/build-tests" ${common} -DBUILD_TESTING=ON
    -DSFR_VALGRIND=/nonexistent/valgrind)
if(NOT out MATCHES "valgrind was not found")
  message(FATAL_ERROR "configure without valgrind did not warn:\n${out}")
endif()
execute_process(COMMAND "${CTEST}" -R "^sfr_c_api$" --output-on-failure
                WORKING_DIRECTORY "${WORK}/build-tests" RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0 OR NOT out MATCHES "needs valgrind")
  message(FATAL_ERROR "without valgrind, sfr_c_api should fail saying it needs valgrind (exit ${rc}):\n${out}${err}")
endif()
message(STATUS "tests on without valgrind: configure OK, sfr_c_api fails saying it needs valgrind")
file(REMOVE_RECURSE "${WORK}")
